"""SDPA kernels for long causal inputs with a relative position bias, used by the ``auto`` backend.

Both split the queries into blocks of ``C`` rows and give each block only the keys it can see (causal), so the
work is the causal half of L x L, as with the native ``is_causal`` kernel, and no (H, L, L) bias is ever built.
Shapes: B batch, H heads, Hkv key/value heads, Lq/Lk query/key length (queries are the last Lq keys), D head dim.

- :func:`blocked_attention` (any bias that depends only on q_pos - k_pos, e.g. ALiBi, T5; training too): one
  (1, H, C, Lk) *template* per forward, the bias of the last C queries against all keys with the causal mask
  folded in. Query block [a, b) sees keys [0, b) and its bias is the template's slice ``[C-c:, Lk-b:]`` (a view:
  the bias only depends on the distance). Memory: H*C*Lk floats per forward instead of H*Lq*Lk.
- :func:`alibi_windowed_attention` (ALiBi, causal, no padding mask): ALiBi's penalty -s_h d makes far keys
  weightless; from the actual query/key norms each head gets a window W_h past which the keys provably carry less
  than exp(-32) of the weight (:func:`alibi_windows`), and attends only within it. Exact to fp32 resolution; heads
  with steep slopes become local attention, so the layer can cost less than the native causal kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Query-block rows. Measured (docs/performance.md): 256 is the fastest of 128/256/512 for the template path at
# 1k-4k.
BLOCK_ROWS = 256
WINDOW_ROWS = 128
WINDOW_MARGIN = 32.0  # truncated keys carry < exp(-32) / slope of the weight


def query_blocks(q_len: int, rows: int) -> list[tuple[int, int]]:
    """[(a, b)] query-row ranges covering [0, q_len): full blocks of ``rows`` aligned to the end, the first one
    shorter if ``rows`` does not divide ``q_len``."""
    first = q_len - rows * ((q_len - 1) // rows)
    edges = [0, *range(first, q_len + 1, rows)]
    return list(zip(edges[:-1], edges[1:]))


# ---- template path ---------------------------------------------------------------------------------------
def causal_template(method, k_pos: torch.Tensor, rows: int, dtype: torch.dtype) -> torch.Tensor:
    """(1, H, rows, Lk): bias of the last ``rows`` positions (as queries) against every key, causal mask included
    (dtype-min above the diagonal)."""
    q_pos = k_pos[-rows:]
    bias = method.score_bias(q_pos, k_pos).to(dtype)  # (H, rows, Lk)
    future = k_pos[None, :] > q_pos[:, None]  # (rows, Lk)
    return bias.masked_fill_(future, torch.finfo(dtype).min)[None] if not bias.requires_grad else (
        bias.masked_fill(future, torch.finfo(dtype).min)[None]
    )


def blocked_attention(query, key, value, template, attention_mask, scaling: float, dropout: float,
                      gqa: bool) -> torch.Tensor:
    """Causal attention by query blocks with the template's bias slices. Returns (B, Lq, H, D).

    ``attention_mask``: None (causal only), bool (B|1, 1, Lq, Lk) True = attend (causal included), or additive float.
    """
    q_len, k_len = query.shape[2], key.shape[2]
    rows = template.shape[2]
    offset = k_len - q_len  # cached keys before the first query
    min_value = torch.finfo(template.dtype).min
    outs = []
    for a, b in query_blocks(q_len, rows):
        c, seen = b - a, offset + b  # block rows; keys [0, seen) are visible to it
        bias = template[:, :, rows - c :, k_len - seen :]  # (1, H, c, seen), a view
        if attention_mask is not None:
            part = attention_mask[:, :, a:b, :seen]  # (B|1, 1, c, seen)
            bias = torch.where(part, bias, min_value) if part.dtype == torch.bool else bias + part
        outs.append(
            F.scaled_dot_product_attention(
                query[:, :, a:b], key[:, :, :seen], value[:, :, :seen], attn_mask=bias, dropout_p=dropout,
                scale=scaling, enable_gqa=gqa,
            )
        )  # (B, H, c, D)
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous()


# ---- windowed ALiBi path ---------------------------------------------------------------------------------
def alibi_windows(query, key, slopes: torch.Tensor, scaling: float, limit: int) -> list[int]:
    """Per query head h, the key window W_h beyond which ALiBi leaves less than ``exp(-WINDOW_MARGIN)`` of the
    attention weight (``limit`` = no truncation). Proof: with M_h = scaling * max|q_h| * max|k_h|, a key at distance
    d has weight <= exp(2 M_h - s_h d) relative to the query's own key, so keys with s_h d >= 2 M_h + margin carry a
    total weight below exp(-margin) / s_h: far below fp32 resolution."""
    q_norm = query.detach().norm(dim=-1).amax(dim=(0, 2))  # (H,)
    k_norm = key.detach().norm(dim=-1).amax(dim=(0, 2))  # (Hkv,)
    k_norm = k_norm.repeat_interleave(query.shape[1] // key.shape[1])  # (H,)
    bound = 2 * scaling * q_norm.float() * k_norm.float() + WINDOW_MARGIN  # (H,)
    windows = torch.ceil(bound / slopes.float()).clamp(max=limit)
    return [int(w) for w in windows.tolist()]


def alibi_bias_block(slopes: torch.Tensor, windows: torch.Tensor, rows: int, width: int, dtype) -> torch.Tensor:
    """(1, Hg, rows, rows + width): ALiBi bias of ``rows`` consecutive queries against the ``width`` keys before the
    first query and the ``rows`` keys from it on, per head; causal and each head's window masked."""
    r = torch.arange(rows, device=slopes.device)[:, None]
    m = torch.arange(rows + width, device=slopes.device)[None, :]
    distance = (r + width - m).to(torch.float32)  # (rows, rows + width)
    bias = distance[None] * -slopes.float()[:, None, None]  # (Hg, rows, rows + width)
    hidden = (distance[None] < 0) | (distance[None] > windows.float()[:, None, None])
    return bias.masked_fill_(hidden, torch.finfo(torch.float32).min).to(dtype)[None]


def window_rows(width: int) -> int:
    """Query-block rows for a key window: small blocks waste less of a short window (the block's own causal square
    is computed in full), long windows run best in larger blocks."""
    return 64 if width <= 256 else 128 if width <= 1024 else BLOCK_ROWS


def alibi_windowed_attention(query, key, value, slopes: torch.Tensor, scaling: float, dropout: float = 0.0
                             ) -> torch.Tensor:
    """Causal ALiBi attention, each head over its provably sufficient key window. Returns (B, Lq, H, D).

    Consecutive heads with the same (rounded) window run together. Query block [a, b) (C rows) attends keys
    [a - W, b): one batched SDPA call for all blocks with a full window (the overlapping key windows as a strided
    view, one (C, C + W) bias shared by all blocks), one call per earlier block. Heads whose window covers all keys
    run the same code with W = Lk, which is :func:`blocked_attention` for those heads.
    """
    batch, heads, q_len, dim = query.shape
    k_len = key.shape[2]
    offset = k_len - q_len
    groups = heads // key.shape[1]
    exact = alibi_windows(query, key, slopes, scaling, k_len)
    out = query.new_empty(batch, q_len, heads, dim)
    plan = []  # [(h0, h1, width, rows)]: consecutive heads sharing a rounded window
    for h, window in enumerate(exact):
        rows = window_rows(window)
        width = min(-(-window // rows) * rows, k_len)  # keys before a block's first query that it may see
        if plan and plan[-1][2:] == (width, rows) and (h // groups == plan[-1][0] // groups or groups == 1):
            plan[-1] = (plan[-1][0], h + 1, width, rows)
        else:
            plan.append((h, h + 1, width, rows))
    windows = torch.tensor(exact, device=query.device)
    for h0, h1, width, rows in plan:
        q = query[:, h0:h1]  # (B, Hg, Lq, D) view
        kv_heads = slice(h0 // groups, h0 // groups + 1) if groups > 1 else slice(h0, h1)
        k, v = key[:, kv_heads], value[:, kv_heads]  # (B, Hg|1, Lk, D)
        bias = alibi_bias_block(slopes[h0:h1], windows[h0:h1], rows, width, query.dtype)
        blocks = query_blocks(q_len, rows)
        steady = [a for a, b in blocks if b - a == rows and offset + a >= width]
        for a, b in blocks:
            if steady and a >= steady[0]:
                break
            start = max(0, offset + a - width)  # keys [start, offset + b)
            c, seen = b - a, offset + b - start
            out[:, a:b, h0:h1] = F.scaled_dot_product_attention(
                q[:, :, a:b], k[:, :, start : offset + b], v[:, :, start : offset + b],
                attn_mask=bias[:, :, rows - c :, rows + width - seen :], dropout_p=dropout, scale=scaling,
                enable_gqa=groups > 1,
            ).transpose(1, 2)
        if steady:
            first, n, hg = steady[0], len(steady), h1 - h0

            def windows_of(x, row, start, size):  # (B, G, L, D) -> (Hg, n, size, D): block i from start + i*rows
                sb, sg, sl, sd = x.stride()
                head_stride = sg if x.shape[1] == hg else 0  # GQA: the group's heads share one kv head
                offset_ = x.storage_offset() + row * sb + start * sl
                return x.as_strided((hg, n, size, dim), (head_stride, rows * sl, sl, sd), offset_)

            mask = bias.transpose(0, 1)  # (Hg, 1, rows, rows + width): per head, shared by the n blocks
            for row in range(batch):  # overlapping windows are strided views: no copy of the keys
                o = F.scaled_dot_product_attention(
                    windows_of(q, row, first, rows), windows_of(k, row, offset + first - width, rows + width),
                    windows_of(v, row, offset + first - width, rows + width), attn_mask=mask, dropout_p=dropout,
                    scale=scaling,
                )  # (Hg, n, rows, D)
                out[row, first:, h0:h1] = o.permute(1, 2, 0, 3).reshape(n * rows, hg, dim)
    return out
