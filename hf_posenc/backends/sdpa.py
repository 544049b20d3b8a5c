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
- :func:`t5_banded_attention` (a ``banded`` bias: T5, causal, no padding mask): the bias is a per-head constant
  beyond a reach R, so a query's keys split into a band (distance < R, the bias table) and far keys (one constant:
  no mask at all, the constant added to their log-sum-exp); the two are merged by log-sum-exp. With autograd
  :func:`t5_banded_train_attention` runs the band as batched matmuls and the far keys as one square causal CPU
  flash call, with a custom backward that also yields the gradients of the band bias and of the far constant.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Query-block rows. Measured (docs/performance.md): 256 is the fastest of 128/256/512 for the template path at
# 1k-4k.
BLOCK_ROWS = 256
WINDOW_MARGIN = 32.0  # truncated keys carry < exp(-32) / slope of the weight
EARLY_SQUARE_MAX = 512  # a windowed group's first blocks run as one call while their (G, S, S) bias is this small

_flash_cpu = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_flash_cpu_backward = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def query_blocks(q_len: int, rows: int) -> list[tuple[int, int]]:
    """[(a, b)] query-row ranges covering [0, q_len): full blocks of ``rows`` aligned to the end, the first one
    shorter if ``rows`` does not divide ``q_len``."""
    first = q_len - rows * ((q_len - 1) // rows)
    edges = [0, *range(first, q_len + 1, rows)]
    return list(zip(edges[:-1], edges[1:]))


# ---- template path ---------------------------------------------------------------------------------------
def causal_template(method, k_pos: torch.Tensor, rows: int, dtype: torch.dtype) -> torch.Tensor:
    """(1, H, rows, Lk), contiguous: bias of the last ``rows`` positions (as queries) against every key, causal mask
    included (dtype-min above the diagonal)."""
    q_pos = k_pos[-rows:]  # k_pos (Lk,): key indices (plain positions)
    bias = method.score_bias(q_pos[None], k_pos[None])[0].to(dtype).contiguous()  # (H, rows, Lk); T5's comes permuted
    future = k_pos[None, :] > q_pos[:, None]  # (rows, Lk)
    min_value = torch.finfo(dtype).min
    return (bias.masked_fill(future, min_value) if bias.requires_grad else bias.masked_fill_(future, min_value))[None]


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


def alibi_bias(slopes: torch.Tensor, windows: torch.Tensor, q_first: int, q_count: int, k_first: int, k_count: int,
               dtype) -> torch.Tensor:
    """(1, G, q_count, k_count): ALiBi bias of queries at positions q_first.. against keys at k_first.., with the
    causal mask and each head's window (distance > window) as dtype-min."""
    device = slopes.device
    distance = (
        torch.arange(q_first, q_first + q_count, device=device)[:, None]
        - torch.arange(k_first, k_first + k_count, device=device)[None, :]
    ).to(torch.float32)  # (Lq', Lk')
    bias = distance[None] * -slopes.float()[:, None, None]  # (G, Lq', Lk')
    hidden = (distance[None] < 0) | (distance[None] > windows.float()[:, None, None])
    return bias.masked_fill_(hidden, torch.finfo(torch.float32).min).to(dtype)[None]


def window_rows(width: int) -> int:
    """Query-block rows for a key window: small blocks waste less of a short window (a block's own causal square
    is computed in full), long windows run best in larger blocks."""
    return 64 if width <= 256 else 128 if width <= 1024 else BLOCK_ROWS


def window_classes(windows: list[int], k_len: int) -> list[tuple[int, list[int]]]:
    """[(width, heads)]: heads grouped by key window width, each window rounded up to its query-block rows (or all
    keys). Heads with equal widths, e.g. all that need every key, run together."""
    classes: dict[int, list[int]] = {}
    for h, window in enumerate(windows):
        rows = window_rows(window)
        classes.setdefault(min(-(-window // rows) * rows, k_len), []).append(h)
    return sorted(classes.items())


def _group_plan(q_len: int, k_len: int, width: int, slopes, windows, dtype) -> list[tuple]:
    """Calls for one head group. ("slice", a, b, k0, k1, bias): queries [a, b) x keys [k0, k1);
    ("windows", a, n, rows, k0, bias): n blocks of ``rows`` queries from a, block i over keys k0 + i*rows ...
    + rows + width (overlapping strided windows, one (G, 1, rows, rows + width) bias for all blocks)."""
    offset = k_len - q_len
    rows = window_rows(width)
    blocks = query_blocks(q_len, rows)
    steady = [a for a, b in blocks if b - a == rows and offset + a >= width] if width < k_len else []
    early_end = steady[0] if steady else q_len
    plan = []
    # one (1, G, rows, rows + width) bias: a block's queries against the ``width`` keys before it and its own; every
    # call slices it (the bias depends only on the distance)
    template = alibi_bias(slopes, windows, width, rows, 0, rows + width, dtype)
    if steady and offset + early_end <= EARLY_SQUARE_MAX:  # the first blocks as one call
        bias = alibi_bias(slopes, windows, offset, early_end, 0, offset + early_end, dtype)
        plan.append(("slice", 0, early_end, 0, offset + early_end, bias))
    else:
        for a, b in blocks:
            if a >= early_end:
                break
            start = max(0, offset + a - width)  # keys [start, offset + b)
            c, seen = b - a, offset + b - start
            plan.append(("slice", a, b, start, offset + b, template[:, :, rows - c :, rows + width - seen :]))
    if steady:
        first = steady[0]
        plan.append(("windows", first, len(steady), rows, offset + first - width, template.transpose(0, 1)))
    return plan


def _strided(x, start: int, n: int, step: int, size: int) -> torch.Tensor:
    """(B, G, L, *rest) with any strides -> (B*G, n, size, *rest): block i is x[:, :, start + i*step :][:size] (a
    view; blocks overlap when size > step). B and G merge when their strides allow (always for B = 1)."""
    batch, heads = x.shape[:2]
    sb, sg, sl, *rest = x.stride()
    if batch > 1 and heads > 1 and sb != heads * sg:
        raise ValueError("batch and head dims cannot merge: pass contiguous tensors")
    return x.as_strided((batch * heads, n, size, *x.shape[3:]), (sg if heads > 1 else sb, step * sl, sl, *rest),
                        x.storage_offset() + start * sl)


def _views(call, q, k, v, out=None, lse=None):
    """The call's (q, k, v, out, lse) views of group tensors q/out (B, G, Lq, D), k/v (B, G, Lk, D), lse (B, G, Lq).
    Windows merge B and G into the batch dim: (B*G, n, rows[, + width], D)."""
    if call[0] == "slice":
        _, a, b, k0, k1, _ = call
        pick = lambda x, lo, hi: None if x is None else x[:, :, lo:hi]  # noqa: E731
        return pick(q, a, b), k[:, :, k0:k1], v[:, :, k0:k1], pick(out, a, b), pick(lse, a, b)
    _, a, n, rows, k0, bias = call
    size = bias.shape[-1]
    blocks = lambda x: None if x is None else _strided(x, a, n, rows, rows)  # noqa: E731
    return blocks(q), _strided(k, k0, n, rows, size), _strided(v, k0, n, rows, size), blocks(out), blocks(lse)


def _call_mask(call, batch):
    bias = call[-1]
    return bias.repeat(batch, 1, 1, 1) if call[0] == "windows" and batch > 1 else bias


def _group_forward(plan, q, k, v, scaling, dropout, lse, out=None):
    """Run a group's calls into ``out`` (B, G, Lq, D) (new if None, returned) and ``lse`` (B, G, Lq) when given."""
    out = torch.empty_like(q) if out is None else out
    for call in plan:
        qc, kc, vc, oc, lc = _views(call, q, k, v, out, lse)
        mask = _call_mask(call, q.shape[0])
        if lse is None:
            oc.copy_(F.scaled_dot_product_attention(qc, kc, vc, attn_mask=mask, dropout_p=dropout, scale=scaling))
        else:
            o, l = _flash_cpu(qc, kc, vc, 0.0, False, attn_mask=mask, scale=scaling)
            oc.copy_(o)
            lc.copy_(l)
    return out


def _group_backward(plan, grad_out, q, k, v, out, lse, scaling):
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for call in plan:
        qc, kc, vc, oc, lc = _views(call, q, k, v, out, lse)
        go = _views(call, grad_out, k, v)[0]
        gq, gk, gv = _flash_cpu_backward(go, qc, kc, vc, oc, lc, 0.0, False, attn_mask=_call_mask(call, q.shape[0]),
                                         scale=scaling)
        _views(call, dq, dk, dv)[0].add_(gq)
        if call[0] == "slice":
            _, _, _, k0, k1, _ = call
            dk[:, :, k0:k1].add_(gk)
            dv[:, :, k0:k1].add_(gv)
            continue
        _, _, n, rows, k0, _ = call
        for j in range(gk.shape[2] // rows):  # slice j of every window: n disjoint key ranges
            keys = slice(k0 + j * rows, k0 + (j + n) * rows)
            for grad, target in ((gk, dk), (gv, dv)):
                view = target[:, :, keys].reshape(-1, n, rows, target.shape[3])  # (B*G, n, R, D), a view
                view.add_(grad[:, :, j * rows : (j + 1) * rows])
    return dq, dk, dv


def _groups(query, key, slopes, scaling):
    """[(heads index, kv index, plan)] for one call of the windowed kernel."""
    q_len, k_len = query.shape[2], key.shape[2]
    exact = alibi_windows(query, key, slopes, scaling, k_len)
    windows = torch.tensor(exact, device=query.device)
    per_kv = query.shape[1] // key.shape[1]
    groups = []
    for width, heads in window_classes(exact, k_len):
        index = torch.tensor(heads, device=query.device)
        plan = _group_plan(q_len, k_len, width, slopes[index], windows[index], query.dtype)
        groups.append((index, index // per_kv, plan))
    return groups


def _gather(x, index):
    return x.index_select(1, index)  # (B, G, L, D), contiguous


class _WindowedAlibi(torch.autograd.Function):
    """Training path: forward without an autograd graph (keeping the log-sum-exps), backward with the CPU flash
    backward kernel per call; overlapping key windows accumulate their gradients slice by slice."""

    @staticmethod
    def forward(ctx, query, key, value, slopes, scaling):
        groups = _groups(query, key, slopes, scaling)
        out = query.new_empty(query.shape[0], query.shape[2], query.shape[1], query.shape[3])  # (B, Lq, H, D)
        saved = []
        for index, kv_index, plan in groups:
            q, k, v = _gather(query, index), _gather(key, kv_index), _gather(value, kv_index)
            lse = q.new_empty(q.shape[:3], dtype=torch.float32)
            o = _group_forward(plan, q, k, v, scaling, 0.0, lse)
            out.index_copy_(2, index, o.transpose(1, 2))
            saved += [o, lse]
        ctx.save_for_backward(query, key, value, *saved)
        ctx.groups, ctx.scaling = groups, scaling
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, *saved = ctx.saved_tensors
        dq, dk, dv = torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value)
        for i, (index, kv_index, plan) in enumerate(ctx.groups):
            o, lse = saved[2 * i], saved[2 * i + 1]
            q, k, v = _gather(query, index), _gather(key, kv_index), _gather(value, kv_index)
            go = grad_out.index_select(2, index).transpose(1, 2).contiguous()  # (B, G, Lq, D)
            gq, gk, gv = _group_backward(plan, go, q, k, v, o, lse, ctx.scaling)
            dq.index_add_(1, index, gq)
            dk.index_add_(1, kv_index, gk)
            dv.index_add_(1, kv_index, gv)
        return dq, dk, dv, None, None


def alibi_windowed_attention(query, key, value, slopes: torch.Tensor, scaling: float, dropout: float = 0.0
                             ) -> torch.Tensor:
    """Causal ALiBi attention, each head over its provably sufficient key window (:func:`alibi_windows`).
    Returns (B, Lq, H, D).

    Heads are grouped by window width (:func:`window_classes`). Per group, the first blocks run as one call (or
    one call per block when that square would be large), and every later query block [a, a+C) attends keys
    [a - W, a + C) in one batched call: the overlapping key windows are a strided view, with one (C, C + W) bias
    for all blocks. A group whose window covers all keys runs block by block, as :func:`blocked_attention`.
    With autograd (CPU, no dropout) a custom backward runs the flash backward kernel per call.
    """
    slopes = slopes.to(query.device)
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        return _WindowedAlibi.apply(query, key, value, slopes, scaling)
    batch = query.shape[0]
    out = query.new_empty(batch, query.shape[2], query.shape[1], query.shape[3])  # (B, Lq, H, D)
    same_kv = key.shape[1] == query.shape[1]
    with torch.no_grad():
        for index, kv_index, plan in _groups(query, key, slopes, scaling):
            h0, h1 = int(index[0]), int(index[-1]) + 1
            if same_kv and h1 - h0 == len(index) and (batch == 1 or h1 - h0 == 1):
                # consecutive heads, B = 1 (or one head): views of the inputs, results written into ``out``
                _group_forward(plan, query[:, h0:h1], key[:, h0:h1], value[:, h0:h1], scaling, dropout, None,
                               out=out[:, :, h0:h1].transpose(1, 2))
                continue
            o = _group_forward(plan, _gather(query, index), _gather(key, kv_index), _gather(value, kv_index),
                               scaling, dropout, None)
            out.index_copy_(2, index, o.transpose(1, 2))
    return out


def can_train_windowed(query, dropout: float) -> bool:
    """The windowed kernel's backward needs the CPU flash kernels and no dropout."""
    return (
        _flash_cpu is not None and _flash_cpu_backward is not None and query.device.type == "cpu" and not dropout
    )


# ---- banded T5 path (inference) ----------------------------------------------------------------------------
def t5_banded_attention(method, query, key, value, scaling: float, rows: int = BLOCK_ROWS) -> torch.Tensor:
    """Causal attention with a bias that is constant beyond a distance R (T5: the last bucket from
    ``max_distance`` on). Query block [a, a+C) runs as two mask-free-or-small calls merged by log-sum-exp:
    the band, keys [a - W, a + C) with W = R rounded up to C (one batched call for all blocks, one shared
    (H, C, C + W) bias), and the far keys [0, a - W), whose bias is the per-head constant: no mask at all, its
    log-sum-exp shifted by that constant. CPU flash kernel for the log-sum-exps. Returns
    (B, Lq, H, D). With autograd: :func:`t5_banded_train_attention`."""
    if torch.is_grad_enabled() and (
        query.requires_grad or key.requires_grad or value.requires_grad
        or any(p.requires_grad for p in method.parameters())
    ):
        return t5_banded_train_attention(method, query, key, value, scaling)
    batch, heads, q_len, dim = query.shape
    k_len = key.shape[2]
    offset = k_len - q_len
    groups = heads // key.shape[1]
    width = -(-method.bias_reach() // rows) * rows
    # contiguous (B, H, L, D): overlapping key windows are strided views of it
    q = query.contiguous()
    k = key.repeat_interleave(groups, 1) if groups > 1 else key.contiguous()
    v = value.repeat_interleave(groups, 1) if groups > 1 else value.contiguous()
    positions = torch.arange(width + rows, device=query.device)
    band = method.score_bias(positions[None, -rows:], positions[None])[0].to(query.dtype).contiguous()  # (H, C, C + W)
    band = band.masked_fill_(positions[None, :] > positions[-rows:, None], torch.finfo(query.dtype).min)
    reach = method.bias_reach()
    far_positions = torch.arange(reach + 1, device=query.device)
    far_bias = method.score_bias(far_positions[None, -1:], far_positions[None])[0, :, 0, 0].float()  # (H,) at >= R
    out = query.new_empty(batch, q_len, heads, dim)
    blocks = query_blocks(q_len, rows)
    steady = [a for a, b in blocks if b - a == rows and offset + a >= width]
    near_out = torch.empty_like(q)
    near_lse = q.new_empty(batch, heads, q_len, dtype=torch.float32)
    for a, b in blocks:  # early blocks: keys [0, offset + b), all within reach of the band's bias
        if steady and a >= steady[0]:
            break
        start = max(0, offset + a - width)
        c, seen = b - a, offset + b - start
        o, lse = _flash_cpu(q[:, :, a:b], k[:, :, start : offset + b], v[:, :, start : offset + b], 0.0, False,
                            attn_mask=band[None, :, rows - c :, rows + width - seen :], scale=scaling)
        near_out[:, :, a:b], near_lse[:, :, a:b] = o, lse
    if steady:
        first, n = steady[0], len(steady)
        call = ("windows", first, n, rows, offset + first - width, band[:, None])
        qc, kc, vc, oc, lc = _views(call, q, k, v, near_out, near_lse)
        o, lse = _flash_cpu(qc, kc, vc, 0.0, False, attn_mask=_call_mask(call, batch), scale=scaling)
        oc.copy_(o)
        lc.copy_(lse)
    for a, b in blocks:
        far = offset + a - width  # keys [0, far) are beyond the band for every query of the block
        if far <= 0:
            out[:, a:b] = near_out[:, :, a:b].transpose(1, 2)
            continue
        o1, lse1 = _flash_cpu(q[:, :, a:b], k[:, :, :far], v[:, :, :far], 0.0, False, scale=scaling)
        lse1 = lse1 + far_bias[None, :, None]
        lse2, o2 = near_lse[:, :, a:b], near_out[:, :, a:b]
        top = torch.maximum(lse1, lse2)
        w1, w2 = (lse1 - top).exp_(), (lse2 - top).exp_()
        total = w1 + w2
        merged = o1 * (w1 / total)[..., None] + o2 * (w2 / total)[..., None]  # (B, H, c, D)
        out[:, a:b] = merged.transpose(1, 2)
    return out


def can_band(method, query) -> bool:
    """The banded kernel (for a method declaring a banded bias) needs the CPU flash kernel."""
    return _flash_cpu is not None and query.device.type == "cpu"


# ---- banded T5 path (training) -----------------------------------------------------------------------------
# Query-block rows of the trainable band. The band's matmuls cover C + R keys per query for R useful ones, so
# small blocks waste less, but their matmuls run less efficiently: measured (docs/performance.md, T5 training) 32
# and 64 alike, 128 slower at 1k-2k.
TRAIN_BAND_ROWS = 64


@dataclass(frozen=True)
class BandLayout:
    """Where the trainable banded kernel's pieces lie, for Lq queries that are the last Lq of Lk keys.

    Every query at position p (= offset + its index) splits its keys in two: the *band*, distances p - j in
    [0, R), and the *far* keys, distance >= R, whose bias is one constant per head.
    - Band: q is padded in front to ``blocks`` x C rows (``q_pad`` zero rows), k / v to ``k_pad`` + Lk rows;
      query block m attends the padded keys [start + m*C, start + m*C + C + R). Every block sees the same
      distances (row r, column c: d = r + R - c), so one (H, C, C + R) bias serves all blocks; the padded keys a
      block's window reaches are hidden per block (:meth:`hidden_keys`).
    - Far: ``far`` lists flash calls (first query, first key, end key, causal): the far keys of query i are
      [0, offset + i - R], a shifted causal staircase; the CPU flash kernel's causal mask is top-left aligned,
      so queries [R - offset, Lq) against keys [0, Lk - R) is one square causal call when offset <= R; with more
      cached keys, keys [0, offset - R) are far for every query (one unmasked call) and the rest one square
      causal call.
    """

    rows: int
    reach: int
    blocks: int
    q_pad: int
    k_pad: int
    start: int
    far: tuple[tuple[int, int, int, bool], ...]

    def hidden_keys(self, block: int) -> int:
        """How many leading columns of block ``block``'s window are padding (0 from some block on)."""
        return max(0, self.k_pad - self.start - block * self.rows)


def band_layout(q_len: int, k_len: int, rows: int, reach: int) -> BandLayout:
    offset = k_len - q_len
    blocks = -(-q_len // rows)
    q_pad = blocks * rows - q_len
    k_pad = max(0, reach + q_pad - offset)
    start = offset - q_pad - reach + k_pad  # >= 0; window m ends at start + (m + 1) * C + R <= k_pad + Lk
    if offset <= reach:
        first = reach - offset
        far = ((first, 0, k_len - reach, True),) if first < q_len else ()
    else:
        far = ((0, 0, offset - reach, False), (0, offset - reach, k_len - reach, True))
    return BandLayout(rows, reach, blocks, q_pad, k_pad, start, far)


def t5_band_bias(method, rows: int, reach: int, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(band (H, C, C + R), far (H,)), differentiable in the method's table: the band bias of a query block
    (row r, column c: distance d = r + R - c; dtype-min outside [0, R): future keys and far keys), and the
    per-head bias at distances >= the method's reach (the far constant)."""
    positions = torch.arange(rows + reach, device=device)
    q_pos, k_pos = positions[reach:], positions  # d = q - k = r + R - c
    bias = method.score_bias(q_pos[None], k_pos[None])[0].to(dtype)  # (H, C, C + R)
    distance = q_pos[:, None] - k_pos[None, :]
    band = torch.where((distance >= 0) & (distance < reach), bias, torch.finfo(dtype).min)
    # one query at distance R from key 0: beyond the reach every distance has this bias
    far_q = torch.tensor([[method.bias_reach()]], device=device)
    far = method.score_bias(far_q, torch.zeros_like(far_q))[0, :, 0, 0].to(dtype)  # (H,)
    return band, far


def _band_windows(x: torch.Tensor, layout: BandLayout) -> torch.Tensor:
    """(B, H, k_pad + Lk, D) padded keys / values -> (B*H, blocks, C + R, D), overlapping windows (a view)."""
    return _strided(x, layout.start, layout.blocks, layout.rows, layout.rows + layout.reach)


def _hide_padding(scores: torch.Tensor, layout: BandLayout) -> None:
    """Scores (B*H, blocks, C, C + R): padded keys -> dtype-min, in place (only the first blocks reach any)."""
    for m in range(layout.blocks):
        hidden = layout.hidden_keys(m)
        if hidden == 0:
            break
        scores[:, m, :, :hidden] = torch.finfo(scores.dtype).min


def _bmm_heads(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[h] = a[h] @ b[h] for (B*H, n, ., .) operands, one bmm per head row: a bmm reads a window view's
    uniform (overlapping) batch stride in place, where a 4-D matmul would copy the windows (measured 2.4x)."""
    for h in range(a.shape[0]):
        torch.bmm(a[h], b[h], out=out[h])
    return out


def _band_forward(qs, kp, vp, band, layout: BandLayout):
    """Band attention of all query blocks. qs (B, H, blocks*C, D) padded queries already multiplied by the
    scaling, kp / vp padded keys. Returns (out (B, H, blocks*C, D), lse (B, H, blocks*C), probs (B*H, blocks, C,
    C + R) normalised within the band). Padded query rows see only dtype-min scores: their probabilities are
    uniform, never NaN (their gradient is zero)."""
    batch, heads, rows_total, dim = qs.shape
    qb = qs.view(batch * heads, layout.blocks, layout.rows, dim)
    k_windows = _band_windows(kp, layout)  # (B*H, n, C + R, D)
    scores = _bmm_heads(qb, k_windows.transpose(-1, -2), qb.new_empty(*qb.shape[:3], k_windows.shape[2]))
    scores.view(batch, heads, *scores.shape[1:]).add_(band[None, :, None])
    _hide_padding(scores, layout)
    # softmax's fused kernel, not exp: torch's exp slows down ~10x on the masked (dtype-min) scores
    probs = torch.softmax(scores, dim=-1)
    lse = scores.amax(dim=-1) - probs.amax(dim=-1).log()  # the largest probability is 1 / sum exp(s - max)
    out = _bmm_heads(probs, _band_windows(vp, layout), torch.empty_like(qb))  # (B*H, n, C, D)
    return out.view(batch, heads, rows_total, dim), lse.view(batch, heads, rows_total), probs


def _add_windows(target: torch.Tensor, grad: torch.Tensor, layout: BandLayout) -> None:
    """target (B, H, k_pad + Lk, D) += the window gradients grad (B*H, blocks, C + R, D): column chunk t (C wide)
    of every window lands on disjoint key ranges, one strided add per chunk."""
    rows, size = layout.rows, layout.rows + layout.reach
    for t in range(0, size, rows):
        width = min(rows, size - t)
        _strided(target, layout.start + t, layout.blocks, rows, width).add_(grad[:, :, t : t + width])


def _merge(near_out, near_lse, far_parts):
    """Log-sum-exp merge. near (B, H, Lq, D) / (B, H, Lq); far_parts [(first query, out, lse incl. the far
    constant)]. Returns (out (B, H, Lq, D), lse (B, H, Lq), near weight (B, H, Lq), far weights [(B, H, Lq')])."""
    lse = near_lse.clone()
    for first, _, part_lse in far_parts:
        lse[..., first:] = torch.logaddexp(lse[..., first:], part_lse)
    near_weight = (near_lse - lse).exp_()
    out = near_out * near_weight[..., None].to(near_out.dtype)
    far_weights = []
    for first, part_out, part_lse in far_parts:
        weight = (part_lse - lse[..., first:]).exp_()
        out[..., first:, :] += part_out * weight[..., None].to(out.dtype)
        far_weights.append(weight)
    return out, lse, near_weight, far_weights


class _BandedT5(torch.autograd.Function):
    """Training path of the banded kernel. Forward without an autograd graph; backward from the merged output and
    log-sum-exp (as flash attention's): the band by batched matmuls (its scores' gradient is also the band bias'),
    the far calls by the CPU flash backward kernel, fed the merged output and the merged log-sum-exp minus the far
    constant (so it recomputes the far probabilities of the full softmax). The far constant's gradient per head:
    sum over queries of w_i (dout_i . (o_far_i - out_i)), w_i the far keys' share of query i's weight.
    Saved: the padded scaled queries and padded keys / values (the far calls read slices of them, scale 1), the
    band's probabilities (B*H*Lq*(C + R) floats), the output, the merged log-sum-exp, the far outputs / weights."""

    @staticmethod
    def forward(ctx, query, key, value, band, far_bias, scaling, layout):
        lq, lk = layout.q_pad, layout.k_pad
        qs = F.pad(query * scaling, (0, 0, lq, 0))  # (B, H, n*C, D), contiguous
        kp, vp = F.pad(key, (0, 0, lk, 0)), F.pad(value, (0, 0, lk, 0))  # (B, H, k_pad + Lk, D)
        near_out, near_lse, probs = _band_forward(qs, kp, vp, band, layout)
        far_parts = []
        for first, k0, k1, causal in layout.far:
            out, lse = _flash_cpu(qs[:, :, lq + first :], kp[:, :, lk + k0 : lk + k1], vp[:, :, lk + k0 : lk + k1],
                                  0.0, causal, scale=1.0)
            far_parts.append((first, out, lse + far_bias[None, :, None].to(lse.dtype)))
        out, lse, near_weight, far_weights = _merge(near_out[:, :, lq:], near_lse[:, :, lq:], far_parts)
        # the band's probabilities as shares of the full softmax (padded rows keep theirs: their gradient is 0)
        probs.view(*qs.shape[:3], -1)[:, :, lq:].mul_(near_weight[..., None].to(probs.dtype))
        ctx.save_for_backward(qs, kp, vp, probs, out, lse, *[part[1] for part in far_parts], *far_weights, far_bias)
        ctx.scaling, ctx.layout = scaling, layout
        return out

    @staticmethod
    def backward(ctx, grad_out):
        qs, kp, vp, probs, out, lse, *rest = ctx.saved_tensors
        layout = ctx.layout
        lq, lk, n_far = layout.q_pad, layout.k_pad, len(layout.far)
        far_outs, far_weights, far_bias = rest[:n_far], rest[n_far : 2 * n_far], rest[-1]
        grad_out = grad_out.contiguous()
        delta = (grad_out * out).sum(-1)  # (B, H, Lq): dout_i . out_i
        d_qs, d_kp, d_vp, d_band = _band_backward(grad_out, delta, qs, kp, vp, probs, layout)  # padded
        d_far = torch.zeros_like(far_bias)
        for (first, k0, k1, causal), far_out, weight in zip(layout.far, far_outs, far_weights):
            go, rows, keys = grad_out[:, :, first:], slice(lq + first, None), slice(lk + k0, lk + k1)
            gq, gk, gv = _flash_cpu_backward(go, qs[:, :, rows], kp[:, :, keys], vp[:, :, keys], out[:, :, first:],
                                             lse[..., first:] - far_bias[None, :, None], 0.0, causal, scale=1.0)
            d_qs[:, :, rows] += gq
            d_kp[:, :, keys] += gk
            d_vp[:, :, keys] += gv
            share = (go * far_out).sum(-1) - delta[..., first:]  # (B, H, Lq'): dout . (o_far - out)
            d_far += (weight * share).sum((0, 2))
        d_q = d_qs[:, :, lq:].mul_(ctx.scaling)
        return d_q, d_kp[:, :, lk:], d_vp[:, :, lk:], d_band, d_far.to(far_bias.dtype), None, None


def _band_backward(grad_out, delta, qs, kp, vp, probs, layout: BandLayout):
    """The band's share of the gradients with respect to the padded inputs: (d qs (B, H, n*C, D), d kp / d vp
    (B, H, k_pad + Lk, D), d band (H, C, C + R)). probs (B*H, n, C, C + R) are the band's shares of the full
    softmax, so dS = P * (dout . v - dout . out); qs are the scaled queries (scores = qs k^T, dk = dS^T qs)."""
    batch, heads, rows_total, dim = qs.shape
    lq = layout.q_pad
    go = F.pad(grad_out, (0, 0, lq, 0)).view(batch * heads, layout.blocks, layout.rows, dim)
    dl = F.pad(delta, (lq, 0)).view(batch * heads, layout.blocks, layout.rows, 1)
    k_windows, v_windows = _band_windows(kp, layout), _band_windows(vp, layout)  # (B*H, n, C + R, D)
    d_scores = _bmm_heads(go, v_windows.transpose(-1, -2), torch.empty_like(probs)).sub_(dl).mul_(probs)
    d_band = d_scores.view(batch, heads, *d_scores.shape[1:]).sum((0, 2))  # (H, C, C + R)
    d_qs = _bmm_heads(d_scores, k_windows, torch.empty_like(go)).view(batch, heads, rows_total, dim)
    d_kp, d_vp = torch.zeros_like(kp), torch.zeros_like(vp)
    window_grad = go.new_empty(*k_windows.shape)  # (B*H, n, C + R, D), reused for dk then dv
    _add_windows(d_kp, _bmm_heads(d_scores.transpose(-1, -2), qs.view_as(go), window_grad), layout)
    _add_windows(d_vp, _bmm_heads(probs.transpose(-1, -2), go, window_grad), layout)
    return d_qs, d_kp, d_vp, d_band


def t5_banded_train_attention(method, query, key, value, scaling: float, rows: int = TRAIN_BAND_ROWS
                              ) -> torch.Tensor:
    """Causal attention with a banded bias (:class:`BandLayout`), differentiable in q, k, v and the method's bias
    table (through :func:`t5_band_bias`). GQA keys / values are repeated to H heads here (autograd sums their
    gradients). Returns (B, Lq, H, D)."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, 1) if groups > 1 else key.contiguous()
    value = value.repeat_interleave(groups, 1) if groups > 1 else value.contiguous()
    q_len, k_len = query.shape[2], key.shape[2]
    reach = min(method.bias_reach(), k_len)  # a band as long as the keys leaves nothing far
    layout = band_layout(q_len, k_len, rows, reach)
    band, far = t5_band_bias(method, rows, reach, query.dtype, query.device)
    out = _BandedT5.apply(query.contiguous(), key, value, band, far, scaling, layout)
    return out.transpose(1, 2).contiguous()


def can_train_banded(query, dropout: float) -> bool:
    """The banded kernel's backward needs the CPU flash kernels, no dropout and fp32 / fp64 (the band's matmuls
    run in the input dtype)."""
    return can_train_windowed(query, dropout) and query.dtype in (torch.float32, torch.float64)
