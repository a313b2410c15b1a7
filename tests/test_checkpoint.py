"""Checkpoints: self-contained, and damaged ones are named, not crashed on."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from lenet5.checkpoint import load_checkpoint, save_checkpoint
from lenet5.errors import CheckpointError
from lenet5.models import create_model


def test_round_trip_rebuilds_the_model_from_the_file_alone(tmp_path):
    torch.manual_seed(1)
    model = create_model("lenet5")
    path = save_checkpoint(tmp_path / "best", model, config={"seed": 1}, epoch=4, metrics={"test_acc": 0.9})
    loaded = load_checkpoint(path)
    assert loaded.meta["epoch"] == 4 and loaded.meta["metrics"]["test_acc"] == 0.9
    assert not loaded.model.training
    x = torch.rand(3, 1, 28, 28)
    torch.testing.assert_close(loaded.model(x), model.eval()(x))
    assert (tmp_path / "best.json").is_file()


def test_damaged_or_foreign_checkpoints_are_named(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="garbage.safetensors: not a readable safetensors checkpoint"):
        load_checkpoint(garbage)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="without lenet5 metadata"):
        load_checkpoint(foreign)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match="no checkpoints/best.safetensors"):
        load_checkpoint(tmp_path)


def test_truncated_checkpoint_is_named(tmp_path):
    path = save_checkpoint(tmp_path / "last", create_model("lenet5"))
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="not a readable safetensors checkpoint"):
        load_checkpoint(path)
