"""The run's report: the score tables (perplexity per corpus and length, passkey accuracy), the account of the
choice, and ``report.md``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .fitted import fit_text
from .plan import Plan
from .scores import LAST_TOKENS, NOT_RUN, SKIPPED, unscored_passkey
from .select import options_text
from .stages import finetune_summary


def cell(value: Any, metric: str) -> str:
    if isinstance(value, str):
        return value
    number = value.get(metric) if isinstance(value, dict) else value
    if not isinstance(number, (int, float)):
        return value.get("error", "?") if isinstance(value, dict) else "?"
    return f"{number:.2f}" if math.isfinite(number) else "inf"


def ppl_table(plan: Plan, rows: dict[str, dict], corpus: str, metric: str) -> str:
    head = "| model | " + " | ".join(str(n) for n in plan.lengths) + " |"
    lines = [head, "|---|" + "---:|" * len(plan.lengths)]
    for label, scores in rows.items():
        cells = [cell(scores["ppl"][corpus][str(n)], metric) for n in plan.lengths]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def passkey_table(plan: Plan, rows: dict[str, dict]) -> str:
    lengths = [str(n) for n in plan.lengths]
    lines = ["| model | " + " | ".join(lengths) + " |", "|---|" + "---:|" * len(lengths)]
    for label, scores in rows.items():
        key = scores["passkey"]
        # a gap is labelled by this plan (scores cached by an older version may say otherwise)
        cells = [f"{key[n]:.2f} ({key[n + '/n']})" if isinstance(key.get(n), float)
                 else SKIPPED if key.get(n) == SKIPPED else unscored_passkey(plan, int(n)) for n in lengths]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tables(plan: Plan, rows: dict[str, dict]) -> str:
    parts = []
    for corpus in plan.corpora:
        parts.append(f"Held-out {corpus}: perplexity of each window's last {LAST_TOKENS} tokens (all tokens below)\n\n"
                     + ppl_table(plan, rows, corpus, "last"))
    for corpus in plan.corpora:
        parts.append(f"Held-out {corpus}: perplexity of all tokens of each window\n\n"
                     + ppl_table(plan, rows, corpus, "ppl"))
    parts.append("Passkey accuracy (prompts per length in brackets)\n\n" + passkey_table(plan, rows))
    return "\n\n".join(parts)


def write_report(plan: Plan, rows: dict[str, dict], seconds: float) -> Path:
    train, recipe = plan.train, plan.recipe
    ft = finetune_summary(plan) if plan.finetune else {}
    mode = f"LoRA r={train.lora.r}" if train.lora is not None else "full fine-tune"
    extras = ", ".join(f"{k} {v}" for k, v in (("PoSE", train.pose), ("distill", train.distill)) if v is not None)
    wall = f"{ft['seconds']:.0f} s" if ft.get("seconds") else "?"
    text = "\n".join([
        f"# Retrofit: {train.model} -> {plan.choice['method']} {options_text(plan.choice['options'])} "
        f"({plan.choice['model']})",
        "",
        f"Recipe `{recipe.name}`: {recipe.evidence}.",
        "",
        (f"Fine-tune: {ft['steps']} steps ({ft['tokens']} training tokens, {wall}), {mode}, seq_len "
         f"{train.seq_len}, batch {train.batch_size} x {train.grad_accum}, lr {train.lr}, on "
         f"{train.data.text or train.data.files}{'; ' + extras if extras else ''}." if plan.finetune else
         f"Fine-tune: none ({recipe.skip_reason}); the candidates are chosen on "
         f"{train.data.text or train.data.files}."),
        f"Scored on held-out text the fine-tune never saw ({', '.join(plan.corpora)}): non-overlapping windows of "
        f"each length ({plan.eval_tokens} tokens per length, at least one window); passkey over depths "
        f"{plan.depths} x {plan.num_samples} prompts{retrieval_text(plan)}. `{SKIPPED}`: beyond the original's "
        "learned position table; "
        "cells equal to the original's inside its context are so by construction (same logits, tested).",
        "",
        *fit_text(plan),
        *selection_text(plan),
        tables(plan, rows),
        "",
        f"Wall time of this run: {seconds:.0f} s (stages found done were skipped); stages: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in plan.timings.items()) + ". Plot: plots/perplexity.png.",
        "",
    ])
    path = plan.out / "report.md"
    path.write_text(text)
    return path


def retrieval_text(plan: Plan) -> str:
    if not plan.retrieval_length:
        return ""
    return (f"; at {plan.retrieval_length} (past the original's context) the retrofit's only, over depths "
            f"{plan.retrieval_depths} x {plan.retrieval_samples} prompts (`{NOT_RUN}`: not run, a forward of that "
            "length per prompt)")


def selection_text(plan: Plan) -> list[str]:
    """The report's account of the choice: every candidate's perplexity on the training text, and the winner."""
    chosen_by = plan.choice.get("chosen_by")
    if not chosen_by:
        return []
    lines = [f"The retrofit is the {plan.choice['model']} model, {plan.choice['method']} with "
             f"{options_text(plan.choice['options'])}: the lowest perplexity of these candidates on the last "
             f"{chosen_by['tokens']} tokens of the fine-tune's training text (2x the trained context; the held-out "
             "texts below were never used to choose):", "",
             f"| candidate | method | options | perplexity | last {LAST_TOKENS} |", "|---|---|---|---:|---:|"]
    for c in chosen_by["candidates"]:
        lines.append(f"| {c['model']} | {c['method']} | {options_text(c['options'])} | {c['ppl']:.3f} | "
                     f"{c['last']:.3f} |")
    return [*lines, ""]
