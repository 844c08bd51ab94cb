"""The closing printout of ``ftflow run``: where to look, the ledger, base vs tuned."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from data_contracts.config import PipelineConfig
from tasks.stages import spec


def comparison_rows(metrics: dict[str, float]) -> list[tuple[str, float, float]]:
    """(task.metric, base, tuned) for every metric measured on both models."""
    rows = []
    for key, base in sorted(metrics.items()):
        if key.startswith("base."):
            name = key[len("base."):]
            tuned = metrics.get(f"tuned.{name}")
            if tuned is not None:
                rows.append((name, base, tuned))
    return rows


def print_summary(out: dict[str, Any], cfg: PipelineConfig, console: Console | None = None) -> None:
    console = console or Console(width=max(Console().width, 110))
    ledger = out["ledger"]
    table = Table(title=f"ledger of run {out['run_id']}")
    for col in ("stage", "in", "generated", "kept", "filtered", "deduplicated", "quarantined",
                "seconds"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for name, m in ledger.items():
        table.add_row(name, str(m["records_in"]), str(m["generated"]), str(m["kept"]),
                      str(sum(m["filtered"].values())), str(m["deduplicated"]),
                      str(m["quarantined"]), f"{m['duration_s']:.1f}")
    console.print(table)

    ev = ledger.get(spec("evaluate").name, {})
    cmp = Table(title="held-out benchmark: base vs fine-tuned")
    for col in ("task.metric", "base", "tuned"):
        cmp.add_column(col, justify="left" if col == "task.metric" else "right")
    for name, base, tuned in comparison_rows(ev.get("metrics", {})):
        cmp.add_row(name, f"{base:.4f}", f"{tuned:.4f}")
    tr = ledger.get(spec("train").name, {}).get("metrics", {})
    if "eval_loss" in tr:
        cmp.add_row("validation loss (train stage, tuned)", "", f"{tr['eval_loss']:.4f}")
    console.print(cmp)
    console.print(f"gate: {ev.get('info', {}).get('gate', '-')}")

    ex = ledger.get(spec("export").name, {}).get("info", {})
    uri = out["tracking_uri"]
    console.print(f"MLflow run: {out['mlflow_run_id']}  (tracking URI {uri})")
    if ex.get("registered"):
        console.print(f"registered model: {ex.get('model_name')} version {ex.get('version')} "
                      f"alias @{ex.get('alias')}  ->  {ex.get('model_uri')}")
    else:
        console.print(f"model not registered: {ex.get('reason', '-')}")
    console.print(f"run directory: {out['run_dir']}")
    console.print(f"look at it: mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000")
