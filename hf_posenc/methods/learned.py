"""Learned absolute positions, kept and extended past the old limit: the zero-training baseline.

E'[p] for p < N_old comes from the model's own table E (N_old, hidden); the rows past the old limit, up to the new
limit N (``config.max_position_embeddings``), follow ``extend``:

- ``copy`` (Longformer, Beltagy et al. 2020: RoBERTa's 512 rows copied out to 4096): E'[p] = E[p mod N_old];
- ``interpolate``: the whole table resampled to N rows, E'[p] = E at p (N_old - 1) / (N - 1), linearly between
  rows (the absolute analogue of position interpolation; rows inside the old limit change too);
- ``zeros``: E'[p] = 0 past the old limit.

On a family without a table (Llama-style) the table is fresh: zeros, so the converted model starts as NoPE and
fine-tuning grows it. Positions at or past N are refused with an error naming the fix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import MethodOptions, ModelShape, PositionMethod, PositionTerm, help_field

EXTENDS = ("copy", "interpolate", "zeros")


@dataclass
class LearnedOptions(MethodOptions):
    extend: str = help_field(
        "copy",
        "rows past the old limit: 'copy' (repeat the old table, Longformer), 'interpolate' (resample the whole "
        "table to the new length) or 'zeros'; a family without a table starts from zeros",
    )

    def validate(self, shape=None):
        if self.extend not in EXTENDS:
            raise ValueError(f"option 'extend' must be one of {list(EXTENDS)}, got {self.extend!r}")


def extended_table(old: torch.Tensor, rows: int, extend: str) -> torch.Tensor:
    """(rows, E) fp32 from the old (N_old, E) table (see the module doc)."""
    old = old.float()
    if extend == "interpolate":
        resampled = nn.functional.interpolate(old.T[None], size=rows, mode="linear", align_corners=True)
        return resampled[0].T.contiguous()
    if extend == "copy":
        return old.repeat(-(-rows // old.shape[0]), 1)[:rows].clone()
    return torch.cat([old, old.new_zeros(rows - old.shape[0], old.shape[1])])[:rows]


class Learned(PositionMethod):
    name = "learned"
    Options = LearnedOptions
    term = PositionTerm(embedding=True)

    def __init__(self, options: LearnedOptions, shape: ModelShape):
        super().__init__(options, shape)
        rows = shape.max_positions or shape.original_max_positions
        self.table = nn.Embedding(rows, shape.hidden_size)  # (N, E), filled by inherit_positions
        nn.init.zeros_(self.table.weight)

    @property
    def position_limit(self) -> int:
        return self.table.num_embeddings  # embed() refuses a position at or past it

    def inherit_positions(self, table: torch.Tensor | None) -> None:
        if table is None:  # no table to keep (Llama-style): a fresh one, zeros
            return
        if table.shape[1] != self.shape.hidden_size:
            raise ValueError(f"the position table has width {table.shape[1]}, the model {self.shape.hidden_size}")
        with torch.no_grad():
            if table.is_meta or self.table.weight.is_meta:
                return
            rows = self.table.num_embeddings
            self.table.weight.copy_(extended_table(table.to(self.table.weight.device), rows, self.options.extend))

    def embed(self, position_ids: torch.Tensor) -> torch.Tensor:
        # the range checks read values, which a traced graph (ONNX, torch.compile fullgraph) has not: eager only
        if torch.compiler.is_exporting() or torch.compiler.is_compiling():
            return self.table(position_ids)  # (B|1, L, E)
        rows = self.table.num_embeddings
        if position_ids.numel() and int(position_ids.min()) < 0:
            raise ValueError(
                f"position {int(position_ids.min())} is before the learned table's first row: position ids start at "
                "0 at the first token (RoBERTa: at padding_idx + 1, as the model counts them); pass the attention_mask "
                "that hides pad tokens (their positions are then ignored)"
            )
        if position_ids.numel() and int(position_ids.max()) >= rows:
            raise ValueError(
                f"position {int(position_ids.max())} is past the learned table's {rows} rows: convert with a larger "
                "max_position_embeddings (the table is extended to it)"
            )
        return self.table(position_ids)  # (B|1, L, E)
