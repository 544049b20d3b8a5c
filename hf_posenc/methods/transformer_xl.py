"""Transformer-XL relative positions (Dai et al. 2019), per layer, with global u and v.

score_ij = q_i k_j + q_i W_R R_{i-j} + u k_j + v W_R R_{i-j}        (the paper's terms (a), (b), (c), (d))
for the distance i - j of the caller's position ids, R_d the sinusoid of the distance (sin / cos halves,
``hidden_size`` dims, wavelength base ``base``), W_R (hidden_size -> H * D) one per layer, u and v (H, D) shared
by all layers. The four terms are summed before the model's ``scaling`` (1/sqrt(D)), as Shaw's are.
Terms (b) + (d) are computed per distinct distance, (q_i + v) W_R R_d (B, H, Lq, n_d), then gathered into
(B, H, Lq, Lk); term (c) is u k_j per key. Causal and bidirectional alike (R_d is defined for negative d).

Init: ``init_std`` = 0 (default) starts W_R, u and v at zero, so a fresh conversion computes exactly NoPE attention
and fine-tuning grows the terms (at zero d/dW_R = (q + v) R^T and d/du = k are non-zero; d/dv = W_R R follows once
W_R has moved).
They depend on q and k, so Transformer-XL runs the eager kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import Memo, MethodOptions, ModelShape, PositionMethod, PositionTerm, check_range, help_field, shared


@dataclass
class TransformerXLOptions(MethodOptions):
    base: float = help_field(10000.0, "wavelength base of the distance sinusoid R; > 1")
    init_std: float = help_field(
        0.0, "std of the normal init of W_R, u and v; 0 = zeros: a fresh conversion computes NoPE; >= 0"
    )

    def validate(self, shape=None):
        check_range("base", self.base, 1.0 + 1e-9)
        check_range("init_std", self.init_std, 0.0)


def distance_sinusoid(distances: torch.Tensor, dim: int, base: float) -> torch.Tensor:
    """(n,) distances -> (n, dim) fp32, [sin(d w), cos(d w)] halves with w_t = base^(-2t/dim)."""
    freqs = base ** -(torch.arange(0, dim, 2, dtype=torch.float32, device=distances.device) / dim)  # (ceil(dim/2),)
    angles = distances.float()[:, None] * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=-1)[:, :dim]


def distance_range(relative: torch.Tensor) -> tuple[int, int]:
    """(min, max) of ``relative``: Python ints, or while exporting data-dependent sizes the graph computes (``int()``
    of a traced value is a guard torch.export cannot decide: it failed, and torch.onnx retried a second way)."""
    if not torch.compiler.is_exporting():
        return int(relative.min()), int(relative.max())
    low, high = relative.min().item(), relative.max().item()
    torch._check(low <= high)
    return low, high


class TransformerXL(PositionMethod):
    name = "transformer_xl"
    Options = TransformerXLOptions
    term = PositionTerm(content=True)

    def __init__(self, options: TransformerXLOptions, shape: ModelShape):
        super().__init__(options, shape)
        heads, dim = shape.num_heads, shape.head_dim
        self.projections = nn.ModuleList(  # W_R per layer
            nn.Linear(shape.hidden_size, heads * dim, bias=False) for _ in range(shape.num_layers))
        self.u = nn.Parameter(torch.zeros(heads, dim))  # content bias (term c)
        self.v = nn.Parameter(torch.zeros(heads, dim))  # position bias (term d)
        with torch.no_grad():
            for p in self.parameters():
                nn.init.normal_(p, std=options.init_std) if options.init_std else nn.init.zeros_(p)

    def distances(self, q_pos: torch.Tensor, k_pos: torch.Tensor, memo: Memo | None = None):
        """(index (P, 1, Lq, Lk) into the distinct distances, R (n_d, hidden) fp32). Shared by all layers."""

        def build():
            relative = q_pos[:, :, None] - k_pos[:, None, :]  # (P, Lq, Lk) i - j
            low, high = distance_range(relative)
            values = torch.arange(low, high + 1, device=k_pos.device)
            return (relative - low)[:, None], distance_sinusoid(values, self.shape.hidden_size, self.options.base)

        return shared(memo, ("transformer_xl", tuple(q_pos.shape), tuple(k_pos.shape), k_pos.device), build)

    def key_term(self, q, k, layer_idx, q_pos, k_pos, memo=None):
        # q (B,H,Lq,D), k (B,H,Lk,D) -> (B,H,Lq,Lk): u k_j + (q_i + v) W_R R_{i-j}
        index, sinusoid = self.distances(q_pos, k_pos, memo)
        heads, dim = self.shape.num_heads, self.shape.head_dim
        weight = self.projections[layer_idx].weight
        per_distance = (sinusoid.to(weight.dtype) @ weight.T).view(-1, heads, dim).permute(1, 2, 0)  # (H, D, n_d)
        position = (q + self.v[None, :, None].to(q.dtype)) @ per_distance.to(q.dtype)  # (B, H, Lq, n_d)
        position = position.gather(-1, index.expand(q.shape[0], heads, -1, -1))  # (B, H, Lq, Lk)
        content = (k * self.u[None, :, None].to(k.dtype)).sum(-1)[:, :, None]  # (B, H, 1, Lk)
        return position + content

    def value_term(self, probs, layer_idx, q_pos, k_pos, memo=None):
        return 0.0  # Transformer-XL changes the scores only
