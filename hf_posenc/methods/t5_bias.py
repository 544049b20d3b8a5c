"""T5 relative position bias (Raffel et al.): a learned scalar per (bucket, head), shared by all layers.

Distances k - q are bucketed: exact below num_buckets/2 (/4 each way for encoders), log-spaced up to
max_distance, clipped beyond. The bucketing is transformers' own ``T5Attention._relative_position_bucket``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .._seams import t5_relative_position_bucket
from .alibi import alibi_slopes
from .base import MethodOptions, ModelShape, PositionMethod, PositionTerm, check_range, help_field


@dataclass
class T5BiasOptions(MethodOptions):
    num_buckets: int = help_field(32, "number of distance buckets (T5 uses 32); >= 2")
    max_distance: int = help_field(128, "distance beyond which all pairs share the last bucket; >= 2")
    init: str = help_field(
        "alibi",
        "initial table: 'alibi' (each bucket gets -slope_h * its smallest distance, so the retrofit starts "
        "from a working recency bias) or 'zeros' (starts as NoPE)",
    )

    def validate(self, shape=None):
        check_range("num_buckets", self.num_buckets, 2, integer=True)
        check_range("max_distance", self.max_distance, 2, integer=True)
        if self.init not in ("alibi", "zeros"):
            raise ValueError(f"option 'init' must be one of ['alibi', 'zeros'], got {self.init!r}")
        # T5's buckets: distances below max_exact get one bucket each, then log-spaced buckets up to max_distance
        # (log(max_distance / max_exact) divides): max_distance must be past the exact ones
        exact = self.num_buckets // 2 if shape is None or shape.causal else self.num_buckets // 4
        if self.max_distance <= exact:
            raise ValueError(f"option 'max_distance' must be > {exact} (the distances with a bucket each, "
                             f"num_buckets={self.num_buckets} // {2 if shape is None or shape.causal else 4}), "
                             f"got {self.max_distance}; raise max_distance or lower num_buckets")


class T5Bias(PositionMethod):
    name = "t5"
    Options = T5BiasOptions
    term = PositionTerm(bias="distance", bias_form="banded")

    def __init__(self, options: T5BiasOptions, shape: ModelShape):
        super().__init__(options, shape)
        self.relative_attention_bias = nn.Embedding(options.num_buckets, shape.num_heads)  # (buckets, H)
        with torch.no_grad():
            self.relative_attention_bias.weight.copy_(self._initial_table())

    def bucket(self, relative_position: torch.Tensor) -> torch.Tensor:
        return t5_relative_position_bucket(
            relative_position,
            bidirectional=not self.shape.causal,
            num_buckets=self.options.num_buckets,
            max_distance=self.options.max_distance,
        )

    def _initial_table(self) -> torch.Tensor:
        """(buckets, H) fp32, whatever torch's default dtype (the embedding's copy_ casts it)."""
        opts = self.options
        if opts.init == "zeros":
            return torch.zeros(opts.num_buckets, self.shape.num_heads, dtype=torch.float32)
        # smallest |distance| that lands in each bucket; buckets no distance reaches keep the largest one
        span = 4 * opts.max_distance
        distance = torch.arange(-span, span + 1)
        buckets = self.bucket(distance)
        smallest = torch.full((opts.num_buckets,), float(span), dtype=torch.float32)
        smallest = smallest.scatter_reduce(0, buckets, distance.abs().float(), reduce="amin")
        return -smallest[:, None] * alibi_slopes(self.shape.num_heads)[None, :]  # (buckets, H)

    def bias_reach(self) -> int:
        """R: every distance beyond R shares the last bucket, so the bias is constant there (banded kernels)."""
        return self.options.max_distance

    def distance_table(self, reach: int, dtype) -> torch.Tensor:
        """(H, 2R+1): the bias for k - q in [-R, R] (flex's score_mod reads it)."""
        distances = torch.arange(-reach, reach + 1, device=self.relative_attention_bias.weight.device)
        return self.relative_attention_bias(self.bucket(distances)).to(dtype).T.contiguous()

    def score_bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        # k - q takes few distinct values (at most Lk + Lq - 1 for consecutive positions): look each distance up
        # once, then gather
        relative = k_pos[:, None, :] - q_pos[:, :, None]  # (P, Lq, Lk)
        if torch.compiler.is_compiling() or torch.compiler.is_exporting():  # the distance range is data: bucket
            return self.relative_attention_bias(self.bucket(relative)).permute(0, 3, 1, 2)
        low, high = int(relative.min()), int(relative.max())
        distances = torch.arange(low, high + 1, device=k_pos.device)
        per_distance = self.relative_attention_bias(self.bucket(distances))  # (high - low + 1, H)
        return per_distance[relative - low].permute(0, 3, 1, 2)  # (P, H, Lq, Lk)
