"""Stage 5: synthetic augmentation with a distilabel teacher, every generation validated.

Seeds are train records only (the held-out split is carried through, never read as a seed).
Each configured strategy (``augment.strategies``: name -> quota, see
``tasks/augment_strategies.py``) turns its seeds into candidate rows in batches; every
candidate is validated (``tasks/augment_validate.py``) and kept, filtered with its reason, or
deduplicated naming the row it repeats. Synthetic rows carry their provenance in ``meta``
(strategy, teacher, prompt-template digest, seed ids) and are capped at
``max_synthetic_share`` of the training set. The teacher's answers are cached per request in
the ftflow home (``tasks/augment_client.py``), so a rerun after a crash asks only for the rest.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable

from data_contracts.config import AugmentConfig
from data_contracts.manifest import Manifest
from data_contracts.records import ChatSample, content_id
from tasks.augment_client import TeacherError, TeacherStats
from tasks.augment_validate import (CONTRACT, INVALID, JUDGE, LANGUAGE, NEAR_DUPLICATE, SCHEMA,
                                    NearDuplicates, check_contract, check_schema, judge_score,
                                    validate_generation)
from tasks.io import Quarantined, is_stage_dir, iter_input, read_records
from tasks.progress import Progress
from tasks.stage_dir import StageDir, StageWriter, write_atomic

__all__ = ["INVALID", "TeacherError", "run_augment", "validate_generation", "choose_seeds"]

log = logging.getLogger(__name__)
SAMPLES_NAME = "synthetic_samples.json"


def usable_chat(r: ChatSample) -> bool:
    return (r.kind == "chat" and r.messages[-1].role == "assistant"
            and any(m.role == "user" for m in r.messages))


def choose_seeds(records: list[ChatSample], n: int, seed: int, strategy: str = "fresh_reply"
                 ) -> list[ChatSample]:
    """Up to n seeds for a strategy (documents for doc_qa, chats else), by a seeded hash."""
    ok = (lambda r: r.kind == "text") if strategy == "doc_qa" else usable_chat
    usable = [r for r in records if ok(r)]
    tag = "" if strategy == "fresh_reply" else f"{strategy}:"
    usable.sort(key=lambda r: hashlib.sha256(f"{seed}:{tag}{r.id}".encode()).hexdigest())
    return usable[:n]


def synthetic_cap(real_train: int, share: float) -> int:
    """The most synthetic rows that keep them at ``share`` of real + synthetic."""
    if share >= 1.0:
        return 10**12
    return int(real_train * share / (1.0 - share) + 1e-9)


def trim_quotas(quotas: dict[str, int], cap: int) -> dict[str, int]:
    """Quotas scaled down (in proportion, remainders in config order) to sum to at most cap."""
    total = sum(quotas.values())
    if total <= cap:
        return dict(quotas)
    out = {k: q * cap // total for k, q in quotas.items()}
    for k in quotas:
        if sum(out.values()) >= cap:
            break
        if out[k] < quotas[k]:
            out[k] += 1
    return out


def domain_groups(seeds: list[ChatSample], pool: list[ChatSample], k: int
                  ) -> list[list[ChatSample]]:
    """For each seed, k-1 other chats of its domain (meta.domain, else its source file)."""
    def domain(r: ChatSample) -> str:
        return str(r.meta.get("domain") or (r.source.file if r.source else ""))

    by_domain: dict[str, list[ChatSample]] = defaultdict(list)
    for r in pool:
        by_domain[domain(r)].append(r)
    out = []
    for s in seeds:
        group = [r for r in by_domain[domain(s)] if r.id != s.id]
        start = int(hashlib.sha256(s.id.encode()).hexdigest(), 16) % max(1, len(group))
        out.append((group[start:] + group[:start])[:k - 1])
    return out


class Ledger:
    """Generated / accepted / rejected-by-reason per strategy, and a sample of each."""

    def __init__(self, quotas: dict[str, int], sample_size: int) -> None:
        self.per: dict[str, dict[str, Any]] = {
            k: {"quota": q, "generated": 0, "accepted": 0, "rejected": Counter()}
            for k, q in quotas.items()}
        self.sample_size = sample_size
        self.accepted_sample: list[dict[str, Any]] = []
        self.rejected_sample: list[dict[str, Any]] = []

    @property
    def rejected(self) -> int:
        return sum(sum(v["rejected"].values()) for v in self.per.values())

    def accept(self, strategy: str, rec: ChatSample) -> None:
        self.per[strategy]["accepted"] += 1
        if len(self.accepted_sample) < self.sample_size:
            self.accepted_sample.append(rec.model_dump(mode="json"))

    def reject(self, strategy: str, reason: str, why: str, rec: ChatSample) -> None:
        self.per[strategy]["rejected"][reason] += 1
        if len(self.rejected_sample) < self.sample_size:
            self.rejected_sample.append({"strategy": strategy, "reason": reason, "why": why,
                                         "record": rec.model_dump(mode="json")})

    def info(self) -> dict[str, Any]:
        return {k: {**v, "rejected": dict(sorted(v["rejected"].items()))}
                for k, v in self.per.items()}

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for k, v in self.per.items():
            out[f"augment.{k}.generated"] = float(v["generated"])
            out[f"augment.{k}.accepted"] = float(v["accepted"])
            for reason, n in v["rejected"].items():
                out[f"augment.{k}.rejected.{reason}"] = float(n)
        return out


class Validator:
    """Every check a candidate passes before it joins (see tasks/augment_validate.py)."""

    def __init__(self, cfg: AugmentConfig, home: str | Path, special: tuple[str, ...],
                 near: NearDuplicates) -> None:
        self.cfg, self.special, self.near = cfg, special, near
        self.language: Callable[[str], str | None] | None = None
        if cfg.languages:
            from tasks.assets import ensure_lid_model
            from tasks.augment_validate import LanguageCheck

            self.language = LanguageCheck(ensure_lid_model(home), cfg.languages,
                                          cfg.language_threshold)

    def instruction(self, text: str, prompt: str) -> str | None:
        return validate_generation(text, prompt, self.cfg, self.special)

    def check(self, c: Any) -> tuple[str, str, str | None] | None:
        """(reason, why, dup_of) for a rejected candidate; None when it may join."""
        if c.problem is not None:
            return (INVALID if c.problem.startswith("instruction:") else CONTRACT), c.problem, None
        if (why := check_contract(c.record)) is not None:
            return CONTRACT, why, None
        for label, text, prompt in c.texts:
            if (why := validate_generation(text, prompt, self.cfg, self.special)) is not None:
                return INVALID, f"{label}: {why}", None
        replies = [t for label, t, _ in c.texts if label in ("reply", "chosen")]
        if self.language is not None:
            for text in replies:
                if (why := self.language(text)) is not None:
                    return LANGUAGE, why, None
        if self.cfg.json_schema:
            for text in replies:
                if (why := check_schema(text, self.cfg.json_schema)) is not None:
                    return SCHEMA, why, None
        match = self.near.match(c.record.joined_text())
        if match is not None:
            return NEAR_DUPLICATE, f"jaccard {match[1]:.2f}", match[0]
        self.near.add(c.record.id, c.record.joined_text())
        return None


def _rejected_row(c: Any, provenance: dict[str, Any]) -> ChatSample:
    """A candidate that never became a row, kept as a text record of what the teacher wrote."""
    text = next((t for _, t, _ in reversed(c.texts) if t.strip()), "") or f"({c.problem})"
    return ChatSample(id=content_id(None, text), text=text, meta=provenance)


def _generate(writer: StageWriter, plan: dict[str, list[ChatSample]], extras: dict[str, Any],
              cfg: AugmentConfig, home: str | Path, base_model: str, stats: TeacherStats,
              ledger: Ledger, near: NearDuplicates) -> None:
    """Run every strategy on its seeds, validate and write each candidate."""
    from tasks.augment_strategies import Strategies, template_digest
    from tasks.augment_teacher import build_teacher, local_model, special_tokens

    teacher_label = cfg.teacher.model if cfg.teacher.kind == "transformers" else (
        f"{cfg.teacher.model}@{cfg.teacher.base_url or 'https://api.openai.com/v1'}")

    def provenance(strategy: str, seed_ids: list[str]) -> dict[str, Any]:
        return {"synthetic": True, "strategy": strategy, "teacher": cfg.teacher.model,
                "teacher_kind": cfg.teacher.kind, "template_digest": template_digest(strategy),
                "seed_id": seed_ids[0], "seed_ids": seed_ids}

    teacher = build_teacher(cfg.teacher, home, stats)
    validator = Validator(cfg, home, special_tokens(cfg.teacher, home), near)
    rejected_model = cfg.rejected_model or base_model or "builtin:tiny-llama"
    strategies = Strategies(
        teacher, provenance, check_instruction=validator.instruction,
        rejecter=lambda: local_model(rejected_model, cfg.teacher, home, stats,
                                     f"rejected:{rejected_model}"))
    total = sum(len(s) for s in plan.values())
    progress = Progress("augment generation", total, unit="rows")
    log.info("augment: %d rows to generate with %s (%s)", total, teacher_label,
             ", ".join(f"{k} {len(v)}" for k, v in plan.items()))
    try:
        for name, seeds in plan.items():
            for i in range(0, len(seeds), cfg.batch_size):
                batch = seeds[i:i + cfg.batch_size]
                extra = extras.get(name, [None] * len(seeds))[i:i + cfg.batch_size]
                cands = getattr(strategies, name)(batch, extra)
                ledger.per[name]["generated"] += len(cands)
                verdicts = [validator.check(c) for c in cands]
                if cfg.judge.enabled:
                    ok = [j for j, v in enumerate(verdicts) if v is None]
                    answers = strategies.judge([cands[j].record for j in ok])
                    for j, answer in zip(ok, answers):
                        score = judge_score(answer)
                        if score is None or score < cfg.judge.min_score:
                            verdicts[j] = (JUDGE, f"judge score {score} < {cfg.judge.min_score}"
                                           if score is not None else "judge gave no score", None)
                for c, verdict in zip(cands, verdicts):
                    rec = c.record or _rejected_row(c, provenance(name, c.seed_ids))
                    if verdict is None:
                        writer.keep(rec, split="train")
                        ledger.accept(name, rec)
                        continue
                    reason, why, dup_of = verdict
                    ledger.reject(name, reason, why, rec)
                    if reason == NEAR_DUPLICATE:
                        writer.duplicate(rec, dup_of or "", "near", why=why, strategy=name)
                    else:
                        writer.drop(rec, reason=reason, why=why, strategy=name)
                progress.update(len(batch), rejected=ledger.rejected)
    finally:
        progress.close()


def run_augment(input_path: str | Path, out_dir: str | Path, cfg: AugmentConfig, *,
                home: str | Path, base_model: str = "") -> Manifest:
    """Keep every record and add teacher-written rows that pass validation."""
    quotas = {k: q for k, q in cfg.quotas().items() if q > 0} if cfg.enabled else {}
    extra_digests = ({"rejected_model": cfg.rejected_model or base_model}
                     if "preference" in quotas else None)
    stage = StageDir(out_dir, "augment", cfg.digest(), input_path, heldout="carry",
                     extra_digests=extra_digests)
    if (done := stage.finished()) is not None:
        return done
    t0 = time.monotonic()
    writer = stage.writer()
    originals: list[ChatSample] = []
    records_in = 0
    for item in iter_input(input_path):
        records_in += 1
        if isinstance(item, Quarantined):
            writer.quarantine(item)
            continue
        originals.append(item)
        writer.keep(item, split="train")

    cap = synthetic_cap(len(originals), cfg.max_synthetic_share)
    trimmed = trim_quotas(quotas, cap)
    plan = {k: choose_seeds(originals, q, cfg.seed, k) for k, q in trimmed.items()}
    plan = {k: v for k, v in plan.items() if v}
    extras: dict[str, Any] = {}
    if "self_instruct" in plan:
        pool = [r for r in originals if usable_chat(r)]
        extras["self_instruct"] = domain_groups(plan["self_instruct"], pool,
                                                cfg.self_instruct_examples)
    ledger = Ledger(trimmed, cfg.sample_size)
    stats = TeacherStats()
    if plan:
        near = NearDuplicates(cfg.near_duplicate_threshold)
        near.add_many([(r.id, r.joined_text()) for r in originals])
        if is_stage_dir(input_path):  # a synthetic copy of a held-out row would leak it
            near.add_many([(r.id, r.joined_text()) for r in read_records(input_path, "heldout")])
        _generate(writer, plan, extras, cfg, home, base_model, stats, ledger, near)
    generated = sum(v["generated"] for v in ledger.per.values())
    accepted = sum(v["accepted"] for v in ledger.per.values())
    log.info("augment: %d generated, %d accepted, %d rejected", generated, accepted,
             ledger.rejected)
    samples = Path(out_dir) / SAMPLES_NAME
    write_atomic(samples, _json({"accepted": ledger.accepted_sample,
                                 "rejected": ledger.rejected_sample}))
    metrics = {"augment.generated": float(generated), "augment.valid": float(accepted),
               "augment.invalid": float(generated - accepted),
               "augment.synthetic_cap": float(min(cap, 10**9)),
               "augment.seconds": round(time.monotonic() - t0, 3),
               **ledger.metrics(), **stats.metrics()}
    info = {"enabled": cfg.enabled, "teacher_kind": cfg.teacher.kind,
            "teacher": cfg.teacher.model, "strategies": ledger.info(),
            "quotas_requested": quotas, "seeds": sorted({s.id for v in plan.values() for s in v}),
            "teacher_requests": dict(stats.counts)}
    return writer.finish(records_in, generated=generated, metrics=metrics, info=info,
                         outputs=[samples])


def _json(obj: Any) -> str:
    import json

    return json.dumps(obj, indent=1, ensure_ascii=False) + "\n"
