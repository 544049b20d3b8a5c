"""The ``"sdpa"`` kernel: transformers' SDPA function with one float mask (position bias + padding / causal) built
once per forward and shared by every layer; the native causal kernel where the method adds no bias."""

from __future__ import annotations

from .._seams import sdpa_attention_forward
from .masks import shared_mask


def sdpa_kernel(call):
    mask = shared_mask(call)
    kwargs = {k: v for k, v in call.kwargs.items() if k != "is_causal"}
    return sdpa_attention_forward(call.module, call.query, call.key, call.value, mask, dropout=call.dropout,
                                  scaling=call.scaling, is_causal=call.causal and mask is None, **kwargs)
