"""The run's ledger, a row per stage: where every record went. One builder, read by the closing
printout and the Prefect artifacts (flows/report.py), the run's LEDGER.md and the model card."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from data_contracts.manifest import Manifest

LEDGER_COLUMNS = ("stage", "in", "generated", "kept", "filtered", "deduplicated", "quarantined",
                  "seconds")


def ledger_rows(manifests: dict[str, Manifest]) -> list[dict[str, Any]]:
    """The ledger, a row per stage: every record of every stage accounted for."""
    return [{"stage": name, "in": m.records_in, "generated": m.generated, "kept": m.kept,
             "filtered": m.filtered_total, "deduplicated": m.deduplicated,
             "quarantined": m.quarantined, "seconds": round(m.duration_s, 1)}
            for name, m in manifests.items()]


STRATEGY_COLUMNS = ("strategy", "quota", "generated", "accepted", "rejected", "rejected by reason")


def strategy_rows(manifests: dict[str, Manifest]) -> list[dict[str, Any]]:
    """The synthetic rows of each augment strategy: its quota, what the teacher generated, what
    validation accepted, and what it rejected, by reason (from the augment stage's manifest)."""
    rows = []
    for m in manifests.values():
        if m.stage != "augment":
            continue
        for name, v in (m.info.get("strategies") or {}).items():
            reasons = v.get("rejected") or {}
            rows.append({"strategy": name, "quota": v.get("quota", 0),
                         "generated": v.get("generated", 0), "accepted": v.get("accepted", 0),
                         "rejected": sum(reasons.values()),
                         "rejected by reason": ", ".join(f"{k} {n}" for k, n in reasons.items())
                         or "-"})
    return rows


def _table(columns: tuple[str, ...], rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|---" + "|---:" * (len(columns) - 1) + "|"]
    return lines + ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]


def ledger_markdown(manifests: dict[str, Manifest]) -> str:
    """The ledger as a markdown table; then, when the run augmented, a row per strategy."""
    lines = _table(LEDGER_COLUMNS, ledger_rows(manifests))
    strategies = strategy_rows(manifests)
    if strategies:
        lines += ["", "Synthetic rows by strategy (augment):", ""]
        lines += _table(STRATEGY_COLUMNS, strategies)
    return "\n".join(lines)


def run_manifests(run_dir: str | Path) -> dict[str, Manifest]:
    """The finished stage directories of a run folder, by name (01-ingest, 02-pii, ...)."""
    return {path.parent.name: Manifest.read(path.parent)
            for path in sorted(Path(run_dir).glob("*/manifest.json"))}
