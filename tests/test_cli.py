"""The command line: a real short run end to end, and every error path as one line, no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from lenet5.cli import main
from lenet5.hardware import EMULATE, choose_precision, class_note, hardware_class
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

    # The machine may change on resume (issue 11): device and threads are host settings, not the run's.
    code, out, err = run(capsys, "train", "--resume", str(run_dir), "--epochs", "3", "--device", "cpu",
                         "--threads", "1")
    assert code == 0, err
    assert "cpu (" in out and "1 threads" in out and "epoch  3  train loss" in out
    assert json.loads((run_dir / "config.json").read_text())["threads"] == 0  # the run's own settings stay

    code, _, err = run(capsys, "train", *common, "--out-dir", str(tmp_path), "--name", "r")
    assert code == 2 and "already holds a run; continue it with --resume" in err

    # A refused resume changes nothing: "--epochs 50 --device cuda" once left 50 epochs in config.json.
    if not torch.cuda.is_available():
        code, _, err = run(capsys, "train", "--resume", str(run_dir), "--epochs", "50", "--device", "cuda")
        assert code != 0 and json.loads((run_dir / "config.json").read_text())["epochs"] == 3, err
    # A training state of another optimizer is named, not a KeyError in its first step.
    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**config, "optimizer": "sgd", "lr": 0.01}))
    code, _, err = run(capsys, "train", "--resume", str(run_dir), "--epochs", "4")
    assert code == 1 and "last.state.pt: does not fit this run's config.json (its optimizer state is not sgd's" in err
    assert one_line(err), err


@pytest.mark.parametrize("name", ["..", ".", "../escaped", "a/b", "/tmp/abs"])
def test_a_run_name_stays_inside_the_out_dir(data_env, tmp_path, capsys, name):
    for command in (["train", "--epochs", "1"], ["reproduce", "lecun1998"]):
        code, _, err = run(capsys, *command, "--out-dir", str(tmp_path / "runs"), "--name", name)
        assert code == 2 and f"--name {name!r}: a run's folder name, without '/'" in err and one_line(err), err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "escaped").exists()


def test_export_refuses_to_overwrite_its_checkpoint_and_calibrate_other_data(data_env, tmp_path, capsys, checkpoint):
    before = checkpoint.read_bytes()
    for out in (checkpoint, checkpoint.with_suffix(".json")):
        code, _, err = run(capsys, "export", str(checkpoint), "--no-check", "--format", "torchscript", "--out", str(out))
        assert code == 2 and "that is the checkpoint being exported" in err and one_line(err), err
    assert checkpoint.read_bytes() == before
    bundled = tmp_path / "bundled.pt"  # no checkpoint given: the bundled model, as predict, explain and serve
    code, out, err = run(capsys, "export", "--no-check", "--format", "torchscript", "--out", str(bundled))
    assert code == 0 and bundled.is_file() and "using the bundled model" in err, err
    long = tmp_path / ("z" * 240 + ".pt")  # a legal name (and its card's) whose temporary twin once was not
    code, _, err = run(capsys, "export", str(checkpoint), "--no-check", "--format", "torchscript", "--out", str(long))
    assert code == 0 and long.is_file(), err
    assert (tmp_path / ("z" * 238 + ".pt.model-card.md")).is_file()  # its card's name cut to 255 bytes
    code, _, err = run(capsys, "train", "--dataset", "fashion-mnist", "--calibrate", "--train-samples", "1000",
                       "--out-dir", str(tmp_path))
    assert code == 2 and "--calibrate fits the digit service's 'unsure' rule on MNIST digits" in err, err


def test_a_recipe_sets_the_options_and_typed_options_win(data_env, tmp_path, capsys):
    """`--recipe fast` takes this machine's class's options; typed options win; precision stays auto."""
    hardware = hardware_class(torch.device("cpu"))
    expected = RECIPES["fast"].options_for(hardware)
    code, out, err = run(capsys, "train", "--recipe", "fast", "--device", "cpu", "--batch-size", "100",
                         "--train-samples", "1000", "--test-samples", "200", "--out-dir", str(tmp_path), "--name", "f")
    assert code == 0, err
    assert f"recipe fast for {hardware}{class_note(torch.device('cpu'))}: " in out
    assert out.count("; replaced by your options: --batch-size 100") == 1  # what the recipe line's summary no longer says
    assert f"model {expected['model']} (" in out and f"| batch 100 | {expected['epochs']} epochs " in out
    precision = expected.get("precision", "auto")
    if precision == "auto":
        assert f"precision {choose_precision('auto', torch.device('cpu')).precision}: auto: CPU class " in out
    else:  # the avx512-bf16 class's recipe names the precision it was measured in
        assert f"precision {precision}: the fast recipe's for {hardware}" in out
    config = json.loads((tmp_path / "f" / "config.json").read_text())
    assert config["precision"] == precision and config["batch_size"] == 100
    assert all(config[k] == v for k, v in expected.items() if k != "batch_size")
    recipe = json.loads((tmp_path / "f" / "run.json").read_text())["recipe"]  # also where --quiet prints no line
    assert recipe == {"name": "fast", "hardware_class": hardware, "why": RECIPES["fast"].why_for(hardware)}


def test_a_precision_the_recipe_names_is_the_recipes_choice_not_the_users(data_env, tmp_path, capsys, monkeypatch):
    """Where the fast recipe names fp32 (the avx512-bf16 class's, measured so), the run says the recipe
    chose it; typed by the user, it says so."""
    from lenet5 import hardware
    from lenet5.cli import train

    monkeypatch.setattr(train, "hardware_class", lambda device, probe=True: "avx512-bf16")
    monkeypatch.setattr(hardware, "bf16_probe", lambda: hardware.Bf16Probe(10.0, 1.0))
    options = ["--device", "cpu", "--train-samples", "500", "--test-samples", "100", "--epochs", "1", "--quiet",
               "--out-dir", str(tmp_path)]
    assert RECIPES["fast"].options_for("avx512-bf16")["precision"] == "fp32"
    for name, typed, reason in (("r", [], "the fast recipe's for avx512-bf16"), ("t", ["--precision", "fp32"], "asked for")):
        code, out, err = run(capsys, "train", "--recipe", "fast", *typed, *options, "--name", name)
        assert code == 0, err
        info = json.loads((tmp_path / name / "run.json").read_text())
        assert info["precision"] == "fp32" and info["precision_reason"] == reason
        assert info["recipe"]["hardware_class"] == "avx512-bf16"


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
    (["train", "--resume", "nowhere", "--lr", "0.1"], 2, "only --epochs and the host settings"),
    (["train", "--resume", "nowhere"], 1, "not a run folder"),
    (["train", "--resume", "nowhere", "--recipe", "fast"], 2, "only --epochs and the host settings"),
    (["train", "--precision", "bf16", "--stop-at", "1.5"], 2, "--stop-at is an accuracy between 0 and 1"),
    (["evaluate", "missing.safetensors"], 1, "checkpoint not found"),
    (["evaluate", "x.safetensors", "--batch-size", "0"], 2, "--batch-size must be positive"),
    (["data", "--timeout", "0"], 2, "--timeout must be positive"),
    (["data", "--timeout", "nan"], 2, "--timeout must be positive seconds, at most 86400, got nan"),
    (["data", "--timeout", "inf"], 2, "got inf"),
    (["data", "--retries", "1000000"], 2, "--retries must be from 0 to 100, got 1000000"),
    (["train", "--test-samples", "10001"], 2, "--test-samples 10,001 is more than the 10,000 images there are"),
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
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines()[1:]}
    assert rows["keras-lenet"] == "1,256,080" and rows["lenet5"] == "61,706" and rows["lenet5-modern"] == "56,042"
    assert rows["robust-lenet"] == "82,258"
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


# ---------------------------------------------------------------- one line, never a traceback
def one_line(err: str) -> bool:
    return len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.fixture
def checkpoint(tmp_path):
    from lenet5.checkpoint import save_checkpoint
    from lenet5.models import create_model

    return save_checkpoint(tmp_path / "ckpt", create_model("lenet5"), epoch=1)


@pytest.mark.parametrize("options, message", [
    (["--lr", "nan"], "--lr must be a finite number, got nan"),
    (["--lr", "inf"], "--lr must be a finite number, got inf"),
    (["--momentum=-inf"], "--momentum must be a finite number"),
    (["--config", "{config}"], "--device must be a string, got 5"),
])
def test_impossible_numbers_and_config_files_are_refused_before_the_run_folder(data_env, tmp_path, capsys,
                                                                              options, message):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"device": 5}))
    options = [o.replace("{config}", str(bad)) for o in options]
    code, _, err = run(capsys, "train", *options, "--out-dir", str(tmp_path / "runs"), "--name", "r")
    assert code == 2 and message in err and one_line(err), err
    assert not (tmp_path / "runs").exists()


def test_a_config_file_with_a_fractional_batch_is_refused(data_env, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"batch_size": 32.5}))
    code, _, err = run(capsys, "train", "--config", str(bad), "--out-dir", str(tmp_path / "runs"))
    assert code == 2 and "--batch-size must be an integer, got 32.5" in err and one_line(err)
    assert not (tmp_path / "runs").exists()


def test_damaged_checkpoint_metadata_is_one_line(data_env, tmp_path, capsys):
    from safetensors.torch import save as safetensors_bytes

    from lenet5.checkpoint import FORMAT
    from lenet5.models import create_model

    bad = tmp_path / "bad.safetensors"
    meta = {"format": FORMAT, "model": "lenet5", "model_args": {"num_classes": "ten"}, "epoch": "one"}
    bad.write_bytes(safetensors_bytes(create_model("lenet5").state_dict(), metadata={"lenet5": json.dumps(meta)}))
    for command in (["evaluate", str(bad)], ["export", str(bad), "--no-check", "--out", str(tmp_path / "m.onnx")],
                    ["explain", str(bad), "--test-index", "0"]):
        code, _, err = run(capsys, *command)
        assert code == 1 and "damaged lenet5 metadata: model argument 'num_classes' must be an integer" in err
        assert one_line(err), err


def test_outputs_onto_folders_and_files_are_one_line(data_env, tmp_path, capsys, checkpoint, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "folder"
    folder.mkdir()
    code, _, err = run(capsys, "export", str(checkpoint), "--no-check", "--format", "torchscript", "--out", str(folder))
    assert code == 1 and f"{folder}: is a folder" in err and one_line(err), err
    code, _, err = run(capsys, "explain", str(checkpoint), "--test-index", "0", "--out", str(folder))
    assert code == 1 and f"{folder}: cannot write: is a folder, not a file" in err and one_line(err), err
    for bad in ("0", "100000"):  # 100,000 columns ended in std::bad_alloc
        code, _, err = run(capsys, "explain", str(checkpoint), "--test-index", "0", "--max-maps", bad)
        assert code == 2 and f"--max-maps must be 1 to 512, got {bad}" in err and one_line(err), err
    for maps in ("1", "512"):  # 1 or 2 columns failed to lay out; 1,000 took minutes: the widest layer's count at most
        code, out, err = run(capsys, "explain", str(checkpoint), "--test-index", "0", "--max-maps", maps,
                             "--out", str(tmp_path / f"maps-{maps}.png"))
        assert code == 0 and (tmp_path / f"maps-{maps}.png").stat().st_size > 1000, err
    report = tmp_path / "report.md"
    report.write_text("mine")
    code, _, err = run(capsys, "evaluate", str(checkpoint), "--report", str(report))
    assert code == 2 and f"{report}: is a file; the report needs a folder" in err and one_line(err), err
    assert report.read_text() == "mine"


@pytest.mark.parametrize("errno_name", ["ENOSPC", "EDQUOT", "EROFS", "EACCES"])
def test_a_full_disk_is_one_line_and_the_run_resumes_once_space_is_freed(data_env, tmp_path, capsys, monkeypatch,
                                                                         errno_name):
    """The disk fills up (or turns read-only, or forbidden) when the first epoch is committed:
    exit 1 naming the file; the folder holds no committed epoch, so --resume trains it from the
    start once the disk is fixed. (Tests run as root, so the failure is simulated.)"""
    import errno

    code_of = getattr(errno, errno_name)
    replace = os.replace

    def full_disk(src, dst, *args, **kwargs):
        if str(dst).endswith("last.state.pt"):
            raise OSError(code_of, os.strerror(code_of))
        return replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", full_disk)
    options = ["--model", "lenet5", "--batch-size", "100", "--train-samples", "500", "--test-samples", "200",
               "--epochs", "1", "--quiet", "--out-dir", str(tmp_path), "--name", "r"]
    code, _, err = run(capsys, "train", *options)
    run_dir = tmp_path / "r"
    assert code == 1 and one_line(err), err
    assert f"{run_dir / 'checkpoints' / 'last.state.pt'}: cannot write: {os.strerror(code_of)}" in err
    assert not list(run_dir.rglob("*.tmp"))
    monkeypatch.setattr(os, "replace", replace)
    code, out, err = run(capsys, "train", "--resume", str(run_dir), "--quiet")
    assert code == 0, err
    assert "after 1 epochs" in out and json.loads((run_dir / "metrics.json").read_text())["epochs"] == 1


def test_a_recipes_label_smoothing_is_dropped_for_a_model_without_logits(data_env, tmp_path, capsys):
    """--recipe fast --model lenet5-1998 failed with "--label-smoothing needs a model with logit outputs",
    an option the user never typed; the recipe's smoothing is for its own network."""
    code, _, err = run(capsys, "train", "--recipe", "fast", "--model", "lenet5-1998", "--device", "cpu", "--epochs", "1",
                       "--train-samples", "300", "--test-samples", "100", "--out-dir", str(tmp_path), "--name", "r",
                       "--no-calibrate")
    assert code == 0, err
    assert json.loads((tmp_path / "r" / "config.json").read_text())["label_smoothing"] == 0
    code, _, err = run(capsys, "train", "--model", "lenet5-1998", "--label-smoothing", "0.1", "--epochs", "1",
                       "--out-dir", str(tmp_path), "--name", "typed")
    assert code == 2 and "--label-smoothing" in err  # typed, it is still an error


def test_the_hint_after_a_stop_offers_resume_only_for_a_begun_run(tmp_path):
    from lenet5.distributed import resume_hint

    assert resume_hint(tmp_path / "none") == "nothing was trained yet: run the same command again"
    assert resume_hint(None) == "nothing was trained yet: run the same command again"
    (tmp_path / "begun").mkdir()
    (tmp_path / "begun" / "config.json").write_text("{}")
    assert resume_hint(tmp_path / "begun") == f"continue with `lenet5 train --resume {tmp_path / 'begun'}`"
