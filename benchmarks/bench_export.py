"""What the export's formats cost: GGUF conversion (f16, q8_0) of a merged model, the second
virtualenv with transformers 4.x the compatibility test builds, and (``--llama-build``) whether
``llama-cpp-python`` builds here from its sdist, and how long that takes.

    python benchmarks/bench_export.py --merged RUN/08-train/merged [--llama-build 1800]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"


def bench_gguf(merged: Path, out: Path) -> dict[str, dict[str, float]]:
    from tasks.export_formats import strip_generation_markers
    from tasks.export_gguf import write_gguf

    template = strip_generation_markers((merged / "chat_template.jinja").read_text())
    result = {}
    for quant in ("f16", "q8_0"):
        t0 = time.monotonic()
        path = write_gguf(merged, out / f"model-{quant}.gguf", quant, template, "bench")
        result[quant] = {"seconds": round(time.monotonic() - t0, 2),
                         "mb": round(path.stat().st_size / 1e6, 2)}
    return result


def bench_venv(cache: Path) -> float:
    import os

    import second_venv

    os.environ["FTFLOW_TEST_CACHE"] = str(cache)
    t0 = time.monotonic()
    second_venv.transformers4_python()
    return round(time.monotonic() - t0, 1)


def bench_llama_build(timeout_s: int, out: Path) -> dict[str, object]:
    t0 = time.monotonic()
    try:
        proc = subprocess.run(["nice", "-n", "19", sys.executable, "-m", "pip", "wheel",
                               LLAMA_CPP_PYTHON, "--no-deps", "-w", str(out)],
                              capture_output=True, text=True, timeout=timeout_s)
        status = "built" if proc.returncode == 0 else f"failed: {proc.stderr[-500:]}"
    except subprocess.TimeoutExpired:
        status = f"not built within {timeout_s}s"
    return {"package": LLAMA_CPP_PYTHON, "status": status,
            "seconds": round(time.monotonic() - t0)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--merged", type=Path, required=True, help="a train stage's merged/ folder")
    p.add_argument("--llama-build", type=int, default=0, metavar="SECONDS",
                   help="also try building llama-cpp-python, at most this long (0: skip)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        result = {"gguf": bench_gguf(args.merged, Path(tmp)),
                  "venv_transformers4_s": bench_venv(Path(tmp) / "cache")}
        if args.llama_build:
            result["llama_cpp_python"] = bench_llama_build(args.llama_build, Path(tmp))
        shutil.rmtree(Path(tmp) / "cache", ignore_errors=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
