"""The evolutionary search over LongRoPE's long factors (Ding et al. 2024, §3.2), as plain functions of numbers.

A candidate is a list of n = rot_dim / 2 factors lambda_i (pair i turns at w_i / lambda_i), in [1, MAX_STRETCH x s]
for the scale s = target / trained length, non-decreasing over i (LongRoPE's constraint: a lower frequency is never
interpolated less than a higher one). Generation 0 is the seeds (position interpolation, NTK-aware, YaRN) and
mutations of them; every later generation is bred from the best candidates scored so far: mutations (Gaussian noise
on some log-factors) and crossovers (one cut), each projected back onto the constraints. The draws depend only on
the seed, the generation number and the scores before it, so a resumed search proposes the same candidates.
"""

from __future__ import annotations

import math
import random

MAX_STRETCH = 2.0  # factors up to 2s: LongRoPE2 finds critical dims stretched past s
DIGITS = 6  # factors are rounded to this many decimals: a candidate is the same after a JSON round trip
MUTATED_SHARE = 0.3  # the share of log-factors one mutation moves
TRIES = 50  # draws for one new candidate before a generation gives up on it (all near ones already scored)


def project(factors: list[float], scale: float) -> list[float]:
    """Clamp to [1, MAX_STRETCH x scale], then make non-decreasing (the running maximum), rounded."""
    top = MAX_STRETCH * scale
    out, floor = [], 1.0
    for value in factors:
        floor = max(floor, min(top, max(1.0, value)))
        out.append(round(floor, DIGITS))
    return out


def seeds(pairs: int, scale: float, yarn: list[float]) -> dict[str, list[float]]:
    """name -> factors: position interpolation (s everywhere), NTK-aware (theta' = theta s^(d/(d-2)): lambda_i =
    s^(2i/(d-2)) for d = 2 x pairs) and YaRN's (``yarn``: w_i / its frequency i, from transformers' yarn)."""
    ntk = [scale ** (i / (pairs - 1)) if pairs > 1 else scale for i in range(pairs)]
    return {"pi": project([scale] * pairs, scale), "ntk": project(ntk, scale), "yarn": project(yarn, scale)}


def mutate(factors: list[float], scale: float, sigma: float, rng: random.Random) -> list[float]:
    logs = [math.log(v) for v in factors]
    moved = [v + rng.gauss(0.0, sigma) if rng.random() < MUTATED_SHARE else v for v in logs]
    if moved == logs:  # move at least one
        i = rng.randrange(len(logs))
        moved[i] += rng.gauss(0.0, sigma)
    return project([math.exp(v) for v in moved], scale)


def crossover(a: list[float], b: list[float], scale: float, rng: random.Random) -> list[float]:
    cut = rng.randrange(1, len(a)) if len(a) > 1 else 0
    return project(a[:cut] + b[cut:], scale)


def key(factors: list[float]) -> tuple[float, ...]:
    return tuple(round(v, DIGITS) for v in factors)


def generation(index: int, scored: list[tuple[list[float], float]], start: list[list[float]], population: int,
               scale: float, sigma: float, seed: int) -> list[list[float]]:
    """Up to ``population`` new candidates (none already in ``scored``, no repeats) for generation ``index``:
    ``start`` (the seeds) and their mutations at 0, else children of the best half of ``scored`` (lowest score
    first; ties: the earlier). Fewer when the draws keep landing on scored candidates."""
    rng = random.Random(f"{seed}:{index}")
    seen = {key(f) for f, _ in scored}
    if index == 0:
        parents = start
        fresh = [f for f in _unique(start) if key(f) not in seen][:population]
    else:
        ranked = sorted(range(len(scored)), key=lambda i: (scored[i][1], i))
        parents = [scored[i][0] for i in ranked[: max(2, population // 2)]]
        fresh = []
    seen |= {key(f) for f in fresh}
    while len(fresh) < population:
        child = _draw_new(parents, seen, scale, sigma, rng)
        if child is None:
            break
        fresh.append(child)
        seen.add(key(child))
    return fresh


def _draw_new(parents, seen, scale, sigma, rng) -> list[float] | None:
    for _ in range(TRIES):
        if len(parents) > 1 and rng.random() < 0.5:
            a, b = rng.sample(range(len(parents)), 2)
            child = mutate(crossover(parents[a], parents[b], scale, rng), scale, sigma, rng)
        else:
            child = mutate(parents[rng.randrange(len(parents))], scale, sigma, rng)
        if key(child) not in seen:
            return child
    return None


def _unique(candidates: list[list[float]]) -> list[list[float]]:
    out, seen = [], set()
    for factors in candidates:
        if key(factors) not in seen:
            seen.add(key(factors))
            out.append(factors)
    return out
