"""Random planar affine distortions of a batch, on its device (LeCun et al. 1998, section III.C.1).

The paper's distortions were "horizontal and vertical translations, scaling, squeezing
(simultaneous horizontal compression and vertical elongation, or the reverse), and
horizontal shearing"; it does not give their ranges. Ours (`DEFAULT_RANGES`) keep MNIST's
20x20 digit box inside the 28x28 frame: at the extremes (2 px shift, 1.1 scale, 1.1 squeeze,
0.2 shear) a digit of the box's full size still stays in the frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F


@dataclass(frozen=True)
class DistortionRanges:
    translate: float = 2.0  # pixels, each direction, uniform in [-t, t]
    scale: float = 0.1  # both axes by s, s uniform in [1 - scale, 1 + scale]
    squeeze: float = 0.1  # x by q and y by 1/q, q uniform in [1 - squeeze, 1 + squeeze]
    shear: float = 0.2  # x += shear * y, uniform in [-shear, shear]

    def scaled(self, factor: float) -> "DistortionRanges":
        """Every range times `factor` (0.5: half as strong; 1: these)."""
        return DistortionRanges(self.translate * factor, self.scale * factor, self.squeeze * factor, self.shear * factor)


DEFAULT_RANGES = DistortionRanges()


def random_affine(images: torch.Tensor, ranges: DistortionRanges = DEFAULT_RANGES,
                  generator: torch.Generator | None = None, share: float = 1.0) -> torch.Tensor:
    """Distort (B, 1, H, W) float images, background 0, each with its own random affine map.

    One affine_grid + grid_sample for the whole batch: no per-image Python. Uses the global RNG
    of the images' device unless a generator is given, so runs are seeded and resumable. With
    `share` below 1 each image is distorted with that probability and otherwise left as it is
    (the paper's training set held 540,000 distorted digits beside the 60,000 originals: 0.9).
    """
    b, _, h, w = images.shape
    device = images.device if generator is None else generator.device
    u = torch.rand(b, 5 if share >= 1 else 6, generator=generator, device=device)
    u = (u.to(images.device, images.dtype) * 2 - 1)  # uniform in [-1, 1]
    keep = None
    if share < 1:  # drawn with the maps, so that a batch of B draws what B batches of one draw
        keep, u = u[:, 5] >= 2 * share - 1, u[:, :5]
    scale = 1 + ranges.scale * u[:, 0]
    squeeze = 1 + ranges.squeeze * u[:, 1]
    shear = ranges.shear * u[:, 2]
    sx, sy = scale * squeeze, scale / squeeze
    # affine_grid maps output coordinates to input coordinates in [-1, 1] units, so the forward
    # map (shear, then scale, then shift) is inverted here: input = M^-1 (output - t).
    tx, ty = ranges.translate * u[:, 3] * 2 / w, ranges.translate * u[:, 4] * 2 / h
    inv = torch.zeros(b, 2, 3, device=images.device, dtype=images.dtype)
    inv[:, 0, 0] = 1 / sx
    inv[:, 0, 1] = -shear / sy
    inv[:, 1, 1] = 1 / sy
    inv[:, 0, 2] = -(tx / sx - shear * ty / sy)
    inv[:, 1, 2] = -ty / sy
    grid = F.affine_grid(inv, list(images.shape), align_corners=False)
    distorted = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return distorted if keep is None else torch.where(keep[:, None, None, None], images, distorted)
