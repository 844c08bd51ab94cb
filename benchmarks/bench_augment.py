"""Synthetic-row generation throughput against a teacher with per-request latency,
at concurrency 1 vs N.

The augment stage (fresh_reply, validation on, a cold teacher cache each time) against the
tests' OpenAI-compatible server on 127.0.0.1 (tests/teacher_server.py), which sleeps
``--latency`` seconds per request like a remote endpoint. Rows/s is over the whole stage call
(reading, requests, validation, writing; distilabel is imported before the clock starts); the
server's count proves every row was really asked for. Prints a markdown table.

    .venv/bin/python benchmarks/bench_augment.py --rows 48 --latency 0.25 --concurrency 1 8
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from data_contracts.config import AugmentConfig, TeacherConfig  # noqa: E402
from data_contracts.records import ChatSample, Message  # noqa: E402
from tasks.augment import run_augment  # noqa: E402
from tasks.stage_dir import StageWriter  # noqa: E402
from teacher_server import TeacherServer  # noqa: E402

import tasks.augment_strategies  # noqa: E402,F401  (distilabel's import, outside the clock)

KEY_ENV = "FTFLOW_BENCH_TEACHER_KEY"


def seeds(out: Path, n: int) -> Path:
    """n distinct support chats as a finished stage directory (the stage's input)."""
    writer = StageWriter(out, "dedup")
    for i in range(n):
        writer.keep(ChatSample(id=f"b{i}", messages=[
            Message(role="user", content=f"How do I change the delivery address of order {i}?"),
            Message(role="assistant", content="Open the order, choose edit address and save.")]))
    writer.finish(n, input_digests={}, config_digest="bench")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=48)
    ap.add_argument("--latency", type=float, default=0.25, help="seconds per request")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--home", default=str(REPO / ".ftflow"),
                    help="an ftflow home holding assets/lid.176.ftz (copied, not written)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ftflow-bench-augment-"))
    os.environ[KEY_ENV] = "sk-bench"
    data = seeds(root / "in", args.rows * 2)  # max_synthetic_share 0.5 allows `rows`
    rows = []
    for conc in args.concurrency:
        home = root / f"home-{conc}"
        lid = Path(args.home) / "assets" / "lid.176.ftz"
        if lid.exists():
            (home / "assets").mkdir(parents=True)
            shutil.copy(lid, home / "assets")
        server = TeacherServer(root / f"server-{conc}", latency=args.latency).start()
        cfg = AugmentConfig(strategies={"fresh_reply": args.rows}, batch_size=max(16, conc),
                            teacher=TeacherConfig(kind="openai", model="bench",
                                                  base_url=server.url, api_key_env=KEY_ENV,
                                                  concurrency=conc))
        try:
            t0 = time.perf_counter()
            m = run_augment(data, root / f"out-{conc}", cfg, home=home)
            wall = time.perf_counter() - t0
        finally:
            server.stop()
        sent = len(server.requests())
        rows.append((conc, m.generated, sent, wall, m.generated / wall,
                     m.metrics["augment.valid"]))
    base = rows[0][4]
    print(f"\n{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; {args.rows} rows, "
          f"{args.latency:.2f} s per request\n")
    print("| concurrency | rows | requests (server) | stage s | rows/s | speed-up | accepted |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for conc, gen, sent, wall, rate, ok in rows:
        print(f"| {conc} | {gen} | {sent} | {wall:.1f} | {rate:.2f} | {rate / base:.1f}x "
              f"| {ok:.0f} |")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
