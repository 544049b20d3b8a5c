"""Sinusoidal absolute positions ("Attention is all you need"), added at the embedding layer, any length.

PE[p, 2i] = sin(p / 10000^(2i/E)), PE[p, 2i+1] = cos(p / 10000^(2i/E)), times ``scale``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import MethodOptions, ModelShape, PositionMethod, PositionTerm, check_range, help_field


@dataclass
class SinusoidalOptions(MethodOptions):
    base: float = help_field(10000.0, "wavelength base of the table; > 1")
    scale: float | None = help_field(
        None,
        "amplitude of the table; None = match the RMS of the learned position table it replaces (or of the "
        "token embeddings where there is none), so a retrofit keeps the scale the model was trained with",
    )

    def validate(self, shape=None):
        check_range("base", self.base, 1.0 + 1e-9)
        if self.scale is not None:
            check_range("scale", self.scale, 0.0)

    def resolve(self, shape: ModelShape) -> "SinusoidalOptions":
        if self.scale is not None:
            return self
        if not shape.weights_known:  # a fallback would be saved with the model and silently mis-scale it
            raise ValueError(
                "option 'scale'=None matches the RMS of the model's weights, which a model on the meta device does "
                "not have: pass scale= explicitly, or convert after the weights are loaded"
            )
        reference = shape.replaced_position_rms or shape.token_embedding_rms or 1.0
        # an unscaled table has RMS sqrt(1/2) (half sin, half cos)
        return SinusoidalOptions(base=self.base, scale=float(reference / math.sqrt(0.5)))


class Sinusoidal(PositionMethod):
    name = "sinusoidal"
    Options = SinusoidalOptions
    term = PositionTerm(embedding=True)

    def embed(self, position_ids: torch.Tensor) -> torch.Tensor:
        dim = self.shape.hidden_size
        exponents = torch.arange(0, dim, 2, dtype=torch.float32, device=position_ids.device) / dim
        angles = position_ids[..., None].float() * self.options.base**-exponents  # (B, L, ceil(E/2)) fp32
        table = torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)  # (B, L, E) interleaved sin/cos
        return table[..., : self.shape.hidden_size] * self.options.scale
