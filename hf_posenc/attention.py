"""The one attention function hf_posenc registers with transformers, joining a position method and a backend.

A converted model runs with ``config._attn_implementation == "hf_posenc"``. Each self-attention module carries
a reference to its method in ``module._posenc_method`` (set by :func:`hf_posenc.convert`); modules without one
(cross-attention) run plain SDPA. The method's ``backend`` (``config.posenc["backend"]``: auto / sdpa / flex /
eager) and the call pick the kernel (:func:`hf_posenc.backends.dispatch.choose_kernel`); the kernels live in
:mod:`hf_posenc.backends`.
The ``sdpa`` kernel uses one float mask (bias + padding/causal) per forward, shared by all layers; eager runs when the
caller asked for attention weights (they then include the position bias) or the method needs probabilities.
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
from . import key_cache
from .backends import dispatch
from .backends import flex as flex_kernels
from .backends import sdpa as sdpa_kernels
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


def biased_mask(method, attention_mask, q_pos, k_pos, causal: bool, dtype) -> torch.Tensor:
    """(B|P, H, Lq, Lk) = position bias + mask, built once per forward and shared by every layer."""

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

    key = ("biased_mask", mask_key(attention_mask), tuple(q_pos.shape), tuple(k_pos.shape), causal, dtype)
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
    method = method_of(module)
    if method is None:  # cross-attention, or a module conversion does not touch
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)

    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    causal = bool(getattr(module, "is_causal", True))
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
    gqa = key.shape[1] != query.shape[1]
    if kernel == "sdpa-windowed":
        slopes = flex_kernels.alibi_slopes_of(method, query.device)  # (H,)
        return sdpa_kernels.alibi_windowed_attention(query, key, value, slopes, scaling, dropout), None
    if kernel == "sdpa-banded":
        return sdpa_kernels.t5_banded_attention(method, query, key, value, scaling), None
    if kernel == "sdpa-blocked":
        rows = min(sdpa_kernels.BLOCK_ROWS, query.shape[2])
        template = method.shared(
            ("template", rows, k_len, query.dtype),
            lambda: sdpa_kernels.causal_template(method, k_pos[0], rows, query.dtype),
        )
        out = sdpa_kernels.blocked_attention(query, key, value, template, attention_mask, scaling, dropout, gqa)
        return out, None
    if kernel == "flex":
        out = flex_kernels.flex_attention(method, query, key, value, attention_mask, scaling, causal)
        if out is not None:
            return out, None  # else a custom mask flex does not express: SDPA below

    if method.has_score_bias:
        mask = biased_mask(method, attention_mask, q_pos, k_pos, causal, query.dtype)
    else:
        mask = attention_mask

    if kernel == "eager":
        if mask is None or mask.dtype == torch.bool:
            mask = keep_mask(mask, q_len, k_len, causal, query.dtype, query.device)
        return eager_attention(module, method, query, key, value, mask, dropout, scaling, q_pos, k_pos)

    kwargs.pop("is_causal", None)
    is_causal = causal and mask is None
    return sdpa_attention_forward(
        module, query, key, value, mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
    )


def register() -> None:
    """Make ``attn_implementation="hf_posenc"`` known to transformers (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, posenc_attention_forward)
    # without a registered mask function transformers passes ``attention_mask=None`` and padding is ignored
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
