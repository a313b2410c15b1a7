"""Outlier exposure (Hendrycks, Mazeika and Dietterich 2019, "Deep anomaly detection with outlier
exposure"): training on images that are no digit, towards an answer that favours no digit.

A network trained on digits alone has never been told what a letter or a scribble is, so it maps
one to whichever digit it resembles most, often confidently. `--outliers SHARE` adds SHARE x B
non-digits to every batch of B digits, drawn at random from a fixed pool (`lenet5.data.nondigits.
outlier_pool`: letters not written like digits, shapes, noise) and augmented with the
digits in the same call. Their loss is the cross-entropy of the answer against the uniform
distribution over the classes, the mean of -log softmax over the classes, weighted by
`--outlier-weight` (the paper's 0.5) beside the digits' cross-entropy.

The outliers share the digits' forward pass, and so batch norm's statistics (a fifth of every
batch). A pass of their own with batch norm in inference mode, so that they would not enter the
statistics, was tried and fails: the network learns that inference-mode normalisation means "no
digit", and at test time, when every input is normalised so, its digit accuracy collapsed to
19-81% (docs/results/stress/outliers/).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from lenet5.data.catalog import DIGITS
from lenet5.errors import ConfigError


@dataclass
class Outliers:
    pool: torch.Tensor  # (N, 28, 28) uint8 on the training device
    share: float  # outliers per digit in a batch
    weight: float  # of their loss beside the digits'

    def count(self, digits: int) -> int:
        """How many outliers go with a batch of `digits` digits (at least one)."""
        return max(1, math.ceil(self.share * digits))

    def draw(self, digits: int) -> torch.Tensor:
        """(count, 28, 28) uint8 outliers, drawn with replacement from the global generator."""
        idx = torch.randint(len(self.pool), (self.count(digits),), device=self.pool.device)
        return self.pool[idx]


def uniform_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of (K, classes) logits against the uniform distribution over the classes."""
    return -F.log_softmax(logits, 1).mean()


def load_outliers(share: float, weight: float, classes: tuple[str, ...], device: torch.device,
                  announce=None) -> Outliers | None:
    """The training pool on `device` for `--outliers share` (None for 0). The pool is non-digits, so
    the data set's classes must be the ten digits."""
    if not share:
        return None
    if tuple(classes) != DIGITS:
        raise ConfigError("--outliers trains on non-digits, so it needs a data set of the digits 0-9 "
                          f"(this one's classes: {', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''})")
    from lenet5.data.nondigits import outlier_pool

    pool = outlier_pool(on_make=announce)
    return Outliers(torch.from_numpy(pool).to(device), share, weight)
