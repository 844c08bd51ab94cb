"""The closing printout of ``ftflow run``: where to look, the ledger, base vs tuned."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from data_contracts.config import PipelineConfig
from data_contracts.manifest import Manifest
from tasks.evaluate import format_change
from tasks.ledger import LEDGER_COLUMNS, ledger_markdown, ledger_rows  # noqa: F401 (re-exported)
from tasks.stages import spec
from tasks.tracking import run_url


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


def gate_rows(metrics: dict[str, float]) -> list[tuple[str, str, float]]:
    """(role, task.metric, relative change) of every metric the gate checked, targets first."""
    rows = []
    for key, change in metrics.items():
        if key.startswith("gate.") and key.endswith(".change"):
            role, name = key[len("gate."):-len(".change")].split(".", 1)
            rows.append((role, name, change))
    return sorted(rows, key=lambda r: (r[0] != "target", r[1]))


def _with_stderr(metrics: dict[str, float], label: str, name: str) -> str:
    value, err = metrics.get(f"{label}.{name}"), metrics.get(f"stderr.{label}.{name}")
    if value is None:
        return "-"
    return f"{value:.4g}" + (f" ±{err:.2g}" if err is not None else "")


def benchmark_table(metrics: dict[str, float], train_metrics: dict[str, float]) -> Table:
    """Base vs tuned: the gate's target and general metrics (with stderr and the relative
    change, + = better), then every other score."""
    cmp = Table(title="base vs fine-tuned (target: held-out chats; general: held-out prose and "
                      "lm-eval tasks)")
    for col in ("gate", "task.metric", "base", "tuned", "change"):
        cmp.add_column(col, justify="left" if col in ("gate", "task.metric") else "right")
    checked = set()
    for role, name, change in gate_rows(metrics):
        checked.add(name)
        cmp.add_row(role, name, _with_stderr(metrics, "base", name),
                    _with_stderr(metrics, "tuned", name),
                    format_change(name.split(".", 1)[-1], change))
    for name, base, tuned in comparison_rows(metrics):
        if name not in checked:
            cmp.add_row("", name, f"{base:.4g}", f"{tuned:.4g}", "")
    if "eval_loss" in train_metrics:
        cmp.add_row("", "validation loss (train stage, tuned)", "",
                    f"{train_metrics['eval_loss']:.4f}", "")
    return cmp


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

    if not out.get("trained", True):
        console.print(f"curated only, not trained: {out.get('reason', '')}")
        return
    ev = ledger.get(spec("evaluate").name, {})
    console.print(benchmark_table(ev.get("metrics", {}),
                                  ledger.get(spec("train").name, {}).get("metrics", {})))
    console.print(f"gate: {ev.get('info', {}).get('gate', '-')}", soft_wrap=True)

    ex = ledger.get(spec("export").name, {}).get("info", {})
    uri = out["tracking_uri"]
    console.print(f"MLflow run: {out['mlflow_run_id']}  (tracking URI {uri})")
    if ex.get("registered"):
        console.print(f"registered model: {ex.get('model_name')} version {ex.get('version')} "
                      f"alias @{ex.get('alias')}  ->  {ex.get('model_uri')}")
    else:
        console.print(f"model not registered: {ex.get('reason', '-')}")
    console.print(f"run directory: {out['run_dir']}")
    url = run_url(uri, out.get("mlflow_experiment_id", ""), out["mlflow_run_id"])
    if url:
        console.print(f"look at it: {url}")
    else:
        console.print(f"look at it: mlflow ui --backend-store-uri {uri} --host 127.0.0.1 "
                      f"--port {free_port()}")


def free_port() -> int:
    """A port nothing listens on now (the hint must not name a port a server holds)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def publish_artifacts(run_id: str, manifests: dict[str, Manifest], tracking_uri: str,
                      experiment_id: str, mlflow_run_id: str, not_trained: str = "") -> None:
    """What a reviewer looks for in the Prefect UI: the ledger and the base-vs-tuned table as
    tables, the gate's decision, and the way to the MLflow run (a link when it is a server)."""
    from prefect.artifacts import (
        create_link_artifact,
        create_markdown_artifact,
        create_table_artifact,
    )

    create_table_artifact(ledger_rows(manifests), key="ftflow-ledger",
                          description=f"ftflow run {run_id}: where every record went")
    url = run_url(tracking_uri, experiment_id, mlflow_run_id)
    if url:
        create_link_artifact(url, link_text=f"MLflow run {mlflow_run_id}",
                             key="ftflow-mlflow-run", description="this run in MLflow")
    if not_trained:
        create_markdown_artifact(key="ftflow-gate", description="curated only",
                                 markdown=f"# Curated, not trained\n\n{not_trained}\n")
        return
    ev, ex = manifests[spec("evaluate").name], manifests[spec("export").name]
    create_table_artifact(
        [{"task.metric": n, "base": round(b, 6), "tuned": round(t, 6)}
         for n, b, t in comparison_rows(ev.metrics)],
        key="ftflow-eval", description="held-out benchmark: base vs fine-tuned")
    where = (f"[MLflow run {mlflow_run_id}]({url})" if url else
             f"MLflow run `{mlflow_run_id}` in `{tracking_uri}` (open it with `mlflow ui "
             f"--backend-store-uri {tracking_uri}`)")
    create_markdown_artifact(
        key="ftflow-gate", description="the promotion gate's decision",
        markdown=(f"# Gate: {'passed' if ev.info.get('gate_passed') else 'failed'}\n\n"
                  f"{ev.info.get('gate', 'no gate result')}\n\n"
                  f"Model: `{ex.info.get('model_uri', '-')}` ({ex.info.get('reason', '')})\n\n"
                  f"{where}\n"))
