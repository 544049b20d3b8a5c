"""The ``"two-pass"`` kernel: two rotations of q / k merged per (query, key) pair before one softmax, for methods
declaring the ``"two_pass"`` rotation form (Self-Extend, ReRoPE).

For query i and key j at distance d = p_i - p_j: s_ij = q_i^near . k_j^near where |d| < W, else q_i^far . k_j^far
(the method's far rotation after the query, d >= W, or before it, d <= -W, for bidirectional models), then
s * scaling (softcap), + mask, softmax, @ v. Queries go in blocks of C rows, so the largest tensor is (B, H, C, Lk),
never (B, H, Lq, Lk): any positions, padding, caches, GQA and decode steps, exact by definition.

:func:`flash_two_pass` is the fast path of long causal prefills on CPU (plain positions: one row of key indices,
no padding mask, no dropout, no autograd): the near pairs are a band, scored by batched matmuls per query block
(keys (a - W, b) of block [a, b)); the far pairs are exactly a causal square, queries [W, Lq) against keys
[0, Lk - W) when Lq == Lk, one CPU flash call; the two are merged by their log-sum-exp.
"""

from __future__ import annotations

import torch
from torch import nn

from .._seams import attention_weights_requested, repeat_kv
from .masks import additive_mask
from .sdpa import _flash_cpu, _merge, query_blocks

MAX_BLOCK_ELEMENTS = 2**25  # B * H * C * Lk floats of one block's scores (128 MB fp32)


def block_rows(batch_heads: int, k_len: int) -> int:
    """Query rows per block: 256, fewer where the block's scores would pass MAX_BLOCK_ELEMENTS, at least 16."""
    return max(16, min(256, MAX_BLOCK_ELEMENTS // max(1, batch_heads * k_len)))


def two_pass_attention(call) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The general kernel. Returns (out (B, Lq, H, D), probabilities (B, H, Lq, Lk) where the caller asked for
    attention weights, else None)."""
    method, memo, module = call.method, call.state.memo, call.module
    q_near, k_near = method.rotate(call.query, call.key, call.q_pos, call.k_pos, memo)
    passes = [(1, *method.rotate_far(call.query, call.key, call.q_pos, call.k_pos, 1, memo))]
    if not call.causal:
        passes.append((-1, *method.rotate_far(call.query, call.key, call.q_pos, call.k_pos, -1, memo)))
    k_near, value = k_near.transpose(-1, -2), call.value  # (B, Hkv, D, Lk), (B, Hkv, Lk, D)
    passes = [(sign, q, k.transpose(-1, -2)) for sign, q, k in passes]
    mask = additive_mask(call)  # (B|1, 1|H, Lq, Lk) or None
    q_len, k_len = call.query.shape[2], call.key.shape[2]
    rows = q_len if torch.compiler.is_exporting() else block_rows(call.query.shape[0] * call.query.shape[1], k_len)
    keep_probs, outs, probs = attention_weights_requested(), [], []
    for a, b in query_blocks(q_len, rows):
        distance = (call.q_pos[:, a:b, None] - call.k_pos[:, None, :])[:, None]  # (P, 1, C, Lk)
        scores = grouped(q_near[:, :, a:b].contiguous(), k_near)  # (B, H, C, Lk)
        for sign, q_far, k_far in passes:
            scores = torch.where(distance * sign >= method.window, grouped(q_far[:, :, a:b].contiguous(), k_far),
                                 scores)
        block = _softmax(scores * call.scaling, call.semantics.softcap, None if mask is None else mask[:, :, a:b])
        block = nn.functional.dropout(block.to(value.dtype), p=call.dropout, training=module.training)
        outs.append(grouped(block, value))
        probs += [block] if keep_probs else []
    out = torch.cat(outs, dim=2).transpose(1, 2).contiguous()  # (B, Lq, H, D)
    return out, torch.cat(probs, dim=2) if keep_probs else None


def decode_two_pass(call) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One query on plain positions (a decode step): its near keys are exactly the last W, its far keys the rest;
    GQA keys are never repeated. Far keys grouped at floor(j / G) (Self-Extend; ReRoPE: all at 0) are not rotated
    at all: the query is rotated once per group instead (q R(a) . k R(g) = q R(a - g) . k), so the cache is read
    once, as by SDPA. Returns (out (B, 1, H, D), probabilities or None)."""
    method, memo, module = call.method, call.state.memo, call.module
    n_far = max(0, call.key.shape[2] - method.window)
    q_near = method.rotate_queries(call.query, call.q_pos, call.k_pos, memo)
    k_near = method.rotate_keys(call.key[:, :, n_far:], call.k_pos[:, n_far:], memo)
    scores = torch.cat([_far_decode_scores(call, n_far), grouped(q_near, k_near.transpose(-1, -2))],
                       dim=-1)  # (B, H, 1, Lk): far keys first, as they sit in the cache
    probs = _softmax(scores * call.scaling, call.semantics.softcap, additive_mask(call))
    probs = nn.functional.dropout(probs.to(call.value.dtype), p=call.dropout, training=module.training)
    out = grouped(probs, call.value).transpose(1, 2).contiguous()
    return out, probs if attention_weights_requested() else None


def _far_decode_scores(call, n_far: int) -> torch.Tensor:
    """(B, H, 1, n_far) scores of the far keys 0..n_far-1 of a decode step (plain positions: key j at p0 + j)."""
    method, memo, key = call.method, call.state.memo, call.key[:, :, :n_far]
    group = method.far_key_group()
    if group is None or n_far == 0:
        q_far, k_far = method.rotate_far(call.query, key, call.q_pos, call.k_pos[:, :n_far], 1, memo)
        return grouped(q_far, k_far.transpose(-1, -2))
    first = int(call.k_pos[0, 0])
    lead = first % group  # keys before the first one in its group: padded so that groups align
    after = -(-(lead + n_far) // group) * group - lead - n_far  # ... and after the last key
    key = nn.functional.pad(key, (0, 0, lead, after)) if lead or after else key
    n_groups = key.shape[2] // group
    q_at = method.far_positions(call.q_pos, call.k_pos[:, :1], 1)[0]  # (P, 1): the query's far position
    relative = q_at - (first // group + torch.arange(n_groups, device=q_at.device))[None]  # (P, n_groups): a - g
    queries = method.rotate_at(call.query, relative, memo)  # (B, H, n_groups, D)
    batch, heads, _, dim = queries.shape
    kv_heads = key.shape[1]
    scores = torch.einsum("bhqnd,bhngd->bhqng", queries.view(batch, kv_heads, heads // kv_heads, n_groups, dim),
                          key.view(batch, kv_heads, n_groups, group, dim))  # (B, Hkv, G_q, n_groups, G)
    return scores.flatten(-2)[..., lead: lead + n_far].reshape(batch, heads, 1, n_far)


def grouped(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x (B, H, Lq, n) @ y (B, Hkv, n, m) -> (B, H, Lq, m), query head h reading kv head h // (H / Hkv) (as
    ``repeat_kv`` lays them out), without repeating y."""
    batch, heads, q_len, _ = x.shape
    kv_heads = y.shape[1]
    if kv_heads == heads:
        return x @ y
    out = x.reshape(batch, kv_heads, heads // kv_heads * q_len, x.shape[-1]) @ y  # (B, Hkv, G * Lq, m)
    return out.view(batch, heads, q_len, y.shape[-1])


def _softmax(scores, softcap, mask):
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores + mask
    return torch.softmax(scores, dim=-1, dtype=torch.float32)


def can_flash(query, key, attention_mask, causal: bool, dropout: float, grad: bool, plain_positions: bool,
              window: int, softcap) -> bool:
    """The fast path's conditions (see the module doc)."""
    q_len, k_len = query.shape[2], key.shape[2]
    return (_flash_cpu is not None and query.device.type == "cpu" and plain_positions and causal
            and attention_mask is None and not dropout and not grad and q_len == k_len > window
            and softcap is None)


def flash_two_pass(call) -> tuple[torch.Tensor, None]:
    """The fast path. Returns (out (B, Lq, H, D), None)."""
    method, memo, module = call.method, call.state.memo, call.module
    groups = getattr(module, "num_key_value_groups", 1)
    window, length = method.window, call.query.shape[2]
    q_near, k_near = method.rotate(call.query, call.key, call.q_pos, call.k_pos, memo)
    q_far, k_far = method.rotate_far(call.query, call.key, call.q_pos, call.k_pos, 1, memo)
    k_near, k_far, value = (repeat_kv(t, groups) for t in (k_near, k_far, call.value))
    near_out, near_lse = _band(q_near * call.scaling, k_near, value, window)
    far_out, far_lse = _flash_cpu(q_far[:, :, window:] * call.scaling, k_far[:, :, : length - window],
                                  value[:, :, : length - window], 0.0, True, scale=1.0)[:2]
    out, *_ = _merge(near_out, near_lse, [(window, far_out, far_lse)])
    return out.transpose(1, 2).contiguous(), None


def _band(query, key, value, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of each query i over keys (i - W, i], by query blocks of CPU flash calls with a band mask:
    (out (B, H, L, D), lse (B, H, L)). ``query`` comes scaled."""
    length = query.shape[2]
    outs, lses = [], []
    for a, b in query_blocks(length, 256):
        first = max(0, a - window + 1)
        rows = torch.arange(a, b, device=query.device)[:, None]
        cols = torch.arange(first, b, device=query.device)[None, :]
        outside = (cols > rows) | (rows - cols >= window)  # (C, b - first)
        band = torch.zeros(outside.shape, dtype=query.dtype, device=query.device).masked_fill_(outside, float("-inf"))
        out, lse = _flash_cpu(query[:, :, a:b], key[:, :, first:b], value[:, :, first:b], 0.0, False,
                              attn_mask=band[None, None], scale=1.0)[:2]
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)
