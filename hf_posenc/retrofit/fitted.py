"""The fitted LongRoPE candidate of the rotary recipe (``--fit-budget N``): ``hf-posenc fit`` on the training text
for the recipe's length, in ``OUT/fit-longrope-<key>`` (keyed by the fit's settings but not its budget, so a larger
budget continues the same search), its best factors a training-free candidate of the selection."""

from __future__ import annotations

import json

from ..fit import FACTORS, SUMMARY, FitSettings, fit
from .models import load_original
from .plan import Plan
from .stages import stage_key


def fit_candidate(plan: Plan) -> list[dict]:
    """Run (or resume) the fit; [the candidate "rope, scaling longrope, the fitted factors"]."""
    data = plan.train.data.text or plan.train.data.files[0]
    settings = FitSettings(plan.train.model, plan.fit_target, str(data), plan.fit_budget, plan.out)
    out = plan.out / f"fit-longrope-{stage_key(settings.identity())}"
    settings = FitSettings(**{**settings.__dict__, "out": out})
    model, tokenizer, _ = load_original(plan)
    fit(settings, model, tokenizer)
    summary = json.loads((out / SUMMARY).read_text())
    plan.fit_summary = {**summary, "folder": out.name}
    options = json.loads((out / FACTORS).read_text())
    return [{"model": "training-free", "method": "rope", "options": {"scaling": "longrope", **options}}]


def fit_text(plan: Plan) -> list[str]:
    """The report's account of the fit: target, budget, what was spent, wall time."""
    if not plan.fit_budget:
        return []
    done = plan.fit_summary
    wall = done.get("wall_seconds_this_run")
    return [f"LongRoPE factors fitted for {plan.fit_target} tokens on the training text (hf-posenc fit, "
            f"docs/fit.md): budget {plan.fit_budget} forward passes, {done.get('forwards')} spent over "
            f"{done.get('candidates')} candidates, {wall:.0f} s of wall time in this run "
            f"({done.get('folder')}/fit.json); the best factors compete as a training-free candidate.", ""]
