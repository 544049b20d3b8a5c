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
it rotates in attention on every family; cached keys are re-rotated with the current scale (a cache equals the full
forward inside the trained context; past it the cached tokens' deeper states keep the scale they were written at:
docs/guarantees.md).

``longrope`` (Ding et al. 2024): per-pair factors, w_i / short_factor_i for a row whose longest position + 1 is
within the trained context, w_i / long_factor_i past it (transformers' ``longrope``, per row), cos/sin times the
attention factor sqrt(1 + ln(factor) / ln(L_train)) at every length; positions below ``start_tokens`` (LongRoPE's
n-hat) keep the unscaled w_i. Rotated in attention on every family; ``hf-posenc fit`` searches the factors.

**A checkpoint that already scales its RoPE** (``config.rope_parameters`` with a ``rope_type`` other than
``default``: Llama 3.x ``llama3``, ``linear``, ``yarn``, ``dynamic``, ``longrope``) is the rotary a conversion starts
from (option ``checkpoint_rope``, filled in from the model): with ``scaling=None`` its own frequencies and cos/sin
scale, so the converted model is the unconverted one; a scaling goes on top, multiplying each pair's frequency by
the factor that scaling applies to the same pair of an unscaled rotary at the checkpoint's theta (linear 1/factor,
YaRN its ramp, NTK its new base) and the cos/sin scale by YaRN's. Frequencies that follow the input length
(``dynamic``, ``longrope``) are kept as they are, with no scaling on top; other combinations are refused by name.

``mscale`` sets YaRN's attention temperature (Peng et al. 2023, eq. 22; DeepSeek-V2's ``mscale``): cos and sin are
scaled by 0.1 * mscale * ln(s) + 1 at scale s, so every logit by its square. YaRN's value is 1 (fitted to LLaMA);
``hf-posenc retrofit`` fits it to the model on its fine-tune text (docs/extrapolation.md §2c).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._seams import ROPE_INIT_FUNCTIONS, rope_frequencies, rope_init_config
from .base import Memo, MethodOptions, ModelShape, PositionMethod, PositionTerm, check_range, help_field, shared

SCALINGS = ("linear", "dynamic", "yarn", "dynamic_yarn", "longrope")
NATIVE_SCALINGS = (None, "linear", "dynamic", "yarn", "longrope")  # what transformers' rope_parameters express
# what a Llama-style model's own rotary module computes in place for us: not ``dynamic``, whose transformers module
# keeps the longest length seen in earlier calls (a forward would depend on its history) and takes one scale for
# the whole batch (a left-padded row would differ from the same row alone); we rotate per row in attention instead
IN_PLACE_SCALINGS = (None, "linear", "yarn")
YARN_SCALINGS = ("yarn", "dynamic_yarn")
LONGROPE_OPTIONS = ("long_factor", "short_factor", "attention_factor", "start_tokens")  # scaling='longrope' only
# a checkpoint's own rope_type (config.rope_parameters) a conversion keeps: one set of frequencies for every input (a
# scaling can go on top), or frequencies that follow the input length (kept as they are: nothing on top)
CHECKPOINT_STATIC = ("linear", "llama3", "yarn", "proportional")
CHECKPOINT_BY_LENGTH = ("dynamic", "longrope")
KEEP_UNSCALED = "pass checkpoint_rope={'rope_type': 'default'} to start from the unscaled rotary at its theta instead"


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
        "'dynamic_yarn' (YaRN scaled by the input length: the original inside the trained context), or 'longrope' "
        "(per-frequency factors: short_factor inside the trained context, long_factor past it)"
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
    long_factor: list | None = help_field(
        None, "LongRoPE's per-frequency rescale factors past the trained context: pair i turns at inv_freq_i / "
        "long_factor_i; one per pair of rotary dims (rot_dim / 2), each > 0; 'longrope' only (required there)"
    )
    short_factor: list | None = help_field(
        None, "LongRoPE's factors for inputs within the trained context; None = all 1.0 (the original frequencies); "
        "'longrope' only"
    )
    attention_factor: float | None = help_field(
        None, "LongRoPE's cos/sin scale, at every length (as transformers applies it); None = sqrt(1 + ln(factor) / "
        "ln(original_max_positions)); 'longrope' only; > 0"
    )
    start_tokens: int = help_field(
        0, "LongRoPE's n-hat: positions below it keep the unscaled frequencies (> 0 has no transformers rope_type: "
        "export refused); 'longrope' only; >= 0"
    )
    checkpoint_rope: dict | None = help_field(
        None, "the checkpoint's own rotary that scaling starts from (its config.rope_parameters: rope_type, "
        "rope_theta, factor, ...); None = the model's own (kept with the conversion, so a reload rebuilds the same "
        "rotary); {'rope_type': 'default'}: the unscaled rotary at `theta`, dropping a checkpoint's scaling on purpose"
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
        check_longrope_options(self, shape)
        given = self.checkpoint_rope
        if given is not None and not (isinstance(given, dict) and isinstance(given.get("rope_type"), str)):
            raise ValueError(f"option 'checkpoint_rope' must be a dict with a 'rope_type' (transformers' "
                             f"rope_parameters), got {self.checkpoint_rope!r}")
        checkpoint = self.checkpoint(shape)
        if checkpoint is not None:
            check_checkpoint_rope(self, checkpoint, shape)

    def checkpoint(self, shape: ModelShape | None) -> dict | None:
        """The scaled rotary the conversion starts from (None: the unscaled one)."""
        given = self.checkpoint_rope
        return scaled_rope(given if given is not None else shape.native_rope_parameters if shape else None)

    def resolve(self, shape: ModelShape) -> "RopeOptions":
        checkpoint = self.checkpoint(shape)
        own_theta = checkpoint.get("rope_theta") if checkpoint else shape.native_rope_theta
        theta = self.theta if self.theta is not None else (own_theta or 10000.0)
        return RopeOptions(
            theta=theta,
            fraction=self.fraction,
            scaling=self.scaling,
            factor=self.factor,
            original_max_positions=self.original_max_positions or shape.original_max_positions,
            mscale=self.mscale,
            growth=self.growth,
            **self.resolved_longrope(shape),
            checkpoint_rope=checkpoint and {"rope_theta": float(theta), **checkpoint},
        )

    def resolved_longrope(self, shape: ModelShape) -> dict:
        """The LongRoPE fields with short_factor filled in (all 1.0) and every factor a float, for a reload."""
        if self.scaling != "longrope":
            return {}
        pairs = rotary_dim(shape.head_dim, self.fraction) // 2
        short = self.short_factor if self.short_factor is not None else [1.0] * pairs
        return {"long_factor": [float(v) for v in self.long_factor], "short_factor": [float(v) for v in short],
                "attention_factor": self.attention_factor, "start_tokens": self.start_tokens}


def check_longrope_options(options: RopeOptions, shape: ModelShape | None) -> None:
    """LongRoPE's options: only with scaling='longrope', long_factor required; per-frequency lists of positive
    numbers, one per pair of rotary dims (checked where the shape is known)."""
    if options.scaling != "longrope":
        given = [name for name in LONGROPE_OPTIONS if getattr(options, name) != RopeOptions.__dataclass_fields__[
            name].default]
        if given:
            raise ValueError(f"option(s) {given} are LongRoPE's: give scaling='longrope' with them "
                             f"(got scaling={options.scaling!r})")
        return
    if options.long_factor is None:
        raise ValueError("scaling='longrope' needs option 'long_factor' (one factor per pair of rotary dims; "
                         "`hf-posenc fit` searches them)")
    pairs = rotary_dim(shape.head_dim, options.fraction) // 2 if shape is not None else None
    for name in ("long_factor", "short_factor"):
        values = getattr(options, name)
        if values is None:
            continue
        if not isinstance(values, (list, tuple)) or not values:
            raise ValueError(f"option {name!r} must be a list of numbers, one per pair of rotary dims, got {values!r}")
        for value in values:
            check_range(name, value, 1e-9)
        if pairs is not None and len(values) != pairs:
            raise ValueError(f"option {name!r} has {len(values)} factors; the model rotates {pairs} pairs of dims "
                             f"per head (head_dim {shape.head_dim} x fraction {options.fraction} / 2)")
    if options.attention_factor is not None:
        check_range("attention_factor", options.attention_factor, 1e-9)
    check_range("start_tokens", options.start_tokens, 0, integer=True)


def scaled_rope(rope_parameters: dict | None) -> dict | None:
    """A model's ``config.rope_parameters`` as the rotary a conversion starts from: None for the unscaled one
    (rope_type 'default', or no rotary); else its top-level entries (the per-layer ones a config may also hold are
    not read by the supported families' rotaries, which read the top level)."""
    if not rope_parameters:
        return None
    if "rope_type" not in rope_parameters:
        raise ValueError(f"the model's rope_parameters are per layer type only ({sorted(rope_parameters)}): no "
                         "supported family reads them; pass checkpoint_rope={'rope_type': 'default'} and theta=... "
                         "to start from an unscaled rotary at a theta you give")
    if rope_parameters["rope_type"] == "default":
        return None
    return {key: value for key, value in rope_parameters.items() if not isinstance(value, dict)}


def check_checkpoint_rope(options: RopeOptions, checkpoint: dict, shape: ModelShape | None) -> None:
    """Refuse what cannot start from the checkpoint's scaled rotary ``checkpoint``, naming the fix."""
    kind = checkpoint["rope_type"]
    if kind not in CHECKPOINT_STATIC + CHECKPOINT_BY_LENGTH:
        raise ValueError(f"the checkpoint's rope_type {kind!r} is not one hf_posenc keeps "
                         f"({list(CHECKPOINT_STATIC + CHECKPOINT_BY_LENGTH)}); {KEEP_UNSCALED}")
    if kind in CHECKPOINT_BY_LENGTH and options.scaling is not None:
        raise ValueError(f"the checkpoint's rope_type {kind!r} already scales with the input length, and "
                         f"scaling={options.scaling!r} cannot go on top of it: convert with scaling=None to keep "
                         f"it, or {KEEP_UNSCALED}")
    if options.fraction != 1.0:
        raise ValueError(f"option 'fraction'={options.fraction}: the checkpoint's {kind!r} rotary turns every dim; "
                         f"convert with fraction=1.0 to keep it, or {KEEP_UNSCALED}")
    theta = checkpoint.get("rope_theta")
    if options.theta is not None and theta is not None and float(options.theta) != float(theta):
        raise ValueError(f"option 'theta'={options.theta}: the checkpoint's {kind!r} rotary has theta {theta}; "
                         f"leave theta unset to keep it, or {KEEP_UNSCALED}")
    if shape is not None:
        check_checkpoint_frequencies({"rope_theta": RopeOptions.resolve(options, shape).theta, **checkpoint}, shape)


def check_checkpoint_frequencies(checkpoint: dict, shape: ModelShape) -> None:
    """The checkpoint's frequencies computed once: one per pair of head dims, or refused."""
    config = rope_init_config(checkpoint, shape.head_dim, shape.num_heads, shape.original_max_positions)
    try:
        inv_freq, _ = rope_frequencies(config)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as err:
        raise ValueError(f"the checkpoint's rope_parameters {checkpoint} cannot be computed ({err!r}); "
                         f"{KEEP_UNSCALED}") from None
    if inv_freq.shape != (shape.head_dim // 2,):
        raise ValueError(f"the checkpoint's {checkpoint['rope_type']!r} rotary gives {inv_freq.numel()} frequencies "
                         f"for {shape.head_dim // 2} pairs of head dims (partial_rotary_factor?): the unconverted "
                         f"model cannot run it either; {KEEP_UNSCALED}")


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
        self.rope_config = self._rope_config(self._scaling_parameters())
        checkpoint = options.checkpoint_rope  # the checkpoint's scaled rotary; None: unscaled at theta
        self.checkpoint_kind = checkpoint["rope_type"] if checkpoint else None
        self.checkpoint_config = None if checkpoint is None else rope_init_config(
            checkpoint, shape.head_dim, shape.num_heads, shape.original_max_positions)

    def _rope_config(self, rope_parameters: dict):
        """A throwaway config in the form transformers' RoPE init functions read, at the trained context."""
        return rope_init_config(rope_parameters, self.shape.head_dim, self.shape.num_heads,
                                self.options.original_max_positions)

    @property
    def rotate_in_attention(self) -> bool:
        # the native rotary of a Llama-style model computes full rotary with the in-place scalings of an unscaled
        # checkpoint, or a scaled checkpoint's own static rotary; partial rotary, dynamic NTK, dynamic YaRN, frequencies
        # that follow the length and any scaling on top of a scaled checkpoint are done by us, per row
        opts, kind = self.options, self.checkpoint_kind
        if kind is None:
            native = opts.scaling in IN_PLACE_SCALINGS
        else:
            native = opts.scaling is None and kind in CHECKPOINT_STATIC
        return not (self.shape.native_rotary and opts.fraction == 1.0 and native)

    @property
    def follows_length(self) -> bool:
        """Whether the frequencies follow the input length (the dynamic scalings, or such a checkpoint)."""
        return (self.options.scaling in ("dynamic", "dynamic_yarn", "longrope")
                or self.checkpoint_kind in CHECKPOINT_BY_LENGTH)

    def native_rope_parameters(self) -> dict:
        """``config.rope_parameters`` in transformers' format for these options: a scaled checkpoint's own with no
        scaling; refused for a scaling on top of one (no transformers rope_type composes two)."""
        if self.options.checkpoint_rope is None:
            return self._scaling_parameters()
        if self.options.scaling is None:
            return dict(self.options.checkpoint_rope)
        raise ValueError(f"scaling={self.options.scaling!r} on top of the checkpoint's {self.checkpoint_kind!r} "
                         "rotary has no transformers rope_type (it is rotated by hf_posenc itself)")

    def _scaling_parameters(self) -> dict:
        """The scaling of these options on an unscaled rotary at ``theta``, in transformers' format."""
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
        if opts.scaling == "longrope":  # transformers' longrope: its default attention factor unless given
            params.update(self._longrope_parameters())
        return params

    def _longrope_parameters(self) -> dict:
        resolved = RopeOptions.resolved_longrope(self.options, self.shape)  # short_factor filled in, floats
        params = {"long_factor": resolved["long_factor"], "short_factor": resolved["short_factor"]}
        if resolved["attention_factor"] is not None:
            params["attention_factor"] = float(resolved["attention_factor"])
        return params

    def _inv_freq(self, seq_len: int | None, device=None) -> tuple[torch.Tensor, float]:
        """(inverse frequencies (rot_dim/2,), cos/sin scale) for inputs whose longest position is ``seq_len`` - 1:
        the checkpoint's, with the scaling on top (per pair, by its ratio to the unscaled rotary)."""
        base, base_scale = self._checkpoint_frequencies(seq_len, device)
        scaled = self._scaled_unscaled(seq_len, device)
        if scaled is None:
            return base, base_scale
        inv_freq, scale = scaled
        if self.checkpoint_config is None:  # base is the unscaled rotary
            return inv_freq, scale
        return base * (inv_freq.float() / self._unscaled_inv_freq(device)), base_scale * float(scale)

    def _checkpoint_frequencies(self, seq_len: int | None, device) -> tuple[torch.Tensor, float]:
        """(the checkpoint's inverse frequencies (rot_dim/2,), its cos/sin scale); unscaled at ``theta`` if none."""
        if self.checkpoint_config is None:
            return self._unscaled_inv_freq(device), 1.0
        return rope_frequencies(self.checkpoint_config, device, seq_len=seq_len)

    def _scaled_unscaled(self, seq_len: int | None, device) -> tuple[torch.Tensor, float] | None:
        """The scaling on an unscaled rotary at ``theta``: (inverse frequencies, cos/sin scale); None where it changes
        nothing (no scaling, or Dynamic YaRN inside the trained context)."""
        opts = self.options
        if opts.scaling is None:
            return None
        if opts.scaling == "dynamic_yarn":
            scale = self.dynamic_scale(seq_len or 0)
            if scale == 1.0:  # inside the trained context: the original frequencies, unscaled
                return None
            config = self._rope_config({**self._scaling_parameters(), "factor": float(scale)})
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
            freqs = self._start_token_freqs(positions, freqs)
            emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (P, 1, L, rot_dim)
            return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)

        key = ("rope", tuple(positions.shape), tuple(k_pos.shape), positions.device, dtype)
        return shared(memo, key, build)

    def _row_frequencies(self, k_pos: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Inverse frequencies and cos/sin scale per row of positions. The dynamic scalings follow each row's
        longest position (so left padding in a batch changes nothing); the others are the same for every row."""
        if not self.follows_length:
            inv_freq, scaling = self._inv_freq(seq_len=None, device=device)
            return inv_freq.float()[None], torch.tensor(float(scaling), device=device).reshape(1, 1, 1, 1)
        if self.options.scaling == "dynamic_yarn" and (torch.compiler.is_exporting() or torch.compiler.is_compiling()):
            return self._traced_dynamic_yarn(k_pos, device)
        if self.options.scaling == "longrope":
            return self._longrope_rows(k_pos, device)
        lengths = (k_pos.amax(dim=-1) + 1).tolist()  # (P',)
        per_length = {n: self._inv_freq(seq_len=n, device=device) for n in set(lengths)}
        inv_freq = torch.stack([per_length[n][0].float() for n in lengths])
        scaling = torch.tensor([float(per_length[n][1]) for n in lengths], device=device)
        return inv_freq, scaling.reshape(-1, 1, 1, 1)

    def _longrope_rows(self, k_pos: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`_row_frequencies` of LongRoPE, as tensor ops (no host sync; traceable): a row whose longest position
        is within the trained context turns at short_factor's frequencies, a longer one at long_factor's
        (transformers' rule, ``max(position_ids) + 1 > original_max_position_embeddings``, per row); one cos/sin
        scale, the attention factor, for both."""
        trained = self.options.original_max_positions
        short, scale = self._inv_freq(seq_len=trained, device=device)
        long, _ = self._inv_freq(seq_len=trained + 1, device=device)
        beyond = (k_pos.amax(dim=-1) + 1 > trained)[:, None]  # (P', 1)
        inv_freq = torch.where(beyond, long.float()[None], short.float()[None])  # (P', rot_dim/2)
        return inv_freq, torch.tensor(float(scale), device=device).reshape(1, 1, 1, 1)

    def _start_token_freqs(self, positions: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        """LongRoPE's n-hat: positions below ``start_tokens`` turn at the frequencies before scaling (the
        checkpoint's, or the unscaled ones at theta). positions (P, L), freqs (P, L, rot_dim/2)."""
        n_hat = self.options.start_tokens
        if not n_hat:
            return freqs
        base, _ = self._checkpoint_frequencies(None, positions.device)
        unscaled = positions[..., None].float() * base.float()  # (P, L, rot_dim/2)
        return torch.where(positions[..., None] < n_hat, unscaled, freqs)

    def _traced_dynamic_yarn(self, k_pos: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`_row_frequencies` of dynamic YaRN as tensor ops of each row's length, for ``torch.export`` (ONNX),
        where lengths are not Python numbers. YaRN at scale s has inverse frequencies w * (r + (1 - r) / s) for the
        unscaled w and a ramp r that does not depend on s, and cos/sin scale 0.1 mscale ln s + 1; r is read off
        transformers' YaRN at ``factor``, and multiplies the checkpoint's frequencies (static: the others are refused).
        At s = 1 this is the checkpoint's rotary, as in eager."""
        factor = float(self.options.factor)
        unscaled = self._unscaled_inv_freq(device)  # (rot_dim/2,)
        base, base_scale = self._checkpoint_frequencies(None, device)  # the unscaled ones for an unscaled checkpoint
        at_factor, _ = ROPE_INIT_FUNCTIONS["yarn"](self.rope_config, device)
        ramp = (at_factor.float() / unscaled - 1.0 / factor) / (1.0 - 1.0 / factor)
        lengths = (k_pos.amax(dim=-1) + 1).float()  # (P',)
        scale = self.dynamic_scale(lengths)[:, None]  # (P', 1)
        inv_freq = base * (ramp + (1.0 - ramp) / scale)  # (P', rot_dim/2)
        return inv_freq, (base_scale * yarn_attention_factor(scale, self.options.mscale)).reshape(-1, 1, 1, 1)

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
        return self.rotate_in_attention and not self.follows_length

    def _rotate_one(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rot, rest = x[..., : self.rot_dim], x[..., self.rot_dim :]
        rot = rot * cos + rotate_half(rot) * sin
        return torch.cat((rot, rest), dim=-1) if rest.shape[-1] else rot
