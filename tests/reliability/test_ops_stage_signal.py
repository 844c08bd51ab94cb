"""SIGTERM to `ftflow stage train` (issue 10, item 4), without Prefect: training stops at the
end of the step, saves a checkpoint first, writes no stage output, exits 143; the same command
again resumes from that checkpoint. (The whole `ftflow run` under SIGTERM: test_ops_signals.)"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from data_contracts.manifest import Manifest
from ops_helpers import REPO, cli_env, ftflow
from test_train_resume import _complete_checkpoints, _stage_dir

pytestmark = pytest.mark.slow
MAX_STEPS = 8


def test_sigterm_saves_a_checkpoint_and_the_rerun_resumes(tmp_path: Path,
                                                          session_home: Path) -> None:
    src, out = _stage_dir(tmp_path / "in"), tmp_path / "08-train"
    cmd = ftflow("stage", "train", "--input", str(src), "--output", str(out),
                 f"run.home={session_home}", f"train.max_steps={MAX_STEPS}",
                 "train.save_steps=1000", "train.eval_steps=1000", "train.logging_steps=1",
                 "train.batch_size=2", "train.max_length=64")
    env, log = cli_env(tmp_path / "prefect"), tmp_path / "train.log"
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 900
    while "'loss'" not in log.read_text():  # a first step is logged
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "no training step within the timeout"
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGTERM)
    try:
        rc = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("ftflow stage train did not exit within 30 s of SIGTERM")
    text = log.read_text()
    assert rc == 128 + signal.SIGTERM, text[-3000:]
    assert "stopped by SIGTERM; run the same command again to resume" in text
    saved = _complete_checkpoints(out)
    assert len(saved) == 1 and 0 < saved[0] < MAX_STEPS, saved
    assert not (out / "manifest.json").exists() and not (out / "adapter").exists()

    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    m = Manifest.read(out)
    assert m.info["resumed_from_step"] == saved[0] and m.metrics["steps"] == MAX_STEPS
