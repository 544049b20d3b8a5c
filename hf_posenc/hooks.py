"""The converted model's per-forward hooks: where one forward's state begins and ends.

The base model (or the family's ``forward_root``: OPT's decoder) gets a forward pre-hook that builds the
:class:`~hf_posenc.forward_state.ForwardState` of the call and adds it to the keyword arguments, which the family
threads down to every attention call; and a forward hook that stores the positions of every key the returned cache
holds on that cache. Nothing is stored on the method or the model between the two: the state lives in the call's
keyword arguments.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from . import key_cache, positions, restore
from .forward_state import STATE_KWARG, ForwardState

METHOD_MODULE = "posenc"  # the method (and its learned tables) is registered as base_model.posenc
ATTN_IMPLEMENTATION = "hf_posenc"
KERNEL_FOR_IMPLEMENTATION = {"eager": "eager", "sdpa": "sdpa"}  # transformers' names -> our backends


class ForwardHooks:
    """The pre- and post-forward hooks of one converted model. ``base``: the base model (held unregistered: the
    hooks sit on it or below it); ``offset``: subtracted from the ``position_ids`` attention receives (RoBERTa's
    padding_idx + 1); ``derive``: the family's own rule for position ids the model derives from its inputs
    (OPT: the attention mask, RoBERTa: the padding tokens), made explicit before the forward so that the cache's
    write hook and every layer see them; None where the model's rule is key indices. ``length_buffers``: the
    family's embeddings read per-token buffers of ``max_position_embeddings`` (BERT, RoBERTa: ``token_type_ids``,
    ``position_ids``; the family's ``extend_limit`` sizes them)."""

    def __init__(self, base: nn.Module, offset: int, derive: Callable | None, length_buffers: bool = False):
        self.__dict__["base"] = base
        self.offset, self.derive, self.length_buffers = offset, derive, length_buffers

    def install(self, root: nn.Module) -> None:
        root.register_forward_pre_hook(self.begin, with_kwargs=True)
        root.register_forward_hook(self.end, with_kwargs=True)

    def begin(self, root, args, kwargs):
        base = self.base
        if restore.in_force(base):  # original_positions: transformers' own attention, nothing to pass
            return None
        if base.config._attn_implementation != ATTN_IMPLEMENTATION:
            _keep_the_method(base)
        cache = positions.cache_argument(kwargs)
        given = kwargs.get("position_ids")
        if given is None and self.derive is not None:
            given = self.derive(base, args, kwargs, positions.past_length(cache))
        if given is not None:
            given = hidden_at_position_zero(given, kwargs.get("attention_mask"), self.offset)
            kwargs = {**kwargs, "position_ids": given}
        if self.length_buffers and (given is None or kwargs.get("token_type_ids") is None):
            refuse_past_length_buffers(base, args, kwargs, positions.past_length(cache))
        checkpointing = base.training and torch.is_grad_enabled() and any(
            getattr(m, "gradient_checkpointing", False) for m in base.modules()
        )
        state = ForwardState(getattr(base, METHOD_MODULE), positions.cached_positions(cache), self.offset,
                             share=not checkpointing)
        state.query_positions(given)
        key_cache.begin_forward(state, cache)
        return args, {**kwargs, STATE_KWARG: state}

    def end(self, root, args, kwargs, output) -> None:
        """The returned cache keeps its keys' positions."""
        state = kwargs.get(STATE_KWARG)
        if state is None:
            return
        written, cache = state.written_positions(), positions.cache_output(output)
        positions.remember_positions(cache, written)
        key_cache.end_forward(state, positions.cache_argument(kwargs), cache, written)


def refuse_past_length_buffers(base, args, kwargs, past: int) -> None:
    """The embeddings slice ``position_ids`` / gather ``token_type_ids`` from buffers of ``max_position_embeddings``
    tokens: an input past them is refused naming the fix (transformers would fail with a bare expand error)."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    embeds = kwargs.get("inputs_embeds")
    length = ids.shape[-1] if ids is not None else embeds.shape[-2] if embeds is not None else 0
    limit = base.config.max_position_embeddings
    if past + length > limit:
        raise ValueError(
            f"{past + length} tokens ({past} cached) are past this converted {base.config.model_type} model's "
            f"max_position_embeddings={limit}: its embeddings read token_type_ids / position_ids buffers of that "
            f"length. Convert with hf_posenc.convert(model, method, max_position_embeddings={past + length}) or more "
            "(the default is 16x the old limit), or pass both token_type_ids and position_ids")


def hidden_at_position_zero(position_ids: torch.Tensor, mask, position_zero: int) -> torch.Tensor:
    """(B|1, L) position ids -> (B, L) with every token a 2-D ``mask`` (B, n + L: the last L columns are this
    forward's tokens) hides moved to position 0 (id ``position_zero``: the family's table offset). A hidden token is
    no other token's key, so its position changes no output that counts; the families' own rules put pads before the
    first position (OPT, RoBERTa: -1), which an absolute method (``learned``) refuses. Unchanged without such a mask
    (none, a 4-D one, or the per-layer-kind dict generate builds for a static cache)."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[-1] < position_ids.shape[-1]:
        return position_ids
    hidden = mask[:, mask.shape[-1] - position_ids.shape[-1]:].to(position_ids.device) == 0  # (B, L)
    return torch.where(hidden, position_zero, position_ids)


def _keep_the_method(base) -> None:
    """``model.set_attn_implementation("eager" | "sdpa")`` (what transformers' own errors advise) would run
    transformers' kernels without the position method: keep the method and switch to our backend of that name
    instead. Other implementations cannot run it: refused, naming the fix."""
    from .backends import set_backend

    asked = base.config._attn_implementation
    if asked not in KERNEL_FOR_IMPLEMENTATION:
        raise ValueError(
            f"attn_implementation={asked!r} would drop this model's position method "
            f"({base.config.posenc['method']!r}): a converted model runs attn_implementation={ATTN_IMPLEMENTATION!r}. "
            f"Choose its kernel with hf_posenc.set_backend(model, one of 'auto', 'sdpa', 'flex', 'eager')."
        )
    set_backend(base, KERNEL_FOR_IMPLEMENTATION[asked])
    base.set_attn_implementation(ATTN_IMPLEMENTATION)
