"""The fit loop: generations of candidates scored within a budget of forward passes, every score appended to
``OUT/evaluations.jsonl`` (its first line the run's identity), the best factors in ``OUT/factors.json`` (convert's
keyword arguments) and a summary in ``OUT/fit.json``, both rewritten atomically after every generation.

Resumable: a rerun with the same identity replays the search from the file (a scored candidate is never scored
again; the budget counts every forward in the file), so a run stopped at any point and rerun ends where one
uninterrupted run with the same budget would. Several Accelerate processes split each generation: rank r scores
its candidates r, r + W, ...; the scores are gathered, and rank 0 writes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .._fs import write_text_atomic
from . import search
from .objective import Objective, candidate_model, evaluate

EVALUATIONS, FACTORS, SUMMARY = "evaluations.jsonl", "factors.json", "fit.json"
OBJECTIVE_VERSION = 1  # bumped when the score of a candidate would change: old files are then refused


@dataclass(frozen=True)
class FitSettings:
    model: str
    target_length: int
    data: str
    budget: int  # forward passes, over every run of this identity
    out: Path
    population: int = 8
    seed: int = 0
    windows: int = 1
    last_tokens: int = 1024
    passkey_samples: int = 1
    needle_weight: float = 1.0
    mutation: float = 0.2  # standard deviation of a mutation, in log-factor
    start_tokens: int = 0
    extra: dict = field(default_factory=dict)  # the model's facts and the calibration inputs' digest (filled in)

    def identity(self) -> dict:
        """Everything the scores depend on: not the budget, not where they go."""
        values = asdict(self)
        for name in ("budget", "out", "extra"):
            values.pop(name)
        return {**values, **self.extra, "objective_version": OBJECTIVE_VERSION}


class IdentityError(ValueError):
    """OUT holds another fit's evaluations."""


def read_history(path: Path, identity: dict) -> list[dict]:
    """The records of ``path`` (none if absent), refused when written for another identity; a last line cut short by
    a crash is dropped."""
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    header = json.loads(lines[0])["identity"] if lines else None
    if header != identity:
        differ = sorted(k for k in set(header or {}) | set(identity) if (header or {}).get(k) != identity.get(k))
        shown = ", ".join(f"{k}: {(header or {}).get(k)!r} there, {identity.get(k)!r} here" for k in differ)
        raise IdentityError(f"{path} was written by another fit ({shown}); choose another --out, or rerun with the "
                            "same settings to resume it")
    records = []
    for line in lines[1:]:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # only the last line can be cut short: appends are whole lines
            break
    return records


def append(path: Path, record: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()


def start_file(path: Path, identity: dict, records: list[dict]) -> None:
    """``path`` holds the header and exactly ``records`` (a cut last line removed), written atomically."""
    lines = [json.dumps({"identity": identity})] + [json.dumps(r) for r in records]
    write_text_atomic(path, "\n".join(lines) + "\n")


def digest(values) -> str:
    return hashlib.sha256(json.dumps(values).encode()).hexdigest()[:16]


def factor_options(factors: list[float], scale: float, trained: int, settings: FitSettings) -> dict:
    """convert(model, "rope", scaling="longrope", **these)."""
    options = {"factor": scale, "long_factor": factors, "short_factor": [1.0] * len(factors),
               "original_max_positions": trained}
    if settings.start_tokens:
        options["start_tokens"] = settings.start_tokens
    return options


@dataclass
class Search:
    """One fit's state: the history replayed or grown, the forwards spent, where it writes."""

    settings: FitSettings
    original: object  # the unconverted model
    objective: Objective
    scale: float
    trained: int
    start: dict[str, list[float]]  # the seeds by name
    records: list[dict]
    rank: int = 0
    world: int = 1
    evaluated: int = 0  # candidates scored by this run (not replayed)

    @property
    def spent(self) -> int:
        return sum(r["forwards"] for r in self.records)

    def scored_before(self, generation: int) -> list[tuple[list[float], float]]:
        """(factors, score) of the generations before ``generation``: all a generation's draws depend on (so a
        resumed run, which holds some of the current generation already, draws the same)."""
        return [(r["long_factor"], r["score"]) for r in self.records if r["generation"] < generation]

    def score(self, factors: list[float], done=None) -> dict:
        options = factor_options(factors, self.scale, self.trained, self.settings)
        self.evaluated += 1
        return evaluate(candidate_model(self.original, options), self.objective, done)


def run_search(state: Search, progress, gather) -> None:
    """Generations until the budget (in forwards) or the search runs out; appends every new score."""
    path = state.settings.out / EVALUATIONS
    replayed = {search.key(r["long_factor"]): r for r in state.records}
    names = {search.key(f): name for name, f in state.start.items()}
    cost = state.objective.forwards
    for index in range(10**6):
        drawn = search.generation(index, state.scored_before(index), list(state.start.values()),
                                  state.settings.population, state.scale, state.settings.mutation, state.settings.seed)
        affordable = (state.settings.budget - state.spent) // cost
        if not drawn or affordable <= 0:  # the search has nothing new, or the budget is spent
            return
        fresh = [f for f in drawn if search.key(f) not in replayed][:affordable]  # replayed: scored in the file
        for start in range(0, len(fresh), state.world):  # one candidate per rank, then every record is on disk
            batch = fresh[start : start + state.world]
            mine = ({start + state.rank: state.score(batch[state.rank], progress.update)}  # the bar: per forward
                    if state.rank < len(batch) else {})
            results = gather(mine)  # {index: result} from every rank
            for i, factors in enumerate(batch, start):
                record = {"generation": index, "long_factor": factors, **results[i]}
                if search.key(factors) in names:
                    record["seed"] = names[search.key(factors)]
                state.records.append(record)
                replayed[search.key(factors)] = record
                if state.rank == 0:
                    append(path, record)
                    if i not in mine:  # another process's candidate: its forwards at once
                        progress.update(cost)
        if state.rank == 0:
            write_results(state)


def best(records: list[dict]) -> dict:
    return min(records, key=lambda r: r["score"])  # the first of equals


def write_results(state: Search, seconds: float | None = None) -> None:
    top = best(state.records)
    options = factor_options(top["long_factor"], state.scale, state.trained, state.settings)
    write_text_atomic(state.settings.out / FACTORS, json.dumps(options, indent=1) + "\n")
    seeds = {r["seed"]: {k: r[k] for k in ("score", "last_ppl", "needle_nll", "passkey")}
             for r in state.records if "seed" in r}
    summary = {"identity": state.settings.identity(), "budget": state.settings.budget, "forwards": state.spent,
               "candidates": len(state.records), "best": {k: v for k, v in top.items() if k != "long_factor"},
               "seeds": seeds, "wall_seconds_this_run": seconds, "processes": state.world}
    write_text_atomic(state.settings.out / SUMMARY, json.dumps(summary, indent=1) + "\n")
