"""Reproduction recipes: the 1998 paper's training of LeNet-5, with a report beside it.

`lenet5 reproduce lecun1998 [--distortions]` trains `lenet5-1998` with stochastic diagonal
Levenberg-Marquardt for 20 passes on the paper's schedule, one update per pattern as the paper
did (on CPU by the native pass of lenet5.train.perpattern; `--batch-size 16` gives the
mini-batch variant), measuring training and test error
after every pass, then writes `report.md`, `error_curves.png` (cf. the paper's Figure 5) and
`misclassified.png` (cf. Figure 8) into the run folder.
"""

from __future__ import annotations

import inspect
import json
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from lenet5.data import MNIST
from lenet5.data.distort import DEFAULT_RANGES
from lenet5.data.transforms import to_model_input
from lenet5.fileio import atomic_write_bytes, atomic_write_text
from lenet5.models.lenet5_1998 import LeNet5_1998
from lenet5.plots import plot_digit_gallery, plot_error_curves
from lenet5.run_folder import RunFolder
from lenet5.train import Callback, FitResult, TrainConfig, TrainingError, fit, resume

PAPER_TEST_ERROR = {False: 0.0095, True: 0.008}  # section III.C: 0.95%, 0.8% with distortions
PAPER_MISCLASSIFIED = 82  # Figure 8 (the distortion-trained network)

# The paper's global step for the first passes is 0.0005 per pattern. From the initialisation
# of appendix A (+-2.4/F) that step saturates F6 within three patterns: the states are so small
# that h << mu for 99% of the parameters, the first steps (eta/mu each) inflate C5's states
# tenfold, and the Hessian estimated before the pass is then a hundred times too small. The
# estimate itself is not at fault (it is the exact Gauss-Newton diagonal where the blow-up
# happens), and no reading of it makes 0.0005 train (docs/lenet5-1998.md, "The paper's
# learning rate"). So the recipe runs the paper's rates per pattern capped at 2e-5: the cap
# replaces the rates of passes 1-12 (5e-4 down to 5e-5), and passes 13-20 run at the paper's own
# 1e-5. The cap and the shape were chosen on a validation split (docs/results/lecun1998-rate/):
# the paper's shape scaled down to start at 1e-5 (this recipe until then) ends at 2e-7 and leaves
# the network under-trained (0.7-0.9% training error where the paper reaches 0.35%).
ETA_PER_SAMPLE = 2e-5
# With B patterns per update the loss is their mean, so a rate of B * eta moves the weights by
# the sum of the B per-pattern steps, each taken at the same weights: the paper's per-pattern
# updates without the B - 1 intermediate ones. That holds while B * eta stays well inside the
# stability limit of one update (2/lambda, docs/lenet5-1998.md): 16 x 1e-5 does, 16 x 2e-5
# saturates F6 in the first pass (a test checks both). So the mini-batch variant keeps the recipe
# it had before the cap was chosen (the paper's shape scaled to start at 1e-5 per pattern),
# which the validation search did not cover.
ETA_PER_SAMPLE_BATCHED = 1e-5
# The paper gives the kinds of its distortions, not their ranges. Ours (lenet5.data.distort) keep
# every digit in the frame, but at full strength they cost this small network more than they
# teach it: after 20 passes it misclassifies 1.7% of its distorted training digits and 1% of the
# undistorted ones. Half of every range scored best on the validation split, over 0.25-1.5 and a
# share of undistorted digits (docs/results/lecun1998-rate/): the per-pattern recipe uses it. The
# mini-batch variant keeps the full ranges, as it keeps its rate: the search did not cover it.
DISTORTION_STRENGTH = 0.5
# The paper's distortion run trained on its 60,000 digits and 540,000 distorted ones; read with its
# 20-pass schedule (it does not say how that set was scheduled), a pass held ten times the
# patterns of a pass without them. The per-pattern
# recipe's pass is so: ten sweeps over the training digits (`--epoch-repeats`), with a tenth of the
# digits left undistorted in each (`--distort-share 0.9`), fresh distortions every sweep.
DISTORTION_SHARE = 0.9
DISTORTION_SWEEPS = 10
# Eq. 9's rubbish-class constant j, which the paper does not give (the model's default is 0.1). On the
# validation split (docs/results/lecun1998-rate/, 5 seeds each, plain per-pattern recipe), j = 0.1,
# 0.3, 1, 3 and 10 scored 98.73, 98.74, 98.71, 98.82 and 98.73%: j = 3 leads by about two standard
# errors of the difference, and is the plain recipe's. With distortions j = 3 led by 0.03 points
# (2 seeds, sd 0.16), far inside the noise, so that recipe keeps 0.1: a recipe changes on a lead of
# about two standard errors, as the distortions' strength did.
RBF_J = {False: 3.0, True: 0.1}  # by variant: with distortions or not
# The settings a recipe is made of beyond the shared ones, as TrainConfig names them, with the values
# of runs made before a field existed (a multi-seed plan or a seed's config.json of an older version):
# j (the model's default, 0.1, when it was not an option) and the distortions.
RECIPE_FIELDS = {"rbf_j": inspect.signature(LeNet5_1998).parameters["j"].default, "distort_strength": 1.0,
                 "distort_share": 1.0, "epoch_repeats": 1}
DISTORTION_FIELDS = ("distort_strength", "distort_share", "epoch_repeats")


def recipe_settings(config: TrainConfig | dict[str, Any]) -> dict[str, float]:
    """j and the distortion settings of a config (a TrainConfig or its JSON), missing ones at their old values."""
    values = config.to_dict() if isinstance(config, TrainConfig) else config
    return {k: default if values.get(k) is None else values[k] for k, default in RECIPE_FIELDS.items()}


def describe_recipe(recipe: dict[str, float], distortions: bool) -> str:
    """One line: 'j = 3' or 'j = 3, 0.5x lenet5.data.distort's ranges on 90% of the digits, 10 sweeps a pass'."""
    return f"j = {recipe['rbf_j']:g}" + (f", {describe_distortions(recipe)}" if distortions else "")


def describe_distortions(recipe: dict[str, float]) -> str:
    """One line: '0.5x lenet5.data.distort's ranges on 90% of the digits, 10 sweeps a pass'."""
    share = f" on {recipe['distort_share']:.0%} of the digits" if recipe["distort_share"] < 1 else ""
    sweeps = f", {recipe['epoch_repeats']:g} sweeps a pass" if recipe["epoch_repeats"] > 1 else ""
    return f"{recipe['distort_strength']:g}x lenet5.data.distort's ranges{share}{sweeps}"


def lecun1998_config(*, distortions: bool = False, batch_size: int = 1, epochs: int = 20, seed: int = 0,
                     threads: int = 0, device: str = "auto") -> TrainConfig:
    if batch_size == 1 and device == "auto":
        device = "cpu"  # one pattern per update is launch-bound on a GPU; the CPU has the native pass
    eta, schedule = (ETA_PER_SAMPLE, "lecun1998-capped") if batch_size == 1 else (ETA_PER_SAMPLE_BATCHED, "lecun1998")
    per_pattern = distortions and batch_size == 1
    return TrainConfig(model="lenet5-1998", optimizer="sdlm", lr=eta * batch_size, mu=0.02, hessian_samples=500,
                       schedule=schedule, batch_size=batch_size, epochs=epochs, distort=distortions,
                       distort_strength=DISTORTION_STRENGTH if per_pattern else 1.0,
                       distort_share=DISTORTION_SHARE if per_pattern else 1.0,
                       epoch_repeats=DISTORTION_SWEEPS if per_pattern else 1,
                       rbf_j=RBF_J[distortions] if batch_size == 1 else None,
                       eval_train=True, seed=seed, threads=threads, device=device)


@torch.no_grad()
def misclassified(model: torch.nn.Module, mnist: MNIST, batch_size: int = 5000) -> list[dict[str, Any]]:
    """Every test digit the model gets wrong: index, true and predicted label."""
    model.eval()
    device = next(model.parameters()).device
    wrong = []
    for start in range(0, len(mnist.test), batch_size):
        images = mnist.test.images[start:start + batch_size].to(device)
        labels = mnist.test.labels[start:start + batch_size].to(device)
        predicted = model.logits(model(to_model_input(images))).argmax(1)
        for k in torch.nonzero(predicted != labels).flatten().tolist():
            wrong.append({"index": start + k, "true": int(labels[k]), "predicted": int(predicted[k])})
    return wrong


def _schedule_text(config: TrainConfig) -> str:
    if config.schedule == "lecun1998-capped":
        cap = config.lr / config.batch_size
        return (f"the paper's rates per pattern (0.0005, 0.0002, 0.0001, 0.00005, 0.00001 over passes 1-2, "
                f"3-5, 6-8, 9-12, 13-) capped at {cap:.0e}")
    return (f"the paper's schedule shape (rates in the ratio 0.0005 : 0.0002 : 0.0001 : 0.00005 : 0.00001 "
            f"over passes 1-2, 3-5, 6-8, 9-12, 13-), peak rate {config.lr:.2e}")


def _distortion_text(config: TrainConfig) -> str:
    ranges = DEFAULT_RANGES.scaled(config.distort_strength)
    share = f"{config.distort_share:.0%} of the training digits" if config.distort_share < 1 else "every training digit"
    papers = config.epoch_repeats == 10 and config.distort_share == 0.9 and config.train_samples in (0, 60_000)
    sweeps = (f" Each pass goes over the training digits {config.epoch_repeats} times, each time in a new order and "
              f"with new distortions" + (" (as the paper's pass: 60,000 digits and 540,000 distorted ones)."
                                         if papers else ".")) if config.epoch_repeats > 1 else ""
    return (f"Distortions: a random planar affine map of {share}, drawn anew every pass: shift "
            f"+-{ranges.translate:g} px, scale and squeeze 1 +- {ranges.scale:g} and {ranges.squeeze:g}, shear "
            f"+-{ranges.shear:g} ({config.distort_strength:g} x lenet5.data.distort's ranges).{sweeps}")


def write_report(result: FitResult, mnist: MNIST, config: TrainConfig, *, command: str,
                 wall_seconds: float, resumed: int = 0) -> Path:
    run_dir, history, distortions = result.run_dir, result.history, config.distort
    paper = PAPER_TEST_ERROR[distortions]
    wrong = misclassified(result.model, mnist)
    final = history[-1]
    test_error = 1 - final["test_acc"]
    atomic_write_bytes(run_dir / "error_curves.png", plot_error_curves(
        history, paper, f"LeNet-5 (1998), SDLM{' + distortions' if distortions else ''}: error vs. passes"))
    images = [mnist.test.images[w["index"]].numpy() for w in wrong]
    captions = [f"{w['true']}->{w['predicted']}" for w in wrong]
    atomic_write_bytes(run_dir / "misclassified.png", plot_digit_gallery(
        images, captions, columns=14, title=f"The {len(wrong)} misclassified test digits (true->predicted)"))

    rows = "\n".join(
        f"| {r['epoch']} | {r['lr']:.2e} | {100 * (1 - r['train_eval_acc']):.2f} | {100 * (1 - r['test_acc']):.2f} "
        f"| {r['test_loss']:.4f} | {r['seconds']:.0f} |" for r in history)
    verdict = (f"**{100 * test_error:.2f}%** test error against the paper's {100 * paper:.2f}%: "
               + ("reached." if test_error <= paper + 1e-12 else
                  f"{100 * (test_error - paper):.2f} points short."))
    metrics = result.metrics
    updates = "after every pattern, as the paper did" if config.batch_size == 1 else (
        f"after every {config.batch_size} patterns (the mini-batch variant; the paper updated after every pattern)")
    text = f"""# LeNet-5 (1998) reproduction{' with distortions' if distortions else ''}

Command: `{command}`

{verdict} {len(wrong)} of the 10,000 test digits misclassified (the paper's Figure 8 shows
{PAPER_MISCLASSIFIED} for its distortion-trained network). Training error after the last pass:
{100 * (1 - final['train_eval_acc']):.2f}% (the paper: 0.35% after 19 passes, without distortions).
Wall time {wall_seconds / 60:.1f} min for {len(history)} passes, evaluation of both sets after every
pass included{f" (resumed after pass {resumed}: those passes by their recorded times)" if resumed else ""}; model `{metrics['model']}` with {metrics['parameters']:,} trainable parameters.

Recipe: stochastic diagonal Levenberg-Marquardt (mu 0.02, Hessian diagonal re-estimated on 500
training samples before each pass), {_schedule_text(config)}, weights updated {updates}.
Loss: eq. 9 with j = {recipe_settings(config)['rbf_j']:g} (the paper does not give j).
{_distortion_text(config) if distortions else ''}
See docs/lenet5-1998.md for every departure from the paper and why.

![error vs passes](error_curves.png)

| pass | rate | training error % | test error % | test loss (eq. 9) | seconds |
|---:|---:|---:|---:|---:|---:|
{rows}

![misclassified test digits](misclassified.png)
"""
    return atomic_write_text(run_dir / "report.md", text)


def reproduce_lecun1998(mnist: MNIST, run_dir: str | Path, *, distortions: bool = False, batch_size: int = 1,
                        epochs: int = 20, seed: int = 0, threads: int = 0, device: str = "auto",
                        resume_run: bool = False, callbacks: Sequence[Callback] = (),
                        command: str = "") -> tuple[FitResult, Path]:
    """Train the paper's recipe into `run_dir` and write its report; returns the result and the report's path."""
    started, done_before = time.perf_counter(), 0
    if resume_run:  # the run keeps its config.json; this machine's threads and device, when given, replace its own
        commit = RunFolder(run_dir).load_commit()
        done_before = len(commit["history"]) if commit else 0
        host = {k: v for k, v in (("threads", threads), ("device", device)) if v not in (0, "auto")}
        result = resume(run_dir, mnist, callbacks=callbacks, **host)
    else:
        config = lecun1998_config(distortions=distortions, batch_size=batch_size, epochs=epochs, seed=seed,
                                  threads=threads, device=device)
        result = fit(config, mnist, run_dir, callbacks=callbacks)
    wall = time.perf_counter() - started
    # a resumed run: the passes before the interruption count with their recorded times
    wall += sum(r["seconds"] for r in result.history[:done_before])
    report = write_report(result, mnist, result.config, command=command, wall_seconds=wall, resumed=done_before)
    return result, report


def seed_statistics(test_errors: Sequence[float]) -> dict[str, float]:
    """Mean, sample standard deviation (None for one seed: it has none), min and max of per-seed test errors."""
    values = list(test_errors)
    return {"seeds": len(values), "mean": statistics.mean(values),
            "sd": statistics.stdev(values) if len(values) > 1 else None, "min": min(values), "max": max(values)}


def plus_minus_sd(stats: dict[str, Any]) -> str:
    """' +- 0.08' of a test error's sd in points, or ' (one seed: no sd)'."""
    return " (one seed: no sd)" if stats["sd"] is None else f" +- {100 * stats['sd']:.2f}"


def write_seed_summary(parent: Path, runs: dict[int, Path], *, distortions: bool, command: str,
                       planned: Sequence[int] = ()) -> dict[str, Any]:
    """summary.md and summary.json beside the per-seed run folders: each seed's final test error and
    training error, then mean +- sd and min-max over the seeds next to the paper's figure, and the
    seeds of `planned` that did not finish."""
    rows, errors = [], []
    for seed, run_dir in sorted(runs.items()):
        history = json.loads((run_dir / "history.json").read_text())
        final = history[-1]
        errors.append(1 - final["test_acc"])
        config = json.loads((run_dir / "config.json").read_text())
        rows.append({"seed": seed, "run": run_dir.name, "passes": len(history), "test_error": 1 - final["test_acc"],
                     "recipe": recipe_settings(config),
                     "train_error": 1 - final["train_eval_acc"] if "train_eval_acc" in final else None,
                     "seconds": sum(r["seconds"] for r in history)})
    stats = seed_statistics(errors)
    paper = PAPER_TEST_ERROR[distortions]
    recipes = {json.dumps(r.pop("recipe"), sort_keys=True) for r in rows}
    if len(recipes) > 1:
        raise TrainingError(f"{parent}: the seeds ran with different recipes "
                            f"({'; '.join(describe_recipe(json.loads(r), distortions) for r in sorted(recipes))}); "
                            f"their errors do not make one figure")
    settings = json.loads(recipes.pop())
    recipe = {k: settings[k] for k in DISTORTION_FIELDS} if distortions else None
    summary = {"recipe": "lecun1998", "distortions": distortions, "rbf_j": settings["rbf_j"], "distortion": recipe,
               "distort_strength": recipe["distort_strength"] if recipe else None, "paper_test_error": paper,
               **stats, "unfinished": [k for k in planned if k not in runs], "runs": rows, "command": command}
    atomic_write_text(parent / "summary.json", json.dumps(summary, indent=2) + "\n")

    def percent(value: float | None) -> str:
        return "" if value is None else f"{100 * value:.2f}%"

    table = "\n".join(f"| {r['seed']} | {r['passes']} | {percent(r['test_error'])} | {percent(r['train_error'])} | "
                      f"{r['seconds'] / 60:.1f} |" for r in rows)
    verdict = "at or below" if stats["mean"] <= paper + 1e-12 else "above"
    unfinished = (f"\n\n**Not finished: seed{'s' if len(summary['unfinished']) > 1 else ''} "
                  f"{', '.join(map(str, summary['unfinished']))}** of the {len(planned)} planned (`lenet5 reproduce "
                  f"lecun1998 --resume {parent}` continues them); the figures above are over the finished ones."
                  if summary["unfinished"] else "")
    text = f"""# LeNet-5 (1998) reproduction{' with distortions' if distortions else ''} ({describe_recipe(settings, distortions)}): {len(rows)} seeds

```sh
{command}
```

Test error over {len(rows)} seeds: **{100 * stats['mean']:.2f}%{plus_minus_sd(stats)}** (mean +- sample sd),
min {100 * stats['min']:.2f}%, max {100 * stats['max']:.2f}%; the paper: {100 * paper:.2f}% (one run). The mean is
{verdict} the paper's figure.{unfinished}

| seed | passes | test error | training error | minutes |
|---:|---:|---:|---:|---:|
{table}

Each seed's run folder holds its report.md, curves and misclassified digits.
"""
    atomic_write_text(parent / "summary.md", text)
    return summary
