"""The attention mask in every encoding a kernel needs, and the method's bias folded into it.

transformers hands the attention function a bool mask (B|1, 1, Lq, Lk) (True = attend), an additive float mask, or
None (causal with no padding, or nothing masked). This module is the one place that decodes it.
"""

from __future__ import annotations

import torch


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


def biased_mask(method, attention_mask, q_pos, k_pos, causal: bool, dtype, window: int | None = None,
                memo=None) -> torch.Tensor:
    """(B|P, H, Lq, Lk) = position bias + mask, built once per forward (``memo``) and shared by every layer with the
    same ``window`` (the call's sliding_window: Gemma2's sliding and full layers get masks of one shape)."""

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

    if memo is None:
        return build()
    key = ("biased_mask", mask_key(attention_mask), window, tuple(q_pos.shape), tuple(k_pos.shape), causal, dtype)
    return memo.get(key, build)


def shared_mask(call) -> torch.Tensor | None:
    """transformers' mask with the method's bias folded in (built once per forward), or the mask as it is."""
    if not call.method.has_score_bias:
        return call.attention_mask
    return biased_mask(call.method, call.attention_mask, call.q_pos, call.k_pos, call.causal, call.query.dtype,
                       window=call.semantics.sliding_window, memo=call.state.memo)


def additive_mask(call) -> torch.Tensor | None:
    """:func:`shared_mask` as an additive float mask (what the eager softmax adds)."""
    mask = shared_mask(call)
    if mask is None or mask.dtype == torch.bool:
        mask = keep_mask(mask, call.query.shape[2], call.key.shape[2], call.causal, call.query.dtype,
                         call.query.device)
    return mask
