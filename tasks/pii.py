"""Stage 2: scrub personal data and secrets from every message with Presidio, offline."""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import json
import logging
import re
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import phonenumbers
import spacy
from presidio_analyzer import (
    AnalysisExplanation,
    AnalyzerEngine,
    EntityRecognizer,
    Pattern,
    PatternRecognizer,
    RecognizerRegistry,
    RecognizerResult,
)
from presidio_analyzer.nlp_engine import NlpArtifacts, SpacyNlpEngine
from presidio_analyzer.predefined_recognizers import (
    CreditCardRecognizer,
    EmailRecognizer,
    IbanRecognizer,
    IpRecognizer,
    PhoneRecognizer,
    SpacyRecognizer,
    UsSsnRecognizer,
)
from presidio_anonymizer import AnonymizerEngine
from presidio_anonymizer.entities import OperatorConfig
from spacy.attrs import LEMMA, LOWER
from spacy.language import Language

from data_contracts.config import PiiConfig
from data_contracts.manifest import Manifest
from data_contracts.records import ChatSample
from tasks.io import Quarantined, is_stage_dir, iter_input, read_records
from tasks.parallel import done, pool_or_here, worker_count
from tasks.stage_dir import StageDir, StageWriter, write_atomic

logger = logging.getLogger(__name__)

SAMPLE_NAME = "redactions_sample.jsonl"
CHUNK = 512  # records analysed together; bounds memory, keeps spaCy batches full

PLACEHOLDERS = {
    "EMAIL_ADDRESS": "<EMAIL>", "PHONE_NUMBER": "<PHONE>", "CREDIT_CARD": "<CREDIT_CARD>",
    "US_SSN": "<SSN>", "IBAN_CODE": "<IBAN>", "IP_ADDRESS": "<IP>",
    "URL_CREDENTIALS": "<URL_CREDENTIALS>", "SECRET": "<SECRET>", "PERSON": "<PERSON>",
    "LOCATION": "<LOCATION>",
}
NER_ENTITIES = ("PERSON", "LOCATION")
NER_FACTORIES = {"ner", "beam_ner", "entity_ruler", "span_ruler"}

# Secret formats Presidio does not know. Each keyword/prefix also feeds the pre-screen, so the
# screen can never reject a text one of these patterns would match.
SECRET_KEYWORDS = r"(?:api[_-]?key|apikey|secret|token|passwd|password|pwd|access[_-]?key)"
SECRET_PREFIXES = ["akia", "asia", "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_",
                   "glpat-", "xox", "eyj", "-----begin", "bearer"]
_ASSIGN = rf"(?<={SECRET_KEYWORDS}(?:[_.-][\w.-]*)?[\"']?\s*[:=]\s*)"
SECRET_PATTERNS = [
    Pattern("aws_access_key_id", r"(?-i:\b(?:AKIA|ASIA)[0-9A-Z]{16}\b)", 0.9),
    Pattern("github_token", r"\bgh[pousr]_[A-Za-z0-9]{36,}\b", 0.9),
    Pattern("github_pat", r"\bgithub_pat_[A-Za-z0-9_]{22,}", 0.9),
    Pattern("gitlab_pat", r"\bglpat-[A-Za-z0-9_-]{20,}", 0.9),
    Pattern("slack_token", r"\bxox[baprs]-[A-Za-z0-9-]{10,}", 0.9),
    Pattern("jwt", r"\beyJ[\w-]{8,}\.eyJ[\w-]{8,}\.[\w-]{8,}", 0.9),
    Pattern("private_key_block",
            r"-----BEGIN[A-Z0-9 ]*PRIVATE KEY-----.*?(?:-----END[A-Z0-9 ]*PRIVATE KEY-----|\Z)",
            1.0),
    Pattern("bearer_token", r"(?<=\bbearer\s+)[A-Za-z0-9._~+/=-]{20,}", 0.8),
    # `password = "hunter22"`: a quoted value after a secret-named key.
    Pattern("quoted_assignment", _ASSIGN + r"([\"'])[^\"'\s]{6,}\1", 0.7),
    # Unquoted: needs letters and digits (or 20+ chars) so `token: required` stays prose.
    Pattern("bare_assignment",
            _ASSIGN + r"(?:(?=[^\s\"',;]*\d)(?=[^\s\"',;]*[a-z])[^\s\"',;<]{6,}|[^\s\"',;<]{20,})",
            0.7),
]
URL_CREDENTIALS_PATTERN = Pattern(
    "userinfo_in_url", r"(?<=\b[a-z][a-z0-9+.-]*://)[^\s:@/]+:[^\s@/]+@[^\s/?#\"'<>]+", 0.95
)

# Minimum digits each numeric recogniser needs to match anything (from its patterns).
MIN_DIGITS = {"CREDIT_CARD": 13, "US_SSN": 9}
# Digits joined by up to 4 non-word characters ('x' and U+30FC are phonenumbers separators too).
_DIGIT_RUN = re.compile(r"\d(?:[\W_xX\u30fc]{0,4}\d)*")
# Lowercase literals only: ASCII texts are lowercased before the screen (see PreScreen).
SCREENS = {
    "EMAIL_ADDRESS": r"@",
    "IBAN_CODE": r"[a-z]{2}[0-9]{2}",
    "IP_ADDRESS": r"\d\.\d|:[0-9a-f]{0,4}:",  # IPv4 has d.d; every IPv6 form has two colons
    "URL_CREDENTIALS": r"://\S*@",
    "SECRET": "|".join([SECRET_KEYWORDS] + [re.escape(p) for p in SECRET_PREFIXES]),
}


@Language.component("ftflow_lower_lemma")
def _lower_lemma(doc):  # type: ignore[no-untyped-def]
    """Lowercase lemmas, so Presidio's context words ('ssn', 'phone') work without a model."""
    doc.from_array([LEMMA], doc.to_array([LOWER]).reshape(-1, 1))  # vectorised: no token loop
    return doc


def longest_digit_run(text: str) -> int:
    """Most digits in one stretch where digits are at most 4 separator characters apart.

    A superset of how phonenumbers' matcher, the credit-card and the SSN patterns group digits,
    so a text whose longest run is shorter than an entity's minimum cannot hold that entity.
    """
    return max((sum(ch.isdigit() for ch in m.group()) for m in _DIGIT_RUN.finditer(text)),
               default=0)


# Presidio's pattern plus Mastercard's 2221-2720 range (issued since 2017), which it lacks.
CREDIT_CARD_PATTERN = Pattern(
    "All Credit Cards (weak)",
    r"\b(?!1\d{12}(?!\d))((4\d{3})|(5[0-5]\d{2})|(2[2-7]\d{2})|(6\d{3})|(1\d{3})|(3\d{3}))"
    r"[- ]?(\d{3,4})[- ]?(\d{3,4})[- ]?(\d{3,5})\b", 0.3)


class _IpRecognizer(IpRecognizer):
    """Presidio's IP recogniser without the unspecified and loopback addresses (0.0.0.0:8080,
    127.0.0.1, ::1): bind addresses in configs and logs that point at no one."""

    def invalidate_result(self, pattern_text: str) -> bool:
        if super().invalidate_result(pattern_text):
            return True
        ip = ipaddress.ip_interface(pattern_text).ip
        return ip.is_unspecified or ip.is_loopback


class _ShortCandidateSkippingMatcher(phonenumbers.PhoneNumberMatcher):
    """phonenumbers' matcher that rejects a candidate too short to be a number, before parsing.

    Most candidates in real text are dates, versions and counts of 1-5 digits; the stock matcher
    parses and validates each of them (and their inner groups) once per region, the bulk of the
    phone recogniser's time. A valid number in the matcher's region has at least `min_chars`
    digits (`phone_min_digits`), and letters count too (phonenumbers reads 3+ letters as a vanity
    number, 'x' -> 9), so skipping shorter candidates changes no match. The two overridden
    hooks are private to phonenumbers: if a release renames them the stock code simply runs.
    """

    def __init__(self, text: str, region: str, leniency: int, min_chars: int) -> None:
        super().__init__(text, region, leniency=leniency)
        self.min_chars = min_chars

    def _too_short(self, candidate: str) -> bool:
        return sum(map(str.isalnum, candidate)) < self.min_chars

    def _extract_match(self, candidate, offset):  # type: ignore[no-untyped-def]
        # Inner matches are substrings of `candidate`: none can be long enough either.
        return None if self._too_short(candidate) else super()._extract_match(candidate, offset)

    def _parse_and_verify(self, candidate, offset):  # type: ignore[no-untyped-def]
        if self._too_short(candidate):
            return None
        return super()._parse_and_verify(candidate, offset)


class _PhoneRecognizer(PhoneRecognizer):
    """Presidio's phone recogniser, skipping regions whose shortest number cannot fit the text
    and candidates too short to be a number (`_ShortCandidateSkippingMatcher`), and dropping
    digit strings that read as something else (`_not_a_phone`).

    Two changes to what counts as a phone: a number written in a phone's shape with separators
    (`PHONE_SHAPE`: (555) 123-4567, 555.123.4567, +1-555-123-4567, +44 20 7946 0958) is one
    whether or not phonenumbers knows its area code as assigned; and a bare run of digits
    (4155550123) is one only next to a phone word (`_PHONE_CONTEXT`: call, tel, phone, ...),
    otherwise it is a count, an order number or an id."""

    def __init__(self, regions: tuple[str, ...]) -> None:
        super().__init__(supported_regions=regions, leniency=1)
        self.min_digits = {r: phone_min_digits(r) for r in regions}

    def analyze(self, text: str, entities: list[str],
                nlp_artifacts: NlpArtifacts | None = None) -> list[RecognizerResult]:
        run = longest_digit_run(text)
        results = []
        for region in self.supported_regions:
            if run < self.min_digits[region]:
                continue
            for match in _ShortCandidateSkippingMatcher(text, region, self.leniency,
                                                        self.min_digits[region]):
                if _not_a_phone(text, match.start, match.raw_string, match.end):
                    continue
                if match.raw_string.strip("() ").isdigit() and not _phone_context(
                        text, match.start, match.end):
                    continue
                results.append(self._get_recognizer_result(match, text, region, nlp_artifacts))
        results = EntityRecognizer.remove_duplicates(results)
        if run >= 8:  # the shortest PHONE_SHAPE has 8 digits
            for m in PHONE_SHAPE.finditer(text):
                digits = sum(ch.isdigit() for ch in m.group())
                if not 8 <= digits <= 15 or _not_a_phone(text, m.start(), m.group(), m.end()):
                    continue
                overlap = [r for r in results if m.start() < r.end and r.start < m.end()]
                if overlap:  # phonenumbers found part of it ("(555) 123-4567" of "+1 (555)...")
                    for r in overlap:
                        r.start, r.end = min(r.start, m.start()), max(r.end, m.end())
                    continue
                results.append(RecognizerResult(
                    self.supported_entities[0], m.start(), m.end(), SHAPE_SCORE,
                    analysis_explanation=AnalysisExplanation(
                        recognizer=self.name, original_score=SHAPE_SCORE,
                        pattern_name="phone_shape", pattern=PHONE_SHAPE.pattern),
                    recognition_metadata={RecognizerResult.RECOGNIZER_NAME_KEY: self.name,
                                          RecognizerResult.RECOGNIZER_IDENTIFIER_KEY: self.id}))
        return results


# Phone-shaped numbers, valid or not: NANP 3-3-4 with one separator used throughout (or the
# area code in parentheses), optionally +1/1 first; or "+<country code>" and 2-6 groups.
PHONE_SHAPE = re.compile(r"""
    (?<![\w+.\-/])(?:
        (?:\+?1[ .-]?)?\(\d{3}\)[ ]?\d{3}[ .-]\d{4}
      | (?:\+?1(?P<s0>[ .-]))?\d{3}(?P<s1>[ .-])\d{3}(?P=s1)\d{4}
      | \+\d{1,3}(?:[ .-]?\(\d{1,5}\)|[ .-]\d{1,5}){2,6}
    )(?![\w\-]|[.,/:]\d)""", re.X)
SHAPE_SCORE = 0.6
# Words that make a bare digit run a phone number: "call 4155550123", "tel: 02079460958".
_PHONE_CONTEXT = re.compile(
    r"\b(?:call(?:ed|ing|s)?|phone|tel|telephone|mobile|cell(?:phone)?|fax|sms|text(?:ed)?|"
    r"whats ?app|dial|ring|reach(?: me)?|contact|hotline|my (?:number|no\.?)|number is)\b",
    re.IGNORECASE)


def _phone_context(text: str, start: int, end: int) -> bool:
    """A phone word within a few words before the digits, or right after them."""
    return bool(_PHONE_CONTEXT.search(text[max(0, start - 40):start])
                or _PHONE_CONTEXT.search(text[end:end + 20]))


# A number right after one of these labels is a reference, not a phone ("order number 41555...").
_REFERENCE_LABEL = re.compile(
    r"\b(?:order|invoice|ticket|tracking|case|ref|reference|serial|sku|transaction|"
    r"confirmation|build|issue|pr|po|purchase order)\s*(?:number|no\.?|num|id|#)?\s*[:#]?\s*$", re.IGNORECASE)


def _not_a_phone(text: str, start: int, raw: str, end: int) -> bool:
    """Digit strings phonenumbers accepts somewhere but that read as something else."""
    groups = re.findall(r"\d+", raw)
    if sum(len(g) == 1 for g in groups) > 2:  # a digit list: '1 2 3 4 5 6 7 8 9 10'
        return True
    if "+" not in raw and sum(map(len, groups)) < 6:
        return True  # a short code or a port ('port 16904'): no one's personal number
    if re.fullmatch(r"[0-9A-Za-z]-", text[max(0, start - 2):start]) or re.fullmatch(
            r"-[0-9A-Za-z]", text[end:end + 2]):
        return True  # a piece of a hyphenated identifier: UUIDs, 'INC-1698058'
    if "+" not in raw and re.fullmatch(r"[\d.]+", raw) and any(len(g) == 1 for g in groups[1:]):
        return True  # a dotted version: '16.8.67.6153' (dotted phones use 2-4 digit groups)
    if re.fullmatch(r"1\d{9}", raw.strip("()")):
        return True  # a bare Unix timestamp (2001-2033); no NANP number starts with 1
    if re.fullmatch(r"\d{1,2}([-./])\d{1,2}\1(?:19|20)\d\d|(?:19|20)\d\d([-./])\d{1,2}\2\d{1,2}",
                    raw):
        return True  # a date: '12.12.2016', '07-04-2022', '2024/10/15'
    if start >= 2 and text[start - 1] in ":." and text[start - 2].isdigit():
        return True  # the tail of a time, address or port: '20:46:16.414', '0.0.0.0:1685'
    return bool(_REFERENCE_LABEL.search(text[max(0, start - 40):start]))


def national_phone_digits(region: str, calling_code: int = 0) -> int:
    """Fewest digits of a valid national number in `region` (phonenumbers metadata)."""
    md = phonenumbers.PhoneMetadata.metadata_for_region_or_calling_code(calling_code, region)
    return min((n for n in (md.general_desc.possible_length if md else ()) if n > 0), default=1)


@functools.cache
def phone_min_digits(region: str) -> int:
    """Fewest digits of any number valid when read with `region` as the default region.

    A national number may be valid for any region sharing the calling code (US -> CA's
    7-digit numbers); a "+<code>" or IDD-prefixed one for any calling code at all.
    """
    code = phonenumbers.country_code_for_region(region)
    shared = phonenumbers.COUNTRY_CODE_TO_REGION_CODE.get(code, (region,))
    return min(min_intl_phone_digits(), *(national_phone_digits(r) for r in shared))


@functools.cache
def min_intl_phone_digits() -> int:
    """Fewest digits of any valid "+<country code>" number, over every country code."""
    return min(len(str(cc)) + national_phone_digits(region, cc)
               for cc, regions in phonenumbers.COUNTRY_CODE_TO_REGION_CODE.items()
               for region in regions)


def digit_run_pattern(digits: int) -> str:
    """A regex for `digits` digits at most 4 separators apart (`longest_digit_run` >= digits)."""
    return rf"\d(?:[\W_xX\u30fc]{{0,4}}\d){{{max(digits - 1, 0)}}}"


@dataclass(frozen=True)
class _Regexes:
    """One compiled form of the screen: per entity type, and all of them in one pattern."""

    tests: tuple[tuple[str, re.Pattern[str]], ...]
    any_test: re.Pattern[str] | None

    @classmethod
    def compile(cls, regexes: dict[str, str], flags: int) -> "_Regexes":
        joined = "|".join(f"(?:{r})" for r in regexes.values())
        return cls(tuple((e, re.compile(r, flags)) for e, r in regexes.items()),
                   re.compile(joined, flags) if joined else None)


@dataclass(frozen=True)
class PreScreen:
    """Which active entity types a text could hold, decided by one regex per type.

    Each regex is a necessary condition of its recognisers (a keyword, an '@', enough digits in
    a row), so a type it rules out would have matched nothing: the analyzer runs only the
    recognisers a text needs, and never sees a text that needs none. `always` are the types
    with no cheap test (a spaCy NER model): with one configured, every text is analysed.

    The regexes match case-insensitively, as the recognisers do. An ASCII text is lowercased
    and searched case-sensitively instead (`lowered`, the same result for ASCII text and
    lowercase patterns, ~2.5x faster); any other text goes through `folded` (re.IGNORECASE,
    whose Unicode folds, e.g. the Kelvin sign for 'k', lowercasing would not reproduce).
    """

    folded: _Regexes
    lowered: _Regexes | None  # None when a pattern is not ASCII
    always: tuple[str, ...] = ()

    def _view(self, text: str) -> tuple[str, _Regexes]:
        if self.lowered is not None and text.isascii():
            return text.lower(), self.lowered
        return text, self.folded

    def __call__(self, text: str) -> bool:
        """True when the text could hold any active entity."""
        if self.always:
            return True
        text, regexes = self._view(text)
        return bool(regexes.any_test and regexes.any_test.search(text))

    def entities(self, text: str) -> tuple[str, ...]:
        """The active entity types this text could hold (empty: skip the analyzer)."""
        if not self(text):
            return ()
        text, regexes = self._view(text)
        return (*self.always, *(entity for entity, test in regexes.tests if test.search(text)))


def build_screen(entities: set[str], regions: tuple[str, ...], deny_list: tuple[str, ...],
                 ner: bool) -> PreScreen:
    """The pre-screen for these active entity types (see `PreScreen`)."""
    always = tuple(e for e in NER_ENTITIES if ner and e in entities)
    digits = {e: MIN_DIGITS[e] for e in entities if e in MIN_DIGITS}
    if "PHONE_NUMBER" in entities:
        digits["PHONE_NUMBER"] = min(phone_min_digits(r) for r in regions)
    regexes = {e: SCREENS[e] for e in entities if e in SCREENS}
    regexes |= {e: digit_run_pattern(n) for e, n in digits.items()}
    if deny_list and "PERSON" in entities and "PERSON" not in always:
        regexes["PERSON"] = "|".join(re.escape(w.lower()) for w in deny_list)
    ordered = {e: regexes[e] for e in PLACEHOLDERS if e in regexes}
    ascii_only = all(r.isascii() for r in ordered.values())
    return PreScreen(_Regexes.compile(ordered, re.IGNORECASE),
                     _Regexes.compile(ordered, 0) if ascii_only else None, always)


@dataclass(frozen=True)
class PiiEngine:
    """One analyzer + anonymizer, the active entity types and the pre-screen derived from them."""

    analyzer: AnalyzerEngine
    anonymizer: AnonymizerEngine
    entities: tuple[str, ...]
    screen: PreScreen


def _load_nlp(model: str) -> tuple[Language, bool]:
    """The spaCy pipeline for tokens (and NER when `model` names one); fails loud if missing."""
    if not model:
        nlp = spacy.blank("en")
    else:
        if not (spacy.util.is_package(model) or Path(model).exists()):
            raise ValueError(f"pii.spacy_model '{model}' is neither an installed spaCy package "
                             "nor a pipeline folder; clear it to run without PERSON/LOCATION")
        nlp = spacy.load(model)
        if not any(nlp.get_pipe_meta(n).factory in NER_FACTORIES for n in nlp.pipe_names):
            raise ValueError(f"pii.spacy_model '{model}' has no NER component "
                             f"(pipes: {nlp.pipe_names})")
    if "lemmatizer" not in nlp.pipe_names:
        nlp.add_pipe("ftflow_lower_lemma")
    return nlp, bool(model)


def _recognizers(entities: set[str], deny_list: tuple[str, ...],
                 regions: tuple[str, ...], ner: bool) -> list[EntityRecognizer]:
    builders: dict[str, Callable[[], EntityRecognizer]] = {
        "EMAIL_ADDRESS": EmailRecognizer,
        "PHONE_NUMBER": lambda: _PhoneRecognizer(regions),
        "CREDIT_CARD": lambda: CreditCardRecognizer(patterns=[CREDIT_CARD_PATTERN]),
        "US_SSN": UsSsnRecognizer,
        "IBAN_CODE": IbanRecognizer,
        "IP_ADDRESS": _IpRecognizer,
        "URL_CREDENTIALS": lambda: PatternRecognizer(
            "URL_CREDENTIALS", name="UrlCredentialsRecognizer",
            patterns=[URL_CREDENTIALS_PATTERN]),
        "SECRET": lambda: PatternRecognizer(
            "SECRET", name="SecretRecognizer", patterns=SECRET_PATTERNS),
    }
    out = [build() for name, build in builders.items() if name in entities]
    if ner:
        out.append(SpacyRecognizer(supported_entities=[e for e in NER_ENTITIES if e in entities]))
    if deny_list and "PERSON" in entities:
        out.append(PatternRecognizer("PERSON", name="PersonDenyList", deny_list=list(deny_list)))
    return out


@functools.lru_cache(maxsize=4)
def _engine(entities: tuple[str, ...], spacy_model: str, deny_list: tuple[str, ...],
            regions: tuple[str, ...]) -> PiiEngine:
    unknown = [r for r in regions if r not in phonenumbers.SUPPORTED_REGIONS]
    if unknown:
        raise ValueError(f"pii.phone_regions: unknown region codes {unknown}")
    nlp, ner = _load_nlp(spacy_model)
    wanted = set(entities)
    active = wanted - set(NER_ENTITIES)
    if ner:
        active |= wanted & set(NER_ENTITIES)
    if deny_list and "PERSON" in wanted:
        active.add("PERSON")
    nlp_engine = SpacyNlpEngine(models=[{"lang_code": "en", "model_name": spacy_model or "blank"}])
    nlp_engine.nlp = {"en": nlp}  # preloaded: Presidio would otherwise try to download a model
    registry = RecognizerRegistry(_recognizers(active, deny_list, regions, ner))
    analyzer = AnalyzerEngine(registry=registry, nlp_engine=nlp_engine)
    order = [e for e in PLACEHOLDERS if e in active]
    inactive = sorted(wanted - active)
    logger.info("pii: active entity types: %s%s", ", ".join(order),
                f" (inactive, need pii.spacy_model or deny_list_persons: {', '.join(inactive)})"
                if inactive else "")
    return PiiEngine(analyzer, AnonymizerEngine(), tuple(order),
                     build_screen(active, regions, deny_list, ner))


def get_engine(cfg: PiiConfig) -> PiiEngine:
    """The (cached) engine for this config."""
    return _engine(tuple(cfg.entities), cfg.spacy_model, tuple(cfg.deny_list_persons),
                   tuple(cfg.phone_regions))


def _luhn_fake(n: int) -> str:
    body = f"400000000000{n % 1000:03d}"
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch) * (2 if i % 2 == 0 else 1)
        total += d - 9 if d > 9 else d
    digits = body + str((10 - total % 10) % 10)
    return " ".join(digits[i:i + 4] for i in range(0, 16, 4))


def fake_value(entity: str, value: str, n: int) -> str:
    """The n-th pseudonym of an entity type: shaped like the real thing, never a real one."""
    fakes: dict[str, Callable[[], str]] = {
        "EMAIL_ADDRESS": lambda: f"user{n}@example.com",
        "PHONE_NUMBER": lambda: f"+1-555-01{n % 100:02d}",  # 555-0100..0199 are fictional
        "CREDIT_CARD": lambda: _luhn_fake(n),
        "US_SSN": lambda: f"900-00-{n % 10000:04d}",  # group 00 is never issued
        "IBAN_CODE": lambda: f"XX00 TEST 0000 {n % 10000:04d}",
        "IP_ADDRESS": lambda: f"2001:db8::{n:x}" if ":" in value else f"192.0.2.{n % 256}",
        "URL_CREDENTIALS": lambda: f"user{n}:password{n}@host{n}.example.com",
    }
    return fakes.get(entity, lambda: f"<{entity.split('_')[0]}_{n}>")()


def mask(entity: str, value: str) -> str:
    """A view of a redacted value safe to show in a report: never the full value."""
    if entity == "EMAIL_ADDRESS" and "@" in value:
        local, domain = value.rsplit("@", 1)
        tld = domain.rsplit(".", 1)[-1] if "." in domain else ""
        return f"{local[:1]}***@{domain[:1]}***.{tld}"
    if entity in ("PHONE_NUMBER", "CREDIT_CARD", "US_SSN", "IBAN_CODE", "IP_ADDRESS"):
        return "***" + value[-2:]
    if entity in NER_ENTITIES:
        return value[:1] + "***"
    return f"*** ({len(value)} chars)"


def _norm_key(entity: str, value: str) -> str:
    if entity in ("PHONE_NUMBER", "CREDIT_CARD", "US_SSN", "IBAN_CODE"):
        return re.sub(r"[^0-9A-Za-z]", "", value).upper()
    return " ".join(value.lower().split())


@dataclass
class _Redactor:
    """Replaces the values of one record; the value->fake map lives only in memory."""

    mode: str
    fakes: dict[tuple[str, str], str] = field(default_factory=dict)
    per_type: Counter[str] = field(default_factory=Counter)
    events: list[tuple[str, str, str]] = field(default_factory=list)  # entity, value, new

    def replace(self, entity: str, value: str) -> str:
        if self.mode == "placeholder":
            new = PLACEHOLDERS.get(entity, f"<{entity}>")
        else:
            key = (entity, _norm_key(entity, value))
            if key not in self.fakes:
                self.per_type[entity] += 1
                self.fakes[key] = fake_value(entity, value, self.per_type[entity])
            new = self.fakes[key]
        self.events.append((entity, value, new))
        return new

    def operators(self, entities: Iterable[str]) -> dict[str, OperatorConfig]:
        return {e: OperatorConfig("custom", {"lambda": functools.partial(self.replace, e)})
                for e in entities}


@dataclass
class _Stats:
    entities: Counter[str] = field(default_factory=Counter)
    records_with_pii: int = 0
    texts_screened_out: int = 0
    texts_analyzed: int = 0
    sample: list[dict[str, str]] = field(default_factory=list)


# One analyzer result, as it travels back from a worker: entity type, start, end, score.
Finding = tuple[str, int, int, float]
# A text to analyse and the entity types the pre-screen left possible for it.
Job = tuple[str, tuple[str, ...]]


def analyze_jobs(engine: PiiEngine, cfg: PiiConfig, jobs: list[Job]) -> list[list[Finding]]:
    """Analyzer results per text, spaCy run over the batch at once (as BatchAnalyzerEngine
    does), each text asking only for the entity types its pre-screen left possible."""
    docs = engine.analyzer.nlp_engine.process_batch(
        [text for text, _ in jobs], language="en", batch_size=cfg.batch_size)
    out = []
    for (text, entities), (_, nlp_artifacts) in zip(jobs, docs, strict=True):
        found = engine.analyzer.analyze(text, language="en", entities=list(entities),
                                        score_threshold=cfg.score_threshold,
                                        nlp_artifacts=nlp_artifacts)
        out.append([(r.entity_type, r.start, r.end, r.score) for r in found])
    return out


_worker_cfg: PiiConfig | None = None


def _init_worker(cfg: PiiConfig) -> None:
    """Pool initializer: a forked worker inherits the parent's built engine from the cache."""
    global _worker_cfg
    _worker_cfg = cfg
    get_engine(cfg)


def _analyze_in_worker(jobs: list[Job]) -> list[list[Finding]]:
    assert _worker_cfg is not None, "worker started without _init_worker"
    return analyze_jobs(get_engine(_worker_cfg), _worker_cfg, jobs)


def _analysis(engine: PiiEngine, cfg: PiiConfig
              ) -> contextlib.AbstractContextManager[tuple[Submit, int]]:
    """How chunks get analysed: in this process (results at once), or in a pool of worker
    processes with up to `window` chunks in flight."""
    return pool_or_here(worker_count(cfg.workers), functools.partial(analyze_jobs, engine, cfg),
                        _analyze_in_worker, _init_worker, (cfg,))


Submit = Callable[[list[Job]], "Future[list[list[Finding]]]"]


@dataclass
class _Pending:
    """A chunk whose screened texts are being analysed."""

    split: str
    records: list[ChatSample]
    texts: list[str]
    analysed: list[int]  # indexes into `texts` sent to the analyzer
    findings: Future[list[list[Finding]]]


def _submit(split: str, chunk: list[ChatSample], engine: PiiEngine, submit: Submit,
            stats: _Stats) -> _Pending:
    """Screen a chunk's texts and send those that could hold an entity to the analyzer."""
    texts = [t for rec in chunk for t in rec.texts()]
    jobs, analysed = [], []
    for i, text in enumerate(texts):
        entities = engine.screen.entities(text)
        if entities:
            jobs.append((text, entities))
            analysed.append(i)
    stats.texts_screened_out += len(texts) - len(jobs)
    stats.texts_analyzed += len(jobs)
    return _Pending(split, chunk, texts, analysed, submit(jobs) if jobs else done([]))


def _redact(pending: _Pending, engine: PiiEngine, cfg: PiiConfig,
            stats: _Stats) -> Iterator[ChatSample]:
    """The chunk's records with every finding replaced (the anonymizer only sees texts with
    findings); counts and the masked sample go into `stats`."""
    found: list[list[Finding]] = [[] for _ in pending.texts]
    for i, res in zip(pending.analysed, pending.findings.result(), strict=True):
        found[i] = res
    results = iter(found)
    for rec in pending.records:
        redactor = _Redactor(cfg.mode)
        operators = redactor.operators(engine.entities)
        new_texts = []
        for text in rec.texts():
            hits = [RecognizerResult(*hit) for hit in next(results)]
            new_texts.append(engine.anonymizer.anonymize(text, hits, operators).text
                             if hits else text)
        if not redactor.events:
            yield rec
            continue
        counts = Counter(entity for entity, _, _ in redactor.events)
        stats.entities.update(counts)
        stats.records_with_pii += 1
        for entity, value, new in redactor.events:
            if len(stats.sample) < cfg.sample_size:
                stats.sample.append({"id": rec.id, "entity": entity, "replacement": new,
                                     "masked": mask(entity, value)})
        out = rec.with_texts(new_texts)
        yield out.model_copy(update={"meta": {**rec.meta, "pii": dict(sorted(counts.items()))}})


def _scrubbed(chunks: Iterable[tuple[str, list[ChatSample]]], engine: PiiEngine,
              cfg: PiiConfig, stats: _Stats) -> Iterator[tuple[str, ChatSample]]:
    """(split, record) for every record, in input order, whichever way chunks are analysed:
    the output and the ledger are the same for any `pii.workers`."""
    with _analysis(engine, cfg) as (submit, window):
        pending: deque[_Pending] = deque()
        for split, chunk in chunks:
            pending.append(_submit(split, chunk, engine, submit, stats))
            while len(pending) > window:
                done = pending.popleft()
                yield from ((done.split, rec) for rec in _redact(done, engine, cfg, stats))
        while pending:
            done = pending.popleft()
            yield from ((done.split, rec) for rec in _redact(done, engine, cfg, stats))


def _chunks(items: Iterable[ChatSample | Quarantined],
            writer: StageWriter) -> Iterator[list[ChatSample]]:
    """Group records for batch analysis; quarantined inputs go straight to the writer."""
    chunk: list[ChatSample] = []
    for item in items:
        if isinstance(item, Quarantined):
            writer.quarantine(item)
            continue
        chunk.append(item)
        if len(chunk) >= CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _heldout(input_path: str | Path | list[str]) -> Iterator[ChatSample]:
    if not isinstance(input_path, list) and is_stage_dir(input_path):
        yield from read_records(input_path, "heldout")


def run_pii(input_path: str | Path, out_dir: str | Path, cfg: PiiConfig, *,
            home: str | Path) -> Manifest:
    """Redact PII and secrets in every message (train and held-out), keeping every record."""
    stage = StageDir(out_dir, "pii", cfg.digest(), input_path)
    if (done := stage.finished()) is not None:
        return done
    engine = get_engine(cfg)
    writer = stage.writer()
    stats = _Stats()
    chunks = ((split, chunk)
              for split, items in (("train", iter_input(input_path)),
                                   ("heldout", _heldout(input_path)))
              for chunk in _chunks(items, writer))
    records_in = 0
    for split, rec in _scrubbed(chunks, engine, cfg, stats):
        writer.keep(rec, split=split)
        records_in += 1
    records_in += writer.manifest.quarantined
    sample_path = Path(out_dir) / SAMPLE_NAME
    write_atomic(sample_path, "".join(json.dumps(row) + "\n" for row in stats.sample))
    metrics = {f"pii.{e}": float(n) for e, n in sorted(stats.entities.items())}
    metrics.update({"pii.records_with_pii": float(stats.records_with_pii),
                    "pii.texts_screened_out": float(stats.texts_screened_out),
                    "pii.texts_analyzed": float(stats.texts_analyzed)})
    logger.info("pii: %d records, %d with PII, %d/%d texts skipped by the pre-screen",
                records_in, stats.records_with_pii, stats.texts_screened_out,
                stats.texts_screened_out + stats.texts_analyzed)
    return writer.finish(records_in, metrics=metrics, outputs=[sample_path],
                         info={"entities": list(engine.entities), "mode": cfg.mode,
                               "redactions_sample": str(sample_path)})
