"""LeNet-5 as published: LeCun, Bottou, Bengio, Haffner, "Gradient-based learning applied to
document recognition", Proc. IEEE 86(11), 1998, section II.B and appendices A-C.

Names follow the paper (C1, S2, C3, S4, C5, F6, the RBF output) so the code reads beside it.
Every layer up to F6 computes a weighted sum plus bias and passes it through the squashing
function f(a) = A tanh(S a) (eq. 6, appendix A). See docs/lenet5-1998.md for the design notes
and the places where this implementation departs from the paper.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from lenet5.models.layers import tanh
from lenet5.models.registry import DigitClassifier, register_model

# Appendix A: A = 1.7159 and S = 2/3, so that f(1) = 1 and f(-1) = -1.
A, S = 1.7159, 2 / 3

# Section II.A: background (white) is -0.1 and foreground (black) 1.175, for mean ~0, variance ~1.
BACKGROUND, FOREGROUND = -0.1, 1.175

# Table I: the S2 feature maps combined by each C3 feature map.
C3_TABLE = (
    (0, 1, 2), (1, 2, 3), (2, 3, 4), (3, 4, 5), (4, 5, 0), (5, 0, 1),
    (0, 1, 2, 3), (1, 2, 3, 4), (2, 3, 4, 5), (3, 4, 5, 0), (4, 5, 0, 1), (5, 0, 1, 2),
    (0, 1, 3, 4), (1, 2, 4, 5), (0, 2, 3, 5),
    (0, 1, 2, 3, 4, 5),
)

# Section II.B, output layer: "the parameter vectors of these units were chosen by hand and
# kept fixed ... designed to represent a stylized image of the corresponding character class
# drawn on a 7x12 bitmap". Ours, drawn for this project: '#' is +1 (ink), '.' is -1.
DIGIT_BITMAPS = {
    0: """
        .......
        ..###..
        .#...#.
        #.....#
        #.....#
        #.....#
        #.....#
        #.....#
        #.....#
        .#...#.
        ..###..
        .......""",
    1: """
        .......
        ...#...
        ..##...
        .#.#...
        ...#...
        ...#...
        ...#...
        ...#...
        ...#...
        ...#...
        .#####.
        .......""",
    2: """
        .......
        .#####.
        #.....#
        ......#
        ......#
        .....#.
        ....#..
        ...#...
        ..#....
        .#.....
        #######
        .......""",
    3: """
        .......
        #######
        .....#.
        ....#..
        ...#...
        ..###..
        .....#.
        ......#
        ......#
        #.....#
        .#####.
        .......""",
    4: """
        .......
        ....##.
        ...#.#.
        ..#..#.
        .#...#.
        #....#.
        #######
        .....#.
        .....#.
        .....#.
        .....#.
        .......""",
    5: """
        .......
        #######
        #......
        #......
        ######.
        ......#
        ......#
        ......#
        ......#
        #.....#
        .#####.
        .......""",
    6: """
        .......
        ..###..
        .#.....
        #......
        #......
        #.###..
        ##...#.
        #.....#
        #.....#
        .#...#.
        ..###..
        .......""",
    7: """
        .......
        #######
        ......#
        .....#.
        ....#..
        ...#...
        ...#...
        ..#....
        ..#....
        ..#....
        ..#....
        .......""",
    8: """
        .......
        .#####.
        #.....#
        #.....#
        #.....#
        .#####.
        #.....#
        #.....#
        #.....#
        #.....#
        .#####.
        .......""",
    9: """
        .......
        ..###..
        .#...#.
        #.....#
        #.....#
        .#...##
        ..###.#
        ......#
        ......#
        .....#.
        ..###..
        .......""",
}


RBF_CODES = ("bitmaps", "random")  # the output's fixed codes: the paper's digit bitmaps, or random +-1 codes
# Appendix A's initial range 2.4/F as printed ("paper"), or 2.4/sqrt(F) ("sqrt"), the reading under which the
# paper's global rate trains (docs/lenet5-1998.md, "The paper's learning rate"): the exponent of F.
INITS = {"paper": 1.0, "sqrt": 0.5}


def rbf_prototypes() -> torch.Tensor:
    """The 10 fixed RBF parameter vectors (10, 84): the bitmaps above, row by row, as +1/-1."""
    rows = []
    for digit in range(10):
        lines = DIGIT_BITMAPS[digit].split()
        if len(lines) != 12 or any(len(line) != 7 or set(line) - {"#", "."} for line in lines):
            raise ValueError(f"the bitmap of digit {digit} must be 12 lines of 7 '#' or '.'")
        rows.append([1.0 if ch == "#" else -1.0 for ch in "".join(lines)])
    return torch.tensor(rows)


def random_prototypes(classes: int, seed: int = 1998) -> torch.Tensor:
    """(classes, 84) fixed +1/-1 codes for a data set other than the ten digits.

    Section II.B: for classes without a hand-drawn bitmap the paper notes the parameter vectors
    "could have been chosen at random with equal probabilities for -1 and +1". Drawn from a fixed
    seed, so the same class count always gets the same codes (they are also saved as a buffer)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (classes, 84), generator=generator).float() * 2 - 1


def squash(a: torch.Tensor) -> torch.Tensor:
    """f(a) = A tanh(S a), eq. 6 (appendix A)."""
    return A * tanh(S * a)


def lecun_uniform_(tensor: torch.Tensor, fan_in: int, power: float = 1.0) -> None:
    """Appendix A: uniform in [-2.4/F, 2.4/F], F the number of inputs of the unit (2.4/F**power)."""
    bound = 2.4 / fan_in**power
    nn.init.uniform_(tensor, -bound, bound)


class Subsampling(nn.Module):
    """S2 and S4: the sum of each non-overlapping 2x2 block, times a trainable coefficient,
    plus a trainable bias, one pair per feature map (section II.B)."""

    def __init__(self, maps: int, power: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(maps))
        self.bias = nn.Parameter(torch.empty(maps))
        lecun_uniform_(self.weight, 4, power)
        lecun_uniform_(self.bias, 4, power)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        block_sum = F.avg_pool2d(x, 2) * 4  # (B, maps, H/2, W/2)
        return block_sum * self.weight[:, None, None] + self.bias[:, None, None]


class SparseConv2d(nn.Module):
    """C3: a convolution in which output map o sees only the input maps table[o] (Table I).

    Only the connected 5x5 kernels exist as parameters (60 of the 96), so the parameter count is
    the paper's and unconnected kernels cannot learn; they are scattered into a dense kernel
    with zeros elsewhere for one ordinary conv2d call.
    """

    def __init__(self, table: tuple[tuple[int, ...], ...], in_maps: int, kernel_size: int, power: float = 1.0):
        super().__init__()
        self.table, self.in_maps, self.kernel_size = table, in_maps, kernel_size
        pairs = [(o, i) for o, inputs in enumerate(table) for i in inputs]
        self.register_buffer("slots", torch.tensor([o * in_maps + i for o, i in pairs]), persistent=False)
        self.weight = nn.Parameter(torch.empty(len(pairs), kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(len(table)))
        fan_in = [len(table[o]) * kernel_size**2 for o, _ in pairs]
        for k, fan in enumerate(fan_in):
            lecun_uniform_(self.weight.data[k], fan, power)
        for o, inputs in enumerate(table):
            lecun_uniform_(self.bias.data[o:o + 1], len(inputs) * kernel_size**2, power)

    def dense_kernel(self) -> torch.Tensor:
        k = self.kernel_size
        full = self.weight.new_zeros(len(self.table) * self.in_maps, k, k).index_copy(0, self.slots, self.weight)
        return full.view(len(self.table), self.in_maps, k, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.dense_kernel(), self.bias)


class EuclideanRBF(nn.Module):
    """Output layer (eq. 7): y_i = sum_j (x_j - w_ij)^2, with fixed, untrained w (a buffer)."""

    def __init__(self, prototypes: torch.Tensor):
        super().__init__()
        self.register_buffer("prototypes", prototypes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x[:, None, :] - self.prototypes[None]).pow(2).sum(-1)  # (B, classes) penalties


@register_model("lenet5-1998")
class LeNet5_1998(DigitClassifier):
    """LeNet-5 of LeCun et al. 1998 (Proc. IEEE, sec. II.B): C3 table, trainable subsampling, scaled tanh, fixed RBF output (60,000 params)."""

    # A reproduction: the paper's arithmetic in fp32 (SDLM's step divides by Hessian estimates that
    # bf16 would round to 3 digits), and its layers are narrow anyway.
    bf16_pays = False
    display_shapes = {"F6": (12, 7)}  # the 7x12 bitmap that the RBF output compares F6 with
    label_smoothing_ok = False  # eq. 9 is not a cross-entropy over logits

    def __init__(self, j: float = 0.1, num_classes: int = 10, codes: str | None = None, init: str = "paper"):
        super().__init__()
        if j <= 0:
            raise ValueError("j, the 'rubbish class' constant of eq. 9, must be positive")
        if codes not in (None, *RBF_CODES):
            raise ValueError(f"codes must be one of {', '.join(RBF_CODES)}, got {codes!r}")
        if codes == "bitmaps" and num_classes != 10:
            raise ValueError(f"the RBF bitmaps are of the ten digits; {num_classes} classes get random codes")
        if not 2 <= num_classes <= 1000:
            raise ValueError(f"num_classes must be 2 to 1000, got {num_classes}")
        if init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
        power = INITS[init]
        self.j = j
        self.C1 = nn.Conv2d(1, 6, 5)  # (B, 6, 28, 28)
        self.S2 = Subsampling(6, power)  # (B, 6, 14, 14)
        self.C3 = SparseConv2d(C3_TABLE, 6, 5, power)  # (B, 16, 10, 10)
        self.S4 = Subsampling(16, power)  # (B, 16, 5, 5)
        self.C5 = nn.Conv2d(16, 120, 5)  # (B, 120, 1, 1): a convolution, so larger inputs still work
        self.F6 = nn.Linear(120, 84)
        # Ten classes get the paper's digit bitmaps (for another ten-class set they are just ten
        # distinct codes) unless codes="random"; any other count gets random codes, as section II.B allows.
        bitmaps = num_classes == 10 and codes != "random"
        self.output = EuclideanRBF(rbf_prototypes() if bitmaps else random_prototypes(num_classes))
        for layer, fan_in in ((self.C1, 25), (self.C5, 16 * 25), (self.F6, 120)):
            lecun_uniform_(layer.weight, fan_in, power)
            lecun_uniform_(layer.bias, fan_in, power)

    @staticmethod
    def input_transform(x: torch.Tensor) -> torch.Tensor:
        """(B, 1, 28, 28) in [0, 1] -> (B, 1, 32, 32): centred with a 2-pixel border, background
        -0.1, ink 1.175 (section II.A)."""
        x = F.pad(x, (2, 2, 2, 2))  # the border is background (0)
        return x * (FOREGROUND - BACKGROUND) + BACKGROUND

    def activations(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every layer's output, by the paper's names (for feature-map views)."""
        maps = {"input": self.input_transform(x)}
        maps["C1"] = squash(self.C1(maps["input"]))
        maps["S2"] = squash(self.S2(maps["C1"]))
        maps["C3"] = squash(self.C3(maps["S2"]))
        maps["S4"] = squash(self.S4(maps["C3"]))
        maps["C5"] = squash(self.C5(maps["S4"]))
        maps["F6"] = squash(self.F6(maps["C5"].flatten(1)))
        maps["output"] = self.output(maps["F6"])
        return maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activations(x)["output"]

    def loss(self, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Eq. 9: y_correct + log(e^-j + sum_i e^-y_i), averaged over the batch."""
        correct = outputs.gather(1, labels[:, None]).squeeze(1)
        rubbish = outputs.new_full((len(outputs), 1), -self.j)
        return (correct + torch.logsumexp(torch.cat([-outputs, rubbish], 1), dim=1)).mean()

    def second_derivatives(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Appendix C's Gauss-Newton diagonal estimate of d2E/dw2 for every parameter, summed
        over the batch, for the per-sample error E = y_correct = ||F6 - w_correct||^2.

        The paper back-propagates second derivatives with every off-diagonal term dropped:
        d2E/da2 = f'(a)^2 d2E/dx2,  d2E/dx_j2 = sum_i w_ij^2 d2E/da_i2,  d2E/dw2 = sum x_j^2 d2E/da_i2
        (sums over all connections sharing w). That is the ordinary backward pass of a surrogate
        network whose weights and inputs are squared and whose activation derivatives are
        squared, so autograd computes it: `grad_scaled` makes the surrogate's forward values the
        squared real states while its backward multiplies by f'(a)^2.

        Against the exact Gauss-Newton diagonal of the same error (per-sample Jacobians by
        autograd, tests/test_sdlm_hessian.py): equal in C5 and F6, where no term is dropped; below
        C5 the dropped cross terms add up, and the estimate is smaller, by a median factor of
        about 1 (S4's biases) to 13 (C1's biases) at the initialisation (docs/lenet5-1998.md).
        """
        def grad_scaled(state: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
            fprime2 = (A * S * (1 - (state / A) ** 2)) ** 2  # f'(a)^2 from f(a) = A tanh(S a)
            scaled = surrogate * fprime2
            return state.detach() ** 2 + scaled - scaled.detach()

        with torch.no_grad():
            maps = self.activations(x)
        sq = {name: p.detach().square().requires_grad_() for name, p in self.named_parameters()}
        bias = {name: torch.zeros_like(p, requires_grad=True) for name, p in self.named_parameters()
                if name.endswith(".bias")}
        s1 = F.conv2d(maps["input"] ** 2, sq["C1.weight"], bias["C1.bias"])
        h1 = grad_scaled(maps["C1"], s1)
        s2 = F.avg_pool2d(h1, 2) * 4 * sq["S2.weight"][:, None, None] + bias["S2.bias"][:, None, None]
        h2 = grad_scaled(maps["S2"], s2)
        c3 = self.C3
        kernel = sq["C3.weight"].new_zeros(len(c3.table) * c3.in_maps, 5, 5).index_copy(0, c3.slots, sq["C3.weight"])
        s3 = F.conv2d(h2, kernel.view(len(c3.table), c3.in_maps, 5, 5), bias["C3.bias"])
        h3 = grad_scaled(maps["C3"], s3)
        s4 = F.avg_pool2d(h3, 2) * 4 * sq["S4.weight"][:, None, None] + bias["S4.bias"][:, None, None]
        h4 = grad_scaled(maps["S4"], s4)
        s5 = F.conv2d(h4, sq["C5.weight"], bias["C5.bias"])
        h5 = grad_scaled(maps["C5"], s5).flatten(1)
        s6 = F.linear(h5, sq["F6.weight"], bias["F6.bias"])
        f6 = maps["F6"]
        s6.backward(self.f6_curvature(f6) * (A * S * (1 - (f6 / A) ** 2)) ** 2)  # d2E/dF6^2 times f'(a)^2
        return {name: (bias[name] if name in bias else sq[name]).grad for name in sq}

    def f6_curvature(self, f6: torch.Tensor) -> torch.Tensor:
        """d2E/dF6^2 for each F6 state, where the estimate starts: 2, that of eq. 9's first term
        ||F6 - w_correct||^2 (eq. 7), the same for every digit. The competitive term's is left out
        (docs/lenet5-1998.md, departure 3; docs/scripts/lecun1998_eq9_hessian.py measures with it)."""
        return torch.full_like(f6, 2.0)

    def logits(self, outputs: torch.Tensor) -> torch.Tensor:
        """Penalties -> scores: the smallest RBF output wins, and softmax(-y) is the posterior
        that eq. 9 trains (without its rubbish class)."""
        return -outputs


def connections(model: LeNet5_1998) -> dict[str, int]:
    """Connections per layer as the paper counts them (a shared weight counts once per use,
    each unit's bias is one connection), computed from the layers' real output sizes."""
    with torch.no_grad():
        maps = model.activations(torch.zeros(1, 1, 28, 28))
    units = {name: maps[name][0].numel() for name in ("C1", "S2", "C3", "S4", "C5", "F6")}
    per_unit = {
        "C1": 25 + 1,
        "S2": 4 + 1,
        "C3": None,  # differs per map: the table's inputs x 25, plus a bias
        "S4": 4 + 1,
        "C5": 16 * 25 + 1,
        "F6": 120 + 1,
    }
    counts = {name: units[name] * n for name, n in per_unit.items() if n is not None}
    positions = maps["C3"][0, 0].numel()  # 10 x 10
    counts["C3"] = positions * sum(len(inputs) * 25 + 1 for inputs in C3_TABLE)
    counts = {name: counts[name] for name in per_unit}
    counts["output"] = maps["output"][0].numel() * maps["F6"][0].numel()  # 10 RBF units x 84 inputs
    counts["total"] = sum(counts.values())
    return counts

