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


def ledger_markdown(manifests: dict[str, Manifest]) -> str:
    """The ledger as a markdown table."""
    rows = ledger_rows(manifests)
    lines = ["| " + " | ".join(LEDGER_COLUMNS) + " |", "|---" + "|---:" * 7 + "|"]
    lines += ["| " + " | ".join(str(r[c]) for c in LEDGER_COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def run_manifests(run_dir: str | Path) -> dict[str, Manifest]:
    """The finished stage directories of a run folder, by name (01-ingest, 02-pii, ...)."""
    return {path.parent.name: Manifest.read(path.parent)
            for path in sorted(Path(run_dir).glob("*/manifest.json"))}
