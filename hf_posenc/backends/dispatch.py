"""Which kernel runs one attention call: the backend the user chose, refined by what the call needs.

Kernels live in :data:`KERNELS`, keyed by name (as transformers' ``AttentionInterface`` keys attention functions),
each with the capability it needs of a method's declared :class:`~hf_posenc.methods.base.PositionTerm`:
``"eager"`` (anything: the only one for attention weights and for content terms other than a clipped one);
``"sdpa"`` (one shared float mask: any position-only term); the query-block SDPA kernels of :mod:`.sdpa`:
``"sdpa-windowed"`` (a ``linear`` distance bias: ALiBi), ``"sdpa-banded"`` (a ``banded`` distance bias: T5,
inference and training), ``"sdpa-blocked"`` (any bias that depends only on the distance); ``"flex"`` (no bias, or a linear /
banded one); ``"shaw-banded"`` (a ``clipped`` content term: Shaw, inference; :mod:`.shaw_banded`). A bias that
depends on the query and key positions themselves (FIRE) runs ``sdpa`` or ``eager``. The ``auto`` rules below come
from the CPU measurements in docs/performance.md (GPT-2 shape: 12 heads of 64, fp32, torch 2.13):

0. a ``two_pass`` rotation (Self-Extend, ReRoPE) with far pairs in the call -> its own kernels, whatever the backend
   (without far pairs, e.g. inputs shorter than its window, q / k come rotated and the rules below apply): ``two-pass-flash`` for
   long causal CPU prefills under ``auto`` (plain positions, no padding, no dropout, no autograd, no weights
   requested), ``two-pass-decode`` for one query on plain positions (a decode step: the last W keys near, the rest
   far, each key rotated and scored once), else ``two-pass`` (:mod:`.two_pass`);
1. attention weights requested -> ``eager`` (any backend);
   a. a clipped content term (Shaw), ``auto``, CPU, at least ``SHAW_BANDED_MIN_QUERIES`` queries, plain positions,
      no mask (causal or full: no padding, and not a maskless 1 < Lq < Lk call), no dropout, no autograd ->
      ``shaw-banded`` (measured: eager is as fast below 256 queries and on decode steps);
   b. any other call with a content term (padding, training, decode steps, short inputs, other backends,
      Transformer-XL) -> ``eager``;
   c. positions other than key indices (explicit ids with gaps, packed rows, static caches) -> ``sdpa``;
2. no position bias (RoPE, xPos, NoPE, sinusoidal, learned) -> ``sdpa``: the native kernel (``is_causal`` when
   unpadded);
3. a distance bias (ALiBi, T5) on a causal model with at least ``BLOCKED_MIN_QUERIES`` queries:
   a. a linear one (ALiBi) on CPU, no padding mask (with autograd: no dropout) -> ``sdpa-windowed``;
   b. a banded one (T5), no padding mask, CPU (with autograd: no dropout, fp32 / fp64) -> ``sdpa-banded``;
   c. otherwise (padding, dropout, bf16 T5 training) -> ``sdpa-blocked``;
4. otherwise (short inputs, decode steps, encoders) -> ``sdpa`` with the shared bias: at these sizes one
   (1, H, Lq, Lk) bias is small and a single call is cheapest; a decode step's bias is one (1, H, 1, Lk) row.
``auto`` never picks ``flex`` on CPU: FlexAttention compiled by torch 2.13 ran 2-2.5x slower than the native causal
kernel in isolation and behind the windowed / banded kernels in the model (forward; it has no CPU backward).
The windowed kernel is CPU-only in ``auto``: on an H200 (bf16, torch 2.11) its many small calls made a 12-layer
GPT-2 forward 11-15x the unconverted one, and with trained SmolLM2 weights (wide windows) a 1k-32k evaluation did
not finish in 6 minutes; ALiBi on a GPU takes ``sdpa-blocked`` like T5 (measured 1.6-5.2x there).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..attention_kwargs import CallSemantics, kernel_for
from ..methods.base import PositionTerm
from . import flex, sdpa, shaw_banded, two_pass
from .eager import eager_kernel
from .plain import sdpa_kernel

BLOCKED_MIN_QUERIES = 512  # below: the shared (1, H, Lq, Lk) bias is as fast and small enough
WINDOWED_MIN_QUERIES = 512
SHAW_BANDED_MIN_QUERIES = 256  # below (and decode steps): eager's (B, H, Lq, Lk) is small and as fast


@dataclass
class KernelCall:
    """One attention call, as every kernel receives it. q (B,H,Lq,D), k / v (B,Hkv,Lk,D) (cache included, already
    rotated), mask: transformers' (bool (B|1,1,Lq,Lk) True = attend, additive float, or None), q_pos (P,Lq),
    k_pos (P,Lk), ``state``: the forward's :class:`~hf_posenc.forward_state.ForwardState` (its memo)."""

    module: Any
    method: Any
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attention_mask: torch.Tensor | None
    dropout: float
    scaling: float
    causal: bool
    q_pos: torch.Tensor
    k_pos: torch.Tensor
    state: Any
    kwargs: dict = field(default_factory=dict)
    semantics: CallSemantics = field(default_factory=CallSemantics)  # softcap, sliding window, is_causal


@dataclass(frozen=True)
class Kernel:
    """``runs(term)``: whether it can compute a method declaring ``term``; ``run(call)`` -> (out (B,Lq,H,D), probs
    or None), or None when this call is one it does not express (the caller then uses ``"sdpa"``)."""

    name: str
    runs: Callable[[PositionTerm], bool]
    run: Callable[[KernelCall], tuple | None]


KERNELS: dict[str, Kernel] = {}


def register_kernel(kernel: Kernel) -> None:
    KERNELS[kernel.name] = kernel


def can_run(name: str, method) -> bool:
    return KERNELS[name].runs(method.term)


def run_kernel(name: str, call: KernelCall) -> tuple:
    out = KERNELS[name].run(call)
    return KERNELS["sdpa"].run(call) if out is None else out


def _windowed(call: KernelCall):
    slopes = flex.alibi_slopes_of(call.method, call.query.device)  # (H,)
    return sdpa.alibi_windowed_attention(call.query, call.key, call.value, slopes, call.scaling, call.dropout), None


def _banded(call: KernelCall):
    return sdpa.t5_banded_attention(call.method, call.query, call.key, call.value, call.scaling), None


def _blocked(call: KernelCall):
    method, query, k_len = call.method, call.query, call.key.shape[2]
    rows = min(sdpa.BLOCK_ROWS, query.shape[2])
    template = call.state.memo.get(
        ("template", rows, k_len, query.dtype),
        lambda: sdpa.causal_template(method, call.k_pos[0], rows, query.dtype),
    )
    gqa = call.key.shape[1] != query.shape[1]
    return sdpa.blocked_attention(query, call.key, call.value, template, call.attention_mask, call.scaling,
                                  call.dropout, gqa), None


def _shaw_banded(call: KernelCall):
    a_k, a_v = call.method.relative_tables(call.module.layer_idx)
    return shaw_banded.shaw_banded_attention(call.query, call.key, call.value, a_k, a_v, call.method.content_reach(),
                                             call.scaling, call.causal), None


def _flex(call: KernelCall):
    out = flex.flex_attention(call.method, call.query, call.key, call.value, call.attention_mask, call.scaling,
                              call.causal, call.state.memo)
    return None if out is None else (out, None)


for _kernel in (
    Kernel("eager", lambda term: True, eager_kernel),
    Kernel("sdpa", lambda term: not term.content, sdpa_kernel),
    Kernel("sdpa-blocked", lambda term: not term.content and term.bias == "distance", _blocked),
    Kernel("sdpa-windowed", lambda term: term.bias_form == "linear", _windowed),
    Kernel("sdpa-banded", lambda term: term.bias_form == "banded", _banded),
    Kernel("flex", lambda term: not term.content and (term.bias is None or term.bias_form is not None), _flex),
    Kernel("shaw-banded", lambda term: term.content_form == "clipped", _shaw_banded),
    Kernel("two-pass", lambda term: term.rotation_form == "two_pass", two_pass.two_pass_attention),
    Kernel("two-pass-flash", lambda term: term.rotation_form == "two_pass", two_pass.flash_two_pass),
    Kernel("two-pass-decode", lambda term: term.rotation_form == "two_pass", two_pass.decode_two_pass),
):
    register_kernel(_kernel)


def autocast_inputs(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Under autocast, the dtype autocast gives SDPA: Llama-style q / k leave the rotary in fp32 while v is bf16;
    the kernels called directly (CPU flash, FlexAttention, the eager softmax) need one dtype."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) for t in tensors)


def needs_grad(method, query, key, value) -> bool:
    if not torch.is_grad_enabled():
        return False
    return query.requires_grad or key.requires_grad or value.requires_grad or any(
        p.requires_grad for p in method.parameters()
    )


def choose_kernel(backend: str, method, query, key, value, attention_mask, causal: bool, dropout: float,
                  weights_requested: bool, plain_positions: bool = True,
                  semantics: CallSemantics | None = None, far_pairs: bool = True) -> str:
    """The kernel for one call: the one place a kernel is chosen (see the module doc for the ``auto`` rules).
    ``plain_positions``: the positions are key indices (one row, consecutive, queries last); the query-block and
    flex kernels assume it, so other positions (explicit ids with gaps, packing, per-row offsets, a static cache's
    capacity) take ``sdpa``. ``semantics``: the call's softcap / sliding window, which some kernels cannot apply
    (:func:`hf_posenc.attention_kwargs.kernel_for` names the one that does). ``far_pairs``: a two-pass method has
    pairs at far positions in this call (else its q / k come rotated and the ordinary rules apply)."""
    semantics = semantics or CallSemantics()
    if method.term.rotation_form == "two_pass" and far_pairs:  # rule 0: its own kernels, whatever the backend
        fast = backend == "auto" and not weights_requested and two_pass.can_flash(
            query, key, attention_mask, causal, dropout, needs_grad(method, query, key, value), plain_positions,
            method.window, semantics.softcap)
        if fast:
            return "two-pass-flash"
        return "two-pass-decode" if causal and query.shape[2] == 1 and plain_positions else "two-pass"
    kernel = _backend_kernel(backend, method, query, key, value, attention_mask, causal, dropout, weights_requested,
                             plain_positions)
    return kernel_for(kernel, semantics, dropout)


def _backend_kernel(backend: str, method, query, key, value, attention_mask, causal: bool, dropout: float,
                    weights_requested: bool, plain_positions: bool) -> str:
    if weights_requested or backend == "eager":
        return "eager"
    grad = needs_grad(method, query, key, value)
    if not can_run("sdpa", method):  # a content term
        return content_kernel(backend, method, query, key, attention_mask, causal, dropout, grad, plain_positions)
    if backend == "sdpa" or not plain_positions:
        return "sdpa"
    if backend == "flex":
        return "flex" if can_run("flex", method) and flex.supports(method, query, key, attention_mask, dropout,
                                                                  grad) else "sdpa"
    # auto
    if method.term.bias is None:
        return "sdpa"
    if causal and query.shape[2] >= BLOCKED_MIN_QUERIES:
        if (
            can_run("sdpa-windowed", method) and attention_mask is None and query.shape[2] >= WINDOWED_MIN_QUERIES
            and query.device.type == "cpu" and (not grad or sdpa.can_train_windowed(query, dropout))
        ):
            return "sdpa-windowed"
        if (
            can_run("sdpa-banded", method) and attention_mask is None and sdpa.can_band(method, query)
            and (not grad or sdpa.can_train_banded(query, dropout))
        ):
            return "sdpa-banded"
        if can_run("sdpa-blocked", method):
            return "sdpa-blocked"
    return "sdpa"


def content_kernel(backend: str, method, query, key, attention_mask, causal: bool, dropout: float, grad: bool,
                   plain_positions: bool) -> str:
    """Rule 1 for a content term: ``shaw-banded`` where it expresses the call, else ``eager``."""
    if (
        backend == "auto" and can_run("shaw-banded", method) and plain_positions and attention_mask is None
        and query.shape[2] >= SHAW_BANDED_MIN_QUERIES and not dropout and not grad
        and shaw_banded.supports(query, key, causal)
    ):
        return "shaw-banded"
    return "eager"
