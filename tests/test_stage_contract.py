"""The stage contract: one ordered list of stages, stage directories that are never half-written
and never stale, the held-out split carried, typed hand-offs, imports one way, valid configs."""

from __future__ import annotations

import logging
import ast
import gzip
from pathlib import Path

import pytest

from data_contracts.config import PipelineConfig, load_config
from data_contracts.manifest import LedgerError, Manifest
from data_contracts.stage_outputs import StageOutputError, TrainOutput, read_output
from model_fixtures import support_chats, write_stage_dir
from tasks.io import read_records
from tasks.stage_dir import StageDir
from tasks.stages import COMMANDS, STAGES, StageContext, StageSpec, run_stage, spec

REPO = Path(__file__).resolve().parents[1]
LAYERS = {"data_contracts": 0, "tasks": 1, "flows": 2}


def test_stages_form_one_ordered_graph() -> None:
    names = [s.name for s in STAGES]
    assert len(set(names)) == len(names)
    cfg = PipelineConfig()
    for i, s in enumerate(STAGES):
        assert s.name.startswith(f"{i + 1:02d}-")
        assert set(s.reads) <= set(names[:i]), f"{s.name} reads a later stage"
        assert (REPO / "tasks" / f"{s.command}.py").is_file()
        assert s.config(cfg) is getattr(cfg, s.section)
        assert s.timeout_s(cfg) > 0
    assert spec("evaluate").name == "09-evaluate" and spec("06-pii-synthetic").command == "pii"
    assert COMMANDS == ("ingest", "pii", "dedup", "curate", "augment", "train", "evaluate",
                        "export")
    with pytest.raises(KeyError, match="no stage named 'nope'"):
        spec("nope")


def _module_imports(path: Path) -> set[str]:
    """Every module a file imports, lazily inside functions too."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def test_imports_go_one_way_without_cycles() -> None:
    """flows -> tasks -> data_contracts; no cycle among the modules of tasks/."""
    graph: dict[str, set[str]] = {}
    for layer in LAYERS:
        for path in sorted((REPO / layer).glob("*.py")):
            mod = f"{layer}.{path.stem}"
            graph[mod] = {m for m in _module_imports(path) if m.split(".")[0] in LAYERS}
    back = [(a, b) for a, deps in graph.items() for b in deps
            if LAYERS[b.split(".")[0]] > LAYERS[a.split(".")[0]]]
    assert not back, f"imports against the layering: {back}"

    def cycle_from(start: str) -> list[str] | None:
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    return path + [nxt]
                if nxt not in path:
                    stack.append((nxt, path + [nxt]))
        return None

    cycles = [c for m in graph if (c := cycle_from(m))]
    assert not cycles, f"import cycle: {' -> '.join(cycles[0])}"


@pytest.mark.parametrize("config", sorted((REPO / "configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates(config: Path) -> None:
    cfg = load_config(config)
    assert cfg.ingest.inputs and cfg.train.base_model


def _raw(tmp_path: Path, n: int = 6) -> Path:
    path = tmp_path / "raw.jsonl"
    path.write_text("".join(r.model_dump_json() + "\n" for r in support_chats(n)))
    return path


def _ingest_like(raw: Path, out: Path, digest: str = "cfg-1", stop_before_finish: bool = False
                 ) -> Manifest | None:
    """A minimal stage on the helper: keep every record of a raw file."""
    stage = StageDir(out, "toy", digest, str(raw))
    if (done := stage.finished()) is not None:
        return done
    writer = stage.writer()
    records = support_chats(6)
    for rec in records:
        writer.keep(rec)
    if stop_before_finish:
        return None  # killed here: files half-written, no manifest
    return writer.finish(len(records))


def test_a_killed_stage_never_looks_complete(tmp_path: Path) -> None:
    raw, out = _raw(tmp_path), tmp_path / "out"
    first = _ingest_like(raw, out)
    assert first is not None and first.kept == 6
    # A run with another config starts over and is killed before it finishes.
    assert _ingest_like(raw, out, "cfg-2", stop_before_finish=True) is None
    assert not (out / "manifest.json").exists(), "the old manifest went first"
    assert not list(out.glob("train-*.jsonl.gz")), "partial files never carry the final name"
    assert StageDir(out, "toy", "cfg-1", str(raw)).finished() is None
    again = _ingest_like(raw, out)
    assert again is not None and again.started_at >= first.started_at
    assert len(list(read_records(out))) == 6


def test_a_changed_or_truncated_output_reruns_the_stage(tmp_path: Path) -> None:
    raw, out = _raw(tmp_path), tmp_path / "out"
    _ingest_like(raw, out)
    assert StageDir(out, "toy", "cfg-1", str(raw)).finished() is not None
    data = next(out.glob("train-*.jsonl.gz"))
    data.write_bytes(data.read_bytes()[:20])  # a truncated gzip, as a crash or disk error leaves
    assert StageDir(out, "toy", "cfg-1", str(raw)).finished() is None
    rerun = _ingest_like(raw, out)
    assert rerun is not None
    with gzip.open(data, "rt") as fh:
        assert len(fh.readlines()) == 6


def _carrying(forget: bool) -> StageSpec:
    def call(ctx: StageContext) -> Manifest:
        stage = StageDir(ctx.out, "toy", "c", ctx.inputs[0], heldout="own" if forget else "carry")
        writer = stage.writer()
        n = 0
        for rec in read_records(ctx.inputs[0]):
            writer.keep(rec)
            n += 1
        return writer.finish(n)

    return StageSpec("99-toy", "toy", "run", ("98-src",), "carry", call)


def test_the_heldout_split_is_carried_and_a_stage_that_drops_it_fails(tmp_path: Path) -> None:
    src = write_stage_dir(tmp_path / "src", support_chats(5), support_chats(3, seed=9, prefix="h"))
    cfg = PipelineConfig()
    m = run_stage(_carrying(forget=False), StageContext(cfg, tmp_path / "ok", (src,)))
    assert m.splits == {"train": 5, "heldout": 3} and m.records_in == 8
    assert list(read_records(tmp_path / "ok", "heldout")) == list(read_records(src, "heldout"))
    with pytest.raises(LedgerError, match="3 held-out records in, 0 out"):
        run_stage(_carrying(forget=True), StageContext(cfg, tmp_path / "bad", (src,)))


def test_typed_hand_off_names_stage_and_field(tmp_path: Path) -> None:
    Manifest(stage="train", info={"adapter_dir": "a", "base_model": "b", "method": "lora",
                                  "quantized": False}).write(tmp_path)
    with pytest.raises(StageOutputError, match=r"stage 'train'.*field 'merged_dir'"):
        read_output(tmp_path, TrainOutput)
    with pytest.raises(StageOutputError, match="no manifest.json"):
        read_output(tmp_path / "nowhere", TrainOutput)


def test_duration_counts_from_the_stage_start_not_the_first_write(tmp_path: Path) -> None:
    """A stage that works before it writes (dedup matches every record first) is timed whole."""
    import time

    raw, out = _raw(tmp_path), tmp_path / "out"
    stage = StageDir(out, "toy", "cfg-1", str(raw))
    time.sleep(0.3)  # the stage's own work before its writer exists
    writer = stage.writer()
    writer.keep(support_chats(1)[0])
    m = writer.finish(1)
    assert m.duration_s >= 0.3
    assert m.started_at == stage.started_at


def _failing(err: BaseException, calls: list[int]) -> StageSpec:
    def call(ctx: StageContext) -> Manifest:
        calls.append(1)
        raise err

    return StageSpec("99-toy", "ingest", "run", (), "none", call, retries=1, retry_delays_s=(0,))


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.mark.parametrize("final", [True, False], ids=["final-error", "other-error"])
def test_a_final_error_fails_the_stage_at_once_in_one_line(final: bool, tmp_path: Path) -> None:
    """In a real Prefect flow: a FinalError (here ConfigError) is not retried and is logged
    without a traceback; any other error keeps the stage's retries and its traceback."""
    from prefect import flow

    from data_contracts.config import ConfigError
    from tasks.quiet import RUN_LOGGERS, quiet_library_noise
    from tasks.stages import stage_task

    quiet_library_noise()
    err = ConfigError("train.base_model: no such folder") if final else RuntimeError("disk hiccup")
    calls: list[int] = []
    s, cfg = _failing(err, calls), PipelineConfig()

    @flow(name="toy-final-error")
    def toy() -> None:
        stage_task(s, cfg)(s, StageContext(cfg, tmp_path / "out", ()))

    seen = _Records()
    for name in RUN_LOGGERS:
        logging.getLogger(name).addHandler(seen)
    try:
        with pytest.raises(type(err)):
            toy()
    finally:
        for name in RUN_LOGGERS:
            logging.getLogger(name).removeHandler(seen)
    assert len(calls) == (1 if final else 2)
    about_it = [r for r in seen.records if str(err) in r.getMessage()]
    assert about_it, "the error is logged by the run"
    tracebacks = [r for r in about_it if r.exc_info]
    assert (tracebacks == []) if final else tracebacks
