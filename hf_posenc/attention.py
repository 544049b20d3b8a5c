"""The one attention function hf_posenc registers with transformers, joining a position method and a backend.

A converted model runs with ``config._attn_implementation == "hf_posenc"``. Each self-attention module carries
its method in ``module._posenc_method`` (set by :func:`hf_posenc.convert`); modules without it (cross-attention)
run plain SDPA. Backends: SDPA with one shared float mask (bias + padding/causal) per forward; eager when the
caller asked for attention weights (they then include the position bias) or the method needs probabilities.
"""

from __future__ import annotations

import torch
from torch import nn

from ._seams import (
    AttentionInterface,
    AttentionMaskInterface,
    attention_weights_requested,
    repeat_kv,
    sdpa_attention_forward,
    sdpa_mask,
)
from .methods.base import PositionMethod

ATTN_IMPLEMENTATION = "hf_posenc"


def method_of(module: nn.Module) -> PositionMethod | None:
    return module.__dict__.get("_posenc_method")


def attach_method(module: nn.Module, method: PositionMethod | None) -> None:
    """A plain (unregistered) reference: the method's parameters live once, under ``base_model.posenc``."""
    if method is None:
        module.__dict__.pop("_posenc_method", None)
    else:
        module.__dict__["_posenc_method"] = method


def keep_mask(attention_mask, q_pos, k_pos, causal: bool, dtype) -> torch.Tensor | None:
    """Additive float mask (B|1, 1, Lq, Lk): 0 where attended, dtype-min elsewhere; None if nothing is masked."""
    min_value = torch.finfo(dtype).min
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        return attention_mask.to(dtype)  # already additive
    keep = attention_mask
    if keep is None and causal:
        keep = (k_pos[None, :] <= q_pos[:, None])[None, None]  # (1, 1, Lq, Lk)
    if keep is None:
        return None
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, min_value)


def biased_mask(method, attention_mask, q_pos, k_pos, causal: bool, dtype) -> torch.Tensor:
    """(B|1, H, Lq, Lk) = position bias + mask, built once per forward and shared by every layer."""

    def build():
        bias = method.score_bias(q_pos, k_pos).to(dtype)[None]  # (1, H, Lq, Lk)
        mask = keep_mask(attention_mask, q_pos, k_pos, causal, dtype)
        if mask is None:
            return bias
        return (bias + mask).clamp_min(torch.finfo(dtype).min)

    key = ("biased_mask", id(attention_mask), q_pos.numel(), k_pos.numel(), causal, dtype)
    return method.shared(key, build)


def eager_attention(module, method, query, key, value, mask, dropout, scaling, q_pos, k_pos):
    """Explicit softmax attention that also applies Shaw's key/value terms. Returns (out (B,Lq,H,D), probs)."""
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)  # (B, H, Lk, D)
    scores = query @ key.transpose(2, 3)  # (B, H, Lq, Lk)
    if method.has_relative_kv:
        scores = scores + method.key_term(query, module.layer_idx, q_pos, k_pos)
    scores = scores * scaling
    if mask is not None:
        scores = scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    out = probs @ value  # (B, H, Lq, D)
    if method.has_relative_kv:
        out = out + method.value_term(probs, module.layer_idx, q_pos, k_pos)
    return out.transpose(1, 2).contiguous(), probs


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
    q_pos, k_pos = method.positions(query.shape[2], key.shape[2], query.device)
    if method.rotate_in_attention:
        query, key = method.rotate(query, key, q_pos, k_pos)

    if method.has_score_bias:
        mask = biased_mask(method, attention_mask, q_pos, k_pos, causal, query.dtype)
    else:
        mask = attention_mask

    if method.has_relative_kv or attention_weights_requested():
        if mask is None or mask.dtype == torch.bool:
            mask = keep_mask(mask, q_pos, k_pos, causal, query.dtype)
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
