"""Eager backend: explicit softmax attention. The only kernel that returns the probabilities, and the general one for
content terms (Shaw's, Transformer-XL's; :mod:`.shaw_banded` runs Shaw's long inference calls); every backend uses
it for ``output_attentions=True``."""

from __future__ import annotations

import torch
from torch import nn

from .._seams import repeat_kv
from .masks import additive_mask


def eager_kernel(call):
    """The ``"eager"`` kernel: explicit softmax; returns the probabilities; runs content terms."""
    return eager_attention(call.module, call.method, call.query, call.key, call.value, additive_mask(call),
                           call.dropout, call.scaling, call.q_pos, call.k_pos, softcap=call.semantics.softcap,
                           memo=call.state.memo)


def eager_attention(module, method, query, key, value, mask, dropout, scaling, q_pos, k_pos, softcap=None,
                    memo=None):
    """Explicit softmax attention that also applies Shaw's key/value terms. Returns (out (B,Lq,H,D), probs).
    ``softcap`` (Gemma2's logit soft-capping): the content scores are capped, softcap * tanh(s / softcap), before
    ``mask`` (position bias + padding/causal) is added, so the method's bias keeps its full range."""
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)  # (B, H, Lk, D)
    scores = query @ key.transpose(2, 3)  # (B, H, Lq, Lk)
    if method.has_relative_kv:
        scores = scores + method.key_term(query, key, module.layer_idx, q_pos, k_pos, memo)
    scores = scores * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    out = probs @ value  # (B, H, Lq, D)
    if method.has_relative_kv:
        out = out + method.value_term(probs, module.layer_idx, q_pos, k_pos, memo)
    return out.transpose(1, 2).contiguous(), probs
