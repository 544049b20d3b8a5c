"""Keys stored rotated: a RoPE method that rotates in attention (RoPE on GPT-2 / BERT, partial rotary on Llama)
rotates each key once, at its own position, when the cache stores it, so no decode step re-rotates the past.

Exact because the rotation of a key depends only on its own position (absolute per key, kept with the cache by
:mod:`hf_posenc.positions`) and on frequencies that do not change with the input. Methods whose frequencies follow
the input length (``dynamic`` NTK, ``dynamic_yarn``) declare ``caches_rotated_keys = False`` and re-rotate every key
in attention each step, as before.

How (all per cache object, nothing global):

- a cache the converted model writes gets a write hook: its ``update`` (which transformers' attention modules call
  with the new (B, Hkv, Lq, D) keys just before the attention function) is shadowed on the instance by
  :class:`RotateOnWrite`, which rotates the new keys at this forward's positions, then stores them;
- the hook is *armed* with the method for the duration of one forward of the converted model (the base model's
  pre-hook arms it, the post-hook disarms it): between forwards the cache holds no reference to the model, and a
  forward that is not the converted model's (``original_positions``, another model) is refused, never silently
  written unrotated into a cache of rotated keys;
- each write leaves a token on the method which the attention function of the same layer takes
  (:func:`take_prerotated`): that call's keys are already rotated and only the queries rotate. A layer that got no
  cache (gradient checkpointing) rotates both, as without a cache;
- a cache the model created inside a forward (``model(x, use_cache=True)`` without one) is adopted at the end of
  that forward: its keys, all written by it at known positions, are rotated once and the hook installed.

A cache that already holds keys this module did not rotate (filled elsewhere) is left as it is: every step then
rotates its keys in attention (correct, slower).
"""

from __future__ import annotations

import torch

from . import _seams

ROTATED = "_posenc_rotated_keys"  # cache attribute: True once the cache holds rotated keys (hook installed)
ARMED = "_posenc_rotating_method"  # cache attribute: the method rotating writes during this forward, else None
PENDING = "_posenc_prerotated_writes"  # method attribute: writes whose attention call has not run yet


class RotateOnWrite:
    """Shadows ``cache.update(key_states, value_states, layer_idx, ...)`` on one cache instance."""

    def __init__(self, cache):
        self.cache = cache  # copy.deepcopy(cache) copies this with it, pointing at the copy

    def __call__(self, key_states, value_states, layer_idx, *args, **kwargs):
        method = self.cache.__dict__.get(ARMED)
        if method is None:
            raise ValueError(
                "this KV cache holds keys rotated by an hf_posenc RoPE model; only a forward of that model can "
                "extend it (not one inside hf_posenc.original_positions, nor another model's)"
            )
        positions = method.new_key_positions(key_states.shape[-2], key_states.device)  # (P, Lq)
        key_states = method.rotate_keys(key_states, positions)
        method.__dict__[PENDING] = method.__dict__.get(PENDING, 0) + 1
        return type(self.cache).update(self.cache, key_states, value_states, layer_idx, *args, **kwargs)


def can_rotate(cache) -> bool:
    """Caches of caches (encoder-decoder) are not handled: their self-attention part would need the hook."""
    return cache is not None and not isinstance(cache, _seams.EncoderDecoderCache)


def begin_forward(method, cache) -> None:
    """Base-model pre-hook: arm the cache's write hook for this forward, installing it on an empty cache."""
    method.__dict__[PENDING] = 0
    if not method.caches_rotated_keys or not can_rotate(cache):
        return
    if not cache.__dict__.get(ROTATED):
        if int(cache.get_seq_length()) > 0:  # keys we did not rotate: leave them to attention
            return
        install(cache)
    cache.__dict__[ARMED] = method


def end_forward(method, cache_in, cache_out, written: torch.Tensor | None) -> None:
    """Base-model post-hook: disarm; adopt a cache this forward created (rotate its keys once, install the hook).
    ``written`` (P, n): the positions of the n keys the output cache holds."""
    if cache_in is not None and can_rotate(cache_in):
        cache_in.__dict__[ARMED] = None
    if (cache_in is not None or not method.caches_rotated_keys or not can_rotate(cache_out)
            or cache_out.__dict__.get(ROTATED) or written is None):
        return
    layers = _seams.cache_layers(cache_out)
    if any(_seams.layer_keys(layer) is not None and _seams.layer_keys(layer).shape[-2] != written.shape[-1]
           for layer in layers):
        return  # not every key is one this forward wrote at ``written``: leave them to attention
    for layer in layers:
        keys = _seams.layer_keys(layer)
        if keys is not None:
            _seams.set_layer_keys(layer, method.rotate_keys(keys, written.to(keys.device)))
    install(cache_out)
    cache_out.__dict__[ARMED] = None


def install(cache) -> None:
    cache.__dict__["update"] = RotateOnWrite(cache)
    cache.__dict__[ROTATED] = True


def take_prerotated(method) -> bool:
    """In the attention function: True when this layer's keys came through a rotating cache write (consumed)."""
    pending = method.__dict__.get(PENDING, 0)
    if pending:
        method.__dict__[PENDING] = pending - 1
    return bool(pending)
