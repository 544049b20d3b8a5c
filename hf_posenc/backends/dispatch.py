"""Which kernel runs one attention call: the backend the user chose, refined by what the call needs.

Kernels: ``"eager"``; ``"sdpa"`` (one shared float mask); the query-block SDPA kernels of :mod:`.sdpa`:
``"sdpa-windowed"`` (ALiBi), ``"sdpa-banded"`` (T5, inference), ``"sdpa-blocked"`` (any relative bias);
``"flex"``. The ``auto`` rules below come from the CPU measurements in docs/performance.md (GPT-2 shape: 12 heads
of 64, fp32, torch 2.13):

1. attention weights requested, or a method that needs the probabilities (Shaw) -> ``eager`` (any backend);
   positions other than key indices (explicit ids with gaps, packed rows, static caches) -> ``sdpa``;
2. no position bias (RoPE, NoPE, sinusoidal) -> ``sdpa``: the native kernel (``is_causal`` when unpadded);
3. a relative bias (ALiBi, T5) on a causal model with at least ``BLOCKED_MIN_QUERIES`` queries:
   a. ALiBi on CPU, no padding mask (with autograd: no dropout) -> ``sdpa-windowed``;
   b. T5, no padding mask, no autograd, CPU -> ``sdpa-banded``;
   c. otherwise (padding, dropout, T5 training) -> ``sdpa-blocked``;
4. otherwise (short inputs, decode steps, encoders) -> ``sdpa`` with the shared bias: at these sizes one
   (1, H, Lq, Lk) bias is small and a single call is cheapest; a decode step's bias is one (1, H, 1, Lk) row.
``auto`` never picks ``flex`` on CPU: FlexAttention compiled by torch 2.13 ran 2-2.5x slower than the native causal
kernel in isolation and behind the windowed / banded kernels in the model (forward; it has no CPU backward).
The windowed kernel is CPU-only in ``auto``: on an H200 (bf16, torch 2.11) its many small calls made a 12-layer
GPT-2 forward 11-15x the unconverted one, and with trained SmolLM2 weights (wide windows) a 1k-32k evaluation did
not finish in 6 minutes; ALiBi on a GPU takes ``sdpa-blocked`` like T5 (measured 1.6-5.2x there).
"""

from __future__ import annotations

import torch

from . import flex, sdpa

BLOCKED_MIN_QUERIES = 512  # below: the shared (1, H, Lq, Lk) bias is as fast and small enough
WINDOWED_MIN_QUERIES = 512


def method_kind(method) -> str | None:
    return flex.method_kind(method)


def needs_grad(method, query, key, value) -> bool:
    if not torch.is_grad_enabled():
        return False
    return query.requires_grad or key.requires_grad or value.requires_grad or any(
        p.requires_grad for p in method.parameters()
    )


def choose_kernel(backend: str, method, query, key, value, attention_mask, causal: bool, dropout: float,
                  weights_requested: bool, plain_positions: bool = True) -> str:
    """The kernel for one call (see the module doc for the ``auto`` rules). ``plain_positions``: the positions are
    key indices (one row, consecutive, queries last); the query-block and flex kernels assume it, so other
    positions (explicit ids with gaps, packing, per-row offsets, a static cache's capacity) take ``sdpa``."""
    if weights_requested or method.has_relative_kv or backend == "eager":
        return "eager"
    if backend == "sdpa" or not plain_positions:
        return "sdpa"
    grad = needs_grad(method, query, key, value)
    if backend == "flex":
        return "flex" if flex.supports(method, query, key, attention_mask, dropout, grad) else "sdpa"
    # auto
    if not method.has_score_bias:
        return "sdpa"
    kind = method_kind(method)
    if causal and kind is not None and query.shape[2] >= BLOCKED_MIN_QUERIES:
        if (
            kind == "alibi" and attention_mask is None and query.shape[2] >= WINDOWED_MIN_QUERIES
            and query.device.type == "cpu" and (not grad or sdpa.can_train_windowed(query, dropout))
        ):
            return "sdpa-windowed"
        if kind == "t5" and attention_mask is None and not grad and sdpa.can_band(method, query):
            return "sdpa-banded"
        return "sdpa-blocked"
    return "sdpa"
