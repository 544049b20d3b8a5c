"""What hf_posenc needs to know about a model family, as data plus a few small module swaps.

An :class:`ArchSpec` is the one table of per-family facts: encoder or decoder, which modules are self-attention and
the keyword arguments they pass the attention function, where the native position code lives (a learned table and
how the family calls it, or a rotary module) and how it is switched off, the length buffers to extend, LoRA targets,
and the head classes the family ships. Everything else asks the spec, never ``config.model_type``. A spec knows no
method. Adding a family: one file in this folder and one line in ``ARCHES`` (docs/methods.md, "Adding a family").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..method_ref import MethodRef


def embedding_call(input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - nn.Embedding.forward's own name
    """How GPT-2 / BERT call their position table: ``table(position_ids)``. Returns the position ids."""
    return input


def no_offset(config) -> int:
    return 0


def unscaled(config) -> float:
    return 1.0


def never_cross_attention(module: nn.Module) -> bool:
    return False


@dataclass(frozen=True)
class ArchSpec:
    family: str
    model_types: tuple[str, ...]
    attention_classes: tuple[str, ...]  # class names of the self-attention modules to wire
    # keyword arguments the family's attention modules pass the attention function (beyond transformers' own
    # TransformersKwargs); each is honoured or bookkeeping in hf_posenc.attention_kwargs, checked by tests/test_families.py
    attention_kwargs: frozenset[str] = frozenset()
    encoder: bool = False  # a bidirectional (masked-LM) family; causal only as a decoder (config.is_decoder)
    # native positions: a learned absolute table (nn.Embedding) under the base model, or a rotary module
    position_table: str | None = None
    # the table's call signature (the same parameters as the family's module) -> its (B|1, L) position ids
    table_call: Callable[..., torch.Tensor] = embedding_call
    # the table row of position 0 (RoBERTa: padding_idx + 1); the method sees position_ids - offset
    table_offset: Callable[[object], int] = no_offset
    # the table row that holds position 0, where the table adds its own offset to the ids it is called with (OPT:
    # 2); None: table_offset. What a method that keeps the table (``learned``) copies from
    table_first_row: Callable[[object], int] | None = None
    # (base_model, forward args, forward kwargs, cached-key count) -> the (B, L) position ids the model derives when it is given
    # none, where its rule is not key indices (OPT: from the attention mask; RoBERTa: from the padding tokens);
    # the forward hook passes them explicitly, so the cache and every layer see the model's own positions
    derive_position_ids: Callable[[nn.Module, tuple, dict, object], torch.Tensor | None] | None = None
    rotary: str | None = None  # native rotary module under the base model, if any
    # a rotary called per layer type with each type's own rope_parameters (Gemma 3: config.rope_parameters =
    # {layer type: parameters}, rotary(x, position_ids, layer_type)): the type whose rotary a rotary method
    # replaces and starts from (Gemma 3: "full_attention"); the layers of the other types keep the model's own
    # rotary under a rotary method (their sliding window never reaches past the trained context). None: one rotary
    rope_layer_type: str | None = None
    decoder_layers: str | None = None  # ModuleList of layers under the base model (for Llama-style embeds)
    # the module under the base model whose forward every forward of the model runs, if not the base model itself
    # (OPT's heads call model.decoder directly); the per-forward hooks go on it
    forward_root: str | None = None
    # the family's mask builder gets position_ids, so rows whose positions restart at 0 are packed sequences that
    # do not see each other (transformers' find_packed_sequence_indices); OPT's does not get them
    packs_by_position_ids: bool = True
    # what the model multiplies its token embeddings by before layer 0 (Gemma2: sqrt(hidden_size)); absolute
    # methods match the scale of the hidden states they are added to
    token_embedding_scale: Callable[[object], float] = unscaled
    is_cross_attention: Callable[[nn.Module], bool] = never_cross_attention
    extend_limit: Callable[[nn.Module, int], None] | None = None  # family-specific length buffers
    lora_targets: tuple[str, ...] | None = None  # None: PEFT's own mapping for the model_type
    lora_fan_in_fan_out: bool = False  # the projections are Conv1D (weights stored transposed: GPT-2)
    head_classes: tuple[str, ...] = ()  # transformers classes the family ships and the tests exercise; LM head first
    # model types of the same checkpoints the family does not cover, each with why and the fix (Gemma 3's
    # multimodal "gemma3": its vision tower)
    refused_model_types: tuple[tuple[str, str], ...] = ()

    def is_causal(self, config) -> bool:
        return bool(getattr(config, "is_decoder", False)) if self.encoder else True

    def table_limit(self, config) -> int | None:
        """Tokens the native learned table covers (None: no table): its rows from the offset on. Read it from an
        unconverted model's config (a converted one has a new limit and no table)."""
        return None if self.position_table is None else config.max_position_embeddings - self.table_offset(config)

    def first_table_row(self, config) -> int:
        return (self.table_first_row or self.table_offset)(config)

    def num_kv_heads(self, config) -> int:
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads

    def head_dim(self, config) -> int:
        return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    def rope_parameters(self, config) -> dict:
        """The rope_parameters a rotary method starts from: those of ``rope_layer_type`` on a per-layer-type
        rotary, else the top level ({} without any)."""
        parameters = getattr(config, "rope_parameters", None) or {}
        return (parameters.get(self.rope_layer_type) or {}) if self.rope_layer_type else parameters

    def own_rotary_layers(self, config) -> frozenset[int]:
        """The layers that keep the model's own rotary under a rotary method (those not of ``rope_layer_type``)."""
        if self.rope_layer_type is None:
            return frozenset()
        return frozenset(i for i, kind in enumerate(config.layer_types) if kind != self.rope_layer_type)

    def attention_modules(self, base_model: nn.Module) -> list[nn.Module]:
        return [
            m
            for m in base_model.modules()
            if type(m).__name__ in self.attention_classes and not self.is_cross_attention(m)
        ]


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def rms(weight: torch.Tensor) -> float:
    return float(weight.detach().float().pow(2).mean().sqrt())


class TablePositions(nn.Module):
    """Base of the stand-ins for a learned position table: called as the family calls its table (``table_call``),
    it returns the embedding of ``position_ids - offset`` (position 0 at the first token). The same ids reach the
    attention calls (:mod:`hf_posenc.forward_state`); the stand-in only embeds."""

    def __init__(self, table_call: Callable[..., torch.Tensor], offset: int, dtype: torch.dtype):
        super().__init__()
        self.table_call, self.offset = table_call, offset
        # empty: holds no values (so to_empty after init on the meta device leaves nothing uninitialised), only
        # the dtype / device the model is moved to
        self.dtype_ref = nn.Buffer(torch.zeros(0, dtype=dtype), persistent=False)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        position_ids = self.table_call(*args, **kwargs) - self.offset  # a TypeError names a changed signature
        return self.embed(position_ids)  # (B, L, E)


class ZeroPositions(TablePositions):
    """Stands in for a removed learned position table: adds nothing, at any length."""

    def __init__(self, hidden_size: int, dtype: torch.dtype, table_call: Callable[..., torch.Tensor] = embedding_call,
                 offset: int = 0):
        super().__init__(table_call, offset, dtype)
        self.hidden_size = hidden_size

    def embed(self, position_ids: torch.Tensor) -> torch.Tensor:
        zero = torch.zeros((), dtype=self.dtype_ref.dtype, device=self.dtype_ref.device)
        return zero.expand(*position_ids.shape, self.hidden_size)  # (B, L, E), no memory


class MethodPositions(TablePositions):
    """Stands in for a learned position table with an absolute method's ``embed`` (e.g. sinusoidal, learned). The
    method lives under base_model.posenc and is looked up there at each call (``method``: a
    :class:`~hf_posenc.method_ref.MethodRef`), so a module that replaces it (PEFT's trainable copy,
    ``modules_to_save=["posenc"]``) is the one that embeds."""

    def __init__(self, method: MethodRef, dtype: torch.dtype, table_call: Callable[..., torch.Tensor] = embedding_call,
                 offset: int = 0):
        super().__init__(table_call, offset, dtype)
        self.method = method  # not a module: unregistered

    def embed(self, position_ids: torch.Tensor) -> torch.Tensor:
        return self.method.get().embed(position_ids).to(self.dtype_ref.dtype)  # (B, L, E)


class IdentityRotary(nn.Module):
    """Stands in for a Llama-style rotary embedding: cos = 1, sin = 0, so ``apply_rotary_pos_emb`` is a no-op.
    The rotary is applied before the cache update, so this also keeps cached keys unrotated."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.head_dim = head_dim

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, layer_type: str | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``layer_type``: Gemma3-style rotaries take the layer's kind; the identity is the same for every kind."""
        shape = (*position_ids.shape, self.head_dim)  # (B, L, D)
        one = torch.ones((), dtype=x.dtype, device=x.device).expand(shape)
        return one, torch.zeros((), dtype=x.dtype, device=x.device).expand(shape)


class LayerTypeRotary(nn.Module):
    """Stands in for a per-layer-type rotary (Gemma 3) when a method rotates in attention: the layer types in
    ``kept`` get the model's own rotary (``own``, unchanged: their own theta), every other type the identity (the
    method rotates those layers itself)."""

    def __init__(self, own: nn.Module, kept: frozenset[str], head_dim: int):
        super().__init__()
        self.own, self.kept, self.identity = own, kept, IdentityRotary(head_dim)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, layer_type: str
                ) -> tuple[torch.Tensor, torch.Tensor]:
        rotary = self.own if layer_type in self.kept else self.identity
        return rotary(x, position_ids, layer_type)


class EmbedBeforeFirstLayer:
    """Forward pre-hook: adds an absolute method's embedding to the hidden states entering layer 0
    (Llama-style models have no position table to replace). ``method``: where the method lives, looked up at each
    call (see :class:`MethodPositions`)."""

    def __init__(self, method: MethodRef):
        self.method = method

    def __call__(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        hidden = hidden + self.method.get().embed(kwargs["position_ids"]).to(hidden.dtype)  # (B, L, E)
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}
