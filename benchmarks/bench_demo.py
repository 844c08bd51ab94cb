"""Time the demo pipeline on a fresh ftflow home: total wall time and each stage's share.

    .venv/bin/python benchmarks/bench_demo.py [--home DIR]

Prints a markdown block for BENCHMARKS.md. A fresh home means the tiny base model is built
and Prefect's local API starts from scratch, as on a new machine (the venv is not timed).
"""

from __future__ import annotations

import argparse
import platform
import shutil
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--home", help="ftflow home to use (default: a fresh temporary one)")
    args = parser.parse_args()
    home = Path(args.home) if args.home else Path(tempfile.mkdtemp(prefix="ftflow-bench-"))
    lid = REPO / ".ftflow" / "assets" / "lid.176.ftz"
    if lid.exists():  # the asset download is part of setup, not of the pipeline
        (home / "assets").mkdir(parents=True, exist_ok=True)
        shutil.copy(lid, home / "assets" / lid.name)

    import os

    os.environ.setdefault("PREFECT_HOME", str(home / "prefect"))
    from flows.env import quiet_offline_env

    quiet_offline_env()
    t0 = time.monotonic()
    from flows.pipeline import finetune_pipeline
    from tasks.stages import spec

    t_import = time.monotonic() - t0
    out = finetune_pipeline(config_path=str(REPO / "configs" / "demo.yaml"),
                            overrides=[f"run.home={home}"], run_id="bench")
    total = time.monotonic() - t0
    print(f"### Demo pipeline ({date.today()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores)\n")
    print("| stage | seconds | in | kept |\n|---|---:|---:|---:|")
    for name, m in out["ledger"].items():
        print(f"| {name} | {m['duration_s']:.1f} | {m['records_in']} | {m['kept']} |")
    print(f"| imports | {t_import:.1f} | | |")
    print(f"| **total wall time** | **{total:.1f}** | | |")
    ev = out["ledger"][spec("evaluate").name]["metrics"]
    for key in sorted(ev):
        if key.startswith("base."):
            name = key[5:]
            print(f"- {name}: base {ev[key]:.4f} -> tuned {ev.get('tuned.' + name, float('nan')):.4f}")


if __name__ == "__main__":
    main()
