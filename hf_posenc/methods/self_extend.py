"""Training-free context extension by two rotations merged in one softmax: Self-Extend and ReRoPE.

Both keep the model's own RoPE (its theta, and a checkpoint's own static scaling with its cos/sin scale: see
:mod:`.rope`; a static scaling on top where given) for near pairs and give far pairs other positions, chosen per
(query i, key j) by the distance d = p_i - p_j of the caller's positions:

- ``self_extend`` (Jin et al. 2024, "LLM Maybe LongLM", datamllab/LongLM): d < W: the ordinary positions;
  d >= W: the query rotated at p_i // G + W - W // G and the key at p_j // G (grouped positions, floor division),
  so the farthest relative position seen is W + (N - W) / G for N tokens. Defaults: W = L_train / 2 and the
  smallest G with W + (N - W) / G <= (2/3) L_train for N = the converted model's limit (the paper's rule
  (1/2 - 2/3) L_train >= W + (N - W) / G): pass ``max_position_embeddings`` = the length you need.
- ``rerope`` (Su 2023, "ReRoPE"): d < W: the ordinary positions; d >= W: the relative position clamped at W (the
  query rotated at W, the key at 0); with ``leaky`` = k > 1 compressed instead, W + (d - W) / k (the query at
  p_i / k + W - W / k, the key at p_j / k: Self-Extend's grouping without the floor). Default W = L_train / 2.

Inside the window every score is exactly the original model's: a model converted with W >= every distance of the
input is the unconverted model. Far positions of a bidirectional model (BERT) mirror the causal ones for keys
after the query (d <= -W). The scores need both rotations of q and k, so keys are cached unrotated and the
``"two_pass"`` kernel (:mod:`hf_posenc.backends.two_pass`) merges the two score sets before one softmax.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import Memo, PositionTerm, check_range, help_field, shared
from .rope import CHECKPOINT_BY_LENGTH, KEEP_UNSCALED, Rope, RopeOptions

WINDOW_SHARE = 2  # default window: L_train / 2 (SmolLM2: 4096, docs/extrapolation.md 2e)
REACH_SHARE = 2 / 3  # default group: the far positions stay within (2/3) L_train (Self-Extend's rule)
STATIC_SCALINGS = (None, "linear", "yarn")  # a dynamic scaling's frequencies would follow the input length


@dataclass
class ExtendedRopeOptions(RopeOptions):
    window: int | None = help_field(
        None, "neighbour window W: pairs closer than W keep the model's own positions; None = trained context / 2; "
        "1 <= W < trained context"
    )
    dynamic: bool = help_field(
        False, "True: far positions only for inputs whose longest position reaches past the trained context (inside "
        "it the model is exactly the original, as Dynamic YaRN); False: for every pair at distance >= W"
    )
    logn: bool = help_field(
        False, "True: log-n attention, each query at position p scaled by max(1, ln(p + 1) / ln(L_train)) (every "
        "score of a query past the trained context sharpens as the context grows; 1 inside it)"
    )

    def validate(self, shape=None):
        super().validate(shape)
        for name in ("dynamic", "logn"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"option {name!r} must be True or False, got {getattr(self, name)!r}")
        if self.scaling not in STATIC_SCALINGS:
            raise ValueError(f"option 'scaling'={self.scaling!r}: the far positions already extend the context; "
                             f"combine with one of {[s for s in STATIC_SCALINGS if s]} or none")
        checkpoint = self.checkpoint(shape)
        if checkpoint is not None and checkpoint["rope_type"] in CHECKPOINT_BY_LENGTH:
            raise ValueError(f"the checkpoint's rope_type {checkpoint['rope_type']!r} follows the input length: the "
                             f"far positions would change its frequencies; convert with 'rope' to keep it, or "
                             f"{KEEP_UNSCALED}")
        if self.window is not None:
            check_range("window", self.window, 1, integer=True)
            trained = self.original_max_positions or (shape.original_max_positions if shape else None)
            if trained is not None and self.window >= trained:
                raise ValueError(f"option 'window'={self.window} must be below the trained context {trained}: "
                                 "a window that wide never reaches the far positions")

    def resolved_window(self, shape) -> int:
        return self.window or max(1, (self.original_max_positions or shape.original_max_positions) // WINDOW_SHARE)

    def base_resolved(self, shape) -> dict:
        """RopeOptions.resolve's fields and this class's as a dict (theta, trained context and window filled in)."""
        return {**RopeOptions.resolve(self, shape).to_dict(), "window": self.resolved_window(shape),
                "dynamic": self.dynamic, "logn": self.logn}


@dataclass
class SelfExtendOptions(ExtendedRopeOptions):
    group: int | None = help_field(
        None, "group size G of the far positions (floor(p / G)); None = the smallest G with W + (N - W) / G <= "
        "(2/3) trained context, N = max_position_embeddings; >= 1"
    )

    def validate(self, shape=None):
        super().validate(shape)
        if self.group is not None:
            check_range("group", self.group, 1, integer=True)

    def resolve(self, shape) -> "SelfExtendOptions":
        window = self.resolved_window(shape)
        group = self.group or default_group(window, shape.max_positions or shape.original_max_positions,
                                            self.original_max_positions or shape.original_max_positions)
        return SelfExtendOptions(**{**self.base_resolved(shape), "group": group})


def default_group(window: int, target: int, trained: int) -> int:
    """The smallest G >= 1 with W + (N - W) / G <= (2/3) L_train."""
    room = REACH_SHARE * trained - window
    return max(1, math.ceil((target - window) / room)) if room > 0 else max(1, target)


@dataclass
class ReRopeOptions(ExtendedRopeOptions):
    leaky: float | None = help_field(
        None, "None: relative positions clamped at W (ReRoPE); k > 1: compressed past W, W + (d - W) / k (leaky ReRoPE)"
    )

    def validate(self, shape=None):
        super().validate(shape)
        if self.leaky is not None:
            check_range("leaky", self.leaky, 1.0 + 1e-9)

    def resolve(self, shape) -> "ReRopeOptions":
        return ReRopeOptions(**{**self.base_resolved(shape), "leaky": self.leaky})


class ExtendedRope(Rope):
    """Rope whose far pairs (|d| >= ``window``) are scored at other positions: :meth:`far_positions`."""

    term = PositionTerm(rotation=True, rotation_form="two_pass")

    def __init__(self, options, shape):
        super().__init__(options, shape)
        # cos/sin scale c of every rotation (a YaRN scaling's or checkpoint's; 1 otherwise): the frequencies are
        # static (a dynamic scaling or checkpoint is refused), so c is one number
        self.rotation_scale = float(self._inv_freq(None)[1])

    @property
    def window(self) -> int:
        return self.options.window

    @property
    def rotate_in_attention(self) -> bool:
        return True  # both rotations, per pair: never the model's own rotary module

    @property
    def caches_rotated_keys(self) -> bool:
        return False  # each key is rotated at two positions

    def far_positions(self, q_pos: torch.Tensor, k_pos: torch.Tensor, sign: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """(query positions (P, Lq), key positions (P, Lk)) of the far pairs after (``sign`` 1: d >= W) or before
        (-1: d <= -W) the query."""
        raise NotImplementedError

    def query_scales(self, q_pos: torch.Tensor, memo: Memo | None = None) -> torch.Tensor | None:
        """Log-n attention (``logn``): (P, 1, Lq, 1) max(1, ln(p + 1) / ln(L_train)) per query position p; None
        without it. A query's own position only: a decode step is scaled as in the full forward."""
        if not self.options.logn:
            return None

        def build():
            trained = self.options.original_max_positions
            return ((q_pos.double() + 1).log() / math.log(trained)).clamp_min(1.0).float()[:, None, :, None]

        return shared(memo, ("logn", tuple(q_pos.shape), q_pos.device), build)

    def has_far_pairs(self, q_pos: torch.Tensor, k_pos: torch.Tensor, causal: bool) -> bool:
        """Whether any pair of this call is scored at far positions (an over-estimate is exact: a pair is far only
        where its distance says so; False: every score is the model's own RoPE, which the ordinary kernels run).
        Reads the positions (a host sync)."""
        if self.options.dynamic and int(k_pos.max()) < self.options.original_max_positions:
            return False  # the input stays inside the trained context: the original model
        reach = int(q_pos.max()) - int(k_pos.min())
        if not causal:
            reach = max(reach, int(k_pos.max()) - int(q_pos.min()))
        return reach >= self.window

    def far_key_group(self) -> int | None:
        """G where a far key at position p sits at floor(p / G) (one position per group of G consecutive keys: the
        decode kernel then rotates the query once per group instead of every key); None where it does not."""
        return None

    def rotate_at(self, x: torch.Tensor, positions: torch.Tensor, memo: Memo | None = None) -> torch.Tensor:
        """x (B, H, 1, D) rotated at each relative position a - g of ``positions`` (P, n) -> (B, H, n, D), for keys
        left unrotated: q c R(a) . k c R(g) = c^2 q R(a - g) . k for the cos/sin scale c, so x is scaled by c^2."""

        def build():
            cos, sin = self.cos_sin(positions, positions, x.dtype)  # (P, 1, n, rot_dim), scaled by c
            return cos * self.rotation_scale, sin * self.rotation_scale

        cos, sin = shared(memo, ("at", tuple(positions.shape), positions.device, x.dtype), build)
        return self._rotate_one(x, cos, sin)

    def rotate_far(self, q, k, q_pos, k_pos, sign: int = 1, memo: Memo | None = None):
        """q (B, H, Lq, D), k (B, Hkv, Lk, D) rotated at their far positions."""
        q_far, k_far = self.far_positions(q_pos, k_pos, sign)
        q_cos, q_sin = self._far_cos_sin("q", sign, q_far, k_pos, q.dtype, memo)
        k_cos, k_sin = self._far_cos_sin("k", sign, k_far, k_pos, k.dtype, memo)
        return self._rotate_one(q, q_cos, q_sin), self._rotate_one(k, k_cos, k_sin)

    def _far_cos_sin(self, which: str, sign: int, positions, k_pos, dtype, memo):
        key = ("far", which, sign, tuple(positions.shape), tuple(k_pos.shape), positions.device, dtype)
        return shared(memo, key, lambda: self.cos_sin(positions, k_pos, dtype))


class SelfExtend(ExtendedRope):
    name = "self_extend"
    Options = SelfExtendOptions

    def far_key_group(self) -> int | None:
        return self.options.group

    def far_positions(self, q_pos, k_pos, sign: int = 1):
        window, group = self.options.window, self.options.group
        shift = window - window // group  # the grouped query sits W - W // G past its group
        return torch.div(q_pos, group, rounding_mode="floor") + sign * shift, torch.div(k_pos, group,
                                                                                        rounding_mode="floor")


class ReRope(ExtendedRope):
    name = "rerope"
    Options = ReRopeOptions

    def rotate_far(self, q, k, q_pos, k_pos, sign: int = 1, memo: Memo | None = None):
        if self.options.leaky is not None or self.rotation_scale != 1.0:
            return super().rotate_far(q, k, q_pos, k_pos, sign, memo)
        # clamped: every far key at 0, where RoPE with cos/sin scale 1 is the identity
        q_far, _ = self.far_positions(q_pos, k_pos, sign)
        q_cos, q_sin = self._far_cos_sin("q", sign, q_far, k_pos, q.dtype, memo)
        return self._rotate_one(q, q_cos, q_sin), k

    def far_positions(self, q_pos, k_pos, sign: int = 1):
        window, leaky = self.options.window, self.options.leaky
        if leaky is None:  # every far pair at relative position W: the query at +-W, the key at 0
            return torch.full_like(q_pos, sign * window), torch.zeros_like(k_pos)
        return q_pos / leaky + sign * (window - window / leaky), k_pos / leaky
