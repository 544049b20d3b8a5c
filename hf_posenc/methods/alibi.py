"""ALiBi (Press et al., 2022): a fixed, per-head linear penalty on query-key distance, no learned parameters.

bias[h, i, j] = -slope[h] * |p_i - p_j| for query / key positions p (the caller's position ids). For causal models only j <= i survives the mask, so this is the paper's
-slope * (i - j); encoders get the symmetric |i - j|.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import MethodOptions, ModelShape, PositionMethod, PositionTerm, check_range, help_field


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """(H,) geometric slopes starting at 2^(-8/n). For H not a power of two, BLOOM's convention: the slopes of
    the nearest lower power of two, then every other slope of the next power of two."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = base ** torch.arange(1, closest + 1, dtype=torch.float64)
    if closest != num_heads:
        extra_base = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        remaining = min(closest, num_heads - closest)
        extra = extra_base ** torch.arange(1, 1 + 2 * remaining, 2, dtype=torch.float64)
        slopes = torch.cat([slopes, extra])
    return slopes.float()


@dataclass
class AlibiOptions(MethodOptions):
    slope_scale: float = help_field(1.0, "multiplies every head's slope (1.0 = the paper's slopes); > 0")

    def validate(self, shape=None):
        check_range("slope_scale", self.slope_scale, 1e-6)


class Alibi(PositionMethod):
    name = "alibi"
    Options = AlibiOptions
    term = PositionTerm(bias="distance", bias_form="linear")

    def slopes(self, device=None) -> torch.Tensor:
        """(H,) fp32, derived from the head count (not a buffer, so .to(bfloat16) cannot round them)."""
        return (alibi_slopes(self.shape.num_heads) * self.options.slope_scale).to(device)

    def score_bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        distance = (q_pos[:, None, :, None] - k_pos[:, None, None, :]).abs().float()  # (P, 1, Lq, Lk)
        return -self.slopes(k_pos.device)[:, None, None] * distance  # (P, H, Lq, Lk) fp32
