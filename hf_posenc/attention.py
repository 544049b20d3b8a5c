"""The one attention function hf_posenc registers with transformers, joining a position method and a backend.

A converted model runs with ``config._attn_implementation == "hf_posenc"``. Each self-attention module carries
a reference to its method in ``module._posenc_method`` (set by :func:`hf_posenc.convert`); modules without one
(cross-attention) run plain SDPA. The method's ``backend`` (``config.posenc["backend"]``: auto / sdpa / flex /
eager) and the call pick the kernel (:func:`hf_posenc.backends.dispatch.choose_kernel`); the kernels live in
:mod:`hf_posenc.backends`.
The ``sdpa`` kernel uses one float mask (bias + padding/causal) per forward, shared by all layers; eager runs when the
caller asked for attention weights (they then include the position bias) or the method needs probabilities (Shaw's
long inference calls under ``auto`` run ``shaw-banded`` instead).
"""

from __future__ import annotations

import torch
from torch import nn

from ._seams import (
    AttentionInterface,
    AttentionMaskInterface,
    attention_weights_requested,
    sdpa_attention_forward,
    sdpa_mask,
)
from . import attention_kwargs
from . import key_cache
from .backends import dispatch
from .backends.eager import eager_attention
from .methods.base import PositionMethod

ATTN_IMPLEMENTATION = "hf_posenc"


class MethodRef:
    """Where an attention module finds its method: ``owner.<name>`` (``base_model.posenc``), looked up at call time.
    The method's parameters live once, there; and a wrapper that replaces it (PEFT ``modules_to_save=["posenc"]``
    trains a copy inside one) is the one used, not the original it copied."""

    __slots__ = ("owner", "name")

    def __init__(self, owner: nn.Module, name: str):
        self.owner, self.name = owner, name

    def get(self) -> PositionMethod:
        return getattr(self.owner, self.name)


def method_of(module: nn.Module) -> PositionMethod | None:
    ref = module.__dict__.get("_posenc_method")
    return None if ref is None else ref.get()


def attach_method(module: nn.Module, method: MethodRef | None) -> None:
    """A plain (unregistered) reference, so the method is not registered once per layer."""
    if method is None:
        module.__dict__.pop("_posenc_method", None)
    else:
        module.__dict__["_posenc_method"] = method


def future_keys(q_len: int, k_len: int, device) -> torch.Tensor:
    """(1, 1, Lq, Lk) bool, True where a causal query may not look, when transformers passed no mask: by index,
    with SDPA ``is_causal``'s convention, which transformers relies on when it skips the mask: one query sees
    every key (a decode step), otherwise query i sees keys 0..i (Lq == Lk, or a static cache's first prefill,
    whose slots past the queries are empty)."""
    if q_len == 1:
        return torch.zeros(1, 1, 1, k_len, dtype=torch.bool, device=device)
    return (torch.arange(k_len, device=device)[None, :] > torch.arange(q_len, device=device)[:, None])[None, None]


def keep_mask(attention_mask, q_len: int, k_len: int, causal: bool, dtype, device) -> torch.Tensor | None:
    """Additive float mask (B|1, 1, Lq, Lk): 0 where attended, dtype-min elsewhere; None if nothing is masked."""
    min_value = torch.finfo(dtype).min
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        return attention_mask.to(dtype)  # already additive
    keep = attention_mask
    if keep is None and causal:
        keep = ~future_keys(q_len, k_len, device)
    if keep is None:
        return None
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, min_value)


def mask_key(attention_mask) -> tuple | None:
    """A memo key for the mask of this forward: its kind and shape (a value, not ``id()``: torch.compile guards on
    memo keys). Within one forward every layer gets the same mask."""
    return None if attention_mask is None else (tuple(attention_mask.shape), attention_mask.dtype)


def biased_mask(method, attention_mask, q_pos, k_pos, causal: bool, dtype, window: int | None = None) -> torch.Tensor:
    """(B|P, H, Lq, Lk) = position bias + mask, built once per forward and shared by every layer with the same
    ``window`` (the call's sliding_window: Gemma2's sliding and full layers get masks of one shape)."""

    def build():  # in place where autograd allows: one (B|P, H, Lq, Lk) tensor at the peak, not three
        bias = method.score_bias(q_pos, k_pos).to(dtype).contiguous()  # (P, H, Lq, Lk); SDPA reads a
        min_value = torch.finfo(dtype).min  # permuted mask (T5's) several times slower
        q_len, k_len = q_pos.shape[-1], k_pos.shape[-1]
        if attention_mask is not None and attention_mask.dtype != torch.bool:  # already additive
            return (bias + attention_mask.to(dtype)).clamp_min(min_value)
        if attention_mask is None:
            if not causal or q_len == 1:  # a decode step's query sees every key
                return bias
            hidden = future_keys(q_len, k_len, bias.device)  # (1, 1, Lq, Lk)
        elif attention_mask.shape[0] == 1 and bias.shape[0] == 1:
            hidden = ~attention_mask
        else:  # padding differs per row: (B, H, Lq, Lk)
            return torch.where(attention_mask, bias, min_value)
        return bias.masked_fill(hidden, min_value) if bias.requires_grad else bias.masked_fill_(hidden, min_value)

    key = ("biased_mask", mask_key(attention_mask), window, tuple(q_pos.shape), tuple(k_pos.shape), causal, dtype)
    return method.shared(key, build)


def autocast_inputs(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Under autocast, the dtype autocast gives SDPA. Llama-style q / k leave the rotary multiply in the residual
    stream's fp32 while v is bf16; ``F.scaled_dot_product_attention`` casts them itself, but the kernels called
    directly (CPU flash, FlexAttention, the eager softmax) need one dtype."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) for t in tensors)


def posenc_attention_forward(
    module: nn.Module,
    query: torch.Tensor,  # (B, H, Lq, D)
    key: torch.Tensor,  # (B, Hkv, Lk, D), cache included
    value: torch.Tensor,  # (B, Hkv, Lk, D)
    attention_mask: torch.Tensor | None,  # bool (B|1, 1, Lq, Lk), True = attend; None = causal/no padding
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    semantics = attention_kwargs.read(kwargs)  # softcap, sliding_window, is_causal; refuses keywords it does not know
    method = method_of(module)
    if method is None:  # cross-attention, or a module conversion does not touch (SDPA refuses softcap itself)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)

    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    causal = bool(getattr(module, "is_causal", True)) if semantics.is_causal is None else bool(semantics.is_causal)
    query, key, value = autocast_inputs(query, key, value)
    q_len, k_len = query.shape[2], key.shape[2]
    q_pos, k_pos = method.positions(q_len, k_len, query.device)  # (P, Lq), (P, Lk)
    if method.rotate_in_attention:
        if key_cache.take_prerotated(method):  # the cache stored this layer's keys rotated (key_cache)
            query = method.rotate_queries(query, q_pos, k_pos)
        else:
            query, key = method.rotate(query, key, q_pos, k_pos)

    kernel = dispatch.choose_kernel(
        getattr(method, "backend", "auto"), method, query, key, value, attention_mask, causal, dropout,
        attention_weights_requested(), method.plain_positions(q_len, k_len, query.device),
    )
    kernel = attention_kwargs.kernel_for(kernel, semantics, dropout)  # one that honours softcap / dropout
    attention_kwargs.check_window(semantics, attention_mask, q_len, k_len)
    call = dispatch.KernelCall(module, method, query, key, value, attention_mask, dropout, scaling, causal, q_pos,
                               k_pos, kwargs, semantics)
    return dispatch.run_kernel(kernel, call)


def shared_mask(call: "dispatch.KernelCall") -> torch.Tensor | None:
    """transformers' mask with the method's bias folded in (built once per forward), or the mask as it is."""
    if not call.method.has_score_bias:
        return call.attention_mask
    return biased_mask(call.method, call.attention_mask, call.q_pos, call.k_pos, call.causal, call.query.dtype,
                       window=call.semantics.sliding_window)


def eager_kernel(call: "dispatch.KernelCall"):
    """The ``"eager"`` kernel: explicit softmax; returns the probabilities; runs content terms."""
    mask = shared_mask(call)
    q_len, k_len = call.query.shape[2], call.key.shape[2]
    if mask is None or mask.dtype == torch.bool:
        mask = keep_mask(mask, q_len, k_len, call.causal, call.query.dtype, call.query.device)
    return eager_attention(call.module, call.method, call.query, call.key, call.value, mask, call.dropout,
                           call.scaling, call.q_pos, call.k_pos, softcap=call.semantics.softcap)


def sdpa_kernel(call: "dispatch.KernelCall"):
    """The ``"sdpa"`` kernel: transformers' SDPA with one float mask (bias + padding / causal) per forward."""
    mask = shared_mask(call)
    kwargs = {k: v for k, v in call.kwargs.items() if k != "is_causal"}
    return sdpa_attention_forward(call.module, call.query, call.key, call.value, mask, dropout=call.dropout,
                                  scaling=call.scaling, is_causal=call.causal and mask is None, **kwargs)


def register() -> None:
    """Make ``attn_implementation="hf_posenc"`` known to transformers (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, posenc_attention_forward)
    # without a registered mask function transformers passes ``attention_mask=None`` and padding is ignored
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
