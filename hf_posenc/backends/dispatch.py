"""Which kernel runs one attention call: the backend the user chose, refined by what the call needs.

Kernels: ``"eager"``, ``"sdpa"`` (one shared float mask), ``"sdpa-blocked"`` and ``"sdpa-folded"`` (query-block
SDPA kernels of :mod:`.sdpa`), ``"flex"``. The ``auto`` rules below come from the CPU measurements in
docs/performance.md (B=1, 12 heads, head dim 64, fp32, 2 cores, torch 2.13):

1. attention weights requested, or a method that needs the probabilities (Shaw) -> ``eager`` (any backend);
2. no position bias (RoPE, NoPE, sinusoidal) -> ``sdpa``: the native kernel (``is_causal`` when unpadded);
3. a relative bias (ALiBi, T5) on a causal model and at least ``BLOCKED_MIN_QUERIES`` queries:
   a. ALiBi, no autograd, no padding mask, no dropout, fp32 on CPU -> ``sdpa-folded`` (within a few % of the
      native kernel, no mask at all);
   b. otherwise -> ``sdpa-blocked`` (causal half of the work, no (H, L, L) bias);
4. otherwise (short inputs, decode steps, encoders) -> ``sdpa`` with the shared bias: at these sizes building
   it is cheaper than splitting the call.
``auto`` never picks ``flex`` on CPU: compiled FlexAttention measured 2-2.5x slower than the native causal kernel
there (forward; it has no CPU backward). On GPU it is the expected winner for long inputs but was not measured
here; choose it explicitly with ``backend="flex"``.
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
                  weights_requested: bool) -> str:
    """The kernel for one call (see the module doc for the ``auto`` rules)."""
    if weights_requested or method.has_relative_kv or backend == "eager":
        return "eager"
    if backend == "sdpa":
        return "sdpa"
    grad = needs_grad(method, query, key, value)
    if backend == "flex":
        return "flex" if flex.supports(method, query, key, attention_mask, dropout, grad) else "sdpa"
    # auto
    if not method.has_score_bias:
        return "sdpa"
    kind = method_kind(method)
    if causal and kind is not None and query.shape[2] >= BLOCKED_MIN_QUERIES:
        if kind == "alibi" and attention_mask is None and query.shape[2] >= WINDOWED_MIN_QUERIES:
            return "sdpa-windowed"
        return "sdpa-blocked"
    return "sdpa"
