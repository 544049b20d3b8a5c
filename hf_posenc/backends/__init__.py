"""Attention backends of a converted model: which kernel computes softmax(q k^T * scaling + bias) v.

A converted model has one backend name, stored in ``config.posenc["backend"]`` (saved with the model) and on its
position method (read by the attention function on every call):

- ``"auto"`` (default): the fastest exact kernel for each call, by the measured rules of
  :func:`hf_posenc.backends.dispatch.choose_kernel` (docs/performance.md has the measurements behind them): the
  native SDPA kernel for methods without a bias, query-block SDPA kernels that never build an (H, L, L) bias for
  long ALiBi / T5 inputs (ALiBi heads attend only within the window their slope leaves any weight in), one shared
  bias for short inputs and decode steps, eager for attention weights.
- ``"sdpa"``: PyTorch SDPA with one float mask (position bias + padding/causal) built once per forward and shared
  by all layers. The simple reference; (B|1, H, Lq, Lk) floats per forward.
- ``"flex"``: FlexAttention (compiled per method kind, then dynamic shapes) with the position bias as a
  ``score_mod`` and causal/padding as a block-sparse mask; no L x L tensor at all. Single-token decode steps use
  ``"sdpa"`` (a (1, H, 1, Lk) bias row; no compile per step), and so do calls flex cannot run (backward on CPU,
  dropout, a method without a flex ``score_mod``, a custom float mask).
- ``"eager"``: explicit softmax attention.
Every backend falls back to eager when attention weights are requested (``output_attentions=True``) or the method
needs the probabilities (Transformer-XL; Shaw, except for the long inference calls ``"auto"`` gives its
``"shaw-banded"`` kernel, :mod:`.shaw_banded`, which never builds an (H, L, L) tensor).

This module stays light (no torch.compile import); the kernels live in :mod:`.sdpa`, :mod:`.flex`, :mod:`.eager`.
"""

from __future__ import annotations

BACKENDS = ("auto", "sdpa", "flex", "eager")


def check_backend(name) -> str:
    """Return ``name`` if it is a known backend; raise ``ValueError`` listing them otherwise."""
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; known backends: {', '.join(BACKENDS)}")
    return name


def set_backend(model, backend: str):
    """Switch a converted model's attention backend (in place; returns the model). Saved with the model."""
    from ..methods.base import PositionMethod

    check_backend(backend)
    posenc = getattr(getattr(model, "config", None), "posenc", None)
    if posenc is None:
        raise ValueError("set_backend expects a model converted by hf_posenc.convert (its config has no 'posenc')")
    methods = [m for m in model.modules() if isinstance(m, PositionMethod)]
    for method in methods:  # the method, and any copy a wrapper (PEFT modules_to_save) trains in its place
        method.backend = backend
    posenc["backend"] = backend
    return model


def get_backend(model) -> str:
    """The backend name of a converted model."""
    posenc = getattr(getattr(model, "config", None), "posenc", None)
    if posenc is None:
        raise ValueError("get_backend expects a model converted by hf_posenc.convert (its config has no 'posenc')")
    return posenc.get("backend", "auto")
