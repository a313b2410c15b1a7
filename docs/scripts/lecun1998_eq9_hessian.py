"""SDLM's Hessian estimate with the curvature of the whole of eq. 9 (departure 3 of docs/lenet5-1998.md).

lenet5-1998's estimate starts from d2E/dF6^2 = 2 for every F6 state: the curvature of eq. 9's first
term, ||F6 - w_c||^2. Eq. 9 also has a competitive term, log(e^-j + sum_i e^-y_i) with the penalties
y_i = ||F6 - w_i||^2. With p_i = e^-y_i / (e^-j + sum_l e^-y_l) for the classes and p_r = 1 - sum_i p_i
for the rubbish class, and d_i = x_k - w_ik for one F6 state x_k, the exact second derivative of the
whole error is

    d2E/dx_k^2 = 2 - 2 sum_i p_i + 4 (sum_i p_i d_i^2 - (sum_i p_i d_i)^2)
               = 2 p_r + 4 (sum_i p_i d_i^2 - (sum_i p_i d_i)^2)

which does not depend on the label and is never negative (the bracket is at least p_r sum_i p_i d_i^2,
by Cauchy-Schwarz). On a trained network, where p_c is near 1 / (1 + e^-j), it is far below 2: h is
smaller and SDLM's steps eta / (mu + h) larger.

This script registers `lenet5-1998-eq9h`, lenet5-1998 with that curvature, and runs the lenet5
command line, so a run trains exactly as the product's:

    python docs/scripts/lecun1998_eq9_hessian.py --check          # the formula against autograd
    python docs/scripts/lecun1998_eq9_hessian.py train --model lenet5-1998-eq9h [lenet5 train options]

`docs/scripts/lecun1998_rate_search.py` runs it as one of its candidates, on the validation split.
"""

from __future__ import annotations

import sys

import torch

from lenet5.models.lenet5_1998 import LeNet5_1998
from lenet5.models.registry import register_model


def eq9_curvature(f6: torch.Tensor, prototypes: torch.Tensor, j: float) -> torch.Tensor:
    """d2E/dx_k^2 of eq. 9 for every F6 state x_k of every digit: (B, 84) from F6 (B, 84)."""
    d = f6[:, None, :] - prototypes[None]  # (B, classes, 84)
    penalties = d.square().sum(-1)  # (B, classes)
    rubbish = penalties.new_full((len(f6), 1), -j)
    p = torch.softmax(torch.cat([-penalties, rubbish], 1), 1)
    p_classes, p_rubbish = p[:, :-1, None], p[:, -1:]  # (B, classes, 1), (B, 1)
    mean = (p_classes * d).sum(1)
    return 2 * p_rubbish + 4 * ((p_classes * d.square()).sum(1) - mean.square())


@register_model("lenet5-1998-eq9h")
class LeNet5_1998_Eq9Hessian(LeNet5_1998):
    """lenet5-1998 whose SDLM Hessian estimate starts from the curvature of the whole of eq. 9."""

    def f6_curvature(self, f6: torch.Tensor) -> torch.Tensor:
        return eq9_curvature(f6, self.output.prototypes, self.j)


def check(samples: int = 8, j: float = 3.0) -> float:
    """The largest relative difference between `eq9_curvature` and autograd's exact second derivatives."""
    model = LeNet5_1998(j=j).double()
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for trained_like in (False, True):
        for k in range(samples):
            label = k % 10
            # a state near the correct prototype (as after training) or anywhere in squash's range
            x = model.output.prototypes[label] * 0.9 + 0.1 * torch.randn(84, generator=generator, dtype=torch.float64) \
                if trained_like else 1.7 * (2 * torch.rand(84, generator=generator, dtype=torch.float64) - 1)

            def error(state: torch.Tensor) -> torch.Tensor:
                return model.loss(model.output(state[None]), torch.tensor([label]))

            exact = torch.autograd.functional.hessian(error, x).diagonal()
            ours = eq9_curvature(x[None], model.output.prototypes, j)[0]
            worst = max(worst, ((ours - exact).abs().max() / exact.abs().max()).item())
    return worst


if __name__ == "__main__":
    if sys.argv[1:] == ["--check"]:
        difference = check()
        print(f"eq9_curvature against autograd's exact d2E/dF6^2 (16 states, j = 3): largest relative difference "
              f"{difference:.1e}")
        sys.exit(0 if difference < 1e-9 else 1)
    from lenet5.cli import main

    sys.exit(main(sys.argv[1:]))
