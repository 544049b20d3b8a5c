"""Shaw et al. (2018) relative position representations, on keys and values, per layer.

e_ij = q_i (k_j + a^K_{c(j-i)})^T * scaling,   z_i = sum_j p_ij (v_j + a^V_{c(j-i)}),
c(d) = clip(d, -R, R), for the distance d = p_j - p_i of the caller's position ids. Tables (2R+1, D) are shared by the heads of a layer, one pair per layer. Both start at
zero, so a freshly converted model computes exactly NoPE attention and fine-tuning grows the tables.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import Memo, MethodOptions, ModelShape, PositionMethod, PositionTerm, check_range, help_field, shared


@dataclass
class ShawOptions(MethodOptions):
    max_distance: int = help_field(16, "clip distance R: pairs farther apart than R share the edge table entry; >= 1")

    def validate(self, shape=None):
        check_range("max_distance", self.max_distance, 1, integer=True)


class ShawTables(nn.Module):
    def __init__(self, num_distances: int, head_dim: int):
        super().__init__()
        self.keys = nn.Parameter(torch.zeros(num_distances, head_dim))  # (2R+1, D) a^K
        self.values = nn.Parameter(torch.zeros(num_distances, head_dim))  # (2R+1, D) a^V


class Shaw(PositionMethod):
    name = "shaw"
    Options = ShawOptions
    term = PositionTerm(content=True, content_form="clipped")

    def __init__(self, options: ShawOptions, shape: ModelShape):
        super().__init__(options, shape)
        n = 2 * options.max_distance + 1
        self.layers = nn.ModuleList(ShawTables(n, shape.head_dim) for _ in range(shape.num_layers))

    def distance_index(self, q_pos: torch.Tensor, k_pos: torch.Tensor, memo: Memo | None = None) -> torch.Tensor:
        """(P, 1, Lq, Lk) index into the tables: clip(p_j - p_i, -R, R) + R. Shared by all layers."""
        r = self.options.max_distance

        def build():
            return ((k_pos[:, None, :] - q_pos[:, :, None]).clamp(-r, r) + r)[:, None]

        return shared(memo, ("shaw_index", tuple(q_pos.shape), tuple(k_pos.shape), k_pos.device), build)

    def content_reach(self) -> int:
        """R: pairs farther apart than R share the edge table entries (the ``"clipped"`` content form)."""
        return self.options.max_distance

    def relative_tables(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(a^K, a^V), each (2R+1, D), of one layer; row t is distance t - R."""
        tables = self.layers[layer_idx]
        return tables.keys, tables.values

    def key_term(self, q, k, layer_idx, q_pos, k_pos, memo=None):
        # q (B,H,Lq,D) @ a^K (D, 2R+1) -> (B,H,Lq,2R+1), then pick each pair's distance -> (B,H,Lq,Lk)
        per_distance = q @ self.layers[layer_idx].keys.to(q.dtype).T
        index = self.distance_index(q_pos, k_pos, memo).expand(q.shape[0], q.shape[1], -1, -1)  # (B, H, Lq, Lk)
        return per_distance.gather(-1, index)

    def value_term(self, probs, layer_idx, q_pos, k_pos, memo=None):
        # sum probabilities per clipped distance: (B,H,Lq,Lk) -> (B,H,Lq,2R+1), then @ a^V -> (B,H,Lq,D)
        index = self.distance_index(q_pos, k_pos, memo).expand_as(probs)
        per_distance = probs.new_zeros(*probs.shape[:-1], 2 * self.options.max_distance + 1)
        per_distance = per_distance.scatter_add(-1, index, probs)
        return per_distance @ self.layers[layer_idx].values.to(probs.dtype)
