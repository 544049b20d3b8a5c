"""Positions carried with the KV cache: cached keys keep the positions they were written with.

A converted model's base-model hooks (see :func:`hf_posenc.convert.convert`) read the positions of the keys a cache
already holds before each forward, and store the positions of every real key after it, as an attribute of the cache
object (``_posenc_positions``, (P, n) long; a static cache's: (P, capacity), one per slot). A cache the model has not written (built elsewhere, or cropped) falls
back to key indices for the keys it holds. Slots a static cache has not written yet have no position: the
attention mask hides them.
"""

from __future__ import annotations

import torch

from . import _seams
from .methods.base import SlotPositions

ATTRIBUTE = "_posenc_positions"
CACHE_NAMES = ("cache", "past_key_values")  # transformers renamed the argument and output field within 5.x


def cache_argument(kwargs: dict):
    """The KV cache a forward was called with (by keyword, as generate() and the models' own code pass it)."""
    return next((kwargs[name] for name in CACHE_NAMES if kwargs.get(name) is not None), None)


def cache_output(output):
    """The KV cache a forward returned, if any (ModelOutput field; tuple outputs carry none we can mark). Only the
    field the output class declares is read: 5.24 keeps ``past_key_values`` as a property that logs a deprecation."""
    declared = getattr(type(output), "__dataclass_fields__", {})
    return next((getattr(output, name) for name in CACHE_NAMES if name in declared), None)


def cached_positions(cache) -> torch.Tensor | SlotPositions | None:
    """(P, n) positions of the n keys ``cache`` holds; None without a cache. A cache cropped since (assisted
    decoding) keeps the first n; one we did not write gets key indices. A static cache (fixed slots, written in
    order) gets :class:`SlotPositions`: its (P, capacity) positions and the number written, as tensors, so that
    a compiled decode step reads no value and sees the same shapes every step."""
    if cache is None or not hasattr(cache, "get_seq_length"):
        return None
    capacity = _seams.static_capacity(cache)
    if capacity is not None:
        # a copy: the layers advance their own count in place during the forward
        held = torch.as_tensor(cache.get_seq_length()).clone()
        stored = getattr(cache, ATTRIBUTE, None)
        if stored is None or stored.shape[-1] != capacity:  # key indices for the held slots, 0 past them
            slots = torch.arange(capacity, device=held.device)
            stored = torch.where(slots < held, slots, 0)[None]
        return SlotPositions(stored, held)
    held = int(cache.get_seq_length())
    stored = getattr(cache, ATTRIBUTE, None)
    if stored is None or stored.shape[-1] < held:
        return torch.arange(held)[None]
    return stored[:, :held]


def remember_positions(cache, written: torch.Tensor | None) -> None:
    if cache is not None and written is not None:
        setattr(cache, ATTRIBUTE, written)
