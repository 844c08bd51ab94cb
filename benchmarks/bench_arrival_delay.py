"""From a file landing in the inbox to its run starting, on the real stack, as a user runs it.

`ftflow up`, `ftflow deploy CONFIG --watch inbox` (curation only, so each run is short), then
for each of N files: drop it (write, then rename), and time until the `on-new-data` flow run
that reads it starts and ends. Default settings of the stack: the watcher polls every 15 s and
a file is complete once it has not changed for 5 s. Prints a markdown table.

    .venv/bin/python benchmarks/bench_arrival_delay.py --files 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import date, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
FTFLOW = Path(sys.executable).with_name("ftflow")


def api(url: str, body: Any = None) -> Any:
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        raw = resp.read()
    return json.loads(raw) if raw else None


def ts(value: str | None) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() if value else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=3)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ftflow-bench-arrival-"))
    home, cwd = root / "home", root / "project"
    (home / "assets").mkdir(parents=True)
    (cwd / "inbox").mkdir(parents=True)
    lid = REPO / ".ftflow" / "assets" / "lid.176.ftz"
    if lid.exists():
        shutil.copy(lid, home / "assets" / lid.name)
    env = dict(os.environ, FTFLOW_HOME=str(home))
    for key in ("PREFECT_API_URL", "FTFLOW_TRACKING_URI", "FTFLOW_NO_STACK"):
        env.pop(key, None)

    def ftflow(*a: str) -> str:
        r = subprocess.run([str(FTFLOW), *a], env=env, cwd=cwd, capture_output=True, text=True,
                           timeout=600)
        if r.returncode:
            raise SystemExit(f"ftflow {' '.join(a)} failed:\n{r.stdout}\n{r.stderr}")
        return r.stdout

    ftflow("up")
    load_before = os.getloadavg()[0]
    rows = []
    try:
        api_url = json.loads((home / "stack.json").read_text())["prefect"]["api_url"]
        ftflow("deploy", str(REPO / "configs" / "demo.yaml"), "curate.min_new_records=1000000",
               "--watch", "inbox")
        dep = api(f"{api_url}/deployments/name/finetune-pipeline/on-new-data")["id"]
        lines = (REPO / "sample_data" / "support_chat.jsonl").read_bytes().splitlines()
        for i in range(args.files):
            tmp = cwd / "inbox" / f"batch-{i}.jsonl.partial"
            tmp.write_bytes(b"\n".join(lines[i * 20:(i + 1) * 20]) + b"\n")
            landed = time.time()
            tmp.rename(cwd / "inbox" / f"batch-{i}.jsonl")
            run = None
            while time.time() - landed < 600:
                runs = api(f"{api_url}/flow_runs/filter",
                           {"deployments": {"id": {"any_": [dep]}}, "sort": "START_TIME_DESC"})
                done = [r for r in runs if r["state_type"] in ("COMPLETED", "FAILED", "CRASHED")]
                if len(done) > i:
                    run = done[0]
                    break
                time.sleep(1)
            if run is None:
                raise SystemExit(f"no run for batch-{i} within 10 minutes")
            rows.append((f"batch-{i}.jsonl", ts(run["start_time"]) - landed,
                         ts(run["end_time"]) - landed, run["state_type"]))
    finally:
        ftflow("down")
    print(f"### File landing to run ({date.today()}, {platform.machine()}, {os.cpu_count()} "
          f"cores, load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}; watcher every "
          "15 s, settle 5 s; curation-only runs)\n")
    print("| file | landed -> run started, s | landed -> run ended, s | state |")
    print("|---|---:|---:|---|")
    for name, start, end, state in rows:
        print(f"| {name} | {start:.0f} | {end:.0f} | {state} |")


if __name__ == "__main__":
    main()
