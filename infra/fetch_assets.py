"""Fetch the offline assets into the ftflow home: python infra/fetch_assets.py [HOME]."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from data_contracts.config import default_home
from tasks.assets import ensure_lid_model


def main(argv: list[str]) -> int:
    """Fetch every asset; print where each one lies."""
    home = Path(argv[0]) if argv else default_home()
    print(f"language-id model: {ensure_lid_model(home)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
