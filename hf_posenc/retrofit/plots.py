"""The run's plots: perplexity and passkey accuracy against length, one series per model (and corpus)."""

from __future__ import annotations

from pathlib import Path

from ..integrations import plotting
from .plan import Plan


def plot(plan: Plan, rows: dict[str, dict]) -> list[Path]:
    series = {"perplexity": {}, "passkey": {}}
    for label, scores in rows.items():
        for corpus in plan.corpora:
            points = [(n, scores["ppl"][corpus][str(n)]["last"]) for n in plan.lengths
                      if isinstance(scores["ppl"][corpus][str(n)], dict) and "last" in scores["ppl"][corpus][str(n)]]
            series["perplexity"][f"{label} [{corpus}]"] = points
        series["passkey"][label] = [(n, scores["passkey"][str(n)]) for n in plan.lengths
                                    if isinstance(scores["passkey"].get(str(n)), float)]
    return plotting.plot(series, plan.out / "plots", {"trained": plan.trained_length})
