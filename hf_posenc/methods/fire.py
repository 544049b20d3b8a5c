"""FIRE (Li et al. 2023, "Functional Interpolation for Relative Positions Improves Long Context Transformers").

bias[h, i, j] = f_theta(psi(|i - j|) / (psi(max(L, i)) + eps))[h],   psi(x) = log(|c| x + 1),
for the caller's query position i and key position j; f_theta: Linear(1, W) -> ReLU -> Linear(W, H), c and the
threshold L learnable (the reference code: c = 0.1, L = 512 times a learned multiplier). Normalising by the query
position maps every distance of every query into [0, 1] (causal), so the MLP never sees an input it was not trained
on at longer lengths; below the threshold L the normaliser is constant. One FIRE module shared by all layers (as
the project's T5 bias; the reference code builds one per layer). Encoders use |i - j| the same way (the normalised
distance may then exceed 1 for keys after the query).

The bias depends on the query position itself, not only the distance: it runs the shared-bias SDPA kernel (or
eager), never the template / flex kernels that assume a distance-only bias.

Init (``init``):
- ``alibi``: the MLP is set, exactly and without training, to the piecewise-linear interpolation in the normalised
  distance x of ALiBi's -m_h d at W knots x_k = k / W (first layer: weight 1, bias -x_k; second layer: the slope
  changes). Below the threshold it equals ALiBi at the knots and stays within the chord error between them
  (tests/test_new_methods.py measures it); beyond the threshold it is FIRE's own progressive interpolation.
- ``zeros``: the last layer is zero: a fresh conversion computes NoPE attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .alibi import alibi_slopes
from .base import MethodOptions, ModelShape, PositionMethod, PositionTerm, check_range, help_field

EPS = 1e-6
CHUNK_ELEMENTS = 1 << 24  # hidden activations per chunk of query rows (64 MB in fp32)
INITS = ("alibi", "zeros")


@dataclass
class FireOptions(MethodOptions):
    width: int = help_field(32, "hidden width W of the MLP (the paper: 32); >= 2")
    c: float = help_field(0.1, "initial c of psi(x) = log(|c| x + 1) (learnable; the reference: 0.1); > 0")
    threshold: float | None = help_field(
        None, "initial threshold L of the normaliser psi(max(L, i)) (learnable); None = the model's old limit; >= 1"
    )
    init: str = help_field(
        "alibi", "initial MLP: 'alibi' (piecewise-linear interpolation of ALiBi at W knots) or 'zeros' (NoPE)"
    )

    def validate(self, shape=None):
        check_range("width", self.width, 2, integer=True)
        check_range("c", self.c, 1e-9)
        if self.threshold is not None:
            check_range("threshold", self.threshold, 1.0)
        if self.init not in INITS:
            raise ValueError(f"option 'init' must be one of {list(INITS)}, got {self.init!r}")

    def resolve(self, shape: ModelShape) -> "FireOptions":
        threshold = float(self.threshold if self.threshold is not None else shape.original_max_positions)
        return FireOptions(width=self.width, c=self.c, threshold=threshold, init=self.init)


def psi(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return torch.log(c.abs() * x + 1)


class Fire(PositionMethod):
    name = "fire"
    Options = FireOptions
    term = PositionTerm(bias="positions")

    def __init__(self, options: FireOptions, shape: ModelShape):
        super().__init__(options, shape)
        self.mlp = nn.Sequential(nn.Linear(1, options.width), nn.ReLU(), nn.Linear(options.width, shape.num_heads))
        self.c = nn.Parameter(torch.tensor(float(options.c)))
        self.threshold = nn.Parameter(torch.tensor(float(options.threshold)))
        with torch.no_grad():
            self._initialise()

    def _initialise(self) -> None:
        first, last = self.mlp[0], self.mlp[2]
        width = self.options.width
        knots = torch.arange(width, dtype=torch.float32) / width  # (W,) x_0 = 0 ... x_{W-1}
        first.weight.fill_(1.0)
        first.bias.copy_(-knots)
        if self.options.init == "zeros":
            last.weight.zero_()
            last.bias.zero_()
            return
        # ALiBi as a function of x below the threshold: -m_h d(x), d(x) = (exp(x psi(L)) - 1) / c
        ends = torch.cat([knots, torch.ones(1)])  # (W + 1,) knots and x = 1
        scale = float(psi(torch.tensor(self.options.threshold), torch.tensor(self.options.c)))
        distance = (torch.exp(ends * scale) - 1) / self.options.c  # (W + 1,)
        target = -alibi_slopes(self.shape.num_heads)[:, None] * distance[None]  # (H, W + 1)
        slopes = (target[:, 1:] - target[:, :-1]) / (ends[1:] - ends[:-1])  # (H, W) per interval
        changes = torch.cat([slopes[:, :1], slopes[:, 1:] - slopes[:, :-1]], dim=1)  # (H, W)
        last.weight.copy_(changes)
        last.bias.copy_(target[:, 0])

    def normalised_distance(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """(P, Lq, Lk) fp32: psi(|i - j|) / (psi(max(L, i)) + eps)."""
        c = self.c.float()
        distance = (q_pos[:, :, None] - k_pos[:, None, :]).abs().float()
        normaliser = torch.maximum(q_pos.float(), self.threshold.float().abs())[:, :, None]  # (P, Lq, 1)
        return psi(distance, c) / (psi(normaliser, c) + EPS)

    def score_bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_exporting():  # one chunk: a loop over a symbolic length would fix it to the example's
            return self._bias_rows(q_pos, k_pos)
        # query rows in chunks: the MLP's hidden layer is W floats per (i, j) pair
        rows = max(1, CHUNK_ELEMENTS // max(1, k_pos.shape[-1] * self.options.width * q_pos.shape[0]))
        parts = [self._bias_rows(q_pos[:, start : start + rows], k_pos) for start in range(0, q_pos.shape[-1], rows)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)  # (P, H, Lq, Lk)

    def _bias_rows(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """(P, H, c, Lk) fp32 for the c query positions ``q_pos`` (P, c)."""
        x = self.normalised_distance(q_pos, k_pos)  # (P, c, Lk)
        return self.mlp(x[..., None].to(self.mlp[0].weight.dtype)).permute(0, 3, 1, 2).float()
