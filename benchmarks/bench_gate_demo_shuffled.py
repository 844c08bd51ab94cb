"""The demo's fine-tune again, on its own training set with the final replies shuffled across chats:
what the gate sees for a model that learned the replies but not which question each answers.

Takes a finished demo run directory (``ftflow run configs/demo.yaml``) and its ftflow home;
trains with the demo's train settings on ``07-dedup-synthetic``'s records (chat replies
permuted, seed 0) and evaluates with its evaluate settings; prints the gate and the scores.

    nice .venv/bin/python benchmarks/bench_gate_demo_shuffled.py RUN_DIR HOME [--work DIR]
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import yaml  # noqa: E402
from model_fixtures import one_torch_thread, write_stage_dir  # noqa: E402

from data_contracts.config import PipelineConfig  # noqa: E402
from tasks.evaluate import run_evaluate  # noqa: E402
from tasks.io import read_records  # noqa: E402
from tasks.train import run_train  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("home", type=Path)
    ap.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-gate-demo-shuffled"))
    args = ap.parse_args()
    cfg = PipelineConfig.model_validate(yaml.safe_load(Path(args.config).read_text()))
    src = args.run_dir / "07-dedup-synthetic"
    train, held = list(read_records(src, "train")), list(read_records(src, "heldout"))
    chats = [i for i, r in enumerate(train) if r.messages and r.messages[-1].role == "assistant"]
    replies = [train[i].messages[-1] for i in chats]
    random.Random(0).shuffle(replies)
    for i, reply in zip(chats, replies):
        train[i] = train[i].model_copy(update={"messages": [*train[i].messages[:-1], reply]})
    print(f"replies shuffled across {len(chats)} of {len(train)} training records", flush=True)
    data = write_stage_dir(args.work / "data", train, held)
    with one_torch_thread():
        run_train(data, args.work / "train", cfg.train, home=args.home, seed=cfg.run.seed)
        m = run_evaluate(data, args.work / "train", args.work / "eval", cfg.evaluate,
                         home=args.home)
    print(m.info["gate"])
    for key, value in sorted(m.metrics.items()):
        if key.split(".")[0] in ("base", "tuned", "stderr"):
            print(key, f"{value:.4g}")


if __name__ == "__main__":
    main()
