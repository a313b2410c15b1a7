"""The 1998 network against the paper's numbers, SDLM, and the distortions."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from torch.nn import functional as F

from lenet5.data import MNIST
from lenet5.data.augment import distortion
from lenet5.data.distort import DEFAULT_RANGES, DistortionRanges, random_affine
from lenet5.data.transforms import to_model_input
from lenet5.errors import ConfigError
from lenet5.models import count_parameters, create_model
from lenet5.models.lenet5_1998 import A, C3_TABLE, S, connections, rbf_prototypes, squash
from lenet5.reproduce import (DISTORTION_SHARE, DISTORTION_STRENGTH, DISTORTION_SWEEPS, ETA_PER_SAMPLE, ETA_PER_SAMPLE_BATCHED, RBF_J,
                              lecun1998_config, recipe_settings,
                              reproduce_lecun1998, write_seed_summary)
from lenet5.train import TrainConfig, TrainingError, fit
from lenet5.train.optim import lr_multiplier
from lenet5.train.sdlm import SDLM, diagonal_hessian


@pytest.fixture
def model():
    torch.manual_seed(0)
    return create_model("lenet5-1998")


def test_parameters_and_connections_per_layer_are_the_papers(model):
    per_layer = {name: count_parameters(getattr(model, name)) for name in ("C1", "S2", "C3", "S4", "C5", "F6")}
    assert per_layer == {"C1": 156, "S2": 12, "C3": 1516, "S4": 32, "C5": 48_120, "F6": 10_164}
    assert count_parameters(model) == 60_000
    assert connections(model) == {"C1": 122_304, "S2": 5_880, "C3": 151_600, "S4": 2_000, "C5": 48_120,
                                  "F6": 10_164, "output": 840, "total": 340_908}


def test_squash_and_input_scaling(model):
    assert squash(torch.tensor([1.0, -1.0, 0.0])).tolist() == pytest.approx([1.0, -1.0, 0.0], abs=1e-4)
    assert (A, S) == (1.7159, 2 / 3)
    x = torch.zeros(1, 1, 28, 28)
    x[0, 0, 10, 10] = 1.0
    inp = model.input_transform(x)
    assert inp.shape == (1, 1, 32, 32)
    assert inp[0, 0, 12, 12].item() == pytest.approx(1.175)  # ink, shifted by the 2-pixel border
    assert inp[0, 0, 0, 0].item() == pytest.approx(-0.1) and inp.min().item() == pytest.approx(-0.1)


def test_c3_connects_only_table_one(model):
    kernel = model.C3.dense_kernel()
    for o in range(16):
        for i in range(6):
            connected = i in C3_TABLE[o]
            assert bool(kernel[o, i].abs().sum() > 0) == connected, (o, i)
    # An S2 map outside a C3 map's row of the table cannot change that map's output.
    s2 = torch.randn(2, 6, 14, 14)
    poked = s2.clone()
    poked[:, 5] += 10.0
    before, after = model.C3(s2), model.C3(poked)
    for o, inputs in enumerate(C3_TABLE):
        assert torch.equal(before[:, o], after[:, o]) == (5 not in inputs), o


def test_unconnected_kernels_stay_zero_through_training(model, mnist):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = to_model_input(mnist.train.images[:64]), mnist.train.labels[:64]
    dense = model.C3.dense_kernel()
    dense.retain_grad()
    F.conv2d(torch.randn(2, 6, 14, 14), dense).sum().backward()
    for o in range(16):
        for i in range(6):
            if i not in C3_TABLE[o]:
                assert torch.count_nonzero(dense.grad[o, i]) > 0  # a dense kernel would learn here...
    for _ in range(5):
        optimizer.zero_grad()
        model.loss(model(x), y).backward()
        optimizer.step()
    kernel = model.C3.dense_kernel()
    for o in range(16):
        for i in range(6):
            if i not in C3_TABLE[o]:
                assert torch.count_nonzero(kernel[o, i]) == 0  # ...the sparse C3 cannot


def test_rbf_prototypes_are_fixed_plus_minus_one_bitmaps(model, mnist):
    prototypes = rbf_prototypes()
    assert prototypes.shape == (10, 84) and set(prototypes.unique().tolist()) == {-1.0, 1.0}
    distances = torch.cdist(prototypes, prototypes, p=1) / 2  # Hamming distance between bitmaps
    assert distances[~torch.eye(10, dtype=torch.bool)].min() >= 8  # every digit is distinct
    assert "output.prototypes" not in dict(model.named_parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    optimizer.zero_grad()
    model.loss(model(to_model_input(mnist.train.images[:32])), mnist.train.labels[:32]).backward()
    optimizer.step()
    assert torch.equal(model.output.prototypes, prototypes)


def test_rbf_output_and_loss_match_a_hand_computation(model):
    features = torch.zeros(1, 84)
    assert model.output(features).tolist() == [[84.0] * 10]  # every prototype is at distance 84 from 0
    penalties = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0]])
    j = model.j
    expected = 3.0 + math.log(math.exp(-j) + sum(math.exp(-v) for v in range(1, 11)))
    assert model.loss(penalties, torch.tensor([2])).item() == pytest.approx(expected, rel=1e-6)
    assert model.logits(penalties).argmax(1).item() == 0  # the smallest penalty wins


def test_sdlm_hessian_is_positive_and_steps_are_sane(model, mnist):
    images = mnist.train.images[:500]
    hessian = diagonal_hessian(model, images)
    for name, p in model.named_parameters():
        assert hessian[p].shape == p.shape and (hessian[p] >= 0).all() and hessian[p].sum() > 0, name
    # F6's weights share nothing, so the estimate is exact there: 2 f'(a)^2 x^2 averaged.
    with torch.no_grad():
        maps = model.activations(to_model_input(images))
        fprime2 = (A * S * (1 - (maps["F6"] / A) ** 2)) ** 2
        exact = (2 * fprime2[:, :, None] * maps["C5"].flatten(1)[:, None, :] ** 2).mean(0)
    torch.testing.assert_close(hessian[model.F6.weight], exact, rtol=1e-4, atol=1e-9)
    optimizer = SDLM(model.parameters(), lr=5e-4, mu=0.02)
    optimizer.set_hessian(hessian)
    model.loss(model(to_model_input(images[:8])), mnist.train.labels[:8]).backward()
    optimizer.step()
    for p in model.parameters():
        steps = optimizer.state[p]["step_size"]
        assert (steps <= 5e-4 / 0.02 + 1e-12).all() and (steps > 0).all()


def test_the_papers_schedule():
    rates = lr_multiplier(TrainConfig(model="lenet5-1998", optimizer="sdlm", schedule="lecun1998", epochs=20), 10)
    per_pass = [rates(10 * p) * 5e-4 for p in range(20)]
    assert per_pass == pytest.approx([5e-4] * 2 + [2e-4] * 3 + [1e-4] * 3 + [5e-5] * 4 + [1e-5] * 8)


@pytest.mark.parametrize("batch", [1, 16])
def test_the_papers_schedule_capped(batch):
    """The paper's own rates per pattern, scaled to the batch, none above --lr."""
    config = TrainConfig(model="lenet5-1998", optimizer="sdlm", schedule="lecun1998-capped", epochs=20,
                         lr=2e-5 * batch, batch_size=batch)
    rates = lr_multiplier(config, 10)
    per_pattern = [rates(10 * p + 9) * config.lr / batch for p in range(20)]
    assert per_pattern == pytest.approx([2e-5] * 12 + [1e-5] * 8)
    uncapped = dataclasses.replace(config, lr=5e-4 * batch)
    paper = lr_multiplier(uncapped, 10)
    assert [paper(10 * p) * 5e-4 for p in range(20)] == pytest.approx(
        [5e-4] * 2 + [2e-4] * 3 + [1e-4] * 3 + [5e-5] * 4 + [1e-5] * 8)


def test_sdlm_training_learns(mnist, tmp_path):
    config = lecun1998_config(batch_size=16, epochs=1)
    config.train_samples, config.test_samples = 10_000, 1_000
    result = fit(config, mnist, tmp_path / "run")
    assert result.history[0]["test_acc"] > 0.90


def test_the_per_pattern_cap_is_too_large_for_batches_of_16(mnist, tmp_path):
    """Why the mini-batch variant keeps a cap of 1e-5: 16 x 2e-5 per update saturates F6 in its first pass."""
    config = dataclasses.replace(lecun1998_config(batch_size=16, epochs=1), lr=16 * ETA_PER_SAMPLE,
                                 train_samples=10_000, test_samples=1_000)
    assert ETA_PER_SAMPLE == 2 * ETA_PER_SAMPLE_BATCHED
    per_pattern, batched = lecun1998_config(), lecun1998_config(batch_size=16)
    assert (per_pattern.lr, per_pattern.schedule) == (ETA_PER_SAMPLE, "lecun1998-capped")
    assert (batched.lr, batched.schedule) == (16 * ETA_PER_SAMPLE_BATCHED, "lecun1998")
    distorted = lecun1998_config(distortions=True), lecun1998_config(distortions=True, batch_size=16)
    assert [(c.distort, c.distort_strength, c.distort_share, c.epoch_repeats) for c in distorted] == [
        (True, DISTORTION_STRENGTH, DISTORTION_SHARE, DISTORTION_SWEEPS), (True, 1.0, 1.0, 1)]
    assert (per_pattern.distort_share, per_pattern.epoch_repeats) == (1.0, 1)  # plain: as the paper's plain pass
    assert [c.rbf_j for c in (per_pattern, batched, *distorted)] == [RBF_J[False], None, RBF_J[True], None]
    assert fit(config, mnist, tmp_path / "run").history[0]["test_acc"] < 0.5


def test_distortions_keep_the_digit_in_the_frame(mnist):
    x = to_model_input(mnist.train.images[:1000])
    assert torch.allclose(random_affine(x, DistortionRanges(0, 0, 0, 0)), x, atol=1e-5)
    distorted = random_affine(x, generator=torch.Generator().manual_seed(0))
    assert distorted.shape == x.shape and distorted.min() >= 0 and distorted.max() <= 1 + 1e-6
    assert (distorted - x).abs().flatten(1).amax(1).min() > 0.1  # every digit was moved
    # The same maps on a frame with 8 more pixels each side: what falls outside 28x28 was lost.
    wide = random_affine(F.pad(x, (8, 8, 8, 8)), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(wide[..., 8:36, 8:36], distorted, atol=1e-4, rtol=0)
    lost = 1 - wide[..., 8:36, 8:36].sum((1, 2, 3)) / wide.sum((1, 2, 3))
    assert lost.median() < 0.001 and torch.quantile(lost, 0.99) < 0.05


def test_distortion_strength_and_share(mnist):
    x = to_model_input(mnist.train.images[:2000])

    def moved(strength: float, share: float) -> torch.Tensor:  # per image: the largest pixel change
        out = distortion(strength, share)(x, generator=torch.Generator().manual_seed(0))
        return (out - x).abs().flatten(1).amax(1)

    assert distortion() is random_affine
    assert DEFAULT_RANGES.scaled(0.5) == DistortionRanges(1.0, 0.05, 0.05, 0.1)
    full, half = moved(1.0, 1.0), moved(0.5, 1.0)
    assert (full > 1e-3).all() and (half > 1e-3).all()
    # Half the ranges moves ink less: the same draws, every map closer to the identity.
    assert (x - distortion(0.5)(x, generator=torch.Generator().manual_seed(0))).abs().sum() < \
        0.7 * (x - distortion(1.0)(x, generator=torch.Generator().manual_seed(0))).abs().sum()
    kept = (moved(1.0, 0.9) == 0).float().mean().item()  # left exactly as they were
    assert 0.08 < kept < 0.12


@pytest.mark.parametrize("option", [{"distort_strength": 0.0}, {"distort_strength": 4.0}, {"distort_share": 0.0},
                                    {"distort_share": 1.5}])
def test_distortion_options_are_checked(option):
    with pytest.raises(ConfigError, match=next(iter(option)).replace("_", "-")):
        TrainConfig(model="lenet5-1998", distort=True, **option).validate()


def test_reproduce_writes_its_report(mnist, tmp_path):
    small = MNIST(train=mnist.train.head(2_000), test=mnist.test.head(500), root=mnist.root)
    result, report = reproduce_lecun1998(small, tmp_path / "run", epochs=1, batch_size=16, distortions=True,
                                         command="test")
    text = report.read_text()
    assert "test error against the paper's 0.80%" in text and "| 1 |" in text
    assert "shift +-2 px" in text  # the mini-batch variant keeps the full ranges
    assert (tmp_path / "run" / "error_curves.png").stat().st_size > 1000
    assert (tmp_path / "run" / "misclassified.png").stat().st_size > 1000
    assert "train_eval_acc" in result.history[0]


def test_reproduce_over_seeds_summarises_and_resumes(mnist_dir, tmp_path, capsys):
    """--seeds 2 --jobs 2: two per-pattern reproductions (one pass each) as child processes, a summary
    with mean +- sd over them, and --resume of the folder finds both done."""
    from lenet5.cli import main

    args = ["reproduce", "lecun1998", "--seeds", "2", "--seed", "5", "--jobs", "2", "--epochs", "1",
            "--data-dir", str(mnist_dir), "--offline", "--out-dir", str(tmp_path), "--name", "two"]
    assert main(args) == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    errors = [json.loads((tmp_path / "two" / f"seed-{k}" / "metrics.json").read_text())["test_error"] for k in (5, 6)]
    assert [r["seed"] for r in summary["runs"]] == [5, 6] and summary["seeds"] == 2
    assert abs(summary["mean"] - sum(errors) / 2) < 1e-12 and summary["min"] == min(errors)
    assert abs(summary["sd"] - abs(errors[0] - errors[1]) / 2 ** 0.5) < 1e-12  # the sample sd of two values
    assert 0 < summary["mean"] < 0.05 and summary["paper_test_error"] == 0.0095
    assert "test error over 2 seeds" in out and (tmp_path / "two" / "summary.md").is_file()
    assert json.loads((tmp_path / "two" / "seed-5" / "config.json").read_text())["batch_size"] == 1  # the paper's
    assert main(["reproduce", "lecun1998", "--resume", str(tmp_path / "two"), "--data-dir", str(mnist_dir),
                 "--offline"]) == 0
    assert capsys.readouterr().out.count("done before") == 2
    one = write_seed_summary(tmp_path / "two", {5: tmp_path / "two" / "seed-5"}, distortions=False, command="test",
                             planned=[5, 6])  # seed 6 not finished: a figure over one seed has no sd, and says so
    text = (tmp_path / "two" / "summary.md").read_text()
    assert one["sd"] is None and one["unfinished"] == [6] and summary["unfinished"] == []
    assert "(one seed: no sd)" in text and "Not finished: seed 6** of the 2 planned" in text
    assert main(args) == 2  # the folder is taken
    assert "already exists and is not empty" in capsys.readouterr().err
    # A plan made before the recipe's distortions changed cannot be continued by this version,
    plan = json.loads((tmp_path / "two" / "seeds.json").read_text())
    assert (plan["distort_strength"], plan["distort_share"], plan["epoch_repeats"]) == (1.0, 1.0, 1)  # plain
    assert plan["rbf_j"] == RBF_J[False] and summary["rbf_j"] == RBF_J[False]
    assert f"Loss: eq. 9 with j = {RBF_J[False]:g}" in (tmp_path / "two" / "seed-5" / "report.md").read_text()
    resume_args = ["reproduce", "lecun1998", "--resume", str(tmp_path / "two"), "--data-dir", str(mnist_dir),
                   "--offline"]
    (tmp_path / "two" / "seeds.json").write_text(json.dumps({**plan, "rbf_j": RBF_J[False] + 1}))
    assert main(resume_args) == 0  # another j, but every seed has its run (which keeps its own config)
    assert capsys.readouterr().out.count("done before") == 2
    (tmp_path / "two" / "seeds.json").write_text(json.dumps({**plan, "rbf_j": RBF_J[False] + 1, "seeds": [5, 6, 7]}))
    assert main(resume_args) == 2  # seed 7 would start with another j
    assert f"planned with j = {RBF_J[False] + 1:g}, and this version's recipe uses j = {RBF_J[False]:g}" in (
        capsys.readouterr().err)
    plan.update(distortions=True, seeds=[5, 6, 7])
    for key in ("rbf_j", "distort_strength", "distort_share", "epoch_repeats"):
        del plan[key]  # as plans made before the options were written
    (tmp_path / "two" / "seeds.json").write_text(json.dumps(plan))
    assert main(resume_args) == 2
    assert (f"planned with j = 0.1, 1x lenet5.data.distort's ranges, and this version's recipe uses "
            f"j = {RBF_J[True]:g}, {DISTORTION_STRENGTH:g}x lenet5.data.distort's ranges on 90% of the digits, "
            f"10 sweeps a pass") in capsys.readouterr().err
    # and seeds that ran with different recipes make no summary.
    runs = {k: tmp_path / "two" / f"seed-{k}" for k in (5, 6)}
    for k, changes in ((5, {"distort_strength": 1.0}), (6, {"distort_strength": 1.0, "epoch_repeats": 10})):
        config = json.loads((runs[k] / "config.json").read_text())
        (runs[k] / "config.json").write_text(json.dumps({**config, "distort": True, **changes}))
    with pytest.raises(TrainingError, match="different recipes .*10 sweeps a pass"):
        write_seed_summary(tmp_path / "two", runs, distortions=True, command="test")
    summary = write_seed_summary(tmp_path / "two", {6: runs[6]}, distortions=True, command="test")
    assert summary["distortion"] == {"distort_strength": 1.0, "distort_share": 1.0, "epoch_repeats": 10}
    assert f"(j = {RBF_J[False]:g}, 1x lenet5.data.distort's ranges, 10 sweeps a pass)" in (
        tmp_path / "two" / "summary.md").read_text()
    config = json.loads((runs[5] / "config.json").read_text())
    (runs[5] / "config.json").write_text(json.dumps({**config, "epoch_repeats": 10, "rbf_j": 7.0}))
    with pytest.raises(TrainingError, match=f"different recipes \\(j = {RBF_J[False]:g}, .*; j = 7, "):
        write_seed_summary(tmp_path / "two", runs, distortions=True, command="test")


def test_rbf_j_reaches_the_per_pattern_pass_and_the_checkpoint(mnist, tmp_path):
    """--rbf-j sets eq. 9's constant for the native per-pattern pass and is kept in the checkpoint."""
    from lenet5.checkpoint import load_checkpoint

    with pytest.raises(ConfigError, match="--rbf-j is the constant of lenet5-1998's loss"):
        TrainConfig(model="lenet5", rbf_j=1.0).validate()
    for bad in (0.0, -1.0, 101.0):
        with pytest.raises(ConfigError, match=r"--rbf-j must be in \(0, 100\]"):
            dataclasses.replace(lecun1998_config(), rbf_j=bad).validate()
    losses = {}
    for j in (None, 0.1, 3.0):
        config = dataclasses.replace(lecun1998_config(epochs=1), rbf_j=j, train_samples=300, test_samples=100,
                                     hessian_samples=50, threads=1)
        result = fit(config, mnist, tmp_path / f"j{j}")
        losses[j] = result.history[0]["train_loss"]
        checkpoint = load_checkpoint(tmp_path / f"j{j}")
        assert checkpoint.model.j == (0.1 if j is None else j)
    assert losses[None] == losses[0.1]  # the default is the paper-less 0.1, exactly
    assert losses[3.0] != losses[0.1]


def test_rbf_codes_random_replaces_the_bitmaps(mnist, tmp_path):
    """--rbf-codes random: section II.B's random +-1 codes instead of the digit bitmaps, kept in the checkpoint."""
    from lenet5.checkpoint import load_checkpoint
    from lenet5.models.lenet5_1998 import random_prototypes

    with pytest.raises(ConfigError, match="--rbf-codes are the fixed codes of lenet5-1998's RBF output"):
        TrainConfig(model="keras-lenet", rbf_codes="random").validate()
    with pytest.raises(ValueError, match="codes must be one of bitmaps, random"):
        create_model("lenet5-1998", codes="gray")
    with pytest.raises(ValueError, match="the RBF bitmaps are of the ten digits; 26 classes get random codes"):
        create_model("lenet5-1998", num_classes=26, codes="bitmaps")
    assert torch.equal(create_model("lenet5-1998", num_classes=26).output.prototypes, random_prototypes(26))
    config = dataclasses.replace(lecun1998_config(epochs=1), rbf_codes="random", train_samples=300, test_samples=100,
                                 hessian_samples=50, threads=1)
    fit(config, mnist, tmp_path / "random")
    model = load_checkpoint(tmp_path / "random").model
    assert torch.equal(model.output.prototypes, random_prototypes(10))
    assert not torch.equal(model.output.prototypes, rbf_prototypes())


def test_lecun_init_sqrt_draws_from_the_wider_range():
    """--lecun-init sqrt draws every weight and bias from +-2.4/sqrt(F) instead of appendix A's +-2.4/F."""
    ranges = {}
    for init in ("paper", "sqrt"):
        torch.manual_seed(0)
        model = create_model("lenet5-1998", init=init)
        ranges[init] = {name: p.abs().max().item() for name, p in model.named_parameters()}
    fan_in = {"C1": 25, "S2": 4, "S4": 4, "C5": 400, "F6": 120}
    for name, largest in ranges["paper"].items():
        layer = name.split(".")[0]
        if layer in fan_in:  # C3's fan-in differs per map (75, 100 or 150); bounded by its smallest below
            assert largest <= 2.4 / fan_in[layer]
            assert ranges["sqrt"][name] <= 2.4 / fan_in[layer] ** 0.5
            assert ranges["sqrt"][name] > 2.4 / fan_in[layer]  # so the range really widened
    assert ranges["paper"]["C3.weight"] <= 2.4 / 75 < ranges["sqrt"]["C3.weight"] <= 2.4 / 75**0.5
    assert ranges["sqrt"]["C5.weight"] > 0.9 * 2.4 / 20  # 48,000 draws come close to the bound
    with pytest.raises(ValueError, match="init must be one of paper, sqrt"):
        create_model("lenet5-1998", init="xavier")
    with pytest.raises(ConfigError, match="--lecun-init is lenet5-1998's initialisation"):
        TrainConfig(model="lenet5", lecun_init="sqrt").validate()
    assert TrainConfig(model="lenet5-1998", lecun_init="sqrt").model_args() == {"init": "sqrt"}


def test_reproduce_resume_refuses_what_it_cannot_continue(mnist_dir, tmp_path, capsys):
    """A plain training run was resumed as a reproduction (its options ignored, then a crash in the
    report), options given with --resume were silently ignored, and a damaged seeds.json was a traceback."""
    from lenet5.cli import main

    def refused(*argv: str) -> str:
        assert main(["reproduce", "lecun1998", *argv, "--data-dir", str(mnist_dir), "--offline"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err
        return err

    assert main(["train", "--model", "lenet5", "--epochs", "1", "--train-samples", "256", "--test-samples", "100",
                 "--data-dir", str(mnist_dir), "--offline", "--out-dir", str(tmp_path), "--name", "plain",
                 "--quiet"]) == 0
    capsys.readouterr()
    assert "plain: not a lecun1998 reproduction (a run of lenet5); continue a training run with lenet5 train " \
           "--resume" in refused("--resume", str(tmp_path / "plain"))
    assert "--distortions, --epochs may not be given with --resume, which continues a reproduction as it was " \
           "started" in refused(
        "--resume", str(tmp_path / "plain"), "--epochs", "5", "--distortions")
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    plan = {"seeds": [0, 1], "distortions": False, "batch_size": 1, "epochs": 20, "device": "cpu", "threads": 1}
    for damaged, why in (("{}", "seeds, distortions, batch_size, epochs, device, threads missing"),
                         ("[]", "not a JSON object"), ('{"seeds": [0, 1', "damaged (Expecting"),
                         (json.dumps({**plan, "seeds": 5}), "(seeds missing or of the wrong kind)"),
                         (json.dumps({**plan, "rbf_j": "3"}), "(rbf_j missing or of the wrong kind)"),
                         (json.dumps({**plan, "seeds": [0, 0]}), "(seeds missing")):
        (seeds / "seeds.json").write_text(damaged)
        err = refused("--resume", str(seeds))
        assert f"{seeds / 'seeds.json'}: damaged" in err and why in err, (damaged, err)


def test_resumed_reproductions_run_with_this_machines_threads(mnist_dir, tmp_path, monkeypatch, capsys):
    """A run or plan from a bigger machine (32 threads) could not be continued on 2 cores: --threads
    given with --resume was ignored, by the single run and by the seeds' child processes."""

    import subprocess

    import lenet5.cli as cli
    import lenet5.reproduce as reproduce

    class Resumed(Exception):
        pass

    def fake_resume(run_dir, data, **options):
        raise Resumed(options)

    monkeypatch.setattr(reproduce, "resume", fake_resume)
    with pytest.raises(Resumed) as resumed:
        reproduce.reproduce_lecun1998(None, tmp_path, threads=2, device="cpu", resume_run=True)
    assert resumed.value.args[0] == {"callbacks": (), "threads": 2, "device": "cpu"}
    with pytest.raises(Resumed) as resumed:  # nothing given: the run's own settings
        reproduce.reproduce_lecun1998(None, tmp_path, resume_run=True)
    assert resumed.value.args[0] == {"callbacks": ()}

    parent = tmp_path / "seeds"
    (parent / "seed-0" / "checkpoints").mkdir(parents=True)
    (parent / "seed-0" / "config.json").write_text("{}")
    (parent / "seed-0" / "checkpoints" / "last.state.pt").write_bytes(b"started")
    plan = {"seeds": [0, 1], "distortions": False, "batch_size": 1, "epochs": 20, "device": "cpu", "threads": 32,
            **recipe_settings(lecun1998_config())}
    (parent / "seeds.json").write_text(json.dumps(plan))
    children = []

    class FakeChild:  # a seed's process that stops at once
        returncode = 1

        def __init__(self, command, **kwargs):
            children.append(command)

        def communicate(self):
            return "", "stopped by the test"

    monkeypatch.setattr(subprocess, "Popen", FakeChild)  # the seeds' child processes
    assert cli.main(["reproduce", "lecun1998", "--resume", str(parent), "--threads", "1", "--jobs", "1",
                     "--data-dir", str(mnist_dir), "--offline"]) == 1
    assert "no seed finished" in capsys.readouterr().err
    resumed_child, new_child = sorted(children, key=lambda c: "--resume" not in c)
    for child in (resumed_child, new_child):
        assert child[child.index("--threads") + 1] == "1" and child[child.index("--device") + 1] == "cpu"
    assert "--resume" in resumed_child and new_child[new_child.index("--seed") + 1] == "1"


def test_sigterm_to_reproduce_stops_the_seeds_it_runs(mnist_dir, tmp_path):
    """SIGTERM reaches the parent alone (Ctrl-C reaches the whole group): the parent once died and left
    its seeds training as orphans. It now passes the signal on and waits for them."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    parent = subprocess.Popen([sys.executable, "-m", "lenet5", "reproduce", "lecun1998", "--seeds", "2", "--jobs", "2",
                               "--threads", "1", "--data-dir", str(mnist_dir), "--offline", "--out-dir", str(tmp_path),
                               "--name", "two"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        children: list[int] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and parent.poll() is None:
            children = [int(p) for f in Path(f"/proc/{parent.pid}/task").glob("*/children") for p in f.read_text().split()]
            if len(children) == 2 and all((tmp_path / "two" / f"seed-{k}" / "config.json").is_file() for k in (0, 1)):
                break
            time.sleep(0.1)
        assert len(children) == 2, "both seeds should be training by now"
        parent.send_signal(signal.SIGTERM)
        _, err = parent.communicate(timeout=60)
    finally:
        parent.kill()
    assert parent.returncode == 143 and err.strip().splitlines()[-1] == "lenet5 reproduce: stopped by SIGTERM", err
    for pid in children:  # gone, or at most a zombie nobody waits for
        status = Path(f"/proc/{pid}/status")
        assert not status.exists() or "State:\tZ" in status.read_text(), f"seed process {pid} still runs"


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "2", "--seed", str(2**32 - 1)], "each must be 0 to 2**32 - 1"),  # seed 2**32 failed after seed 2**32-1 ran
    (["--jobs", "2"], "give --seeds N too"),  # silently ignored
    (["--seeds", "2", "--device", "cuda:99"], "--device cuda:99"),  # a plan folder, then each seed failing alone
])
def test_reproduce_refuses_impossible_options_before_any_work(mnist_dir, tmp_path, capsys, argv, message):
    from lenet5.cli import main

    assert main(["reproduce", "lecun1998", *argv, "--epochs", "1", "--data-dir", str(mnist_dir), "--offline",
                 "--out-dir", str(tmp_path), "--name", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and not (tmp_path / "x").exists()
