"""A second virtualenv with transformers 4.x, built once and cached, for the export's
compatibility test: what a team on vLLM or an older stack would load the model with."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REQUIREMENTS = REPO / "tests" / "requirements-transformers4.txt"


def _find_links() -> list[str]:
    """pip's find-links (where the local torch CPU wheel lies): uv does not read pip's config."""
    links = os.environ.get("PIP_FIND_LINKS", "")
    if not links:
        proc = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.find-links"],
                              capture_output=True, text=True)
        links = proc.stdout.strip() if proc.returncode == 0 else ""
    return [arg for link in links.split() for arg in ("--find-links", link)]


def transformers4_python() -> Path:
    """The python of the cached transformers-4 venv (built on first use, ~25 s with a warm uv
    cache); under $FTFLOW_TEST_CACHE, else .ftflow/test-cache in the repo."""
    from filelock import FileLock

    key = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()[:12]
    cache = Path(os.environ.get("FTFLOW_TEST_CACHE", REPO / ".ftflow" / "test-cache"))
    venv = cache / f"venv-transformers4-{key}"
    python = venv / "bin" / "python"
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache / f"{venv.name}.lock"), timeout=900):
        if python.exists():
            return python
        building = venv.with_name(venv.name + ".building")
        shutil.rmtree(building, ignore_errors=True)
        uv = Path(sys.executable).with_name("uv")
        t0 = time.monotonic()
        subprocess.run([str(uv), "venv", "-q", "-p", sys.executable, str(building)], check=True)
        subprocess.run([str(uv), "pip", "install", "-q", "--python", str(building / "bin/python"),
                        *_find_links(), "torch==2.13.0", "-r", str(REQUIREMENTS)], check=True)
        building.rename(venv)  # only bin/python is used: scripts' shebangs may name .building
        print(f"built {venv} in {time.monotonic() - t0:.0f}s")
    return python
