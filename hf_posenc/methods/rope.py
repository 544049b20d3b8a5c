"""Rotary position embedding (Su et al.), rotate-half convention, with optional context scaling.

q_rot = q * cos(p * w) + rotate_half(q) * sin(p * w) on the first ``fraction`` of each head's dims, for
inverse frequencies w = theta^(-2i/d). Scaling (``linear`` = position interpolation, ``dynamic`` = NTK,
``yarn``) reuses transformers' own ``ROPE_INIT_FUNCTIONS``. On families that already apply RoPE (Llama-style),
the arch re-configures the native rotary with :meth:`Rope.native_rope_parameters` instead of rotating twice.

``dynamic_yarn`` (Peng et al. 2023, "Dynamic-YaRN"): YaRN whose scale follows the input, s = clip(1 + growth *
(L / L_train - 1), 1, factor) for L = the longest position + 1 (``growth`` 1: s = L / L_train, the paper's rule;
``factor``: transformers' dynamic NTK rule). Inside the trained context s = 1: exactly the original rotary (the
pretrained model is unchanged there); past it YaRN x s, up to ``factor``. A faster growth interpolates the low
frequencies further than the input needs, which on SmolLM2 finds a passkey 16k tokens back that s = L / L_train
loses (docs/extrapolation.md §2d). transformers has no native equivalent, so
it rotates in attention on every family; cached keys are re-rotated with the current scale, so a cache matches
the full forward at every length.

``mscale`` sets YaRN's attention temperature (Peng et al. 2023, eq. 22; DeepSeek-V2's ``mscale``): cos and sin are
scaled by 0.1 * mscale * ln(s) + 1 at scale s, so every logit by its square. YaRN's value is 1 (fitted to LLaMA);
``hf-posenc retrofit`` fits it to the model on its fine-tune text (docs/extrapolation.md §2c).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

from .._seams import ROPE_INIT_FUNCTIONS
from .base import Memo, MethodOptions, ModelShape, PositionMethod, PositionTerm, check_range, help_field, shared

SCALINGS = ("linear", "dynamic", "yarn", "dynamic_yarn")
NATIVE_SCALINGS = (None, "linear", "dynamic", "yarn")  # what transformers' rope_parameters express (export)
# what a Llama-style model's own rotary module computes in place for us: not ``dynamic``, whose transformers module
# keeps the longest length seen in earlier calls (a forward would depend on its history) and takes one scale for
# the whole batch (a left-padded row would differ from the same row alone); we rotate per row in attention instead
IN_PLACE_SCALINGS = (None, "linear", "yarn")
YARN_SCALINGS = ("yarn", "dynamic_yarn")


def yarn_attention_factor(scale, mscale: float):
    """YaRN's cos/sin scale at scale s >= 1 (a float or a tensor): 0.1 * mscale * ln(s) + 1; 1 at s = 1."""
    log = torch.log(scale) if isinstance(scale, torch.Tensor) else math.log(scale)
    return 0.1 * mscale * log + 1.0


@dataclass
class RopeOptions(MethodOptions):
    theta: float | None = help_field(
        None, "base wavelength; None = the model's own (Llama-style) or 10000 (GPT-2, BERT); > 1"
    )
    fraction: float = help_field(1.0, "fraction of each head's dims that rotate (partial rotary); in (0, 1]")
    scaling: str | None = help_field(
        None, "context scaling: None, 'linear' (position interpolation), 'dynamic' (NTK), 'yarn', or "
        "'dynamic_yarn' (YaRN scaled by the input length: the original inside the trained context)"
    )
    factor: float = help_field(1.0, "scaling factor (new context / trained context); >= 1, > 1 with a scaling")
    original_max_positions: int | None = help_field(
        None, "context the model was trained at, for scaling; None = the model's position limit before conversion"
    )
    mscale: float = help_field(
        1.0, "YaRN's attention temperature: cos/sin scaled by 0.1 * mscale * ln(s) + 1 at scale s (YaRN: 1; 0: none); "
        "'yarn' / 'dynamic_yarn' only; >= 0"
    )
    growth: float = help_field(
        1.0, "how fast Dynamic YaRN's scale grows past the trained context: s = clip(1 + growth * (L / L_train - 1), "
        "1, factor) (1: s = L / L_train; factor: transformers' dynamic NTK rule); 'dynamic_yarn' only; > 0"
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
        check_range("mscale", self.mscale, 0.0)
        if self.mscale != 1.0 and self.scaling not in YARN_SCALINGS:
            raise ValueError(f"option 'mscale' is YaRN's attention temperature: give scaling='yarn' or "
                             f"'dynamic_yarn' with it (got scaling={self.scaling!r})")
        check_range("growth", self.growth, 1e-9)
        if self.growth != 1.0 and self.scaling != "dynamic_yarn":
            raise ValueError(f"option 'growth' sets how Dynamic YaRN's scale follows the input: give "
                             f"scaling='dynamic_yarn' with it (got scaling={self.scaling!r})")
        if shape is not None and rotary_dim(shape.head_dim, self.fraction) < 2:
            raise ValueError(f"option 'fraction'={self.fraction} leaves fewer than 2 of {shape.head_dim} dims to rotate")

    def resolve(self, shape: ModelShape) -> "RopeOptions":
        return RopeOptions(
            theta=self.theta if self.theta is not None else (shape.native_rope_theta or 10000.0),
            fraction=self.fraction,
            scaling=self.scaling,
            factor=self.factor,
            original_max_positions=self.original_max_positions or shape.original_max_positions,
            mscale=self.mscale,
            growth=self.growth,
        )


def rotary_dim(head_dim: int, fraction: float) -> int:
    return int(head_dim * fraction) // 2 * 2


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Rope(PositionMethod):
    name = "rope"
    Options = RopeOptions
    term = PositionTerm(rotation=True)

    def __init__(self, options: RopeOptions, shape: ModelShape):
        super().__init__(options, shape)
        self.rot_dim = rotary_dim(shape.head_dim, options.fraction)
        # frequencies are recomputed in fp32 per forward (rot_dim/2 values): never rounded by .to(bfloat16)
        self.rope_config = self._rope_config(self.native_rope_parameters())

    def _rope_config(self, rope_parameters: dict) -> PretrainedConfig:
        """A throwaway config in the form transformers' RoPE init functions read."""
        config = PretrainedConfig(
            hidden_size=self.shape.head_dim * self.shape.num_heads,
            num_attention_heads=self.shape.num_heads,
            head_dim=self.shape.head_dim,
            max_position_embeddings=self.options.original_max_positions,
        )
        config.rope_parameters = rope_parameters
        return config

    @property
    def rotate_in_attention(self) -> bool:
        # the native rotary of a Llama-style model computes full rotary with the in-place scalings; partial
        # rotary, dynamic NTK and dynamic YaRN are done by us, per row
        native = self.options.fraction == 1.0 and self.options.scaling in IN_PLACE_SCALINGS
        return not (self.shape.native_rotary and native)

    def native_rope_parameters(self) -> dict:
        """``config.rope_parameters`` in transformers' format for these options."""
        opts = self.options
        kind = "yarn" if opts.scaling == "dynamic_yarn" else opts.scaling  # at its largest scale, for the record
        params = {"rope_type": kind or "default", "rope_theta": float(opts.theta)}
        if opts.fraction != 1.0:
            params["partial_rotary_factor"] = opts.fraction
        if opts.scaling:
            params["factor"] = float(opts.factor)
            params["original_max_position_embeddings"] = opts.original_max_positions
        if opts.scaling in YARN_SCALINGS and opts.mscale != 1.0:  # transformers' yarn: 0.1 ln(factor) + 1 unless given
            params["attention_factor"] = yarn_attention_factor(float(opts.factor), opts.mscale)
        return params

    def _inv_freq(self, seq_len: int | None, device=None) -> tuple[torch.Tensor, float]:
        """(inverse frequencies (rot_dim/2,), cos/sin scale) for inputs whose longest position is ``seq_len`` - 1."""
        opts = self.options
        if opts.scaling is None:
            return self._unscaled_inv_freq(device), 1.0
        if opts.scaling == "dynamic_yarn":
            scale = self.dynamic_scale(seq_len or 0)
            if scale == 1.0:  # inside the trained context: the original frequencies, unscaled
                return self._unscaled_inv_freq(device), 1.0
            config = self._rope_config({**self.native_rope_parameters(), "factor": float(scale)})
            inv_freq, _ = ROPE_INIT_FUNCTIONS["yarn"](config, device)  # its attention factor is at `factor`
            return inv_freq, yarn_attention_factor(scale, opts.mscale)
        init = ROPE_INIT_FUNCTIONS[opts.scaling]
        return init(self.rope_config, device, seq_len=seq_len)

    def dynamic_scale(self, seq_len):
        """Dynamic YaRN's scale for inputs of ``seq_len`` positions (a number or a tensor): 1 inside the trained
        context, then 1 + growth * (seq_len / L_train - 1), at most ``factor``."""
        opts = self.options
        ratio = seq_len / opts.original_max_positions
        grown = ratio if opts.growth == 1.0 else 1.0 + opts.growth * (ratio - 1.0)  # growth 1: L / L_train exactly
        if isinstance(grown, torch.Tensor):
            return grown.clamp(1.0, float(opts.factor))
        return min(float(opts.factor), max(1.0, grown))

    def _unscaled_inv_freq(self, device) -> torch.Tensor:
        exponents = torch.arange(0, self.rot_dim, 2, dtype=torch.float32, device=device) / self.rot_dim
        return 1.0 / (self.options.theta**exponents)

    def cos_sin(self, positions: torch.Tensor, k_pos: torch.Tensor, dtype: torch.dtype, memo: Memo | None = None):
        """(cos, sin), each (P, 1, L, rot_dim), for ``positions`` (P, L) (the queries' or the keys'); shared by
        all layers within a forward. The dynamic scalings follow the longest key position of each row,
        ``max(k_pos) + 1`` (transformers' dynamic RoPE: ``max(position_ids) + 1`` over the batch)."""

        def build():
            inv_freq, scaling = self._row_frequencies(k_pos, positions.device)  # (P', rot_dim/2), (P', 1, 1, 1)
            freqs = positions[..., None].float() * inv_freq[:, None, :]  # (P, L, rot_dim/2)
            emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (P, 1, L, rot_dim)
            return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)

        key = ("rope", tuple(positions.shape), tuple(k_pos.shape), positions.device, dtype)
        return shared(memo, key, build)

    def _row_frequencies(self, k_pos: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Inverse frequencies and cos/sin scale per row of positions. The dynamic scalings follow each row's
        longest position (so left padding in a batch changes nothing); the others are the same for every row."""
        if self.options.scaling not in ("dynamic", "dynamic_yarn"):
            inv_freq, scaling = self._inv_freq(seq_len=None, device=device)
            return inv_freq.float()[None], torch.tensor(float(scaling), device=device).reshape(1, 1, 1, 1)
        if self.options.scaling == "dynamic_yarn" and torch.compiler.is_exporting():
            return self._traced_dynamic_yarn(k_pos, device)
        lengths = (k_pos.amax(dim=-1) + 1).tolist()  # (P',)
        per_length = {n: self._inv_freq(seq_len=n, device=device) for n in set(lengths)}
        inv_freq = torch.stack([per_length[n][0].float() for n in lengths])
        scaling = torch.tensor([float(per_length[n][1]) for n in lengths], device=device)
        return inv_freq, scaling.reshape(-1, 1, 1, 1)

    def _traced_dynamic_yarn(self, k_pos: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`_row_frequencies` of dynamic YaRN as tensor ops of each row's length, for ``torch.export`` (ONNX),
        where lengths are not Python numbers. YaRN at scale s has inverse frequencies w * (r + (1 - r) / s) for the
        unscaled w and a ramp r that does not depend on s, and cos/sin scale 0.1 mscale ln s + 1; r is read off
        transformers' YaRN at ``factor``. At s = 1 this is the unscaled rotary, as in eager."""
        factor = float(self.options.factor)
        unscaled = self._unscaled_inv_freq(device)  # (rot_dim/2,)
        at_factor, _ = ROPE_INIT_FUNCTIONS["yarn"](self.rope_config, device)
        ramp = (at_factor.float() / unscaled - 1.0 / factor) / (1.0 - 1.0 / factor)
        lengths = (k_pos.amax(dim=-1) + 1).float()  # (P',)
        scale = self.dynamic_scale(lengths)[:, None]  # (P', 1)
        inv_freq = unscaled * (ramp + (1.0 - ramp) / scale)  # (P', rot_dim/2)
        return inv_freq, yarn_attention_factor(scale, self.options.mscale).reshape(-1, 1, 1, 1)

    def rotate(self, q, k, q_pos, k_pos, memo=None):
        return self.rotate_queries(q, q_pos, k_pos, memo), self.rotate_keys(k, k_pos, memo)

    def rotate_queries(self, q, q_pos, k_pos, memo=None):
        """q (B, H, Lq, D) rotated at q_pos (P, Lq); k_pos (P, Lk) sets the dynamic scalings' frequencies."""
        cos, sin = self.cos_sin(q_pos, k_pos, q.dtype, memo)
        return self._rotate_one(q, cos, sin)

    def rotate_keys(self, k, k_pos, memo=None):
        """k (B, Hkv, Lk, D) rotated at k_pos (P, Lk)."""
        cos, sin = self.cos_sin(k_pos, k_pos, k.dtype, memo)
        return self._rotate_one(k, cos, sin)

    @property
    def caches_rotated_keys(self) -> bool:
        """Keys may be stored rotated (see :mod:`hf_posenc.key_cache`) when we rotate them and a key's rotation
        depends on its own position only: not with the dynamic scalings, whose frequencies follow the longest
        position of the input (every key re-rotates when it grows)."""
        return self.rotate_in_attention and self.options.scaling not in ("dynamic", "dynamic_yarn")

    def _rotate_one(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rot, rest = x[..., : self.rot_dim], x[..., self.rot_dim :]
        rot = rot * cos + rotate_half(rot) * sin
        return torch.cat((rot, rest), dim=-1) if rest.shape[-1] else rot
