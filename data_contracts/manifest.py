"""The stage ledger: what came in, and where every record went."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

MANIFEST_NAME = "manifest.json"


class LedgerError(AssertionError):
    """The counts of a stage do not add up: a record was lost or invented."""


class Manifest(BaseModel):
    """One stage's ledger: records_in + generated == kept + filtered + deduplicated + quarantined."""

    model_config = ConfigDict(extra="forbid")
    stage: str
    records_in: int = 0
    generated: int = 0  # records a stage creates (synthetic augmentation)
    kept: int = 0
    filtered: dict[str, int] = Field(default_factory=dict)  # reason -> count
    deduplicated: int = 0
    quarantined: int = 0
    splits: dict[str, int] = Field(default_factory=dict)  # kept records per split (train/heldout)
    input_digests: dict[str, str] = Field(default_factory=dict)
    config_digest: str = ""
    output_files: dict[str, str] = Field(default_factory=dict)  # name -> sha256
    started_at: str = ""
    duration_s: float = 0.0
    metrics: dict[str, float] = Field(default_factory=dict)  # stage-specific numbers
    info: dict[str, Any] = Field(default_factory=dict)  # stage-specific facts (paths, names)

    @property
    def filtered_total(self) -> int:
        return sum(self.filtered.values())

    def check(self) -> "Manifest":
        """Raise LedgerError unless every record is accounted for."""
        out = self.kept + self.filtered_total + self.deduplicated + self.quarantined
        if self.records_in + self.generated != out:
            raise LedgerError(
                f"stage {self.stage}: {self.records_in} in + {self.generated} generated != "
                f"{self.kept} kept + {self.filtered_total} filtered + {self.deduplicated} "
                f"deduplicated + {self.quarantined} quarantined"
            )
        if self.splits and sum(self.splits.values()) != self.kept:
            raise LedgerError(f"stage {self.stage}: splits {self.splits} != kept {self.kept}")
        return self

    def ledger_metrics(self) -> dict[str, float]:
        """The counts as flat MLflow metrics."""
        out: dict[str, float] = {
            "records_in": self.records_in,
            "generated": self.generated,
            "kept": self.kept,
            "filtered": self.filtered_total,
            "deduplicated": self.deduplicated,
            "quarantined": self.quarantined,
            "duration_s": self.duration_s,
        }
        out.update({f"filtered.{k}": v for k, v in self.filtered.items()})
        out.update({f"split.{k}": v for k, v in self.splits.items()})
        out.update(self.metrics)
        return out

    def write(self, stage_dir: str | Path) -> Path:
        """Write the checked manifest atomically (a reader sees the old one or the new one)."""
        path = Path(stage_dir) / MANIFEST_NAME
        tmp = path.with_name(MANIFEST_NAME + ".partial")
        tmp.write_text(self.check().model_dump_json(indent=2) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def read(cls, stage_dir: str | Path) -> "Manifest":
        return cls.model_validate(json.loads((Path(stage_dir) / MANIFEST_NAME).read_text()))
