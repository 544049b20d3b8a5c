"""The ``hf-posenc retrofit`` command: the stages in order, their progress lines, the report and the export."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
import warnings
from pathlib import Path

from ..exporters import export
from .args import make_plan, parse_args
from .fitted import fit_candidate
from .models import load_original, load_retrofit
from .plan import Plan
from .plots import plot
from .report import tables, write_report
from .scores import score_model
from .select import candidates, choice_key, choice_text, options_text, retrofit_dir, select_model
from .stages import fetch_model, finetune, train_identity


def say(step: int, total: int, text: str) -> None:
    print(f"[{step}/{total}] {text}", flush=True)


@contextlib.contextmanager
def logs_to_file(out: Path):
    """transformers', accelerate's and python's warnings go to ``<out>/retrofit.log`` instead of between the stage
    lines; everything is put back on exit."""
    out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out / "retrofit.log")
    loggers = [logging.getLogger(name) for name in ("transformers", "accelerate", "peft", "py.warnings")]
    saved = [(logger.handlers[:], logger.propagate) for logger in loggers]
    for logger in loggers:
        logger.handlers[:] = [handler]
        logger.propagate = False
    logging.captureWarnings(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            yield
    finally:
        logging.captureWarnings(False)
        for logger, (handlers, propagate) in zip(loggers, saved):
            logger.handlers[:] = handlers
            logger.propagate = propagate
        handler.close()


def stage_count(plan: Plan) -> int:
    """fetch, [fine-tune], [fit], [choose], original, [training-free], retrofit, report."""
    recipe = plan.recipe
    chooses = len(candidates(recipe, plan.finetune)) > 1
    return 4 + plan.finetune + recipe.training_free + chooses + (plan.fit_budget > 0)


def run_stages(plan: Plan, started: float) -> dict[str, dict]:
    recipe = plan.recipe
    total, step = stage_count(plan), 2

    def timed(name, fn):
        t0 = time.perf_counter()
        result = fn()
        plan.timings[name] = time.perf_counter() - t0
        return result

    def stage(text):
        nonlocal step
        say(step, total, text)
        step += 1

    final = None
    if plan.finetune:
        stage(f"fine-tuning {recipe.method} {recipe.options or ''} for {plan.train.max_steps} steps at "
              f"{plan.train.seq_len} tokens (recipe {recipe.name})")
        final = timed("fine-tune", lambda: finetune(plan))
    else:
        print(f"      no fine-tune: {recipe.skip_reason}")
    if plan.fit_budget:
        stage(f"fitting LongRoPE factors for {plan.fit_target} tokens with {plan.fit_budget} forward passes")
        plan.fitted = timed("fit", lambda: fit_candidate(plan))
    if plan.selection_length:
        count = len(candidates(recipe, plan.finetune)) + len(plan.fitted)
        stage(f"choosing the retrofit among {count} candidates on "
              f"{plan.selection_length} tokens of the training text")
        plan.choice = timed("choose", lambda: select_model(plan, final))
    else:
        plan.choice = select_model(plan, final)  # the one candidate: the fine-tune
    retrofit_model = retrofit_dir(plan, final, plan.choice)
    rows: dict[str, dict] = {}
    lengths = ", ".join(map(str, plan.lengths))
    stage(f"scoring the original at {lengths} on {', '.join(plan.corpora)}")
    rows["original"] = timed("original", lambda: score_model(
        plan, "original", {"model": plan.train.model}, lambda: load_original(plan), shared=True))
    if recipe.training_free:
        label = f"{recipe.method} {options_text(recipe.options)}, training-free"
        stage(f"scoring {label}" + (" past the trained context (the original inside it)"
                                    if recipe.original_inside else ""))
        rows[label] = timed("training-free", lambda: score_model(
            plan, "training-free", {"model": plan.train.model, "method": recipe.method, "options": recipe.options},
            lambda: load_original(plan, (recipe.method, recipe.options)), shared=True,
            skip_inside=rows["original"] if recipe.original_inside else None))
    stage(f"scoring the retrofit ({recipe.name}: {choice_text(plan.choice)})")
    training_free = plan.choice["model"] == "training-free"
    trained = train_identity(plan.train) if plan.choice["model"] == "fine-tuned" else None
    # a training-free retrofit is the source model converted: its scores hold for any run (the source cache)
    source = {"model": plan.train.model} if training_free else {}
    rows[f"retrofit ({recipe.name}: {plan.choice['method']})"] = timed("retrofit", lambda: score_model(
        plan, "retrofit", {**source, "finetune": trained, **choice_key(plan.choice)},
        lambda: load_retrofit(retrofit_model), shared=training_free,
        skip_inside=rows["original"] if recipe.original_inside and training_free else None, retrieval=True))
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    started = time.perf_counter()
    try:
        plan = make_plan(args)
    except (ValueError, OSError) as err:
        print(f"hf-posenc retrofit: error: {err}", file=sys.stderr)
        return 2
    total = stage_count(plan)
    say(1, total, f"getting the model {plan.train.model}")
    try:
        location = fetch_model(plan)
    except (ValueError, OSError) as err:
        print(f"hf-posenc retrofit: error: {err}", file=sys.stderr)
        return 2
    print(f"      {location}; recipe {plan.recipe.name}: {plan.recipe.evidence}")
    try:
        with logs_to_file(plan.out):
            rows = run_stages(plan, started)
    except KeyboardInterrupt as stop:
        print(f"\ninterrupted: {stop or 're-run the same command to resume'}", file=sys.stderr)
        return 130
    say(total, total, "writing the plot and the report")
    plot(plan, rows)
    report = write_report(plan, rows, time.perf_counter() - started)
    print("\n" + tables(plan, rows) + f"\n\nreport: {report}")
    return export_retrofit(plan) if args.export else 0


def export_retrofit(plan: Plan) -> int:
    """``--export``: the fine-tuned model -> ``OUT/export`` (replaced by each run), see docs/export.md."""
    final = plan.finetune_dir if plan.finetune else None
    model, tokenizer, _ = load_retrofit(retrofit_dir(plan, final, plan.choice))
    try:
        out = export(model, plan.out / "export", tokenizer=tokenizer, overwrite=True)
    except ValueError as err:
        print(f"hf-posenc retrofit: the results above are kept, but the export failed: {err}", file=sys.stderr)
        return 2
    print(f"export: {out} (see its README.md)")
    return 0
