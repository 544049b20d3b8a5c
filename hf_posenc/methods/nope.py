"""NoPE: no position information at all. Causal models still see order through the mask; encoders see a bag
of tokens. A baseline that matters for extrapolation studies."""

from __future__ import annotations

from dataclasses import dataclass

from .base import MethodOptions, PositionMethod


@dataclass
class NopeOptions(MethodOptions):
    pass


class Nope(PositionMethod):
    name = "nope"
    Options = NopeOptions
