"""The one attention function hf_posenc registers with transformers, joining a position method and a backend.

A converted model runs with ``config._attn_implementation == "hf_posenc"``. Each self-attention module carries a
reference to its method (``module._posenc_method``, set by :func:`hf_posenc.convert`); modules without one
(cross-attention) run plain SDPA. Every call carries its forward's state (``posenc_state``,
:mod:`hf_posenc.forward_state`): positions, the per-forward memo, which layers' keys the cache stored rotated.
The method rotates q / k here where it rotates in attention; :func:`hf_posenc.backends.dispatch.choose_kernel`
picks the kernel (the backend the user chose, refined by the call) and the kernels in :mod:`hf_posenc.backends`
apply the bias, the mask and the content terms.
"""

from __future__ import annotations

import torch
from torch import nn

from . import attention_kwargs
from ._seams import (AttentionInterface, AttentionMaskInterface, attention_weights_requested, sdpa_attention_forward,
                     sdpa_mask)
from .backends import dispatch
from .forward_state import STATE_KWARG, state_of
from .hooks import ATTN_IMPLEMENTATION
from .method_ref import MethodRef, attach_method, method_of  # noqa: F401 - where callers have found them


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
    if method is None:  # cross-attention, or a module conversion does not touch (SDPA refuses softcap itself)
        kwargs.pop(STATE_KWARG, None)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    state = state_of(kwargs)  # removed from kwargs
    semantics = attention_kwargs.read(kwargs)  # softcap, sliding_window, is_causal; refuses keywords it does not know
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    causal = bool(getattr(module, "is_causal", True)) if semantics.is_causal is None else bool(semantics.is_causal)
    query, key, value = dispatch.autocast_inputs(query, key, value)
    q_len, k_len = query.shape[2], key.shape[2]
    state.query_positions(kwargs.get("position_ids"))
    q_pos, k_pos = state.positions(q_len, k_len, query.device)  # (P, Lq), (P, Lk)
    own_positions = module.layer_idx in method.shape.own_rotary_layers  # Gemma 3's sliding layers: untouched
    query_scales = None if own_positions else method.query_scales(q_pos, state.memo)  # (P, 1, Lq, 1) or None
    if query_scales is not None:
        query = query * query_scales.to(query.dtype)
    rotates = method.rotate_in_attention and not own_positions
    two_pass = rotates and method.term.rotation_form == "two_pass" and state.memo.get(
        ("far_pairs", q_len, k_len, causal), lambda: method.has_far_pairs(q_pos, k_pos, causal))
    if rotates and not two_pass:  # a two-pass kernel rotates itself
        if module.layer_idx in state.prerotated:  # the cache stored this layer's new keys rotated (key_cache)
            query = method.rotate_queries(query, q_pos, k_pos, state.memo)
        else:
            query, key = method.rotate(query, key, q_pos, k_pos, state.memo)
    attention_kwargs.check_window(semantics, attention_mask, q_len, k_len)
    kernel = dispatch.choose_kernel(
        method.backend, method, query, key, value, attention_mask, causal, dropout,
        attention_weights_requested(), state.plain_positions(q_len, k_len, query.device), semantics, two_pass,
    )
    call = dispatch.KernelCall(module, method, query, key, value, attention_mask, dropout, scaling, causal, q_pos,
                               k_pos, state, kwargs, semantics)
    return dispatch.run_kernel(kernel, call)


def register() -> None:
    """Make ``attn_implementation="hf_posenc"`` known to transformers (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, posenc_attention_forward)
    # without a registered mask function transformers passes ``attention_mask=None`` and padding is ignored
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
