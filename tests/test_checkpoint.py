"""Checkpoints: self-contained, and damaged or hostile ones are named, not crashed on."""

from __future__ import annotations

import json
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as safetensors_bytes
from safetensors.torch import save_file

from lenet5.checkpoint import FORMAT, METADATA_KEY, load_checkpoint, save_checkpoint
from lenet5.errors import CheckpointError
from lenet5.models import create_model, list_models


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


# ---------------------------------------------------------------- hostile metadata and tensors
STATES = {name: create_model(name).state_dict() for name in list_models()}


def valid_meta(name: str = "lenet5", **changes) -> dict:
    meta = {"format": FORMAT, "model": name, "model_args": {}, "epoch": 3, "metrics": {"test_acc": 0.9},
            "config": {"seed": 0}, "lenet5_version": "0", "torch_version": torch.__version__}
    meta.update(changes)
    return meta


def write(path, tensors, meta, raw: str | None = None):
    text = raw if raw is not None else json.dumps(meta)
    path.write_bytes(safetensors_bytes(tensors, metadata={METADATA_KEY: text}))
    return path


@pytest.mark.parametrize("changes, message", [
    ({"model": 5}, "unknown model '5'"),
    ({"model": "lenet7"}, "unknown model 'lenet7'"),
    ({"format": ["x"]}, "checkpoint format"),
    ({"model_args": [1]}, "model_args must be an object, got list"),
    ({"model_args": {"num_classes": "10"}}, "model argument 'num_classes' must be an integer, got '10'"),
    ({"model_args": {"num_classes": 10.5}}, "model argument 'num_classes' must be an integer"),
    ({"model_args": {"width": 3}}, "model 'lenet5' takes no argument 'width'"),
    ({"model_args": {"num_classes": -1}}, "cannot be built from model_args"),
    ({"epoch": "3"}, "epoch must be a count of epochs, got 3"),
    ({"epoch": -1}, "epoch must be a count of epochs"),
    ({"metrics": [0.9]}, "metrics must be an object, got list"),
    ({"config": "seed=0"}, "config must be an object, got str"),
    ({"torch_version": 2}, "torch_version must be a string"),
])
def test_metadata_of_the_wrong_types_is_named_in_one_line(tmp_path, changes, message):
    path = write(tmp_path / "m.safetensors", STATES["lenet5"], valid_meta(**changes))
    with pytest.raises(CheckpointError, match=message) as err:
        load_checkpoint(path)
    assert "\n" not in str(err.value) and str(err.value).startswith(str(path))


def test_model_args_cannot_make_loading_allocate(tmp_path):
    """Arguments asking for 100 TB of weights are refused by the shape check before any weight
    is allocated (allocating first would fail with a RuntimeError, not a CheckpointError)."""
    path = write(tmp_path / "big.safetensors", STATES["keras-lenet"],
                 valid_meta("keras-lenet", model_args={"conv1": 2**20, "conv2": 2**20, "hidden": 2**20}))
    started = time.perf_counter()
    with pytest.raises(CheckpointError, match=r"weights do not fit model 'keras-lenet': features.0.weight is "
                                              r"\[20, 1, 5, 5\] F32, the model's is \[1048576, 1, 5, 5\] F32"):
        load_checkpoint(path)
    assert time.perf_counter() - started < 2


def test_wrong_tensor_shapes_and_dtypes_are_named(tmp_path):
    tensors = dict(STATES["lenet5"])
    tensors["features.0.weight"] = torch.zeros(6, 1, 3, 3)
    with pytest.raises(CheckpointError,
                       match=r"features.0.weight is \[6, 1, 3, 3\] F32, the model's is \[6, 1, 5, 5\]"):
        load_checkpoint(write(tmp_path / "shape.safetensors", tensors, valid_meta()))
    tensors = {k: v.double() for k, v in STATES["lenet5"].items()}
    with pytest.raises(CheckpointError, match=r"is \[6, 1, 5, 5\] F64, the model's is \[6, 1, 5, 5\] F32"):
        load_checkpoint(write(tmp_path / "dtype.safetensors", tensors, valid_meta()))
    tensors = {**STATES["lenet5"], "extra": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"missing \[\], unexpected \['extra'\]"):
        load_checkpoint(write(tmp_path / "extra.safetensors", tensors, valid_meta()))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_named_not_predicted_with(tmp_path, bad):
    """A NaN weight made predict answer "8, confidence nan%" with exit 0, and export pass its check."""
    tensors = dict(STATES["lenet5"])
    tensors["features.3.weight"] = tensors["features.3.weight"].clone()
    tensors["features.3.weight"][0, 0, 0, 0] = bad
    with pytest.raises(CheckpointError, match=r"weights contain NaN or infinite values \(features.3.weight\)"):
        load_checkpoint(write(tmp_path / "nan.safetensors", tensors, valid_meta()))
    assert load_checkpoint(write(tmp_path / "fine.safetensors", dict(STATES["lenet5"]), valid_meta())).model


def test_the_header_size_is_bounded(tmp_path):
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes((2**40).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match=r"a header of 1,099,511,627,776 bytes"):
        load_checkpoint(huge)
    padded = write(tmp_path / "padded.safetensors", STATES["lenet5"], valid_meta(config={"x": "y" * (2 << 20)}))
    with pytest.raises(CheckpointError, match=r"a header of [\d,]+ bytes; a lenet5 checkpoint's is a few kB"):
        load_checkpoint(padded)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=6)
ARG_NAMES = st.sampled_from(["num_classes", "conv1", "conv2", "hidden", "j", "width", "self"])


def field(valid):
    """Mostly the valid value, so that most examples reach the later checks; else anything."""
    return st.one_of(st.just(valid), st.just(valid), st.just(valid), JSON)


METADATA = st.fixed_dictionaries({
    "format": field(FORMAT),
    "model": st.one_of(st.sampled_from(list_models()), st.sampled_from(list_models()), JSON),
    "model_args": st.one_of(st.just({}), st.dictionaries(ARG_NAMES, st.one_of(st.integers(-3, 40), JSON), max_size=2),
                            JSON),
    "epoch": field(3), "metrics": field({"test_acc": 0.5}), "config": field({"seed": 0}),
    "lenet5_version": field("0.1"), "torch_version": field("2"),
})
DAMAGE = st.sampled_from(["none", "none", "drop", "extra", "shape", "dtype", "not-json"])


@settings(max_examples=100, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(meta=METADATA, missing=st.lists(st.sampled_from(["format", "model", "model_args", "epoch", "config"]),
                                       max_size=1), damage=DAMAGE, raw=st.text(max_size=20))
def test_fuzzed_metadata_loads_or_is_a_one_line_checkpoint_error(tmp_path, meta, missing, damage, raw):
    meta = {k: v for k, v in meta.items() if k not in missing}
    name = meta["model"] if isinstance(meta.get("model"), str) and meta["model"] in STATES else "lenet5"
    tensors = dict(STATES[name])
    key = sorted(tensors)[0]
    if damage == "drop":
        del tensors[key]
    elif damage == "extra":
        tensors["extra.weight"] = torch.zeros(2, 2)
    elif damage == "shape":
        tensors[key] = torch.zeros(tensors[key].numel() + 1)
    elif damage == "dtype":
        tensors[key] = tensors[key].to(torch.float16)
    path = write(tmp_path / "fuzz.safetensors", tensors, meta, raw if damage == "not-json" else None)
    try:
        loaded = load_checkpoint(path)
    except CheckpointError as e:
        assert "\n" not in str(e)
    else:
        assert loaded.meta["model"] in STATES and damage == "none"
