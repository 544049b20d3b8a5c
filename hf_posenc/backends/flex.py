"""FlexAttention backend: the position bias as a ``score_mod``, causal and padding as a block-sparse mask.

No L x L tensor is built: ALiBi's score_mod is arithmetic on (q_idx, kv_idx), T5's reads a (H, 2R+1) per-distance
table (its buckets are constant beyond ``max_distance`` R). ``flex_attention`` is compiled per method kind with
PyTorch's automatic dynamic shapes: the first call compiles for its lengths, the first call at another length
recompiles once with dynamic lengths, and after that new lengths do not recompile (measured in
tests/test_backends.py; a separate graph each for queries after cached keys and for padding masks). Single-token
decode steps never reach it (see :func:`supports`): they use SDPA with a (1, H, 1, Lk) bias row.
The block mask is built from block indices directly (not by evaluating the mask on every (q, k) pair) once per
forward and shared by all layers.

Limits (torch 2.13, CPU): no backward, no dropout, and slower than the native SDPA kernel (docs/performance.md);
:func:`supports` says when flex can run a call, otherwise the dispatcher uses SDPA. ``dynamic=True`` from the first
call fails to build T5's table lookup on CPU in torch 2.13, hence automatic dynamic shapes.
"""

from __future__ import annotations

import torch

from ..methods.base import shared

BLOCK = 128  # flex's default sparse block size
MIN_QUERIES = 2  # single-token decode steps use SDPA with a (1, H, 1, Lk) bias row: cheaper, and nothing to compile
# torch 2.13's compiled CPU flex returned NaN for some inputs shorter than one block (L = 8, 24; it varied between
# runs): on CPU such calls take SDPA, and any non-finite flex output is recomputed by SDPA (warned once)
CPU_MIN_QUERIES = BLOCK
_warned_non_finite = False

_compiled: dict[str, object] = {}


def _flex_alibi(query, key, value, score_mod, block_mask, scale, enable_gqa):
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scale,
                          enable_gqa=enable_gqa)


def _flex_t5(query, key, value, score_mod, block_mask, scale, enable_gqa):
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scale,
                          enable_gqa=enable_gqa)


def _flex_none(query, key, value, score_mod, block_mask, scale, enable_gqa):
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention(query, key, value, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)


def compiled_flex_attention(kind: str):
    """``torch.compile`` of flex_attention for one score_mod kind ('alibi', 't5', 'none'), built on first use.

    One function per kind, so each has its own compile cache and automatic-dynamic state (a cache shared by the
    kinds makes T5's table size dynamic, which fails to build on CPU in torch 2.13).
    """
    if kind not in _compiled:
        function = {"alibi": _flex_alibi, "t5": _flex_t5, "none": _flex_none}[kind]
        _compiled[kind] = torch.compile(function, dynamic=None)
    return _compiled[kind]


def available() -> bool:
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except ImportError:  # pragma: no cover - torch < 2.5
        return False
    return True


def method_kind(method) -> str | None:
    """'alibi' / 't5' / 'none' from the method's declared term: flex has a score_mod for no bias, a linear
    distance bias and a banded one; None for any other term."""
    term = method.term
    if term.content:
        return None
    if term.bias is None:
        return "none"
    return {"linear": "alibi", "banded": "t5"}.get(term.bias_form)


def alibi_slopes_of(method, device) -> torch.Tensor:
    """(H,) fp32 slopes of a method declaring a linear distance bias."""
    return method.slopes(device).to(device=device, dtype=torch.float32)


def supports(method, query, key, attention_mask, dropout: float, needs_grad: bool) -> bool:
    """Whether flex can run this call (else the dispatcher uses SDPA)."""
    return (
        query.shape[2] >= (CPU_MIN_QUERIES if query.device.type == "cpu" else MIN_QUERIES)
        and method_kind(method) is not None
        and not dropout
        and not (needs_grad and query.device.type == "cpu")  # no CPU backward in torch 2.13
        and (attention_mask is None or attention_mask.dtype == torch.bool)
        and available()
    )


# ---- block mask ------------------------------------------------------------------------------------------
def _ordered(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 1, nq, nk) bool -> (count (B, 1, nq) int32, indices (B, 1, nq, nk) int32, the True columns first)."""
    count = blocks.sum(-1, dtype=torch.int32)
    order = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return count, order


def build_block_mask(attention_mask, q_len: int, k_len: int, causal: bool, device):
    """BlockMask for causal (queries are the last Lq keys) and/or a boolean (B|1, 1, Lq, Lk) mask."""
    from torch.nn.attention.flex_attention import BlockMask

    nq, nk = -(-q_len // BLOCK), -(-k_len // BLOCK)
    offset = k_len - q_len
    offset_t = torch.tensor(offset, device=device)
    if attention_mask is None:
        q_first = torch.arange(nq, device=device) * BLOCK + offset  # absolute position of each block's rows
        q_last = torch.clamp((torch.arange(nq, device=device) + 1) * BLOCK, max=q_len) - 1 + offset
        k_first = torch.arange(nk, device=device) * BLOCK
        k_last = torch.clamp((torch.arange(nk, device=device) + 1) * BLOCK, max=k_len) - 1
        if causal:
            some = k_first[None, :] <= q_last[:, None]  # (nq, nk) a block with at least one visible pair
            full = k_last[None, :] <= q_first[:, None]  # every pair visible

            def mask_mod(b, h, q_idx, kv_idx):
                return q_idx + offset_t >= kv_idx
        else:
            some = full = torch.ones(nq, nk, dtype=torch.bool, device=device)
            mask_mod = None  # every block full: nothing to evaluate

        some, full = some[None, None], full[None, None]
    else:
        keep = attention_mask[:, :1]  # (B|1, 1, Lq, Lk), causal included by transformers' mask function
        keys = keep.any(-2)[:, 0]  # (B|1, Lk): the key padding (a padded key is seen by no query)
        rebuilt = keys[:, None, None, :]
        if causal:
            positions = torch.arange(k_len, device=device)
            rebuilt = rebuilt & (positions[None, :] <= positions[offset:, None])
        if not torch.equal(rebuilt.expand_as(keep), keep):
            return None  # not causal + key padding (a custom mask): the caller uses SDPA
        pad = (0, nk * BLOCK - k_len, 0, nq * BLOCK - q_len)
        tiles = (keep.shape[0], 1, nq, BLOCK, nk, BLOCK)
        some = torch.nn.functional.pad(keep, pad, value=False).view(tiles).any(-1).any(-2)
        full = torch.nn.functional.pad(keep, pad, value=True).view(tiles).all(-1).all(-2)
        one = keys.shape[0] == 1  # one padding row for the whole batch

        if causal:

            def mask_mod(b, h, q_idx, kv_idx):
                return keys[0 if one else b, kv_idx] & (q_idx + offset_t >= kv_idx)
        else:

            def mask_mod(b, h, q_idx, kv_idx):
                return keys[0 if one else b, kv_idx]

    partial = some & ~full
    kv_num, kv_idx = _ordered(partial)
    full_num, full_idx = _ordered(full)
    return BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=BLOCK, mask_mod=mask_mod, seq_lengths=(q_len, k_len)
    )


# ---- score mods ------------------------------------------------------------------------------------------
def t5_distance_table(method, dtype) -> torch.Tensor:
    """(H, 2R+1): a banded bias for k - q in [-R, R] (R = ``bias_reach()``; constant beyond)."""
    return method.distance_table(method.bias_reach(), dtype)


def score_mod_for(method, q_len: int, k_len: int, dtype, device):
    """The flex ``score_mod`` adding the method's bias; positions are q_idx + (Lk - Lq) and kv_idx."""
    kind = method_kind(method)
    offset = torch.tensor(k_len - q_len, device=device)  # a tensor: a new length must not recompile
    if kind == "alibi":
        slopes = alibi_slopes_of(method, device)  # (H,)
        torch._dynamo.mark_static(slopes)

        def alibi(score, b, h, q_idx, kv_idx):
            return score - slopes[h] * (q_idx + offset - kv_idx).abs()

        return alibi
    if kind == "t5":
        table = t5_distance_table(method, torch.float32)  # (H, 2R+1)
        torch._dynamo.mark_static(table)
        reach = method.bias_reach()

        def t5(score, b, h, q_idx, kv_idx):
            return score + table[h, (kv_idx - q_idx - offset).clamp(-reach, reach) + reach]

        return t5
    return None


def flex_attention(method, query, key, value, attention_mask, scaling: float, causal: bool, memo=None
                   ) -> torch.Tensor | None:
    """Returns (B, Lq, H, D), or None when the mask is not causal + key padding or the CPU kernel returned
    non-finite values (the caller then uses SDPA)."""
    q_len, k_len = query.shape[2], key.shape[2]

    def build():
        return (
            build_block_mask(attention_mask, q_len, k_len, causal, query.device),
            score_mod_for(method, q_len, k_len, query.dtype, query.device),
        )

    mask = None if attention_mask is None else (tuple(attention_mask.shape), attention_mask.dtype)  # not id():
    block_mask, score_mod = shared(memo, ("flex", mask, q_len, k_len, query.device), build)  # compile guards
    if block_mask is None:
        return None
    for tensor in (query, key, value):  # heads and head dim never vary for a model: keep them out of the
        torch._dynamo.mark_static(tensor, 1)  # dynamic shapes (a symbolic head count fails to build on CPU)
        torch._dynamo.mark_static(tensor, 3)
    out = compiled_flex_attention(method_kind(method))(
        query, key, value, score_mod, block_mask, scaling, key.shape[1] != query.shape[1]
    )  # (B, H, Lq, D)
    if query.device.type == "cpu" and not bool(torch.isfinite(out).all()):
        _warn_non_finite()
        return None  # the caller recomputes this call with SDPA
    return out.transpose(1, 2).contiguous()


def _warn_non_finite() -> None:
    global _warned_non_finite
    if not _warned_non_finite:
        import warnings

        warnings.warn("FlexAttention on CPU returned non-finite values (a known issue of compiled CPU flex in torch "
                      "2.13); those calls are recomputed with SDPA. hf_posenc.set_backend(model, 'auto') avoids flex "
                      "on CPU altogether.", RuntimeWarning, stacklevel=3)
        _warned_non_finite = True
