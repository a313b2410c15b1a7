"""Why the paper's global rate (0.0005 per pattern) diverged in our LeNet-5: the curvature evidence.

Checks `LeNet5_1998.second_derivatives` (appendix C's Gauss-Newton diagonal, off-diagonal terms
dropped) against the exact Gauss-Newton diagonal computed by autograd from per-sample Jacobians,
and that against the exact Hessian diagonal; measures the scale of the estimate against mu, the
stability limit of SDLM's step, and follows the first updates at eta = 0.0005. Writes Markdown.

    python docs/scripts/hessian_check.py --data-dir ../shared/mnist > docs/results/lecun1998-hessian/hessian_check.md

Three network states: the initialisation as printed in appendix A (uniform +-2.4/F, F the fan-in),
one scaled by sqrt(F) instead (uniform +-2.4/sqrt(F)), and the first after one pass over 10,000
training digits with the recipe that trains it (16 patterns per update at 16 x 1e-5).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from torch.func import functional_call, hessian, jacrev, vmap

from lenet5.data import load_mnist
from lenet5.data.transforms import to_model_input
from lenet5.models.lenet5_1998 import LeNet5_1998
from lenet5.train.sdlm import SDLM, diagonal_hessian

sys.path.insert(0, str(Path(__file__).parent))
from sdlm_eta_runs import fan_in_init_  # noqa: E402 (after the path: the scripts share the initialisations)

ETA, MU = 5e-4, 0.02  # the paper's first global rate and its mu (section III.C, appendix C)


class _F6(torch.nn.Module):
    """The network up to F6's states: what the Gauss-Newton matrix is taken through."""

    def __init__(self, model: LeNet5_1998):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.activations(x)["F6"]


def output_curvature(model: LeNet5_1998, f6: torch.Tensor, labels: torch.Tensor, full: bool) -> torch.Tensor:
    """d2E/dF6^2 per sample, (N, 84, 84): 2I for E = y_correct alone, or the exact Hessian of
    eq. 9 with respect to F6 (positive definite: 2(1 - sum p) I plus a positive semi-definite
    term, where p are the classes' posteriors with the rubbish class)."""
    if not full:
        return 2 * torch.eye(f6.shape[1]).expand(len(f6), -1, -1)
    prototypes = model.output.prototypes

    def eq9(state: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        y = (state[None] - prototypes).pow(2).sum(-1)
        rubbish = torch.full((1,), -model.j)
        return (y * (torch.arange(len(y)) == label)).sum() + torch.logsumexp(torch.cat([-y, rubbish]), 0)

    return vmap(hessian(eq9))(f6, labels)


def exact_gauss_newton(model: LeNet5_1998, x: torch.Tensor, labels: torch.Tensor,
                       chunk: int = 20) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Mean over the samples of diag(J^T H J), J = dF6/dw per sample (autograd), H = d2E/dF6^2:
    for E = y_correct (the error our estimate models) and for the whole of eq. 9."""
    net = _F6(model)
    params = {f"model.{k}": v.detach() for k, v in model.named_parameters()}

    def f6(p: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
        return functional_call(net, p, (xi[None],))[0]

    sums = {full: {k: torch.zeros_like(v) for k, v in model.named_parameters()} for full in (False, True)}
    for start in range(0, len(x), chunk):
        xs, ys = x[start:start + chunk], labels[start:start + chunk]
        jac = vmap(jacrev(f6), in_dims=(None, 0))(params, xs)  # name -> (n, 84, *shape)
        with torch.no_grad():
            states = model.activations(xs)["F6"]
        for full in (False, True):
            # H = V diag(l) V^T, so diag(J^T H J) = sum_r l_r (V^T J)_r^2
            evals, evecs = torch.linalg.eigh(output_curvature(model, states, ys, full))
            assert (evals > 0).all(), "d2E/dF6^2 should be positive definite"
            for name in sums[full]:
                j = jac[f"model.{name}"].flatten(2)  # (n, 84, P)
                rotated = evecs.transpose(1, 2) @ j
                sums[full][name] += (evals[:, :, None] * rotated.pow(2)).sum((0, 1)).view_as(sums[full][name])
    return ({k: v / len(x) for k, v in sums[False].items()}, {k: v / len(x) for k, v in sums[True].items()})


def exact_hessian_entries(model: LeNet5_1998, x: torch.Tensor, labels: torch.Tensor, per_tensor: int,
                          generator: torch.Generator) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """d2E/dw_k2 of eq. 9 (mean over the samples, every term kept) for `per_tensor` random
    entries k of each parameter tensor, by differentiating the gradient twice."""
    params = dict(model.named_parameters())
    loss = model.loss(model(x), labels)
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    out = {}
    for (name, p), g in zip(params.items(), grads):
        picks = torch.randperm(p.numel(), generator=generator)[:per_tensor]
        values = []
        for k in picks.tolist():
            (row,) = torch.autograd.grad(g.flatten()[k], p, retain_graph=True)
            values.append(row.flatten()[k])
        out[name] = (picks, torch.stack(values).detach())
    return out


def preconditioned_sharpness(model: LeNet5_1998, x: torch.Tensor, labels: torch.Tensor,
                             hessian_diag: dict[str, torch.Tensor]) -> tuple[float, float, dict[str, float]]:
    """Largest eigenvalue lambda of D^-1/2 G D^-1/2, D = mu + h, G the Gauss-Newton matrix of
    E = y_correct: over the samples together (full batch) and for single samples (median), and
    each parameter tensor's share of the single-sample lambda (median). SDLM's step eta D^-1 g is
    stable on the linearised problem while eta lambda stays below 2."""
    net = _F6(model)
    params = {f"model.{k}": v.detach() for k, v in model.named_parameters()}

    def f6(p: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
        return functional_call(net, p, (xi[None],))[0]

    jac = vmap(jacrev(f6), in_dims=(None, 0))(params, x)
    blocks = {k: (math.sqrt(2) * jac[f"model.{k}"] / (MU + h).sqrt()).flatten(2)
              for k, h in hessian_diag.items()}  # name -> (n, 84, P_k): H^1/2 J D^-1/2
    scaled = torch.cat(list(blocks.values()), dim=2)
    evals, evecs = torch.linalg.eigh(scaled @ scaled.transpose(1, 2))
    single, top = evals[:, -1], evecs[:, :, -1]
    # lambda = |B^T u|^2 for the top eigenvector u: split by parameter tensor
    shares = {k: float(((top[:, None, :] @ b).squeeze(1).pow(2).sum(1) / single).median()) for k, b in blocks.items()}
    stacked = scaled.flatten(0, 1)  # (n * 84, P); the nonzero eigenvalues of B^T B / n are those of B B^T / n
    full_batch = torch.linalg.eigvalsh(stacked @ stacked.T / len(x))[-1]
    return float(full_batch), float(single.median()), shares


def layer_rows(model: LeNet5_1998) -> list[str]:
    return [name for name, _ in model.named_parameters()]


def quantiles(t: torch.Tensor) -> str:
    q = torch.quantile(t.double(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.double))
    return f"{q[1]:.3g} ({q[0]:.3g} - {q[2]:.3g})"


def first_updates(model: LeNet5_1998, images: torch.Tensor, labels: torch.Tensor, steps: int) -> list[str]:
    """SDLM at eta = 0.0005 after every pattern, h estimated once on 500 samples (as before each
    pass): what the network does, how far the estimate drifts from the one it would give now, and
    eta lambda (section 4, one digit, median of 4) with the h in use and with a fresh one."""
    start = diagonal_hessian(model, images[:500])
    optimizer = SDLM(model.parameters(), lr=ETA, mu=MU)
    optimizer.set_hessian(start)
    x = to_model_input(images[500:500 + steps])
    probe_x, probe_y = to_model_input(images[:4]), labels[:4]
    c5 = model.C5.weight.detach().clone()
    rows, loss = [], torch.tensor(float("nan"))
    for i in range(steps + 1):
        now = diagonal_hessian(model, images[:500])
        with torch.no_grad():
            maps = model.activations(to_model_input(images[:500]))
        drift = {name: float((now[p] / start[p]).median()) for name, p in
                 (("C5.weight", model.C5.weight), ("F6.weight", model.F6.weight))}
        names = dict(model.named_parameters())
        used = preconditioned_sharpness(model, probe_x, probe_y, {n: start[p] for n, p in names.items()})[1]
        fresh = preconditioned_sharpness(model, probe_x, probe_y, {n: now[p] for n, p in names.items()})[1]
        rows.append(f"| {i} | {loss.item():.1f} | {maps['C5'].abs().mean():.3f} "
                    f"| {maps['F6'].abs().max():.2f} | {((model.C5.weight - c5).norm() / c5.norm()).item():.2f} "
                    f"| {drift['C5.weight']:.3g} | {drift['F6.weight']:.3g} | {ETA * used:.3g} | {ETA * fresh:.3g} |")
        if i == steps:
            break
        loss = model.loss(model(x[i:i + 1]), labels[500 + i:501 + i])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--samples", type=int, default=100, help="samples for the exact Gauss-Newton diagonal")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.perf_counter()
    mnist = load_mnist(args.data_dir, download=False)
    images, labels = mnist.train.images, mnist.train.labels
    x, y = to_model_input(images[:args.samples]), labels[:args.samples]

    def network(state: str) -> LeNet5_1998:
        torch.manual_seed(args.seed)
        model = LeNet5_1998()
        fan_in_init_(model, 2.4, 0.5 if state == "2.4/sqrt(F)" else 1.0)
        if state == "trained":
            optimizer = SDLM(model.parameters(), lr=16 * 1e-5, mu=MU)
            optimizer.set_hessian(diagonal_hessian(model, images[-500:]))
            train = to_model_input(images[:10_000])
            for s in range(0, 10_000, 16):
                optimizer.zero_grad()
                model.loss(model(train[s:s + 16]), labels[s:s + 16]).backward()
                optimizer.step()
        return model

    states = {"init 2.4/F": network("2.4/F"), "init 2.4/sqrt(F)": network("2.4/sqrt(F)"),
              "trained (init 2.4/F, 10,000 digits at 1e-5)": network("trained")}
    out = [f"Command: `python docs/scripts/hessian_check.py --data-dir ../shared/mnist --samples {args.samples}` "
           f"(torch {torch.__version__}, seed {args.seed}).", ""]

    out += ["## 1. The estimate against the exact Gauss-Newton diagonal", "",
            f"Per parameter, over the first {args.samples} training digits: our estimate "
            "(`second_derivatives`, mean over the samples) divided by the exact Gauss-Newton diagonal "
            "of E = y_correct (mean over the samples of diag(J^T 2I J), J = dF6/dw by autograd); then "
            "the exact Gauss-Newton diagonal of the whole of eq. 9 (its exact d2E/dF6^2) divided by that "
            "of y_correct: the curvature the competitive term adds. Median (10th - 90th percentile).", ""]
    exact = {}
    for label, model in states.items():
        estimate = {k: v / len(x) for k, v in model.second_derivatives(x).items()}
        gn, gn_eq9 = exact_gauss_newton(model, x, y)
        exact[label] = (gn, gn_eq9)
        out += [f"**{label}**", "", "| parameters | estimate / exact GN (y_correct) | exact GN eq. 9 / exact GN y_correct |",
                "|---|---:|---:|"]
        for name in layer_rows(model):
            out.append(f"| {name} | {quantiles(estimate[name] / gn[name])} | {quantiles(gn_eq9[name] / gn[name])} |")
        out.append("")

    out += ["## 2. Gauss-Newton against the exact Hessian diagonal", "",
            f"For 6 random entries of each parameter tensor: the exact d2E/dw2 of eq. 9 (every term, "
            f"mean over the same {args.samples} digits) divided by the exact Gauss-Newton diagonal of eq. 9.", "",
            "| parameters | " + " | ".join(states) + " |", "|---|" + "---:|" * len(states)]
    generator = torch.Generator().manual_seed(args.seed)
    ratios = {}
    for label, model in states.items():
        entries = exact_hessian_entries(model, x, y, 6, generator)
        ratios[label] = {name: values / exact[label][1][name].flatten()[picks] for name, (picks, values) in entries.items()}
    for name in layer_rows(states["init 2.4/F"]):
        out.append(f"| {name} | " + " | ".join(
            f"{ratios[s][name].median():.3g} ({ratios[s][name].min():.3g} - {ratios[s][name].max():.3g})"
            for s in states) + " |")
    out.append("")

    out += ["## 3. The scale of the estimate against mu = 0.02", "",
            "h: our estimate, mean over 500 training digits as before each pass. Share of h below mu "
            "(where the step is about eta/mu whatever h is), and the effective rate eta / (mu + h) "
            "at eta = 0.0005.", "",
            "| state | h: median (10th - 90th percentile) | share h < mu | eta/(mu+h): min - max | with h summed over the 500: min - max |",
            "|---|---:|---:|---:|---:|"]
    hessians = {}
    for label, model in states.items():
        h = diagonal_hessian(model, images[-500:])
        hessians[label] = h
        flat = torch.cat([v.flatten() for v in h.values()])
        rate, summed = ETA / (MU + flat), ETA / (MU + 500 * flat)
        out.append(f"| {label} | {quantiles(flat)} | {(flat < MU).float().mean():.1%} | "
                   f"{rate.min():.2g} - {rate.max():.2g} | {summed.min():.2g} - {summed.max():.2g} |")
    out.append("")
    out += ["Per layer (median h):", "", "| parameters | " + " | ".join(states) + " |", "|---|" + "---:|" * len(states)]
    for name, p in states["init 2.4/F"].named_parameters():
        cells = []
        for label, model in states.items():
            cells.append(f"{hessians[label][dict(model.named_parameters())[name]].median():.2g}")
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    out.append("")

    out += ["## 4. Stability of the step on the linearised problem", "",
            "lambda: the largest eigenvalue of D^-1/2 G D^-1/2, D = mu + h, G the Gauss-Newton matrix of "
            "y_correct, over 40 digits together (full batch) and for single digits (median). SDLM's "
            "step eta D^-1 g overshoots once eta lambda > 2, so 2/lambda is the largest stable eta. "
            "h: our estimate (mean or sum over 500 digits), or the exact Gauss-Newton diagonal (mean over "
            f"the {args.samples} digits of section 1). Last columns: the share of the one-digit lambda "
            "that lies in C5's weights, and in the layers below C5.", "",
            "| state | h | lambda, full batch | 2/lambda | lambda, one digit | 2/lambda | eta lambda at eta = 0.0005, one digit "
            "| share C5.weight | share below C5 |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    below = ("C1.", "S2.", "C3.", "S4.")
    for label, model in states.items():
        named = dict(model.named_parameters())
        for kind, h in (("estimate, mean over 500", {name: hessians[label][p] for name, p in named.items()}),
                        ("estimate, sum over 500", {name: 500 * hessians[label][p] for name, p in named.items()}),
                        ("exact Gauss-Newton", exact[label][0])):
            full, single, shares = preconditioned_sharpness(model, x[:40], y[:40], h)
            low = sum(v for k, v in shares.items() if k.startswith(below))
            out.append(f"| {label} | {kind} | {full:.4g} | {2 / full:.2g} | {single:.4g} | {2 / single:.2g} "
                       f"| {ETA * single:.3g} | {shares['C5.weight']:.0%} | {low:.0%} |")
    out.append("")

    out += ["## 5. The first updates at eta = 0.0005, one pattern per update", "",
            "h estimated once on 500 digits, as before a pass; after each update: the loss of the "
            "pattern just learnt, the mean |C5 state| and the largest |F6 state| over the 500 digits, how "
            "far C5's weights have moved (relative to their initial norm), the median ratio of the "
            "estimate the network would give now to the one the steps use (C5 and F6 weights), and "
            "eta lambda for one digit (section 4; median of 4 digits) with the h in use and with a "
            "fresh one. Above 2 the next step overshoots.", ""]
    for label in ("init 2.4/F", "init 2.4/sqrt(F)"):
        model = network("2.4/F" if label == "init 2.4/F" else "2.4/sqrt(F)")
        out += [f"**{label}**", "", "| updates | loss | mean abs C5 | max abs F6 | C5 moved | h now / h used, C5 "
                "| h now / h used, F6 | eta lambda, h used | eta lambda, fresh h |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        out += first_updates(model, images, labels, 6)
        out.append("")
    out.append(f"({time.perf_counter() - started:.0f} s)")
    print("\n".join(out))


if __name__ == "__main__":
    main()
