"""xPos (Sun et al. 2022, "A Length-Extrapolatable Transformer"): RoPE with an exponential per-dimension scale.

q'_n = R(n) q_n * zeta^((n - c) / B),  k'_m = R(m) k_m * zeta^(-(m - c) / B),  zeta_i = (2i/d + gamma) / (1 + gamma)
for rotary frequency pair i of d head dims (rotate-half convention, both halves of a pair share zeta_i), so
q'_n . k'_m = (R(n - m) q_n . k_m) scaled by zeta^((n - m) / B): an exponential decay with distance on top of
RoPE's rotation. The centre c cancels in the product; it is the middle of each row's key positions in this
forward, which keeps the factors near 1 (x-transformers centres on the sequence the same way). Keys are rotated
and scaled in attention on every family (cached keys are stored plain): on Llama-style models the native rotary is
switched off (reusing it would silently drop the scale).

For causal models every key is at or before its query, so zeta^((n - m)/B) <= 1 is a decay. Encoders (BERT) get
the same formula, which the paper defines for causal models: keys after the query are scaled up, by at most
zeta_0^(-L/B) for L tokens. The factors are bounded by zeta_0^(+-L/(2B)) (about 2.3e4 at L = 8192, B = 512,
gamma = 0.4): fine in fp32 / bf16, outside fp16's range past a few thousand tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Memo, MethodOptions, ModelShape, PositionMethod, PositionTerm, check_range, help_field, shared
from .rope import rotate_half


@dataclass
class XposOptions(MethodOptions):
    theta: float | None = help_field(
        None, "rotary base wavelength; None = the model's own (Llama-style) or 10000 (GPT-2, BERT); > 1"
    )
    scale_base: float = help_field(512.0, "B: the decay zeta^(distance / B) (the paper and x-transformers: 512); > 0")
    gamma: float = help_field(0.4, "gamma in zeta_i = (2i/d + gamma) / (1 + gamma) (the paper: 0.4); > 0")

    def validate(self, shape=None):
        if self.theta is not None:
            check_range("theta", self.theta, 1.0 + 1e-9)
        check_range("scale_base", self.scale_base, 1e-6)
        check_range("gamma", self.gamma, 1e-6)

    def resolve(self, shape: ModelShape) -> "XposOptions":
        theta = self.theta if self.theta is not None else (shape.native_rope_theta or 10000.0)
        return XposOptions(theta=float(theta), scale_base=self.scale_base, gamma=self.gamma)


class Xpos(PositionMethod):
    name = "xpos"
    Options = XposOptions
    term = PositionTerm(rotation=True)

    def zeta(self, device=None) -> torch.Tensor:
        """(D/2,) fp32 per-pair decay base in (0, 1)."""
        half = self.shape.head_dim // 2
        return (torch.arange(half, dtype=torch.float32, device=device) * 2 / self.shape.head_dim
                + self.options.gamma) / (1 + self.options.gamma)

    def factors(self, q_pos: torch.Tensor, k_pos: torch.Tensor, dtype, memo: Memo | None = None):
        """((q_cos, q_sin), (k_cos, k_sin)), each (P, 1, L, D): the rotation with the xPos scale folded in (q times
        zeta^((n-c)/B), k divided by it). Shared by all layers within a forward."""

        def build():
            device = k_pos.device
            dim = self.shape.head_dim
            inv_freq = 1.0 / (self.options.theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
            centre = (k_pos.amin(-1, keepdim=True) + k_pos.amax(-1, keepdim=True)).float() / 2  # (P, 1)
            log_zeta = self.zeta(device).log()  # (D/2,)

            def one(positions, sign):
                angles = positions[..., None].float() * inv_freq  # (P, L, D/2)
                power = sign * (positions.float() - centre)[..., None] / self.options.scale_base
                scale = (power * log_zeta).exp()  # (P, L, D/2)
                emb = torch.cat((angles, angles), -1)[:, None]  # (P, 1, L, D)
                scale = torch.cat((scale, scale), -1)[:, None]
                return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)

            return one(q_pos, 1.0), one(k_pos, -1.0)

        return shared(memo, ("xpos", tuple(q_pos.shape), tuple(k_pos.shape), k_pos.device, dtype), build)

    def rotate(self, q, k, q_pos, k_pos, memo=None):
        (q_cos, q_sin), (k_cos, k_sin) = self.factors(q_pos, k_pos, q.dtype, memo)
        return q * q_cos + rotate_half(q) * q_sin, k * k_cos + rotate_half(k) * k_sin
