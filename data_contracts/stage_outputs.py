"""What a later stage reads from an earlier one, as typed contracts over ``Manifest.info``.

A stage writes these fields into its manifest's ``info`` (beside free-form facts for people),
and a later stage reads them only through :func:`read_output`, so a missing or renamed field is
an error naming the stage directory and the field, not a ``KeyError`` deep in evaluate or export.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from data_contracts.config import FinalError
from data_contracts.manifest import Manifest


class StageOutputError(ValueError, FinalError):
    """An earlier stage's manifest lacks a field that a later stage needs."""


class StageOutput(BaseModel):
    """Base of the typed hand-offs: extra info keys are allowed and ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True)


class TrainOutput(StageOutput):
    """The train stage's model: what evaluate and export load."""

    adapter_dir: str
    merged_dir: str
    base_model: str
    method: str
    quantized: bool
    chat_template: str | None = None  # where the template came from ("base", "chatml", ...)


class EvaluateOutput(StageOutput):
    """The evaluate stage's verdict: what export registers or refuses."""

    gate_passed: bool
    gate: str
    gate_metric: str
    results: str  # results.json: both models' scores
    comparison: str  # comparison.md: the base-vs-tuned table
    # The tuned model's score on the target (gate) metric, and its direction: what export
    # compares with the current champion's before it moves the `champion` alias.
    target_score: float | None = None
    higher_is_better: bool = True


class ExportOutput(StageOutput):
    """Where the export stage put the model."""

    model_name: str
    model_uri: str
    registered: bool
    reason: str
    run_id: str
    version: str | None = None
    alias: str = ""
    model_card: str = ""


Output = TypeVar("Output", bound=StageOutput)


def output_of(manifest: Manifest, contract: type[Output], where: str | Path = "") -> Output:
    """The contract's fields from a manifest; StageOutputError names the stage and the field."""
    try:
        return contract.model_validate(manifest.info)
    except ValidationError as err:
        problems = "; ".join(f"field '{'.'.join(str(p) for p in e['loc'])}': {e['msg']}"
                             for e in err.errors())
        place = f" in {where}" if where else ""
        raise StageOutputError(f"stage '{manifest.stage}'{place}: manifest info does not hold "
                               f"a {contract.__name__}: {problems}") from None


def read_output(stage_dir: str | Path, contract: type[Output]) -> tuple[Manifest, Output]:
    """Read a finished stage directory's manifest and its typed output."""
    try:
        manifest = Manifest.read(stage_dir)
    except FileNotFoundError:
        raise StageOutputError(f"{stage_dir}: no manifest.json; is it a finished "
                               f"{contract.__name__.removesuffix('Output').lower()} stage "
                               "directory?") from None
    return manifest, output_of(manifest, contract, stage_dir)


def output_info(output: StageOutput, **facts: Any) -> dict[str, Any]:
    """A manifest ``info`` dict: the contract's fields plus free-form facts for people."""
    return {**facts, **output.model_dump(mode="json")}
