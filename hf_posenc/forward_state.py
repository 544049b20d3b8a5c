"""The state of one forward of a converted model, passed along with that call.

The base model's pre-hook (:mod:`hf_posenc.hooks`) builds one :class:`ForwardState` per forward and hands it to
every attention call of that forward as the keyword argument ``posenc_state`` (transformers threads the base
model's keyword arguments through every layer to the attention function). Nothing of a call is kept on the method
module or the model, so threads and re-entrant calls never see each other's positions; methods are parameters and
pure functions.

Positions (P = 1 or B rows; see :mod:`hf_posenc.methods.base`):

- query positions: the ``position_ids`` the attention call receives (the model's own, derived or given), less the
  family's table offset; where none arrive, the indices after the cached keys;
- key positions: the positions the cached keys were written with (the cache's record, :mod:`hf_posenc.positions`),
  followed by the query positions.
"""

from __future__ import annotations

import torch

from .methods.base import Memo, SlotPositions, join_positions, key_positions, shared_rows

STATE_KWARG = "posenc_state"  # the attention keyword that carries the state


class ForwardState:
    """One forward's method, positions, memo and key-cache bookkeeping.

    ``past``: (P, n) positions of the keys the cache held before this forward, a static cache's
    :class:`SlotPositions`, or None (no cache). ``offset``: subtracted from the attention call's ``position_ids``
    (RoBERTa's table rows start at padding_idx + 1). ``prerotated``: layers whose new keys the cache stored rotated
    in this forward (:mod:`hf_posenc.key_cache`); their attention call rotates only the queries.
    ``queries``: (P, Lq) position ids of this forward, once an attention call (or the model's input) gave them."""

    __slots__ = ("method", "past", "offset", "memo", "prerotated", "queries")

    def __init__(self, method, past=None, offset: int = 0, share: bool = True, queries: torch.Tensor | None = None):
        self.method = method  # the model's method module (parameters only), as found at the start of the forward
        self.past = past
        self.offset = offset
        self.memo = Memo(share)
        self.prerotated: set[int] = set()
        self.queries = queries

    def query_positions(self, position_ids: torch.Tensor | None) -> torch.Tensor | None:
        """Record the (B|1, Lq) ``position_ids`` an attention call received (offset removed) and return them."""
        if position_ids is not None:
            self.queries = position_ids - self.offset if self.offset else position_ids
        return self.queries

    def positions(self, q_len: int, k_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(q_pos (P, Lq), k_pos (P, Lk)) long for one attention call (see the module doc)."""
        return self.memo.get(("positions", q_len, k_len, device),
                             lambda: key_positions(self.queries, self.past, q_len, k_len, device))

    def plain_positions(self, q_len: int, k_len: int, device) -> bool:
        """True when q_pos / k_pos are one row of consecutive integers with the queries the last Lq keys: what the
        query-block and flex kernels assume. False under ``torch.export`` / compile (values are not read there)."""
        if torch.compiler.is_exporting():
            return False

        def build():
            q_pos, k_pos = self.positions(q_len, k_len, device)
            if torch.compiler.is_compiling() or k_pos.shape[0] != 1:
                return False
            steps = torch.arange(k_len, device=device) + k_pos[0, 0]
            return bool(torch.equal(k_pos[0], steps)) and bool(torch.equal(q_pos[0], steps[k_len - q_len:]))

        return self.memo.get(("plain_positions", q_len, k_len, device), build)

    def new_key_positions(self, n_new: int, device) -> torch.Tensor:
        """(P, n_new) positions of the keys this forward writes: its position ids, else the indices after the
        cached keys."""
        if self.queries is not None and self.queries.shape[-1] == n_new:
            return shared_rows(self.queries.to(device).long())
        past = self.past
        start = 0 if past is None else past.length if isinstance(past, SlotPositions) else past.shape[-1]
        return (torch.arange(n_new, device=device) + start)[None]

    def written_positions(self) -> torch.Tensor | None:
        """(P, n + Lq): positions of every real key the cache holds after this forward (None: no attention call
        reported positions). A static cache's (P, C) keep every row the queries have: a compiled decode step cannot
        share rows (that reads values), so a prefill that shared them would change the shape at the first step."""
        if self.queries is None:
            return None
        queries = self.queries.long()
        return join_positions(self.past, queries if isinstance(self.past, SlotPositions) else shared_rows(queries))


def state_of(kwargs: dict) -> ForwardState:
    """The state an attention call carries (removed from ``kwargs``); refuses a call that carries none."""
    state = kwargs.pop(STATE_KWARG, None)
    if state is None:
        raise RuntimeError(
            "this attention call carries no hf_posenc forward state: the converted model's attention was called "
            "outside the model's own forward (or the family does not pass its keyword arguments through to "
            "attention). Call the model itself; see docs/methods.md, 'How a method is wired'"
        )
    return state
