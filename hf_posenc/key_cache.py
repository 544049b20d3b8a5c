"""Keys stored rotated: a RoPE method that rotates in attention (RoPE on GPT-2 / BERT, partial rotary on Llama)
rotates each key once, at its own position, when the cache stores it, so no decode step re-rotates the past.

Exact because the rotation of a key depends only on its own position (absolute per key, kept with the cache by
:mod:`hf_posenc.positions`) and on frequencies that do not change with the input. Methods whose frequencies follow
the input length (``dynamic`` NTK, ``dynamic_yarn``) declare ``caches_rotated_keys = False`` and re-rotate every key
in attention each step, as before.

How (all per cache object and per forward, nothing on the method or the model):

- a cache the converted model writes gets a write hook: its ``update`` (which transformers' attention modules call
  with the new (B, Hkv, Lq, D) keys just before the attention function) is shadowed on the instance by
  :class:`RotateOnWrite`, which rotates the new keys at this forward's positions, then stores them;
- the hook is *armed* with the forward's :class:`~hf_posenc.forward_state.ForwardState` for the duration of that
  forward (the base model's pre-hook arms the cache's record, the post-hook disarms it): between forwards the cache
  holds no reference to the model, and a forward that is not the converted model's (``original_positions``,
  another model) is refused, never silently written unrotated into a cache of rotated keys;
- each write adds its layer to the state's ``prerotated`` set, which the attention call of the same layer reads:
  that call's keys are already rotated and only the queries rotate. A layer that got no cache (gradient
  checkpointing) rotates both, as without a cache;
- a cache the model created inside a forward (``model(x, use_cache=True)`` without one) is adopted at the end of
  that forward: its keys, all written by it at known positions, are rotated once and the hook installed.

A cache that already holds keys this module did not rotate (filled elsewhere) is left as it is: every step then
rotates its keys in attention (correct, slower).
"""

from __future__ import annotations

import torch

from . import _seams
from .positions import ensure_record, record_of


class RotateOnWrite:
    """Shadows ``cache.update(key_states, value_states, layer_idx, ...)`` on one cache instance."""

    def __init__(self, cache):
        self.cache = cache  # copy.deepcopy(cache) copies this with it, pointing at the copy

    def __call__(self, key_states, value_states, layer_idx, *args, **kwargs):
        record = record_of(self.cache)
        state = None if record is None else record.armed
        if state is None:
            raise ValueError(
                "this KV cache holds keys rotated by an hf_posenc RoPE model; only a forward of that model can "
                "extend it (not one inside hf_posenc.original_positions, nor another model's)"
            )
        if layer_idx not in state.method.shape.own_rotary_layers:  # else the model's own rotary rotated them
            positions = state.new_key_positions(key_states.shape[-2], key_states.device)  # (P, Lq)
            key_states = state.method.rotate_keys(key_states, positions, state.memo)
            state.prerotated.add(layer_idx)
        return type(self.cache).update(self.cache, key_states, value_states, layer_idx, *args, **kwargs)


def can_rotate(cache) -> bool:
    """Caches of caches (encoder-decoder) are not handled: their self-attention part would need the hook."""
    return cache is not None and not isinstance(cache, _seams.EncoderDecoderCache)


def begin_forward(state, cache) -> None:
    """Base-model pre-hook: arm the cache's write hook with this forward's state, installing it on an empty cache."""
    if not state.method.caches_rotated_keys or not can_rotate(cache):
        return
    record = record_of(cache)
    if record is None or not record.rotated:
        if int(cache.get_seq_length()) > 0:  # keys we did not rotate: leave them to attention
            return
        install(cache)
    record_of(cache).armed = state


def end_forward(state, cache_in, cache_out, written: torch.Tensor | None) -> None:
    """Base-model post-hook: disarm; adopt a cache this forward created (rotate its keys once, install the hook).
    ``written`` (P, n): the positions of the n keys the output cache holds."""
    method = state.method
    if record_of(cache_in) is not None:
        record_of(cache_in).armed = None
    if (cache_in is not None or not method.caches_rotated_keys or not can_rotate(cache_out)
            or (record_of(cache_out) is not None and record_of(cache_out).rotated) or written is None):
        return
    layers = _seams.cache_layers(cache_out)
    if any(_seams.layer_keys(layer) is not None and _seams.layer_keys(layer).shape[-2] != written.shape[-1]
           for layer in layers):
        return  # not every key is one this forward wrote at ``written``: leave them to attention
    for index, layer in enumerate(layers):
        keys = _seams.layer_keys(layer)
        if keys is not None and index not in method.shape.own_rotary_layers:
            _seams.set_layer_keys(layer, method.rotate_keys(keys, written.to(keys.device), state.memo))
    install(cache_out)


def install(cache) -> None:
    cache.__dict__["update"] = RotateOnWrite(cache)
    ensure_record(cache).rotated = True
