"""The command line: a real short run end to end, and every error path as one line, no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from lenet5.cli import main
from lenet5.hardware import EMULATE, choose_precision, hardware_class
from lenet5.train.config import RECIPES


@pytest.fixture
def data_env(mnist_dir, monkeypatch):
    monkeypatch.setenv("LENET5_DATA", str(mnist_dir))
    monkeypatch.setenv("LENET5_OFFLINE", "1")


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_train_evaluate_resume_end_to_end(data_env, tmp_path, capsys):
    common = ["--model", "lenet5", "--optimizer", "adam", "--batch-size", "100", "--train-samples", "3000",
              "--test-samples", "500"]
    code, out, err = run(capsys, "train", *common, "--epochs", "1", "--out-dir", str(tmp_path), "--name", "r")
    assert code == 0, err
    assert "model lenet5 (61,706 parameters) | adam lr 0.001" in out
    assert "epoch  1  train loss" in out and "test accuracy" in out
    run_dir = tmp_path / "r"
    history = json.loads((run_dir / "history.json").read_text())

    code, out, err = run(capsys, "evaluate", str(run_dir), "--test-samples", "500", "--json")
    assert code == 0, err
    assert json.loads(out)["test_accuracy"] == pytest.approx(history[0]["test_acc"])

    code, out, err = run(capsys, "train", "--resume", str(run_dir), "--epochs", "2")
    assert code == 0, err
    assert "resuming after epoch 1" in out and "epoch  2  train loss" in out
    assert len(json.loads((run_dir / "history.json").read_text())) == 2

    code, _, err = run(capsys, "train", *common, "--out-dir", str(tmp_path), "--name", "r")
    assert code == 2 and "already holds a run; continue it with --resume" in err


def test_a_recipe_sets_the_options_and_typed_options_win(data_env, tmp_path, capsys):
    """`--recipe fast` takes this machine's class's options; typed options win; precision stays auto."""
    hardware = hardware_class(torch.device("cpu"))
    expected = RECIPES["fast"].options_for(hardware)
    code, out, err = run(capsys, "train", "--recipe", "fast", "--device", "cpu", "--batch-size", "100",
                         "--train-samples", "1000", "--test-samples", "200", "--out-dir", str(tmp_path), "--name", "f")
    assert code == 0, err
    assert f"recipe fast for {hardware}: " in out
    assert f"model {expected['model']} (" in out and f"| batch 100 | {expected['epochs']} epochs " in out
    assert f"precision {choose_precision('auto', torch.device('cpu')).precision}: auto: CPU class {hardware}" in out
    config = json.loads((tmp_path / "f" / "config.json").read_text())
    assert config["precision"] == "auto" and config["batch_size"] == 100
    assert all(config[k] == v for k, v in expected.items() if k != "batch_size")


def test_bf16_where_it_is_emulated_warns(mnist_dir, tmp_path):
    env = {**os.environ, **EMULATE["avx2"], "LENET5_DATA": str(mnist_dir), "LENET5_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "lenet5", "train", "--model", "lenet5", "--precision", "bf16",
                             "--device", "cpu", "--batch-size", "100", "--train-samples", "200", "--test-samples", "100",
                             "--epochs", "1", "--out-dir", str(tmp_path), "--name", "b"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "warning: --precision bf16 will be slow on this machine" in result.stderr
    assert json.loads((tmp_path / "b" / "run.json").read_text())["precision_slow"] is True


@pytest.mark.parametrize("argv, code, message", [
    (["train", "--epochs", "-1"], 2, "--epochs must be positive, got -1"),
    (["train", "--model", "lenet7"], 2, "unknown model 'lenet7'"),
    (["train", "--batch-size", "0"], 2, "--batch-size must be positive"),
    (["train", "--train-samples", "10", "--batch-size", "32"], 2, "larger than the 10 training images"),
    (["train", "--resume", "nowhere", "--lr", "0.1"], 2, "only --epochs may be given"),
    (["train", "--resume", "nowhere"], 1, "not a run folder"),
    (["train", "--resume", "nowhere", "--recipe", "fast"], 2, "only --epochs may be given"),
    (["train", "--precision", "bf16", "--stop-at", "1.5"], 2, "--stop-at is a test accuracy between 0 and 1"),
    (["evaluate", "missing.safetensors"], 1, "checkpoint not found"),
    (["evaluate", "x.safetensors", "--batch-size", "0"], 2, "--batch-size must be positive"),
    (["data", "--timeout", "0"], 2, "--timeout must be positive"),
])
def test_impossible_requests_end_in_one_clear_line(data_env, tmp_path, capsys, monkeypatch, argv, code, message):
    monkeypatch.chdir(tmp_path)
    got, out, err = run(capsys, *argv)
    assert got == code
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_missing_data_offline(tmp_path, capsys):
    code, _, err = run(capsys, "train", "--data-dir", str(tmp_path), "--offline", "--out-dir", str(tmp_path))
    assert code == 1
    assert f"train-images-idx3-ubyte.gz not found in {tmp_path} and downloads are off" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_asking_for_a_missing_gpu(data_env, tmp_path, capsys):
    code, _, err = run(capsys, "train", "--device", "cuda", "--out-dir", str(tmp_path))
    assert code == 2 and "CUDA is not available" in err


def test_models_and_data_listings(data_env, capsys):
    code, out, _ = run(capsys, "models")
    assert code == 0
    assert "keras-lenet   1,256,080" in out and "lenet5           61,706" in out
    code, out, _ = run(capsys, "data")
    assert code == 0
    assert out.count("sha256 ok") == 4 and "5923 6742 5958" in out


def test_the_module_and_console_script_entry_points(data_env, tmp_path):
    env = {**os.environ}
    result = subprocess.run([sys.executable, "-m", "lenet5", "models", "--json"], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert {m["name"] for m in json.loads(result.stdout)} >= {"keras-lenet", "lenet5"}
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    result = subprocess.run([sys.executable, "-m", "lenet5", "evaluate", str(bad)], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 1
    assert "bad.safetensors: not a readable safetensors checkpoint" in result.stderr
    assert "Traceback" not in result.stderr


def test_data_command_downloads_from_a_mirror_and_verifies(mnist_dir, tmp_path, capsys):
    from mirror import Mirror

    with Mirror(mnist_dir) as mirror:
        code, out, err = run(capsys, "data", "--data-dir", str(tmp_path), "--mirror", mirror.url("html"),
                             "--mirror", mirror.url("good"), "--retries", "0")
    assert code == 0, err
    assert out.count("sha256 ok") == 4 and "10,000 images" in out
    with Mirror(mnist_dir) as mirror:
        code, _, err = run(capsys, "data", "--data-dir", str(tmp_path / "empty"), "--mirror", mirror.url("wrong"),
                           "--retries", "0")
    assert code == 1 and "checksum mismatch" in err and len(err.strip().splitlines()) == 1
    assert not any((tmp_path / "empty").iterdir())
