"""The contract every position method follows, and the per-method options base class.

Shapes: B batch, H query heads, Lq / Lk query / key length, D head dim, E hidden size; P = 1 or B: position
tensors are (P, L), one row shared by the batch unless the rows differ (left padding, packing).
Positions come from the caller: q_pos are the ``position_ids`` the model used for this forward (the attention
call receives them, :mod:`hf_posenc.forward_state`), and k_pos are the positions every key was written with:
those of the cached keys (kept on the cache object, see :mod:`hf_posenc.positions`) followed by q_pos. Where nothing reports positions, key indices: ``k_pos = arange(Lk)``, ``q_pos = k_pos[-Lq:]``.
A method knows no model family and no harness: it sees tensors, a :class:`ModelShape` and its options.
"""

from __future__ import annotations

import dataclasses
import math
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
    # the model's own config.rope_parameters (rope_type, theta, a scaling's fields), None without a native rotary or
    # when rebuilt from a converted checkpoint (its config then holds the conversion's rotary, not the checkpoint's)
    native_rope_parameters: dict | None = field(default=None, hash=False)
    # layers whose rotation the model's own rotary keeps doing (Gemma 3's sliding layers under a rotary method):
    # the method does not rotate them, their cached keys included
    own_rotary_layers: frozenset[int] = frozenset()
    replaced_position_rms: float | None = None  # RMS of the learned position table being removed, if any
    token_embedding_rms: float | None = None
    weights_known: bool = True  # False on the meta device: the *_rms statistics above are then None
    max_positions: int | None = None  # the position limit after conversion (config.max_position_embeddings)


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


def shared_rows(positions: torch.Tensor) -> torch.Tensor:
    """(B, L) -> (1, L) when every row is the same (the common case: one row serves the batch). Not while
    torch.compile traces: the check reads values (a host sync and a graph break); B rows are as correct."""
    if positions.dim() == 1:
        return positions[None]
    if torch.compiler.is_compiling():
        return positions
    if positions.shape[0] > 1 and bool((positions == positions[:1]).all()):
        return positions[:1]
    return positions


@dataclass(frozen=True)
class SlotPositions:
    """A static cache's key positions, as tensors of fixed shape (a compiled decode step neither syncs nor changes
    shape): ``slots`` (P, C) the position of the key in each of its C slots (0 where none is written yet; the mask
    hides those), ``length`` () long the number n of slots written, in order, before this forward."""

    slots: torch.Tensor
    length: torch.Tensor

    def write(self, queries: torch.Tensor) -> torch.Tensor:
        """(P', Lq) query positions written into slots n..n+Lq-1 -> (P'', C)."""
        slots = self.slots.to(queries.device)
        rows = _broadcast_rows(slots.shape[0], queries.shape[0])
        index = self.length.to(queries.device) + torch.arange(queries.shape[-1], device=queries.device)
        return slots.expand(rows, -1).index_copy(1, index, queries.expand(rows, -1))


def _broadcast_rows(cached: int, queries: int) -> int:
    rows = max(cached, queries)
    if rows % cached or rows % queries:
        raise ValueError(
            f"the cache holds positions for {cached} rows but this forward has {queries}; "
            "reorder or expand the cache with its own methods (they keep rows aligned)"
        )
    return rows


def join_positions(past, queries: torch.Tensor) -> torch.Tensor:
    """(P, n) cached-key positions + (P', Lq) query positions -> (P'', n + Lq), rows broadcast; a static cache's
    :class:`SlotPositions` -> (P'', C)."""
    if isinstance(past, SlotPositions):
        return past.write(queries)
    if past is None or past.shape[-1] == 0:
        return queries
    past = past.to(queries.device)
    rows = _broadcast_rows(past.shape[0], queries.shape[0])
    past = past.repeat_interleave(rows // past.shape[0], 0)
    queries = queries.expand(rows, -1) if queries.shape[0] == 1 else queries
    return shared_rows(torch.cat([past, queries], dim=-1))


def key_positions(queries: torch.Tensor | None, past: torch.Tensor | None, q_len: int, k_len: int,
                  device) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_pos (P, Lq), k_pos (P, Lk)) from reported query positions and cached-key positions (either may be None)."""
    if queries is None or queries.shape[-1] != q_len:  # nothing reported: key indices
        queries = torch.arange(k_len - q_len, k_len, device=device)[None]
    queries = shared_rows(queries.to(device).long())
    if past is None and k_len > q_len:  # a cache we never saw: its keys are at their indices
        past = torch.arange(k_len - q_len, device=device)[None]
    keys = join_positions(past, queries)
    if keys.shape[-1] > k_len:  # a sliding-window cache returned only its last Lk keys
        keys = keys[:, -k_len:]
    elif keys.shape[-1] < k_len:  # a static cache: Lk is its capacity; unwritten slots are masked
        keys = torch.nn.functional.pad(keys, (0, k_len - keys.shape[-1]))
    return queries, keys


class Memo:
    """Position-only terms built once per forward and reused by every layer. Keys are values (lengths, shapes,
    dtypes, devices), never ``id()``: torch.compile guards on them. ``share=False`` (activation checkpointing: a
    recomputed layer must redo what it did) and ``torch.export`` (symbolic sizes) build every time."""

    __slots__ = ("items", "share")

    def __init__(self, share: bool = True):
        self.items: dict[tuple, Any] = {}
        self.share = share

    def get(self, key: tuple, build: Callable[[], Any]) -> Any:
        if not self.share or torch.compiler.is_exporting():
            return build()
        if key not in self.items:
            self.items[key] = build()
        return self.items[key]


def shared(memo: Memo | None, key: tuple, build: Callable[[], Any]) -> Any:
    """``memo.get(key, build)``; without a memo (a method called on its own), ``build()``."""
    return build() if memo is None else memo.get(key, build)


@dataclass(frozen=True)
class PositionTerm:
    """What a method adds to attention: its declaration, read by convert and by the kernel registry
    (:data:`hf_posenc.backends.dispatch.KERNELS`); nothing probes a method for attributes.

    - ``rotation``: ``rotate(q, k, q_pos, k_pos)`` changes q / k (RoPE, xPos).
    - ``rotation_form``: ``"two_pass"``: a second rotation for far pairs, chosen per (i, j) by the distance
      d = q_pos - k_pos (Self-Extend, ReRoPE): the method provides ``window`` W and ``rotate_far(q, k, q_pos,
      k_pos, sign, memo)``; pairs with |d| < W are scored with ``rotate``, pairs with d >= W (``sign`` 1) or
      d <= -W (-1) with ``rotate_far``, merged before one softmax by the ``"two-pass"`` kernel, which rotates.
    - ``embedding``: ``embed(position_ids)`` is added at the embedding layer (sinusoidal, learned).
    - ``bias``: ``score_bias(q_pos, k_pos) -> (P, H, Lq, Lk)`` is added to the scores; what it depends on:
      ``"distance"`` (only k_pos - q_pos: ALiBi, T5; kernels may slice one template) or ``"positions"`` (the
      query and key positions themselves: FIRE normalises by the query position).
    - ``bias_form``: a distance bias of a special shape that dedicated kernels exploit: ``"linear"`` (-s_h |d|;
      the method provides ``slopes(device) -> (H,)``) or ``"banded"`` (constant beyond a reach R; the method
      provides ``bias_reach() -> R`` and ``distance_table(reach, dtype) -> (H, 2R+1)``).
    - ``content``: ``key_term(q, k, layer, q_pos, k_pos)`` / ``value_term(probs, layer, q_pos, k_pos)`` depend on
      q / k / the probabilities (Shaw, Transformer-XL): the eager kernel runs them.
    - ``content_form``: a content term of a special shape that a dedicated kernel exploits: ``"clipped"`` (Shaw:
      both terms index per-layer (2R+1, D) tables by clip(k_pos - q_pos, -R, R) + R, so they are constant beyond
      the reach R; the method provides ``content_reach() -> R`` and ``relative_tables(layer_idx) -> (a^K, a^V)``).
    """

    rotation: bool = False
    rotation_form: str | None = None
    embedding: bool = False
    bias: str | None = None
    bias_form: str | None = None
    content: bool = False
    content_form: str | None = None

    BIASES: ClassVar[tuple[str, ...]] = ("distance", "positions")
    FORMS: ClassVar[tuple[str, ...]] = ("linear", "banded")
    CONTENT_FORMS: ClassVar[tuple[str, ...]] = ("clipped",)
    ROTATION_FORMS: ClassVar[tuple[str, ...]] = ("two_pass",)

    def __post_init__(self):
        if self.bias not in (None, *self.BIASES):
            raise ValueError(f"PositionTerm.bias must be one of {[None, *self.BIASES]}, got {self.bias!r}")
        if self.bias_form not in (None, *self.FORMS) or (self.bias_form and self.bias != "distance"):
            raise ValueError(f"PositionTerm.bias_form {self.bias_form!r} needs bias='distance' and one of {self.FORMS}")
        if self.rotation_form not in (None, *self.ROTATION_FORMS) or (self.rotation_form and not self.rotation):
            raise ValueError(f"PositionTerm.rotation_form {self.rotation_form!r} needs rotation=True and one of "
                             f"{self.ROTATION_FORMS}")
        if self.content_form not in (None, *self.CONTENT_FORMS) or (self.content_form and not self.content):
            raise ValueError(f"PositionTerm.content_form {self.content_form!r} needs content=True and one of "
                             f"{self.CONTENT_FORMS}")

    @property
    def kind(self) -> str:
        """One word for tables and plots: none / rotation / embedding / bias / content."""
        if self.content:
            return "content"
        if self.bias:
            return "bias"
        return "rotation" if self.rotation else "embedding" if self.embedding else "none"


def help_field(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


def check_range(name: str, value: Any, low: float, high: float | None = None, integer: bool = False) -> None:
    """Raise ``ValueError`` unless ``low <= value (<= high)`` and finite; names the option and the range."""
    kind = int if integer else (int, float)
    bad_type = isinstance(value, bool) or not isinstance(value, kind)
    # nan compares False with everything and inf passes an open range: both are refused explicitly
    non_finite = isinstance(value, float) and not math.isfinite(value)
    if bad_type or non_finite or value < low or (high is not None and value > high):
        span = f"in [{low}, {high}]" if high is not None else f">= {low}"
        what = "an integer" if integer else "a finite number" if non_finite else "a number"
        raise ValueError(f"option '{name}' must be {what} {span}, got {value!r}")


class PositionMethod(nn.Module):
    """One position method. Subclasses declare ``term`` (a :class:`PositionTerm`) and implement its hooks.

    - ``rotate(q, k, q_pos, k_pos)``: RoPE-like methods change q (B,H,Lq,D) and k (B,Hkv,Lk,D).
    - ``score_bias(q_pos, k_pos) -> (P, H, Lq, Lk)``: a position-only additive bias (ALiBi, T5, FIRE).
    - ``key_term(q, k, layer_idx, q_pos, k_pos) -> (B,H,Lq,Lk)`` (k repeated to H heads) and
      ``value_term(probs, layer_idx, q_pos, k_pos) -> (B,H,Lq,D)``: content-dependent relative terms (Shaw,
      Transformer-XL), added to the raw scores q k^T before ``scaling``; they need the probabilities, so eager.
    - ``embed(position_ids) -> (B|1, L, E)``: absolute methods, added at the embedding layer.
    A method holds parameters and options only: the state of a forward (positions, the per-forward memo) is
    passed in. ``memo`` (a :class:`hf_posenc.forward_state.Memo`, or None) keeps position-only terms built once
    per forward and reused by every layer.
    """

    name: ClassVar[str]
    Options: ClassVar[type[MethodOptions]]
    term: ClassVar[PositionTerm] = PositionTerm()

    # the declaration, read as flags (kept for callers of the flags; the declaration is ``term``)
    @property
    def rotates(self) -> bool:
        return self.term.rotation

    @property
    def embeds(self) -> bool:
        return self.term.embedding

    @property
    def has_score_bias(self) -> bool:
        return self.term.bias is not None

    @property
    def has_relative_kv(self) -> bool:
        return self.term.content
    caches_rotated_keys: ClassVar[bool] = False  # the KV cache may store keys rotated (hf_posenc.key_cache)
    backend: str = "auto"  # the attention backend (config.posenc["backend"]; hf_posenc.backends.set_backend)

    def __init__(self, options: MethodOptions, shape: ModelShape):
        super().__init__()
        self.options = options
        self.shape = shape

    @property
    def position_limit(self) -> int | None:
        """A hard limit: the method embeds positions 0 .. position_limit - 1 only (a learned table's rows) and
        refuses any past them; None where every position runs (what a conversion is for)."""
        return None

    # -- hooks (overridden by the methods that declare the matching flag) ------------------------------
    @property
    def rotate_in_attention(self) -> bool:
        return self.rotates

    def rotate(self, q, k, q_pos, k_pos, memo=None):
        raise NotImplementedError

    def query_scales(self, q_pos, memo=None):
        """(P, 1, Lq, 1) factors that multiply each query (every score of its row: log-n attention), or None: none.
        Read by the attention forward before any kernel, so every kernel, cache and decode step sees them."""
        return None

    def score_bias(self, q_pos, k_pos):
        raise NotImplementedError

    def key_term(self, q, k, layer_idx, q_pos, k_pos, memo=None):
        raise NotImplementedError

    def value_term(self, probs, layer_idx, q_pos, k_pos, memo=None):
        raise NotImplementedError

    def embed(self, position_ids):
        raise NotImplementedError

    def inherit_positions(self, table: torch.Tensor | None) -> None:
        """Called once by convert, before the model changes, with the learned absolute position table being
        removed ((old_limit, E); None where the family has none). Most methods start from scratch and ignore it;
        ``learned`` extends it."""

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.options.to_dict().items())
