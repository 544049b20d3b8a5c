"""The command line, turned into a :class:`~.plan.Plan`: recipe, options, config keys, lengths and held-out texts
are validated before any work starts."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import transformers

from .. import sources
from ..cli import NAMED_ARGUMENTS, parse_options
from ..convert import trained_context
from ..registry import arch_for, method_class
from ..training import load_config
from .plan import Plan
from .recipes import QUICK, Recipe, family_recipe, method_recipe
from .scores import PASSKEY_MIN, RETRIEVAL_DEPTHS
from .select import candidates, training_text_tail
from .stages import stage_key, train_identity

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_TEXT = "shakespeare"
OTHER_DOMAIN = "django-docs"  # held-out text of another domain than the fine-tune's (hf_posenc.sources)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="hf-posenc retrofit",
        description="Swap a model's position method, fine-tune it briefly, and compare it with the original (and "
        "the best training-free conversion) on held-out perplexity and passkey retrieval inside and past the "
        f"original's context. With no arguments: an offline quick run on {DEFAULT_MODEL} with the recipe measured "
        "best for its family. Re-running resumes.",
    )
    parser.add_argument("--method", default=None,
                        help="position method (hf_posenc.available_methods()); default: the family's recipe")
    parser.add_argument("--model", default=None,
                        help=f"hub name, local path or named offline source (default {DEFAULT_MODEL})")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="a method option")
    parser.add_argument("--config", default=None, help="a recipes/configs YAML; flags below override it")
    parser.add_argument("--data", default=None,
                        help=f"training text: a named corpus ({DEFAULT_TEXT}), a file or a folder")
    parser.add_argument("--heldout", default=None,
                        help="held-out text file for evaluation (needed with a file --data; default: the corpus' split)")
    parser.add_argument("--other-heldout", default=None,
                        help=f"held-out text of another domain: a named corpus or a file (default {OTHER_DOMAIN} with "
                        "a named --data; 'none' to skip)")
    parser.add_argument("--steps", type=int, default=None, help="fine-tune steps")
    parser.add_argument("--seq-len", type=int, default=None, help="fine-tune length (tokens)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--full", action="store_true", help="full fine-tune even if --config asks for LoRA")
    parser.add_argument("--eval-lengths", default=None,
                        help="comma-separated evaluation lengths (default: 1/8, 1/2, 1 and 2 x the original's context)")
    parser.add_argument("--eval-tokens", type=int, default=None, help="held-out tokens scored per length")
    parser.add_argument("--passkey-samples", type=int, default=None, help="passkey prompts per length and depth")
    parser.add_argument("--retrieval-samples", type=int, default=1,
                        help="passkey prompts per depth (5 depths) at the longest length past the original's context, "
                        "for the retrofit only (a forward of that length per prompt; 0: none)")
    parser.add_argument("--out", default=None, help="output folder (default runs/retrofit-<model>-<recipe>)")
    parser.add_argument("--finetune", action="store_true",
                        help="fine-tune even where the family's recipe skips it (rotary models: the fine-tune lost to "
                        "the training-free conversions in every measured run; it then competes with them)")
    parser.add_argument("--fit-budget", type=int, default=0,
                        help="rotary recipe: also fit LongRoPE factors for the recipe's length (4x the trained "
                        "context) with this many forward passes (hf-posenc fit, docs/fit.md), and let them compete; "
                        "0 (default): off (on a CPU one forward at 16k+ takes minutes)")
    parser.add_argument("--export", action="store_true",
                        help="at the end, export the retrofit to OUT/export for plain transformers (native where exact, "
                        "else ONNX; docs/export.md)")
    return parser.parse_args(argv)


def method_options(texts: list[str]) -> dict[str, Any]:
    """``--option KEY=VALUE`` flags -> the method's options; a convert argument with a key of its own is refused."""
    options = parse_options(texts)
    for key in NAMED_ARGUMENTS:
        if key in options:
            raise ValueError(f"--option {key}=... is not a method option; set `{key}:` in the --config YAML instead")
    return options


def positive_lengths(text: str | None, default: list[int]) -> list[int]:
    if text is None:
        return default
    try:
        lengths = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--eval-lengths must be comma-separated positive integers, got {text!r}") from None
    if not lengths or min(lengths) < 1:
        raise ValueError(f"--eval-lengths must be comma-separated positive integers, got {text!r}")
    return sorted(set(lengths))


def default_lengths(trained: int) -> list[int]:
    """1/8, 1/2, 1 and 2 x the trained context: inside and past it (SmolLM2: 1k, 4k, 8k, 16k)."""
    return sorted({max(16, trained // 8), max(16, trained // 2), trained, 2 * trained})


def make_plan(args: argparse.Namespace, family_default: Callable[[Any], Recipe] | None = None) -> Plan:
    """Validate the recipe, options, config keys, lengths and held-out texts before any work starts (the model's
    own checks, and its disk need, are in :func:`fetch_model`). ``family_default``: the recipe without
    ``--method`` for an arch spec (default :func:`family_recipe`; studies pass variants of it)."""
    for name in ("steps", "seq_len", "batch_size", "eval_tokens", "passkey_samples"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    model = args.model or DEFAULT_MODEL
    quick = args.config is None
    options = method_options(args.option)
    if args.retrieval_samples < 0:
        raise ValueError("--retrieval-samples must be >= 0 (0: no passkey past the context), "
                         f"got {args.retrieval_samples}")
    if args.method is not None:
        method_class(args.method)  # an unknown method fails before the model is read
    positive_lengths(args.eval_lengths, [1])
    spec, trained = model_facts(model)
    recipe = method_recipe(args.method, options) if args.method else (family_default or family_recipe)(spec)
    if options and not args.method:
        recipe = replace(recipe, options={**recipe.options, **options}, training_free=False, original_inside=False)
    overrides: dict[str, Any] = {**QUICK, **recipe.train} if quick else {}
    if args.full:
        overrides["lora"] = None
    overrides.update({"model": model, "method": recipe.method, "method_options": recipe.options})
    data = args.data or (DEFAULT_TEXT if quick else None)
    if data is not None:
        overrides["data"] = {"text": data} if not Path(data).exists() else {"files": [data]}
    if args.heldout is not None:
        overrides["data.heldout_files"] = [args.heldout]
    for flag, key in (("steps", "max_steps"), ("seq_len", "seq_len"), ("batch_size", "batch_size"), ("lr", "lr")):
        if getattr(args, flag) is not None:
            overrides[key] = getattr(args, flag)
    pose = overrides.get("pose")
    if isinstance(pose, dict) and "factor" in pose:  # PoSE up to factor x the trained context
        overrides["pose"] = {"target_length": int(pose["factor"] * trained),
                             **{k: v for k, v in pose.items() if k != "factor"}}
    slug = "-".join(Path(str(model)).name.split())
    out = Path(args.out or f"runs/retrofit-{slug}-{recipe.name}")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is an existing file, not a folder; choose another --out")
    overrides["output_dir"] = str(out / "finetune")  # replaced by the keyed folder below
    train = load_config(args.config, [], overrides)
    train.output_dir = str(out / f"finetune-{recipe.name}-{stage_key(train_identity(train))}")
    lengths = positive_lengths(args.eval_lengths, default_lengths(trained))
    finetune = recipe.finetune or args.finetune or not recipe.training_free  # a recipe without a baseline trains
    fit_target = check_fit_budget(args.fit_budget, recipe, trained, train)
    passkey_lengths = [n for n in lengths if PASSKEY_MIN <= n <= max(PASSKEY_MIN, trained // 2)]
    past = [n for n in lengths if n > trained and n not in passkey_lengths]
    plan = Plan(
        out=out, recipe=recipe, train=train, trained_length=trained, lengths=lengths,
        fit_budget=args.fit_budget, fit_target=fit_target,
        corpora=corpora(train, args.other_heldout),
        eval_tokens=args.eval_tokens or max(lengths) // 2,
        passkey_lengths=passkey_lengths, depths=[0.25, 0.75], num_samples=args.passkey_samples or 2,
        retrieval_length=max(past) if past and args.retrieval_samples else 0,
        retrieval_depths=RETRIEVAL_DEPTHS, retrieval_samples=args.retrieval_samples,
        selection_length=2 * trained if len(candidates(recipe, finetune)) > 1 else 0, finetune=finetune,
    )
    check_text(plan)
    return plan


def check_fit_budget(budget: int, recipe: Recipe, trained: int, train) -> int:
    """The length LongRoPE factors are fitted for (0: no fit): the rotary recipe's factor x the trained context."""
    if budget < 0:
        raise ValueError(f"--fit-budget must be >= 0 (forward passes; 0: no fit), got {budget}")
    if budget == 0:
        return 0
    if recipe.method != "rope" or not recipe.training_free:
        raise ValueError("--fit-budget fits LongRoPE factors among the rotary recipe's training-free candidates: "
                         "run it without --method (and without --option) on a Llama-style model")
    if not (train.data.text or len(train.data.files or []) == 1):
        raise ValueError("--fit-budget fits on the training text of --data: give a named corpus or one file or "
                         "folder (not a `datasets` dataset)")
    return int(recipe.options["factor"] * trained)


def model_facts(model: str):
    """(arch spec, trained context) from the model's config alone (no weights are read)."""
    try:  # a named source is fetched here if needed (the first stage anyway): its config is only known then
        config = transformers.AutoConfig.from_pretrained(sources.resolve_model(model))
    except OSError as err:
        raise ValueError(f"cannot read the model config of {model!r}: {err}") from None
    return arch_for(config), trained_context(config)  # what convert takes as the old limit


def corpora(train, other: str | None) -> dict[str, Path]:
    """{name: held-out file}: the fine-tune corpus' held-out text, then the other-domain one."""
    if train.data.heldout_files:
        first = {Path(train.data.heldout_files[0]).stem: Path(train.data.heldout_files[0])}
    elif train.data.text:
        first = {train.data.text: sources.text_splits(train.data.text)["heldout"]}
    else:
        raise ValueError("retrofit needs held-out text: use a named corpus (--data shakespeare) or pass --heldout FILE")
    if other is None:
        other = OTHER_DOMAIN if train.data.text else "none"
    if other == "none":
        return first
    if Path(other).is_file():
        return {**first, Path(other).stem: Path(other)}
    return {**first, other: sources.text_splits(other)["heldout"]}


def check_text(plan: Plan) -> None:
    if plan.selection_length and len(training_text_tail(plan)) < plan.selection_length:
        raise ValueError(
            f"the training text has fewer than {plan.selection_length} characters, less than one window for choosing "
            "the retrofit (2x the trained context); give more training text"
        )
    for name, path in plan.corpora.items():
        text = path.read_text(errors="ignore")
        if len(text) < max(plan.lengths):  # a crude lower bound: every token is at least one character
            raise ValueError(
                f"held-out text {path} has {len(text)} characters, fewer than one {max(plan.lengths)}-token "
                "window; use a longer text or shorter --eval-lengths"
            )
