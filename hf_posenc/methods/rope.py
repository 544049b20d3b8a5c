"""Rotary position embedding (Su et al.), rotate-half convention, with optional context scaling.

q_rot = q * cos(p * w) + rotate_half(q) * sin(p * w) on the first ``fraction`` of each head's dims, for
inverse frequencies w = theta^(-2i/d). Scaling (``linear`` = position interpolation, ``dynamic`` = NTK,
``yarn``) reuses transformers' own ``ROPE_INIT_FUNCTIONS``. On families that already apply RoPE (Llama-style),
the arch re-configures the native rotary with :meth:`Rope.native_rope_parameters` instead of rotating twice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

from .._seams import ROPE_INIT_FUNCTIONS
from .base import MethodOptions, ModelShape, PositionMethod, check_range, help_field

SCALINGS = ("linear", "dynamic", "yarn")


@dataclass
class RopeOptions(MethodOptions):
    theta: float | None = help_field(
        None, "base wavelength; None = the model's own (Llama-style) or 10000 (GPT-2, BERT); > 1"
    )
    fraction: float = help_field(1.0, "fraction of each head's dims that rotate (partial rotary); in (0, 1]")
    scaling: str | None = help_field(
        None, "context scaling: None, 'linear' (position interpolation), 'dynamic' (NTK) or 'yarn'"
    )
    factor: float = help_field(1.0, "scaling factor (new context / trained context); >= 1, > 1 with a scaling")
    original_max_positions: int | None = help_field(
        None, "context the model was trained at, for scaling; None = the model's position limit before conversion"
    )

    def validate(self, shape=None):
        if self.theta is not None:
            check_range("theta", self.theta, 1.0 + 1e-9)
        check_range("fraction", self.fraction, 1e-9, 1.0)
        if self.scaling is not None and self.scaling not in SCALINGS:
            raise ValueError(f"option 'scaling' must be one of {[None, *SCALINGS]}, got {self.scaling!r}")
        check_range("factor", self.factor, 1.0)
        if self.scaling is not None and self.factor == 1.0:
            raise ValueError(f"option 'factor' must be > 1 with scaling={self.scaling!r} (1.0 changes nothing)")
        if self.original_max_positions is not None:
            check_range("original_max_positions", self.original_max_positions, 1, integer=True)
        if shape is not None and rotary_dim(shape.head_dim, self.fraction) < 2:
            raise ValueError(f"option 'fraction'={self.fraction} leaves fewer than 2 of {shape.head_dim} dims to rotate")

    def resolve(self, shape: ModelShape) -> "RopeOptions":
        return RopeOptions(
            theta=self.theta if self.theta is not None else (shape.native_rope_theta or 10000.0),
            fraction=self.fraction,
            scaling=self.scaling,
            factor=self.factor,
            original_max_positions=self.original_max_positions or shape.original_max_positions,
        )


def rotary_dim(head_dim: int, fraction: float) -> int:
    return int(head_dim * fraction) // 2 * 2


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Rope(PositionMethod):
    name = "rope"
    Options = RopeOptions
    rotates = True

    def __init__(self, options: RopeOptions, shape: ModelShape):
        super().__init__(options, shape)
        self.rot_dim = rotary_dim(shape.head_dim, options.fraction)
        # a throwaway config in the form transformers' RoPE init functions read
        self.rope_config = PretrainedConfig(
            hidden_size=shape.head_dim * shape.num_heads,
            num_attention_heads=shape.num_heads,
            head_dim=shape.head_dim,
            max_position_embeddings=options.original_max_positions,
        )
        self.rope_config.rope_parameters = self.native_rope_parameters()
        # frequencies are recomputed in fp32 per forward (rot_dim/2 values): never rounded by .to(bfloat16)
        _, self.attention_scaling = self._inv_freq(seq_len=None)

    @property
    def rotate_in_attention(self) -> bool:
        # the native rotary of a Llama-style model can express full rotary; partial is done by us
        return not (self.shape.native_rotary and self.options.fraction == 1.0)

    def native_rope_parameters(self) -> dict:
        """``config.rope_parameters`` in transformers' format for these options."""
        opts = self.options
        params = {"rope_type": opts.scaling or "default", "rope_theta": float(opts.theta)}
        if opts.fraction != 1.0:
            params["partial_rotary_factor"] = opts.fraction
        if opts.scaling:
            params["factor"] = float(opts.factor)
            params["original_max_position_embeddings"] = opts.original_max_positions
        return params

    def _inv_freq(self, seq_len: int | None, device=None) -> tuple[torch.Tensor, float]:
        if self.options.scaling is None:
            exponents = torch.arange(0, self.rot_dim, 2, dtype=torch.float32, device=device) / self.rot_dim
            return 1.0 / (self.options.theta**exponents), 1.0
        init = ROPE_INIT_FUNCTIONS[self.options.scaling]
        return init(self.rope_config, device, seq_len=seq_len)

    def cos_sin(self, k_pos: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each (Lk, rot_dim), for key positions; shared by all layers within a forward."""

        def build():
            # dynamic NTK: the base grows with the current length; the others ignore seq_len
            inv_freq, _ = self._inv_freq(seq_len=k_pos.numel(), device=k_pos.device)
            freqs = k_pos[:, None].float() * inv_freq.float()[None, :]  # (Lk, rot_dim/2)
            emb = torch.cat((freqs, freqs), dim=-1)  # (Lk, rot_dim)
            return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)

        return self.shared(("rope", k_pos.numel(), k_pos.device, dtype), build)

    def rotate(self, q, k, q_pos, k_pos):
        cos, sin = self.cos_sin(k_pos, q.dtype)  # (Lk, rot_dim); queries are the last Lq keys
        q_cos, q_sin = cos[-q.shape[2] :], sin[-q.shape[2] :]
        return self._rotate_one(q, q_cos, q_sin), self._rotate_one(k, cos, sin)

    def _rotate_one(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rot, rest = x[..., : self.rot_dim], x[..., self.rot_dim :]
        rot = rot * cos + rotate_half(rot) * sin
        return torch.cat((rot, rest), dim=-1) if rest.shape[-1] else rot
