"""PII stage benchmark: recall per planted type, look-alike false positives, throughput.

    .venv/bin/python benchmarks/bench_pii.py [--records 6000] [--naive-records 1500] [--repeats 3]
    .venv/bin/python benchmarks/bench_pii.py --records 100000 --naive-records 5000  # issue size

Seeded support-chat records: ~22% carry planted PII/secrets (every type the stage covers), the
rest are clean, a part of them full of look-alikes (versions, dates, ISBNs, UUIDs, hashes...).
Recall = share of planted values absent from the output (phones: the national number's digits,
cards: all digits must not survive in the record's digit stream). Throughput compares, on the
same file: a bare read-parse-write pass (the ceiling), `run_pii`, and a naive loop calling
`AnalyzerEngine.analyze` + `AnonymizerEngine.anonymize` per message with the same recognizers.
Prints a markdown report.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import platform
import random
import re
import statistics
import string
import sys
import tempfile
import time
from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS", "")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import phonenumbers  # noqa: E402
from presidio_anonymizer.entities import OperatorConfig  # noqa: E402

from data_contracts.config import PiiConfig  # noqa: E402
from tasks.io import iter_input, read_records  # noqa: E402
from tasks.stage_dir import StageWriter  # noqa: E402
from common import bare_pass  # noqa: E402  (benchmarks/common.py)
from tasks.pii import PLACEHOLDERS, get_engine, run_pii  # noqa: E402

FIRST = "james mary robert patricia john jennifer michael linda david elena wei priya omar".split()
LAST = "smith garcia nguyen mueller rossi kowalski tanaka okafor dubois silva patel cohen".split()
DOMAINS = ["gmail.com", "yahoo.co.uk", "acme-corp.com", "mail.example.org", "outlook.de",
           "proton.me", "uni-heidelberg.de", "company.co.in"]
PRODUCTS = ["the mobile app", "the dashboard", "my subscription", "the router", "the invoice",
            "the export", "the API", "my account", "the printer", "the billing page"]

# --------------------------------------------------------------------------- planted values


def _luhn_complete(body: str) -> str:
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch) * (2 if i % 2 == 0 else 1)
        total += d - 9 if d > 9 else d
    return body + str((10 - total % 10) % 10)


def card(rng: random.Random) -> tuple[str, str]:
    brand, prefix, length = rng.choice([
        ("visa", "4", 16), ("mastercard", str(rng.randint(51, 55)), 16),
        ("mastercard2", str(rng.randint(2221, 2720)), 16), ("amex", rng.choice(["34", "37"]), 15),
        ("discover", "6011", 16), ("jcb", "35" + str(rng.randint(28, 89)), 16),
        ("diners", "36", 14)])
    body = prefix + "".join(rng.choice(string.digits) for _ in range(length - len(prefix) - 1))
    digits = _luhn_complete(body)
    sep = rng.choice([" ", "-", ""])
    if length == 15:
        groups = [digits[:4], digits[4:10], digits[10:]]
    elif length == 14:
        groups = [digits[:4], digits[4:10], digits[10:]]
    else:
        groups = [digits[i:i + 4] for i in range(0, 16, 4)]
    return sep.join(groups), brand


def ssn(rng: random.Random) -> tuple[str, str]:
    while True:
        area = rng.randint(1, 899)
        if area == 666:
            continue
        group, serial = rng.randint(1, 99), rng.randint(1, 9999)
        s = f"{area:03d}{group:02d}{serial:04d}"
        if s not in ("078051120", "123456789", "219099999") and len(set(s)) > 1:
            break
    sep = rng.choice(["-", "-", " ", "."])
    return f"{s[:3]}{sep}{s[3:5]}{sep}{s[5:]}", "sep" + sep.strip()


IBAN_FORMATS = {  # country: BBAN made of (kind, length) chunks; n=digits, a=upper, c=alnum
    "DE": [("n", 18)], "GB": [("a", 4), ("n", 14)], "FR": [("n", 10), ("c", 11), ("n", 2)],
    "ES": [("n", 20)], "IT": [("a", 1), ("n", 10), ("c", 12)], "NL": [("a", 4), ("n", 10)],
    "CH": [("n", 5), ("c", 12)], "BE": [("n", 12)], "PL": [("n", 24)], "AT": [("n", 16)],
}


def iban(rng: random.Random) -> tuple[str, str]:
    country = rng.choice(sorted(IBAN_FORMATS))
    alphabet = {"n": string.digits, "a": string.ascii_uppercase,
                "c": string.digits + string.ascii_uppercase}
    bban = "".join(rng.choice(alphabet[k]) for k, n in IBAN_FORMATS[country] for _ in range(n))
    numeric = "".join(str(int(ch, 36)) for ch in bban + country + "00")
    check = 98 - int(numeric) % 97
    value = f"{country}{check:02d}{bban}"
    if rng.random() < 0.5:
        value = " ".join(value[i:i + 4] for i in range(0, len(value), 4))
    return value, country


PHONE_REGIONS = ["US", "GB", "DE", "FR", "IN", "BR", "AU", "JP", "ES", "IT", "MX", "NL"]


# "+<country code>" numbers written in groups, digits random: valid or not, they are phones.
INTL_SHAPES = {"44": [(2, 4, 4), (4, 6)], "49": [(2, 4, 4), (3, 7)], "33": [(1, 2, 2, 2, 2)],
               "972": [(2, 3, 4)], "91": [(5, 5)], "61": [(1, 4, 4)], "55": [(2, 5, 4)],
               "34": [(3, 3, 3)], "39": [(3, 3, 4)], "81": [(2, 4, 4)]}


def shaped_phone(rng: random.Random) -> tuple[str, str, str]:
    """(formatted, digits, kind): a phone-shaped number with separators whose digits are
    random, so its area code is often unassigned (phonenumbers calls it invalid)."""
    digits = lambda n: "".join(rng.choice(string.digits) for _ in range(n))  # noqa: E731
    if rng.random() < 0.6:
        a, b, c = str(rng.randint(200, 999)), digits(3), digits(4)
        sep = rng.choice("-. ")
        fmt = rng.choice([f"+1-{a}-{b}-{c}", f"{a}.{b}.{c}", f"({a}) {b}-{c}", f"1-{a}-{b}-{c}",
                          f"{a}{sep}{b}{sep}{c}", f"+1 ({a}) {b}-{c}", f"+1 {a} {b} {c}"])
        return fmt, a + b + c, "any-area-US"
    cc = rng.choice(sorted(INTL_SHAPES))
    groups = [digits(n) for n in rng.choice(INTL_SHAPES[cc])]
    sep = rng.choice(" -.") if len(groups) > 2 else rng.choice(" -")
    return f"+{cc} " + sep.join(groups), "".join(groups), "any-area-intl"


def phone(rng: random.Random) -> tuple[str, str, str]:
    """(formatted, national-number digits, kind): valid per phonenumbers' metadata, or (a
    third) phone-shaped with random digits (`shaped_phone`)."""
    if rng.random() < 0.33:
        return shaped_phone(rng)
    region = rng.choice(PHONE_REGIONS[:1] * 5 + PHONE_REGIONS)
    while True:
        ex = phonenumbers.example_number_for_type(region, rng.choice(
            [phonenumbers.PhoneNumberType.FIXED_LINE, phonenumbers.PhoneNumberType.MOBILE]))
        nsn = str(ex.national_number)
        keep = rng.randint(2, 4)  # vary the tail, keep the leading (area/mobile) digits
        nsn = nsn[:keep] + "".join(rng.choice(string.digits) for _ in nsn[keep:])
        num = phonenumbers.parse("+" + str(ex.country_code) + nsn)
        if phonenumbers.is_valid_number(num):
            break
    if region == "US":
        a, b, c = nsn[:3], nsn[3:6], nsn[6:]
        fmt = rng.choice([f"({a}) {b}-{c}", f"{a}-{b}-{c}", f"{a}.{b}.{c}", f"{a} {b} {c}",
                          f"+1 {a}-{b}-{c}", f"1-{a}-{b}-{c}", f"+1{a}{b}{c}", f"+1 ({a}) {b}-{c}"])
        return fmt, nsn, "US"
    styles = [phonenumbers.PhoneNumberFormat.INTERNATIONAL, phonenumbers.PhoneNumberFormat.E164]
    if region in PiiConfig().phone_regions:  # national formats only where configured
        styles.append(phonenumbers.PhoneNumberFormat.NATIONAL)
    style = rng.choice(styles)
    kind = "national" if style == phonenumbers.PhoneNumberFormat.NATIONAL else "intl"
    return phonenumbers.format_number(num, style), nsn, kind


def ipv4(rng: random.Random) -> tuple[str, str]:
    first = rng.choice([10, 172, 192, rng.choice([n for n in range(11, 224) if n != 127])])
    return f"{first}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}", "v4"


def ipv6(rng: random.Random) -> tuple[str, str]:
    groups = [rng.randint(0, 0xFFFF) for _ in range(8)]
    if rng.random() < 0.5:
        groups[rng.randint(2, 5):7] = [0] * 3 if rng.random() < 0.7 else [0] * 2
        groups = (groups + [1] * 8)[:8]
        addr = ipaddress.IPv6Address(":".join(f"{g:x}" for g in groups))
        return addr.compressed, "v6-compressed"
    groups[0] = rng.choice([0x2001, 0x2a02, 0xfe80, 0x2600])
    return ":".join(f"{g:04x}" for g in groups), "v6-full"


def _tok(rng: random.Random, n: int, alphabet: str = string.ascii_letters + string.digits) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def url_creds(rng: random.Random) -> tuple[str, str, str]:
    """(sentence fragment, the secret part that must vanish, kind)."""
    scheme = rng.choice(["https", "postgres", "postgresql", "mysql", "mongodb+srv", "redis",
                         "ftp", "amqp"])
    user = rng.choice(FIRST) + rng.choice(["", "_admin", ".svc", "42"])
    pw = _tok(rng, rng.randint(8, 16), string.ascii_letters + string.digits + "!$%^*_")
    host = rng.choice(["db.internal", "10.0.3.7", "cluster0.ab1cd.mongodb.net", "git.acme.io",
                       "files.example.org"])
    port = rng.choice(["", ":5432", ":6379", ":21"])
    path = rng.choice(["/app", "/repo.git", "", "/prod?sslmode=require"])
    return f"{scheme}://{user}:{pw}@{host}{port}{path}", f"{user}:{pw}", scheme


def secret(rng: random.Random) -> tuple[str, str, str]:
    """(sentence with the secret, the secret value, kind): every SECRET pattern."""
    kind = rng.choice(["aws_access_key_id", "github_token", "github_pat", "gitlab_pat",
                       "slack_token", "jwt", "private_key_block", "bearer_token",
                       "quoted_assignment", "bare_assignment"])
    up = string.ascii_uppercase + string.digits
    b64 = string.ascii_letters + string.digits + "-_"
    if kind == "aws_access_key_id":
        v = rng.choice(["AKIA", "ASIA"]) + _tok(rng, 16, up)
        s = rng.choice(["my access key id is {v}, is that right?", "AWS_ACCESS_KEY_ID={v}",
                        "I set the key {v} in the console"])
    elif kind == "github_token":
        v = rng.choice(["ghp_", "gho_", "ghs_"]) + _tok(rng, 36)
        s = rng.choice(["I used the token {v} to push", "export GH_TOKEN={v}"])
    elif kind == "github_pat":
        v = "github_pat_" + _tok(rng, 22) + "_" + _tok(rng, 59)
        s = "the fine-grained PAT {v} stopped working"
    elif kind == "gitlab_pat":
        v = "glpat-" + _tok(rng, 20, b64)
        s = rng.choice(["CI uses {v} for the registry", "git clone with {v} fails"])
    elif kind == "slack_token":
        v = f"xox{rng.choice('bpa')}-{_tok(rng, 12, string.digits)}-{_tok(rng, 24)}"
        s = "our bot token {v} gets invalid_auth"
    elif kind == "jwt":
        v = "eyJ" + _tok(rng, 30, b64) + ".eyJ" + _tok(rng, 60, b64) + "." + _tok(rng, 43, b64)
        s = rng.choice(["the session cookie is {v} and it expired", "decode this: {v}"])
    elif kind == "private_key_block":
        body = "\n".join(_tok(rng, 64, string.ascii_letters + string.digits + "+/")
                         for _ in range(rng.randint(3, 6)))
        label = rng.choice(["RSA PRIVATE KEY", "OPENSSH PRIVATE KEY", "PRIVATE KEY",
                            "EC PRIVATE KEY"])
        v = f"-----BEGIN {label}-----\n{body}\n-----END {label}-----"
        s = "here is the key file:\n{v}\nwhy does ssh reject it?"
    elif kind == "bearer_token":
        v = _tok(rng, rng.randint(24, 48), b64 + ".")
        s = rng.choice(["curl -H 'Authorization: Bearer {v}' fails", "I send bearer {v} too"])
    elif kind == "quoted_assignment":
        v = _tok(rng, rng.randint(8, 24), string.ascii_letters + string.digits + "!@#-")
        key = rng.choice(["api_key", "password", "client_secret", "DB_PASSWORD", "apiKey",
                          "access_key", "auth_token"])
        s = rng.choice([key + ' = "{v}"', key + ": '{v}'", '"' + key + '": "{v}"'])
    else:
        v = _tok(rng, rng.randint(6, 10), string.ascii_lowercase) + str(rng.randint(10, 9999))
        key = rng.choice(["password", "pwd", "passwd", "token", "secret", "api-key"])
        s = rng.choice([key + "={v}", key + ": {v}", "my " + key + " is " + key + "={v}"])
    return s.format(v=v), v, kind


# --------------------------------------------------------------------------- sentences

TEMPLATES = {
    "EMAIL_ADDRESS": ["Please send the receipt to {v} instead.", "My login email is {v}.",
                      "Can you cc {v} on this ticket?", "I never got the reset mail at {v}"],
    "PHONE_NUMBER": ["You can call me back on {v} after 5pm.", "My number is {v}",
                     "Text me at {v} when the technician is on the way.",
                     "The account phone is {v}, please update it."],
    "CREDIT_CARD": ["I was charged twice on my card {v}.", "Please refund to {v}",
                    "Card number {v} was declined at checkout.", "use {v} exp 09/27 for it"],
    "US_SSN": ["For the tax form my SSN is {v}.", "social security number: {v}",
               "The payroll team has {v} on file as my SSN", "my ssn {v}, is it correct?"],
    "IBAN_CODE": ["Please wire the refund to {v}.", "My IBAN is {v}",
                  "The transfer to IBAN {v} bounced.", "update payout account to {v} please"],
    "IP_ADDRESS": ["The server at {v} stopped responding.", "I'm connecting from {v}",
                   "Whitelist {v} in the firewall please.", "ping {v} times out since Monday"],
    "URL_CREDENTIALS": ["My connection string is {v} and it times out.", "git clone {v} fails",
                        "DATABASE_URL={v}", "we point the worker at {v} but get auth errors"],
    "SECRET": ["{v}", "Hi, {v}", "Quick question: {v}"],
}
CLEAN = [
    "How do I reset my password?", "The app crashes when I open {p}.",
    "Thanks, that fixed it!", "Can I change the plan for {p} next month?",
    "It has been {n} days and my order still has not shipped.",
    "Why is {p} so slow since the last update?", "I'd like to cancel {p}, please.",
    "The export only has {n} rows instead of all of them.", "Is there a dark mode for {p}?",
    "Your help center article about {p} is out of date.", "I can't log in on my phone.",
    "Where can I download last month's invoice?", "The discount code didn't apply.",
    "We have {n} users on the team plan; can we add more?", "Great, thank you so much!",
]
ANSWERS = [
    "Thanks for reaching out! I'm sorry about the trouble with {p}.",
    "I've escalated this to our billing team; you'll hear back within {n} hours.",
    "Could you try clearing the cache and signing in again?",
    "Done: your request has been processed.", "Happy to help. Anything else?",
    "I checked and {p} looks fine on our side now.",
]


def lookalike(rng: random.Random) -> str:
    """A clean message full of things that look like numbers, codes or identifiers."""
    isbn12 = "978" + "".join(rng.choice(string.digits) for _ in range(9))
    check = (10 - sum(int(d) * (1 if i % 2 == 0 else 3) for i, d in enumerate(isbn12)) % 10) % 10
    isbn = f"{isbn12[:3]}-{isbn12[3]}-{isbn12[4:7]}-{isbn12[7:12]}-{check}"
    uuid = "-".join(_tok(rng, n, "0123456789abcdef") for n in (8, 4, 4, 4, 12))
    sha = _tok(rng, 40, "0123456789abcdef")
    y, mo, d = rng.randint(2015, 2026), rng.randint(1, 12), rng.randint(1, 28)
    hh, mm, ss = rng.randint(0, 23), rng.randint(0, 59), rng.randint(0, 59)
    parts = {
        "version": f"v{rng.randint(0, 9)}.{rng.randint(0, 30)}.{rng.randint(0, 20)}",
        "version4": f"{rng.randint(1, 20)}.{rng.randint(0, 9)}.{rng.randint(0, 99)}"
                    f".{rng.randint(1000, 9999)}",  # 4 parts <= 255 would be an IPv4
        "date": rng.choice([f"{y}-{mo:02d}-{d:02d}", f"{mo:02d}/{d:02d}/{y}", f"{d}.{mo}.{y}"]),
        "isbn": f"ISBN {isbn}",
        "uuid": uuid, "sha": rng.choice([sha, sha[:7], sha[:12]]),
        "order": rng.choice([f"order #{rng.randint(10000, 99999999)}",
                             f"order number {rng.randint(10**9, 10**10 - 1)}",
                             f"ticket INC-{rng.randint(100000, 9999999)}",
                             f"tracking 1Z{_tok(rng, 16, string.digits + 'ABCDEF')}"]),
        "port": rng.choice([f"localhost:{rng.randint(1024, 65535)}",
                            f"port {rng.randint(1, 65535)}", f"0.0.0.0:{rng.randint(80, 9000)}"]),
        "ts": rng.choice([f"{y}-{mo:02d}-{d:02d}T{hh:02d}:{mm:02d}:{ss:02d}Z",
                          f"{y}-{mo:02d}-{d:02d} {hh:02d}:{mm:02d}:{ss:02d}.{rng.randint(0, 999)}",
                          str(rng.randint(1_500_000_000, 1_800_000_000)),
                          f"{hh:02d}:{mm:02d}:{ss:02d}"]),
        "price": rng.choice([f"${rng.randint(1, 9999):,}.{rng.randint(0, 99):02d}",
                             f"€{rng.randint(1, 999)},{rng.randint(0, 99):02d}",
                             f"{rng.randint(1, 99999):,} USD"]),
    }
    # Digit runs that phones' shapes must not swallow: parameter and token counts, bare order
    # numbers, long versions, compact dates (no phone word near them).
    big = rng.randint(10**9, 10**10 - 1)
    parts |= {
        "params": rng.choice([f"{rng.choice([7, 13, 34, 70, 405])}000000000 parameters",
                              f"a {big}-parameter model", f"{big} tokens", f"{big} rows",
                              f"{rng.randint(10**8, 10**11):,} parameters"]),
        "order2": rng.choice([f"order {big}", f"PO {rng.randint(100, 999)}-"
                              f"{rng.randint(1000, 9999)}-{rng.randint(1000, 9999)}",
                              f"invoice INV-{y}-{rng.randint(1, 999999):06d}",
                              f"account {rng.randint(10**7, 10**8 - 1)}"]),
        "version2": rng.choice([f"v{rng.randint(1, 20)}.{rng.randint(0, 200)}."
                                f"{rng.randint(1000, 9999)}",
                                f"{y}.{mo:02d}.{rng.randint(100, 999)}"]),
        "date2": rng.choice([f"{y}.{mo:02d}.{d:02d}", f"{y}{mo:02d}{d:02d}",
                             f"{d:02d}-{mo:02d}-{y}", f"{y}/{mo:02d}/{d:02d}"]),
    }
    picks = rng.sample(sorted(parts), 3)
    frames = [
        "After upgrading to {a} on {b}, the build fails; see {c}.",
        "Log says {a} at {b} then {c} and nothing else.",
        "Invoice for {a} lists {b}, reference {c}.",
        "Can you check {a}? It happened again with {b} ({c}).",
    ]
    return rng.choice(frames).format(a=parts[picks[0]], b=parts[picks[1]], c=parts[picks[2]])


def _fill(rng: random.Random, text: str) -> str:
    return text.format(p=rng.choice(PRODUCTS), n=rng.randint(2, 30))


def make_records(n: int, pii_share: float, lookalike_share: float, seed: int):
    """Records (jsonl dicts) and the planted values: {id: [(type, subtype, check-string)]}."""
    rng = random.Random(seed)
    types = list(TEMPLATES)
    records, planted, lookalikes = [], {}, set()
    for i in range(n):
        rid = f"r{i:06d}"
        user = _fill(rng, rng.choice(CLEAN))
        roll = rng.random()
        if roll < pii_share:
            plants, sentences = [], []
            for _ in range(1 if rng.random() < 0.8 else 2):
                typ = types[(i + len(plants)) % len(types)]  # round-robin: even coverage
                check_values: list[tuple[str, str]]
                if typ == "EMAIL_ADDRESS":
                    local = rng.choice(FIRST) + rng.choice([".", "_", "", "+"]) + rng.choice(LAST)
                    v = local + (str(rng.randint(1, 99)) if rng.random() < 0.3 else "")
                    v += "@" + rng.choice(DOMAINS)
                    v = v if rng.random() < 0.8 else v.title()
                    frag, sub, check_values = v, "email", [(v, "raw")]
                elif typ == "PHONE_NUMBER":
                    frag, nsn, sub = phone(rng)
                    check_values = [(nsn, "digits")]
                elif typ == "CREDIT_CARD":
                    frag, sub = card(rng)
                    check_values = [(re.sub(r"\D", "", frag), "digits")]
                elif typ == "US_SSN":
                    frag, sub = ssn(rng)
                    check_values = [(re.sub(r"\D", "", frag), "digits")]
                elif typ == "IBAN_CODE":
                    frag, sub = iban(rng)
                    check_values = [(frag.replace(" ", ""), "alnum")]
                elif typ == "IP_ADDRESS":
                    frag, sub = ipv4(rng) if rng.random() < 0.5 else ipv6(rng)
                    check_values = [(frag, "raw")]
                elif typ == "URL_CREDENTIALS":
                    frag, creds, sub = url_creds(rng)
                    check_values = [(creds.split(":", 1)[1], "raw")]
                else:
                    frag, v, sub = secret(rng)
                    check_values = [(v, "raw")]
                sentences.append(rng.choice(TEMPLATES[typ]).format(v=frag))
                plants += [(typ, sub, cv, how) for cv, how in check_values]
            user = " ".join([user] + sentences) if rng.random() < 0.5 else " ".join(sentences)
            planted[rid] = plants
        elif roll < pii_share + lookalike_share:
            user = lookalike(rng)
            lookalikes.add(rid)
        msgs = [{"role": "user", "content": user},
                {"role": "assistant", "content": _fill(rng, rng.choice(ANSWERS))}]
        if rng.random() < 0.3:
            msgs += [{"role": "user", "content": _fill(rng, rng.choice(CLEAN))},
                     {"role": "assistant", "content": _fill(rng, rng.choice(ANSWERS))}]
        records.append({"id": rid, "messages": msgs})
    return records, planted, lookalikes


# --------------------------------------------------------------------------- measurement


def survives(value: str, how: str, text: str) -> bool:
    if how == "digits":
        return value in re.sub(r"\D", "", text)
    if how == "alnum":
        return value.upper() in re.sub(r"[^0-9A-Za-z]", "", text).upper()
    return value in text


def naive_pass(src: Path, out: Path, cfg: PiiConfig, limit: int) -> int:
    """Per message: AnalyzerEngine.analyze then AnonymizerEngine.anonymize, same recognizers."""
    engine = get_engine(cfg)
    ops = {e: OperatorConfig("replace", {"new_value": PLACEHOLDERS[e]}) for e in engine.entities}
    writer = StageWriter(out, "naive")
    n = 0
    for rec in iter_input(str(src)):
        if n >= limit:
            break
        new = []
        for text in rec.texts():
            found = engine.analyzer.analyze(text, language="en", entities=list(engine.entities),
                                            score_threshold=cfg.score_threshold)
            new.append(engine.anonymizer.anonymize(text, found, ops).text)
        writer.keep(rec.with_texts(new))
        n += 1
    writer.finish(n, input_digests={}, config_digest="naive")
    return n


def _timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=6000)
    ap.add_argument("--naive-records", type=int, default=1500,
                    help="records timed for the naive loop (a prefix of the same file)")
    ap.add_argument("--pii-share", type=float, default=0.22)
    ap.add_argument("--lookalike-share", type=float, default=0.05)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--workers", type=int, default=0,
                    help="pii.workers for run_pii (0: one per CPU, as the stage's default)")
    ap.add_argument("--show-misses", type=int, default=0)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-pii-"))
    records, planted, lookalikes = make_records(args.records, args.pii_share,
                                                args.lookalike_share, args.seed)
    src = work / "chats.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    small = work / "chats-prefix.jsonl"
    small.write_text("".join(json.dumps(r) + "\n" for r in records[:args.naive_records]))
    cfg = PiiConfig(workers=args.workers)
    get_engine(cfg)  # build once, outside the timings (both contenders share it)

    times: dict[str, list[float]] = defaultdict(list)
    for rep in range(args.repeats):
        times["bare"].append(_timed(bare_pass, src, work / f"bare{rep}"))
        times["ours"].append(_timed(lambda: run_pii(src, work / f"ours{rep}", cfg, home=work)))
        times["naive"].append(_timed(naive_pass, small, work / f"naive{rep}", cfg,
                                     args.naive_records))
        times["ours_prefix"].append(_timed(lambda: run_pii(small, work / f"oursp{rep}", cfg,
                                                            home=work)))

    out = {r.id: r for r in read_records(work / "ours0")}
    src_by_id = {r["id"]: r for r in records}
    hits: Counter[str] = Counter()
    total: Counter[str] = Counter()
    sub_total: Counter[tuple[str, str]] = Counter()
    sub_hits: Counter[tuple[str, str]] = Counter()
    misses: list[tuple[str, str, str]] = []
    for rid, plants in planted.items():
        text = "\n".join(out[rid].texts())
        for typ, sub, value, how in plants:
            total[typ] += 1
            sub_total[typ, sub] += 1
            if not survives(value, how, text):
                hits[typ] += 1
                sub_hits[typ, sub] += 1
            else:
                misses.append((typ, sub, value))
    altered = [rid for rid in lookalikes
               if out[rid].texts() != [m["content"] for m in src_by_id[rid]["messages"]]]
    clean_ids = set(src_by_id) - set(planted)
    clean_altered = [rid for rid in clean_ids
                     if out[rid].texts() != [m["content"] for m in src_by_id[rid]["messages"]]]

    med = {k: statistics.median(v) for k, v in times.items()}
    rps = {"bare": args.records / med["bare"], "ours": args.records / med["ours"],
           "naive": args.naive_records / med["naive"],
           "ours_prefix": args.naive_records / med["ours_prefix"]}
    n_pii = len(planted)
    print(f"### PII benchmark ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"{platform.machine()}, {os.cpu_count()} cores)\n")
    print(f"Command: `.venv/bin/python benchmarks/bench_pii.py --records {args.records} "
          f"--naive-records {args.naive_records} --repeats {args.repeats} --seed {args.seed}`\n")
    print(f"{args.records} records: {n_pii} with planted PII ({n_pii / args.records:.0%}), "
          f"{len(lookalikes)} look-alike, {args.records - n_pii - len(lookalikes)} plain clean; "
          f"{sum(total.values())} planted values.\n")
    print("| type | planted | removed | recall |\n|---|---:|---:|---:|")
    for typ in TEMPLATES:
        print(f"| {typ} | {total[typ]} | {hits[typ]} | {hits[typ] / max(total[typ], 1):.4f} |")
    print("\n<details><summary>recall by subtype</summary>\n")
    print("| type | subtype | planted | recall |\n|---|---|---:|---:|")
    for (typ, sub), n in sorted(sub_total.items()):
        print(f"| {typ} | {sub} | {n} | {sub_hits[typ, sub] / n:.3f} |")
    print("\n</details>\n")
    print(f"Look-alike records altered: {len(altered)}/{len(lookalikes)} "
          f"({len(altered) / max(len(lookalikes), 1):.2%}); all clean records altered: "
          f"{len(clean_altered)}/{len(clean_ids)} "
          f"({len(clean_altered) / max(len(clean_ids), 1):.2%})\n")
    print(f"Throughput, median of {args.repeats} (records/s; share of the bare ceiling):\n")
    print("| pass | records | median s | records/s | of ceiling |\n|---|---:|---:|---:|---:|")
    rows = [("bare read-parse-write (ceiling)", "bare", args.records),
            ("run_pii (ours)", "ours", args.records),
            ("run_pii on the naive prefix", "ours_prefix", args.naive_records),
            ("naive analyze+anonymize per message", "naive", args.naive_records)]
    for label, key, n in rows:
        print(f"| {label} | {n} | {med[key]:.2f} | {rps[key]:.0f} | "
              f"{rps[key] / rps['bare']:.3f} |")
    print(f"\nSpeed-up vs naive: {rps['ours'] / rps['naive']:.1f}x (full file), "
          f"{rps['ours_prefix'] / rps['naive']:.1f}x (same prefix)\n")
    for typ, sub, value in misses[:args.show_misses]:
        print(f"MISS {typ}/{sub}: {value!r}", file=sys.stderr)
    for rid in (altered + clean_altered)[:args.show_misses]:
        print(f"ALTERED {rid}: {out[rid].texts()[0]!r}", file=sys.stderr)


if __name__ == "__main__":
    main()
