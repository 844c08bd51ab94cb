"""Safetensors only: a base model whose weights are only a pickle checkpoint is refused with one
clear error, unless the user says `train.allow_pickle: true`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from data_contracts.config import ConfigError, TrainConfig

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pickle_model(tmp_path_factory: pytest.TempPathFactory, session_home: Path) -> Path:
    """The tiny base model with its weights saved as pytorch_model.bin (torch.save) only."""
    import torch
    from safetensors.torch import load_file

    from tasks.base_model import resolve_base_model

    tiny = Path(resolve_base_model("builtin:tiny-llama", session_home))
    folder = tmp_path_factory.mktemp("pickle-model")
    for path in tiny.iterdir():
        if path.suffix != ".safetensors":
            shutil.copy(path, folder / path.name)
    torch.save(load_file(tiny / "model.safetensors"), folder / "pytorch_model.bin")
    return folder


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from model_fixtures import support_chats, write_stage_dir

    return write_stage_dir(tmp_path_factory.mktemp("records") / "dedup", support_chats(16))


def test_ftflow_stage_train_refuses_a_pickle_only_base(pickle_model: Path, records: Path,
                                                       tmp_path: Path, session_home: Path
                                                       ) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "FTFLOW_HOME": str(session_home),
           "FTFLOW_NO_STACK": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "stage", "train", "--input", str(records),
         "--output", str(tmp_path / "train"), f"train.base_model={pickle_model}",
         "train.method=lora", "train.max_steps=1"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ftflow: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    assert f"train.base_model: {pickle_model} holds only pickle weights (pytorch_model.bin)" \
        in errors[0] and "train.allow_pickle=true" in errors[0]
    assert not (tmp_path / "train" / "manifest.json").exists()


def test_the_loaders_refuse_pickle_unless_allowed(pickle_model: Path) -> None:
    from tasks.base_model import check_safetensors
    from tasks.train_model import load_model

    with pytest.raises(ConfigError, match="holds only pickle weights"):
        check_safetensors(str(pickle_model), allow_pickle=False)
    # The loader itself (a hub id is checked only here): transformers refuses the .bin.
    with pytest.raises(OSError, match="safetensors"):
        load_model(str(pickle_model), TrainConfig(method="lora"), cuda=False)
    check_safetensors(str(pickle_model), allow_pickle=True)
    model, quantized, _ = load_model(str(pickle_model),
                                     TrainConfig(method="lora", allow_pickle=True), cuda=False)
    assert not quantized and model.num_parameters() > 1_000_000
