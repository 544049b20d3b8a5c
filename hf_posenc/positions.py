"""Positions carried with the KV cache: cached keys keep the positions they were written with.

A cache a converted model writes gets one record, :class:`CacheRecord`, in its ``__dict__`` (``_posenc``): the
positions of the keys it holds ((P, n) long; a static cache's: (P, capacity), one per slot), whether it stores keys
rotated (:mod:`hf_posenc.key_cache`) and, during one forward, that forward's state (the write hook reads it).
The record follows the cache's own row operations: ``reorder_cache`` (beam search), ``batch_select_indices`` and
``batch_repeat_interleave`` are shadowed on the instance (:class:`FollowRows`) so the positions' rows move with the
keys; ``reset`` forgets them; ``crop`` keeps the first n keys, which :func:`cached_positions` reads off the cache's
length. A cache the model has not written (built elsewhere) falls back to key indices for the keys it holds. Slots
a static cache has not written yet have no position: the attention mask hides them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _seams
from .methods.base import SlotPositions

ATTRIBUTE = "_posenc"
CACHE_NAMES = ("cache", "past_key_values")  # transformers renamed the argument and output field within 5.x


@dataclass
class CacheRecord:
    """What hf_posenc keeps on one cache. ``positions`` (P, n) / (P, capacity); ``rotated``: keys stored rotated;
    ``armed``: the :class:`~hf_posenc.forward_state.ForwardState` writing into it now, else None."""

    positions: torch.Tensor | None = None
    rotated: bool = False
    armed: object = None

    def __deepcopy__(self, memo):  # a copied cache keeps its keys' positions, never another forward's state
        return CacheRecord(None if self.positions is None else self.positions.clone(), self.rotated, None)


def record_of(cache) -> CacheRecord | None:
    return None if cache is None else cache.__dict__.get(ATTRIBUTE)


def ensure_record(cache) -> CacheRecord:
    """The cache's record, created (with its row-operation hooks) on first use."""
    record = record_of(cache)
    if record is None:
        record = cache.__dict__[ATTRIBUTE] = CacheRecord()
        for name in ROW_OPERATIONS:
            if callable(getattr(type(cache), name, None)):
                cache.__dict__[name] = FollowRows(cache, name)
    return record


def select_rows(positions: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(P, n) -> the rows ``rows`` picks; one shared row stays one row."""
    return positions if positions.shape[0] == 1 else positions[rows.to(positions.device)]


def repeat_rows(positions: torch.Tensor, repeats: int) -> torch.Tensor:
    return positions if positions.shape[0] == 1 else positions.repeat_interleave(repeats, dim=0)


# cache method -> what it does to the rows of the key positions
ROW_OPERATIONS = {
    "reorder_cache": lambda positions, beam_idx: select_rows(positions, beam_idx),
    "batch_select_indices": lambda positions, indices: select_rows(positions, indices),
    "batch_repeat_interleave": lambda positions, repeats: repeat_rows(positions, repeats),
    "reset": lambda positions: None,
}


class FollowRows:
    """Shadows one row operation of one cache instance: applies it to the record, then to the cache.
    ``copy.deepcopy(cache)`` copies this with it, pointing at the copy."""

    def __init__(self, cache, name: str):
        self.cache, self.name = cache, name

    def __call__(self, *args, **kwargs):
        record = record_of(self.cache)
        if record is not None and record.positions is not None:
            record.positions = ROW_OPERATIONS[self.name](record.positions, *args, **kwargs)
        return getattr(type(self.cache), self.name)(self.cache, *args, **kwargs)


def cache_argument(kwargs: dict):
    """The KV cache a forward was called with (by keyword, as generate() and the models' own code pass it)."""
    return next((kwargs[name] for name in CACHE_NAMES if kwargs.get(name) is not None), None)


def cache_output(output):
    """The KV cache a forward returned, if any (ModelOutput field; tuple outputs carry none we can mark). Only the
    field the output class declares is read: 5.24 keeps ``past_key_values`` as a property that logs a deprecation."""
    declared = getattr(type(output), "__dataclass_fields__", {})
    return next((getattr(output, name) for name in CACHE_NAMES if name in declared), None)


def past_length(cache):
    """The number of keys ``cache`` holds (a tensor for a static cache), 0 without one."""
    return 0 if cache is None or not hasattr(cache, "get_seq_length") else cache.get_seq_length()


def cached_positions(cache) -> torch.Tensor | SlotPositions | None:
    """(P, n) positions of the n keys ``cache`` holds; None without a cache. A cache cropped since (assisted
    decoding) keeps the first n; one we did not write gets key indices. A static cache (fixed slots, written in
    order) gets :class:`SlotPositions`: its (P, capacity) positions and the number written, as tensors, so that
    a compiled decode step reads no value and sees the same shapes every step."""
    if cache is None or not hasattr(cache, "get_seq_length"):
        return None
    record = record_of(cache)
    stored = None if record is None else record.positions
    capacity = _seams.static_capacity(cache)
    if capacity is not None:
        # a copy: the layers advance their own count in place during the forward
        held = torch.as_tensor(cache.get_seq_length()).clone()
        if stored is None or stored.shape[-1] != capacity:  # key indices for the held slots, 0 past them
            slots = torch.arange(capacity, device=held.device)
            stored = torch.where(slots < held, slots, 0)[None]
        return SlotPositions(stored, held)
    held = int(cache.get_seq_length())
    if stored is None or stored.shape[-1] < held:
        return torch.arange(held)[None]
    return stored[:, :held]


def remember_positions(cache, written: torch.Tensor | None) -> None:
    if cache is not None and written is not None and hasattr(cache, "get_seq_length"):
        ensure_record(cache).positions = written
