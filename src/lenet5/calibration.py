"""Prediction that knows when it is unsure: a calibrated confidence and two thresholds, kept in the checkpoint.

A network's softmax is not a probability of being right: trained networks are miscalibrated,
on inputs unlike their training set most of all. Three numbers fitted on digits the network
never trained on fix that for `predict` and `serve`:

- a **temperature** T (Guo et al. 2017, "On calibration of modern neural networks", section 4.2):
  probabilities softmax(logits / T), with T minimising the negative log-likelihood of held-out
  digits, so that among digits given confidence c about c are right;
- a **confidence threshold**, read off the rejection curve of the held-out digits: the lowest
  confidence at which the digits kept have at most `target_error` errors (0.5%, the figure LeCun
  et al. 1998 report rejection rates for). Below it the model is **unsure which digit** it is;
- an **evidence threshold** on logsumexp(logits / T), the negative free energy of Liu et al. 2020
  ("Energy-based out-of-distribution detection"): how strongly any class responds at all. Below
  the level of the weakest `OOD_SHARE` (1%) of held-out digits the input **looks unlike a digit**.
  A letter or a scribble can get a confident softmax (one class a little ahead of the others,
  all of them weak); its evidence is low. Measured in docs/results/stress/.

Either makes the answer unsure. The held-out digits are the training digits the run did not train
on (`--train-samples N` keeps the last 60,000 - N) together with their stress versions
(`lenet5.data.stress`), so that the thresholds are set where inputs are hard, not only on clean
MNIST. A checkpoint without a stored calibration gets `DEFAULT` (T = 1, unsure below 90%
confidence, no evidence test), and every answer says which rule was used.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lenet5.data import MNIST, Split
from lenet5.errors import ConfigError
from lenet5.models import DigitClassifier

TARGET_ERROR = 0.005
OOD_SHARE = 0.01  # the share of held-out digits whose evidence the "unlike a digit" threshold is below
DEFAULT_THRESHOLD = 0.9  # the rule for checkpoints without a calibration: not fitted to any model
HELDOUT_DIGITS = 10_000  # at most this many held-out digits are used (the first ones)
HELDOUT_STRESS_DIGITS = 1000  # of which the first are also drawn as each stress set


@dataclass(frozen=True)
class Calibration:
    temperature: float
    threshold: float  # on softmax(logits / temperature).max()
    evidence_threshold: float | None = None  # on logsumexp(logits / temperature); None: no such test
    target_error: float = TARGET_ERROR
    fitted: bool = True  # False: the default rule, not fitted to the model
    heldout: str = ""  # what it was fitted on
    heldout_rejected: float = 0.0  # the share of those digits marked unsure, by either test
    heldout_error: float = 0.0  # the error on the rest

    def rule(self) -> str:
        """The rule in words, for answers and logs."""
        if not self.fitted:
            return f"default rule (no calibration stored): unsure below {self.threshold:.0%} confidence"
        evidence = "" if self.evidence_threshold is None else (
            f", or unlike a digit below evidence {self.evidence_threshold:.3g} (1% of held-out digits)")
        return (f"calibrated: temperature {self.temperature:.3g}; unsure below {self.threshold:.1%} confidence "
                f"({self.target_error:.1%} error on held-out digits){evidence}")

    def to_meta(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> "Calibration":
        """The checkpoint's stored calibration, or DEFAULT when it has none (older checkpoints)."""
        stored = meta.get("calibration")
        return DEFAULT if stored is None else cls(**stored)


DEFAULT = Calibration(temperature=1.0, threshold=DEFAULT_THRESHOLD, fitted=False)


def check_calibration(value: Any) -> str | None:
    """Why `value` is not a stored calibration this version can use (None when it is)."""
    if not isinstance(value, dict):
        return f"calibration must be an object, got {type(value).__name__}"
    fields = Calibration.__dataclass_fields__
    unknown = sorted(set(value) - set(fields))
    if unknown:
        return f"calibration has unknown fields {unknown[:3]}"
    for key in ("temperature", "threshold"):
        if key not in value:
            return f"calibration lacks {key!r}"
    for key, f in fields.items():
        if key not in value:
            continue
        v, kind = value[key], f.type
        if kind == "float | None" and v is None:
            continue
        if kind in ("float", "float | None"):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                return f"calibration {key} must be a finite number, got {str(v)[:40]}"
        elif kind == "bool" and not isinstance(v, bool):
            return f"calibration {key} must be true or false"
        elif kind == "str" and not isinstance(v, str):
            return f"calibration {key} must be a string"
    if not 0.01 <= value["temperature"] <= 100:
        return f"calibration temperature must be in [0.01, 100], got {value['temperature']}"
    if not 0 <= value["threshold"] <= 1:
        return f"calibration threshold must be in [0, 1], got {value['threshold']}"
    return None


@torch.no_grad()
def logits_of(model: DigitClassifier, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """(N, 28, 28) uint8 digits -> (N, 10) logits, on the CPU."""
    from lenet5.data.transforms import to_model_input

    model.eval()
    device = next(model.parameters()).device
    out = [model.logits(model(to_model_input(images[i:i + batch_size].to(device)))).float().cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, 10)


@torch.no_grad()
def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T in [0.01, 100] minimising the mean negative log-likelihood of softmax(logits / T). The
    likelihood is convex in 1/T, so a golden-section search over log T finds it (to 1e-4 in log T)."""
    logits, labels = logits.double(), labels.long()

    def nll(log_t: float) -> float:
        return float(torch.nn.functional.cross_entropy(logits / math.exp(log_t), labels))

    low, high = math.log(0.01), math.log(100)
    ratio = (math.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa, fb = nll(a), nll(b)
    while high - low > 1e-4:
        if fa <= fb:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = nll(a)
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = nll(b)
    return math.exp((low + high) / 2)


def threshold_for_error(confidence: torch.Tensor, correct: torch.Tensor, target: float) -> tuple[float, float, float]:
    """(threshold, rejected share, error on the rest): the lowest confidence threshold whose accepted
    digits (confidence >= threshold) have at most `target` errors."""
    order = confidence.argsort(descending=True)
    errors = (~correct[order]).double().cumsum(0)
    kept = torch.arange(1, len(order) + 1, dtype=torch.double)
    error = errors / kept
    ok = torch.nonzero(error <= target).flatten()
    if len(ok) == 0:
        return 1.0, 1.0, 0.0
    k = int(ok[-1])  # keep the k + 1 most confident digits
    sorted_conf = confidence[order].double()
    # halfway to the next digit's confidence, so that digits tied with the last one kept stay kept
    threshold = float(sorted_conf[k]) if k + 1 == len(order) else float((sorted_conf[k] + sorted_conf[k + 1]) / 2)
    return threshold, 1 - (k + 1) / len(order), float(error[k])


def check_target_error(target_error: float) -> None:
    if not 0 < target_error < 1:  # NaN fails this too
        raise ConfigError(f"--target-error must be between 0 and 1 (e.g. 0.005), got {target_error}")


def calibrate(model: DigitClassifier, heldout: Split, *, target_error: float = TARGET_ERROR,
              description: str = "") -> Calibration:
    """Fit the temperature and the threshold on held-out digits (uint8 images and labels)."""
    if len(heldout) == 0:
        raise ConfigError("no held-out digits to calibrate on")
    check_target_error(target_error)
    logits = logits_of(model, heldout.images)
    temperature = fit_temperature(logits, heldout.labels)
    probabilities = torch.softmax(logits / temperature, 1)
    confidence, predicted = probabilities.max(1)
    correct = predicted == heldout.labels
    threshold, _, _ = threshold_for_error(confidence, correct, target_error)
    evidence = torch.logsumexp(logits.double() / temperature, 1)
    evidence_threshold = float(torch.quantile(evidence, OOD_SHARE))
    calibration = Calibration(temperature=temperature, threshold=threshold, evidence_threshold=evidence_threshold,
                              target_error=target_error, heldout=description)
    unsure = judge(logits, calibration).unsure
    error = float((~correct[~unsure]).double().mean()) if (~unsure).any() else 0.0
    return dataclasses.replace(calibration, heldout_rejected=float(unsure.double().mean()), heldout_error=error)


def heldout_digits(config: dict[str, Any], mnist: MNIST) -> tuple[Split, str]:
    """The training digits a run did not train on (after its --train-samples), and their description."""
    n = int(config.get("train_samples") or 0)
    total = len(mnist.train)
    if not 0 < n < total:
        raise ConfigError(f"the run trained on all {total:,} training digits, so none are left to calibrate on; "
                          f"train with --train-samples {total - 5000} to keep the last 5,000 for it")
    end = min(total, n + HELDOUT_DIGITS)
    images, labels = mnist.train.images[n:end], mnist.train.labels[n:end]
    return Split(images, labels), f"training digits {n:,}-{end - 1:,} (not trained on)"


def heldout_with_stress(heldout: Split, digits: int = HELDOUT_STRESS_DIGITS, seed: int = 1) -> Split:
    """The held-out digits, plus the first `digits` of them drawn as every stress set."""
    from lenet5.data.stress import make_stress_sets

    images, labels = heldout.images[:digits].numpy(), heldout.labels[:digits].numpy()
    sets = make_stress_sets(images, labels, seed=seed, userlike=digits)
    return Split(torch.cat([heldout.images, *(s.images for s in sets.values())]),
                 torch.cat([heldout.labels, *(s.labels for s in sets.values())]))


@dataclass
class Judgement:
    """What a calibration makes of a batch of logits."""

    probabilities: torch.Tensor  # (N, 10): softmax(logits / T)
    low_confidence: torch.Tensor  # (N,) bools: below the confidence threshold
    unlike_digits: torch.Tensor  # (N,) bools: below the evidence threshold

    @property
    def unsure(self) -> torch.Tensor:
        return self.low_confidence | self.unlike_digits

    def reason(self, i: int) -> str | None:
        """Why answer i is unsure, in words (None when it is not)."""
        if self.unlike_digits[i]:
            return "unlike the digits it knows"
        return "low confidence" if self.low_confidence[i] else None


def judge(logits: torch.Tensor, calibration: Calibration) -> Judgement:
    """The calibrated probabilities of (N, 10) logits and which of them are unsure, and why."""
    scaled = logits.double() / calibration.temperature
    probabilities = torch.softmax(scaled, 1)
    low = probabilities.max(1).values < calibration.threshold
    unlike = torch.zeros_like(low) if calibration.evidence_threshold is None else (
        torch.logsumexp(scaled, 1) < calibration.evidence_threshold)
    return Judgement(probabilities.float(), low, unlike)


def calibrate_checkpoint(path: str | Path, mnist: MNIST, *, device: str = "auto",
                         target_error: float = TARGET_ERROR) -> tuple[Calibration, Path]:
    """Calibrate a checkpoint on its run's held-out digits and their stress versions, and store the
    calibration in it (weights unchanged). Returns the calibration and the file written."""
    return calibrate_checkpoints([path], mnist, device=device, target_error=target_error)[0]


def calibrate_checkpoints(paths: list[str | Path], mnist: MNIST, *, device: str = "auto",
                          target_error: float = TARGET_ERROR) -> list[tuple[Calibration, Path]]:
    """`calibrate_checkpoint` for checkpoints of one run (its last and best, say): the held-out digits'
    stress versions are made once, from the first checkpoint's config."""
    from lenet5.checkpoint import load_checkpoint, store_calibration
    from lenet5.runtime import resolve_device

    results, heldout = [], None
    for path in paths:
        checkpoint = load_checkpoint(path, resolve_device(device))
        checkpoint.model.to(memory_format=torch.channels_last)  # faster convolutions, as in training
        if heldout is None:
            clean, description = heldout_digits(checkpoint.meta.get("config") or {}, mnist)
            digits = min(HELDOUT_STRESS_DIGITS, len(clean))
            heldout = heldout_with_stress(clean, digits)
            description = f"{description}, and the first {digits:,} of them as every stress set"
        calibration = calibrate(checkpoint.model, heldout, target_error=target_error, description=description)
        results.append((calibration, store_calibration(checkpoint, calibration.to_meta())))
    return results
