"""Stochastic diagonal Levenberg-Marquardt (LeCun et al. 1998, appendix C).

Each parameter k gets its own step  eta / (mu + h_kk),  where h_kk estimates the diagonal of
the Hessian of the per-sample error. Following the paper, h_kk is the Gauss-Newton estimate
obtained by back-propagating second derivatives with off-diagonal terms dropped (the model
computes it: `second_derivatives`), averaged over a few hundred training samples and
re-estimated before every pass.

The average, not the sum: appendix C keeps a running average of the per-pattern second
derivative, and h then estimates the curvature of one pattern's error, the error that each
per-pattern step descends. (Summed over the 500 samples, h is 500 times larger and the paper's
eta of 0.0005 stops learning altogether; docs/lenet5-1998.md.)
"""

from __future__ import annotations

from typing import Iterable

import torch

from lenet5.data.transforms import to_model_input
from lenet5.errors import ConfigError
from lenet5.models import DigitClassifier


class SDLM(torch.optim.Optimizer):
    """p <- p - lr / (mu + h) * grad, with h set by `set_hessian` (0 until then)."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float, mu: float = 0.02):
        if lr <= 0 or mu <= 0:
            raise ValueError("SDLM needs a positive lr and mu")
        super().__init__(params, {"lr": lr, "mu": mu})

    def set_hessian(self, diagonal: dict[torch.nn.Parameter, torch.Tensor]) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                state["hessian"] = diagonal[p].detach().to(p.device, p.dtype).clone()
                state.pop("step_size", None)  # derived from the old h: rebuilt at the next step

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - the docstring of the class says it
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            torch._foreach_addcmul_(params, [p.grad for p in params], [self._step_size(group, p) for p in params],
                                    value=-1)

    @torch.no_grad()
    def step_sizes(self) -> dict[torch.nn.Parameter, torch.Tensor]:
        """Every parameter's step lr / (mu + h) at the current lr: what `step` multiplies its gradient by."""
        return {p: self._step_size(group, p) for group in self.param_groups for p in group["params"]}

    def _step_size(self, group: dict, p: torch.nn.Parameter) -> torch.Tensor:
        # Rebuilt when lr or h changes (at most once per pass), not at every pattern.
        state = self.state[p]
        if state.get("step_lr") != group["lr"] or "step_size" not in state:
            hessian = state.get("hessian", torch.zeros_like(p))
            state["step_size"] = group["lr"] / (group["mu"] + hessian)
            state["step_lr"] = group["lr"]
        return state["step_size"]

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        for state in self.state.values():  # step sizes are derived: rebuild them from the Hessian
            state.pop("step_size", None)
            state.pop("step_lr", None)


def diagonal_hessian(model: DigitClassifier, images: torch.Tensor,
                     chunk: int = 500) -> dict[torch.nn.Parameter, torch.Tensor]:
    """Average per-sample second-derivative estimate over `images` (uint8, (N, 28, 28)):
    one non-negative tensor per parameter, the same whatever `chunk` is."""
    if not hasattr(model, "second_derivatives"):
        raise ConfigError(f"--optimizer sdlm needs a model that estimates its second derivatives "
                          f"(lenet5-1998), not {model.registry_name!r}")
    x = to_model_input(images)
    totals: dict[str, torch.Tensor] = {}
    for start in range(0, len(x), chunk):
        for name, value in model.second_derivatives(x[start:start + chunk]).items():
            totals[name] = totals[name] + value if name in totals else value
    return {p: totals[name] / len(x) for name, p in model.named_parameters()}
