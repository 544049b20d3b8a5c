"""Shaw's clipped relative attention without an (H, Lq, Lk) tensor: the ``"shaw-banded"`` kernel (inference, CPU).

Shaw adds ``scaling * q_i . a^K_t`` to the score of key j and ``a^V_t`` to its value, t = clip(j - i, -R, R) + R
(key indices; the queries are the last Lq keys). Beyond the reach R the table entry is constant, so each row's keys
split into three parts, merged by log-sum-exp:

- near, |j - i| <= R (causal: -R <= j - i <= 0): at most 2R+1 keys per row, computed exactly one distance at a
  time ((B, H, Lq) per distance; no (Lq, Lk) tensor);
- far left, j - i < -R: the key term is the per-row constant f_i = scaling * q_i . a^K_0, the value term is the
  row's far probability mass times a^V_0. So these keys are plain attention with the causal diagonal moved R + 1
  keys back: the CPU flash kernel's causal calls (they return log-sum-exps), their log-sum-exp raised by f_i;
- far right, j - i > R (encoders): the same with a^K_{2R} / a^V_{2R}, run on the reversed sequence.

Cost: the native causal kernel's (twice that for encoders, the full square) plus O(Lq R D). Shapes: B batch,
H heads, Hkv key/value heads, Lq / Lk query / key length, D head dim, R reach, T = 2R+1 table rows.
"""

from __future__ import annotations

import torch

_flash_cpu = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def supports(query, key, causal: bool) -> bool:
    """The calls this kernel expresses (besides what dispatch checks: no mask, no dropout, no autograd, plain
    positions): CPU with its flash kernel, and not a maskless causal call with 1 < Lq < Lk, whose convention
    (``is_causal``: query r sees keys 0..r) is not "queries are the last keys"."""
    q_len, k_len = query.shape[2], key.shape[2]
    return _flash_cpu is not None and query.device.type == "cpu" and not (causal and 1 < q_len < k_len)


def _rows_at(distance: int, offset: int, q_len: int, k_len: int) -> tuple[int, int]:
    """Query rows [lo, hi) whose key at ``distance`` (j = offset + r + distance) exists."""
    return max(0, -offset - distance), min(q_len, k_len - offset - distance)


def near_part(q, k, v, a_k, a_v, reach: int, scaling: float, causal: bool):
    """Exact attention over each row's near keys |j - i| <= R (causal: j <= i), key and value terms included.
    q (B,H,Lq,D), k / v (B,H,Lk,D), a_k / a_v (T,D), float32. Returns (out (B,H,Lq,D) normalised over the near keys,
    lse (B,H,Lq)); every row has a near key (its own)."""
    q_len, k_len = q.shape[2], k.shape[2]
    offset = k_len - q_len
    rows = reach + 1 if causal else 2 * reach + 1  # table rows t = distance + R in use
    per_distance = q @ a_k[:rows].T  # (B, H, Lq, rows): q_i . a^K_t
    scores = torch.full_like(per_distance, float("-inf"))
    spans = []
    for t in range(rows):
        d = t - reach
        lo, hi = _rows_at(d, offset, q_len, k_len)
        keys = slice(offset + lo + d, offset + hi + d)  # the keys at distance d of rows [lo, hi): one diagonal
        spans.append((t, lo, hi, keys))
        if lo < hi:
            scores[:, :, lo:hi, t] = torch.linalg.vecdot(q[:, :, lo:hi], k[:, :, keys]) + per_distance[:, :, lo:hi, t]
    scores = scores.mul_(scaling)
    lse = scores.logsumexp(-1)  # (B, H, Lq)
    probs = scores.sub_(lse[..., None]).exp_()  # (B, H, Lq, rows), 0 where there is no key
    out = probs @ a_v[:rows]  # the value term
    for t, lo, hi, keys in spans:
        if lo < hi:
            out[:, :, lo:hi].addcmul_(probs[:, :, lo:hi, t, None], v[:, :, keys])
    return out, lse


def merge(out1, lse1, out2, lse2):
    """Softmax over the union of two disjoint key sets from each one's normalised output and log-sum-exp. A part
    with no keys in a row has lse -inf and out 0 there; at least one part has keys in every row."""
    lse = torch.logaddexp(lse1, lse2)
    return out1 * (lse1 - lse).exp()[..., None] + out2 * (lse2 - lse).exp()[..., None], lse


def far_part(q, k, v, offset: int, reach: int, scaling: float):
    """Plain softmax attention (no position terms) of query row r, at key index offset + r, over the keys
    j < offset + r - R. Returns (out (B,H,Lq,D), lse (B,H,Lq) float32); rows with no such key: out 0, lse -inf.
    With s = offset - R - 1, row r sees keys j <= r + s: flash's causal calls see j <= r (top-left), so
    s < 0: rows [-s, Lq) over keys [0, Lq + s), causal; s >= 0: every row over keys [0, s] merged with
    rows [1, Lq) over keys [s + 1, s + Lq), causal."""
    q_len = q.shape[2]
    s = offset - reach - 1
    out = q.new_zeros(q.shape, dtype=torch.float32)
    lse = q.new_full(q.shape[:3], float("-inf"), dtype=torch.float32)
    if s < 0:
        first = -s
        if first < q_len:
            o, l = _flash_cpu(q[:, :, first:], k[:, :, : q_len - first], v[:, :, : q_len - first], 0.0, True,
                              scale=scaling)
            out[:, :, first:], lse[:, :, first:] = o, l
        return out, lse
    o, l = _flash_cpu(q, k[:, :, : s + 1], v[:, :, : s + 1], 0.0, False, scale=scaling)  # seen in full by every row
    out[:], lse[:] = o, l
    if q_len > 1:
        o, l = _flash_cpu(q[:, :, 1:], k[:, :, s + 1 : s + q_len], v[:, :, s + 1 : s + q_len], 0.0, True,
                          scale=scaling)
        out[:, :, 1:], lse[:, :, 1:] = merge(out[:, :, 1:], lse[:, :, 1:], o, l)
    return out, lse


def shaw_banded_attention(query, key, value, a_k, a_v, reach: int, scaling: float, causal: bool) -> torch.Tensor:
    """Shaw attention, exact, without an (Lq, Lk) tensor. query (B,H,Lq,D), key / value (B,Hkv,Lk,D) (queries are
    the last Lq keys; causal or full, no mask), a_k / a_v (2R+1, D) the layer's tables, R = ``reach``. Returns
    (B, Lq, H, D). Builds no autograd graph: inference only (dispatch picks it only without autograd)."""
    if a_k.shape[0] != 2 * reach + 1 or a_v.shape[0] != 2 * reach + 1:
        raise ValueError(f"Shaw tables of {a_k.shape[0]} / {a_v.shape[0]} rows for reach {reach}: need {2 * reach + 1}")
    dtype, groups = query.dtype, query.shape[1] // key.shape[1]
    with torch.no_grad():
        q, k, v = (x.float().contiguous() for x in (query, key, value))
        if groups > 1:  # GQA: every query head its key/value head
            k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        a_k, a_v = a_k.detach().float(), a_v.detach().float()
        offset = k.shape[2] - q.shape[2]
        out, lse = near_part(q, k, v, a_k, a_v, reach, scaling, causal)
        edges = (q @ a_k[[0, -1]].T).mul_(scaling)  # (B, H, Lq, 2): f_i of each row, far left / far right
        left, left_lse = far_part(q, k, v, offset, reach, scaling)
        out, lse = merge(out, lse, left + a_v[0], left_lse + edges[..., 0])
        if not causal:  # far right: the far left of the reversed sequence (query row r_ there at key index r_)
            right, right_lse = far_part(q.flip(2), k.flip(2), v.flip(2), 0, reach, scaling)
            out, _ = merge(out, lse, right.flip(2) + a_v[-1], right_lse.flip(2) + edges[..., 1])
    return out.to(dtype).transpose(1, 2).contiguous()
