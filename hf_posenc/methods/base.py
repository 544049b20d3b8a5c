"""The contract every position method follows, and the per-method options base class.

Shapes: B batch, H query heads, Lq / Lk query / key length, D head dim, E hidden size.
Positions are absolute key indices: ``k_pos = arange(Lk)`` (cache included) and ``q_pos = k_pos[-Lq:]``.
A method knows no model family and no harness: it sees tensors, a :class:`ModelShape` and its options.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import nn


@dataclass(frozen=True)
class ModelShape:
    """What a method may know about the model it is wired into (filled in by the arch spec)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    num_layers: int
    causal: bool
    original_max_positions: int
    native_rotary: bool = False  # the family applies RoPE itself (Llama-style); False for GPT-2 / BERT
    native_rope_theta: float | None = None
    replaced_position_rms: float | None = None  # RMS of the learned position table being removed, if any
    token_embedding_rms: float | None = None


@dataclass
class MethodOptions:
    """Base of the per-method option dataclasses. Subclasses add fields with ``metadata={"help": ...}``."""

    def validate(self, shape: ModelShape | None = None) -> None:
        """Raise ``ValueError`` naming the option and its valid range. ``shape`` is given at convert time."""

    def resolve(self, shape: ModelShape) -> "MethodOptions":
        """Options with model-dependent defaults (``None``) filled in, so a reload rebuilds the same method."""
        return self

    @classmethod
    def from_dict(cls, method: str, values: dict[str, Any]) -> "MethodOptions":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            valid = ", ".join(sorted(known)) or "(none)"
            raise ValueError(f"unknown option(s) {unknown} for method '{method}'; valid options: {valid}")
        options = cls(**values)
        options.validate()
        return options

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def help_field(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


def check_range(name: str, value: Any, low: float, high: float | None = None, integer: bool = False) -> None:
    """Raise ``ValueError`` unless ``low <= value (<= high)``; names the option and the range."""
    kind = int if integer else (int, float)
    bad_type = isinstance(value, bool) or not isinstance(value, kind)
    if bad_type or value < low or (high is not None and value > high):
        span = f"in [{low}, {high}]" if high is not None else f">= {low}"
        what = "an integer" if integer else "a number"
        raise ValueError(f"option '{name}' must be {what} {span}, got {value!r}")


class PositionMethod(nn.Module):
    """One position method. Subclasses set the capability flags and implement the matching hooks.

    - ``rotate(q, k, q_pos, k_pos)``: RoPE-like methods change q (B,H,Lq,D) and k (B,Hkv,Lk,D).
    - ``score_bias(q_pos, k_pos) -> (H, Lq, Lk)``: a position-only additive bias (ALiBi, T5).
    - ``key_term(q, layer_idx, q_pos, k_pos) -> (B,H,Lq,Lk)`` and ``value_term(probs, layer_idx, q_pos, k_pos)
      -> (B,H,Lq,D)``: content-dependent relative terms (Shaw); they need the probabilities, so eager attention.
    - ``embed(position_ids) -> (B|1, L, E)``: absolute methods, added at the embedding layer.
    Position-only terms go through :meth:`shared`, so they are built once per forward and reused by every layer.
    """

    name: ClassVar[str]
    Options: ClassVar[type[MethodOptions]]
    rotates: ClassVar[bool] = False
    has_score_bias: ClassVar[bool] = False
    has_relative_kv: ClassVar[bool] = False
    embeds: ClassVar[bool] = False

    def __init__(self, options: MethodOptions, shape: ModelShape):
        super().__init__()
        self.options = options
        self.shape = shape
        self._memo: dict[tuple, Any] = {}
        self._share = True

    # -- per-forward memo -------------------------------------------------------------------------------
    def shared(self, key: tuple, build: Callable[[], Any]) -> Any:
        """Return ``build()``, computed once per forward of the model and reused by all layers."""
        if not self._share:
            return build()
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    def clear_memo(self, *_args: Any, **_kwargs: Any) -> None:
        self._memo.clear()

    def begin_forward(self, share: bool = True) -> None:
        """Called before each forward of the model. ``share=False`` under activation checkpointing: a layer that is
        recomputed in backward must redo exactly what it did in forward, so each layer builds its own terms (in
        forward the first layer built them; in the recompute, whichever layer runs first would)."""
        self._memo.clear()
        self._share = share

    def positions(self, q_len: int, k_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(q_pos (Lq,), k_pos (Lk,)): absolute key indices; the queries are the last Lq keys."""

        def build():
            k_pos = torch.arange(k_len, device=device)
            return k_pos[k_len - q_len :], k_pos

        return self.shared(("positions", q_len, k_len, device), build)

    # -- hooks (overridden by the methods that declare the matching flag) ------------------------------
    @property
    def rotate_in_attention(self) -> bool:
        return self.rotates

    def rotate(self, q, k, q_pos, k_pos):
        raise NotImplementedError

    def score_bias(self, q_pos, k_pos):
        raise NotImplementedError

    def key_term(self, q, layer_idx, q_pos, k_pos):
        raise NotImplementedError

    def value_term(self, probs, layer_idx, q_pos, k_pos):
        raise NotImplementedError

    def embed(self, position_ids):
        raise NotImplementedError

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.options.to_dict().items())
