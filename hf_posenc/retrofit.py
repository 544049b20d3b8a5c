"""``hf-posenc retrofit``: convert, fine-tune briefly, and score the original, the best training-free conversion and
the retrofit inside and past the original's trained context, on the fine-tune corpus' held-out text and on a
held-out corpus of another domain (so that forgetting shows).

    hf-posenc retrofit                                   # offline default: SmolLM2-135M, the recipe for its family
    hf-posenc retrofit --method alibi                    # any method, same quick fine-tune
    hf-posenc retrofit --model gpt2 --method rope --steps 300 --seq-len 512 --eval-lengths 512,1024,2048,4096

Without ``--method`` the recipe measured best for the model's family runs (:data:`RECIPES`; the report says which
and the measurement behind it). Each stage leaves its result in the output folder, keyed by everything that
produced it, and is skipped when that result is there: the fetched model (source cache), the fine-tune
(``finetune-<recipe>-<key>``: checkpoints, then the final model) and each model's scores (``eval/<label>-<key>.json``;
those of the unconverted and the training-free models also in the source cache, as they do not depend on the run).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import logging
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_TEXT = "shakespeare"
OTHER_DOMAIN = "django-docs"  # held-out text of another domain than the fine-tune's (hf_posenc.sources)
LAST_TOKENS = 1024  # the "last" perplexity: each window's last 1024 targets
SKIPPED = "skipped"  # a length the original model cannot take (learned position table)
TOO_SHORT = "n/a"  # passkey below PASSKEY_MIN tokens: the instructions alone fill the prompt
PASSKEY_MIN = 256
NOT_RUN = "—"  # passkey past half the trained context: not scored in the quick run (a forward per prompt)

# the quick fine-tune every recipe starts from: full fine-tuning (on SmolLM2 -> ALiBi, 20 LoRA steps left held-out
# perplexity at 693, 30 full steps at 146; docs/extrapolation.md), short windows, few steps
QUICK = {
    "seq_len": 512, "batch_size": 2, "grad_accum": 1, "max_steps": 40, "lr": 5.0e-5, "warmup_steps": 4,
    "eval_every": 0, "save_every": 10, "keep_checkpoints": 1, "log_every": 5, "eval_tokens": 1024,
    "eval_multipliers": [1], "lora": None, "report_to": ["none"],
}


@dataclass(frozen=True)
class Recipe:
    """What a retrofit converts to and how it fine-tunes; ``evidence`` is the measurement that chose it."""

    name: str
    method: str
    options: dict
    train: dict  # TrainConfig overrides on top of QUICK; "pose.factor" is turned into pose.target_length
    evidence: str
    training_free: bool = False  # also score the converted model before the fine-tune (a training-free baseline)
    original_inside: bool = False  # the conversion equals the original up to the trained context (by construction)
    # method option -> values: with a training-free baseline, the retrofit is the best of {training-free,
    # fine-tuned} x these values on the fine-tune's own text at 2x the trained context (:func:`select_model`);
    # an option with one value is set on every candidate (chosen by other evidence), not chosen
    select: dict = field(default_factory=dict)


RECIPES: dict[str, Recipe] = {
    # a model with a native rotary (Llama-style): its own RoPE scaled by Dynamic YaRN (= the original inside the
    # trained context), PoSE positions up to 4x the trained context, distilled from the original
    "rotary": Recipe(
        name="dynamic-yarn-pose-distill", method="rope", options={"scaling": "dynamic_yarn", "factor": 4.0},
        train={"pose": {"factor": 4, "chunks": 2}, "distill": {"weight": 1.0, "temperature": 1.0, "lm_weight": 0.0}},
        evidence="docs/extrapolation.md section 2 (SmolLM2-135M, CPU): Dynamic YaRN x4 is the original up to 8k "
                 "and the best training-free scaling past it; PoSE + self-distillation keeps it near there; its "
                 "scale grown 1.5x faster past 8k (growth 1.5: 2.5 at 16k) finds the 16k passkey as often as "
                 "dynamic NTK (0.6 of 10 prompts; s = L / 8k: 0.2), at +2.6 % / +0.4 % 16k perplexity; YaRN's "
                 "attention temperature is fitted on the fine-tune text",
        training_free=True, original_inside=True, select={"mscale": [1.0, 0.5], "growth": [1.5]}),
    # a learned absolute table (GPT-2, BERT): ALiBi, fine-tuned on the LM loss and distilled from the original
    "learned": Recipe(
        name="alibi-distill", method="alibi", options={},
        train={"lr": 3.0e-4, "distill": {"weight": 1.0, "temperature": 1.0, "lm_weight": 1.0}},
        evidence="docs/extrapolation.md section 1 (GPT-2 pretrained here): ALiBi is the flattest retrofit from 1x "
                 "to 16x the trained length (148.9 / 146.5); self-distillation keeps the original's predictions"),
}


def family_recipe(spec) -> Recipe:
    """The default recipe for an arch spec: by where its native positions live."""
    return RECIPES["rotary" if spec.rotary is not None else "learned"]


def method_recipe(method: str, options: dict) -> Recipe:
    """``--method``: the quick fine-tune with the LM loss plus self-distillation, for any method."""
    return Recipe(name=method, method=method, options=options,
                  train={"distill": {"weight": 1.0, "temperature": 1.0, "lm_weight": 1.0}},
                  evidence="chosen with --method")


@dataclass
class Plan:
    """Everything the run will do, fixed before any work starts."""

    out: Path
    recipe: Recipe
    train: Any  # hf_posenc.training.TrainConfig
    trained_length: int  # the original's context (its position limit / trained RoPE context)
    lengths: list[int]
    corpora: dict[str, Path]  # name -> held-out text file
    eval_tokens: int
    passkey_lengths: list[int]
    depths: list[float]
    num_samples: int
    selection_length: int = 0  # tokens of the fine-tune text the selection scores each candidate on (0: none)
    model_location: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    choice: dict = field(default_factory=dict)  # what :func:`select_model` chose (set after the fine-tune)

    @property
    def finetune_dir(self) -> Path:
        return Path(self.train.output_dir)


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
    parser.add_argument("--out", default=None, help="output folder (default runs/retrofit-<model>-<recipe>)")
    parser.add_argument("--export", action="store_true",
                        help="at the end, export the retrofit to OUT/export for plain transformers (native where exact, "
                        "else ONNX; docs/export.md)")
    return parser.parse_args(argv)


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
    from .cli import _parse_option
    from .registry import method_class
    from .training import load_config

    for name in ("steps", "seq_len", "batch_size", "eval_tokens", "passkey_samples"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    model = args.model or DEFAULT_MODEL
    quick = args.config is None
    options = dict(_parse_option(o, argparse.ArgumentParser()) for o in args.option)
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
    overrides["output_dir"] = str(out / "finetune")  # replaced by the keyed folder below
    train = load_config(args.config, [], overrides)
    train.output_dir = str(out / f"finetune-{recipe.name}-{stage_key(train_identity(train))}")
    lengths = positive_lengths(args.eval_lengths, default_lengths(trained))
    plan = Plan(
        out=out, recipe=recipe, train=train, trained_length=trained, lengths=lengths,
        corpora=corpora(train, args.other_heldout),
        eval_tokens=args.eval_tokens or max(lengths) // 2,
        passkey_lengths=[n for n in lengths if PASSKEY_MIN <= n <= max(PASSKEY_MIN, trained // 2)],
        depths=[0.25, 0.75], num_samples=args.passkey_samples or 2,
        selection_length=2 * trained if len(candidates(recipe)) > 1 else 0,
    )
    check_text(plan)
    return plan


def model_facts(model: str):
    """(arch spec, trained context) from the model's config alone (no weights are read)."""
    import transformers

    from .registry import arch_for
    from .sources import resolve_model

    try:  # a named source is fetched here if needed (the first stage anyway): its config is only known then
        config = transformers.AutoConfig.from_pretrained(resolve_model(model))
    except OSError as err:
        raise ValueError(f"cannot read the model config of {model!r}: {err}") from None
    spec = arch_for(config)
    rope = getattr(config, "rope_parameters", None) or {}
    trained = rope.get("original_max_position_embeddings") or config.max_position_embeddings
    return spec, int(trained)


def corpora(train, other: str | None) -> dict[str, Path]:
    """{name: held-out file}: the fine-tune corpus' held-out text, then the other-domain one."""
    from . import sources

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


def train_identity(train) -> dict:
    """What the fine-tuned model depends on: the config without where it goes and how often it reports."""
    values = train.to_dict()
    for key in ("output_dir", "resume_from", "log_every", "save_every", "keep_checkpoints", "report_to",
                "eval_every", "rank_report"):
        values.pop(key, None)
    return values


def stage_key(identity: Any) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:12]


def fetch_model(plan: Plan, margin: float | None = None) -> str:
    """Materialise a named source (cached), check the model's config and that the disk has ``margin`` x the
    model's size free for checkpoints and the final model (default 3 with LoRA; 8 for a full fine-tune, whose
    checkpoints hold the weights and AdamW's two moments, two of them while the newest is written). Returns the
    model's location."""
    import shutil

    margin = margin if margin is not None else (3.0 if plan.train.lora is not None else 8.0)
    from .sources import resolve_model
    from .training.model import inspect_model

    location = Path(resolve_model(plan.train.model))
    if inspect_model(plan.train).objective != "causal":  # also: loadable, supported family, LoRA targets exist
        raise ValueError(
            "retrofit scores causal language models (perplexity, passkey); for BERT use "
            "`hf-posenc finetune --config recipes/configs/bert_alibi_mlm.yaml`"
        )
    size = sum(f.stat().st_size for f in location.glob("*.safetensors")) if location.is_dir() else 0
    plan.out.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(plan.out).free
    if size and free < margin * size:
        raise ValueError(
            f"not enough disk: {free / 2**30:.1f} GiB free under {plan.out}, the fine-tune needs about "
            f"{margin * size / 2**30:.1f} GiB (checkpoints + final model); free space or pass --out elsewhere"
        )
    plan.model_location = str(location)
    return str(location)


# ---- stages ------------------------------------------------------------------------------------------------
def say(step: int, total: int, text: str) -> None:
    print(f"[{step}/{total}] {text}", flush=True)


def finetune(plan: Plan) -> Path:
    """Run (or resume, or skip) the fine-tune; returns the final model directory."""
    from .training import list_checkpoints, train

    out = plan.finetune_dir
    if (out / "config.json").is_file() and _finished(out):
        print(f"      found the fine-tuned model in {out}; skipping")
        return out
    checkpoints = list_checkpoints(out)
    if checkpoints:
        plan.train.resume_from = str(checkpoints[-1])
        print(f"      resuming from {checkpoints[-1]}")
    result = train(plan.train)
    if result.interrupted:
        raise KeyboardInterrupt(f"fine-tune stopped at step {result.step}; re-run the same command to resume")
    return out


def _finished(out: Path) -> bool:
    from .training import METRICS_FILE, read_metrics

    return (out / METRICS_FILE).is_file() and any(row.get("final") for row in read_metrics(out))


def finetune_summary(plan: Plan) -> dict:
    """Training tokens and wall time of the fine-tune, from its metrics (summed over resumed sessions)."""
    from .training import read_metrics

    per_step = plan.train.batch_size * plan.train.grad_accum * plan.train.seq_len
    steps, seconds = 0, 0.0
    for row in read_metrics(plan.finetune_dir):  # step lines: tokens/s over the steps since the previous line
        if row.get("tokens_per_s") and row.get("step", 0) > steps:
            seconds += (row["step"] - steps) * per_step / row["tokens_per_s"]
            steps = row["step"]
    return {"steps": steps, "tokens": steps * per_step, "seconds": seconds or None}


def eval_settings(plan: Plan) -> dict:
    return {"lengths": plan.lengths, "eval_tokens": plan.eval_tokens, "last_tokens": LAST_TOKENS,
            "corpora": {name: file_digest(path) for name, path in plan.corpora.items()},
            "passkey": [plan.passkey_lengths, plan.depths, plan.num_samples]}


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def score_model(plan: Plan, label: str, identity: Any, load: Callable, shared: bool,
                skip_inside: dict | None = None) -> dict:
    """{"ppl": {corpus: {length: scores | SKIPPED}}, "passkey": {...}} for one model, cached by :func:`cached`.
    ``skip_inside``: scores to reuse at lengths <= the trained context (a conversion that equals the original
    there)."""

    def compute():
        model, tokenizer, limit = load()
        return compute_scores(plan, model, tokenizer, limit, skip_inside)

    return cached(plan, label, {"model": identity, "settings": eval_settings(plan)}, compute, shared)


def cached(plan: Plan, label: str, identity: Any, compute: Callable[[], Any], shared: bool) -> Any:
    """``compute()``, cached under everything that produced it: ``eval/<label>-<key>.json`` (and the source cache
    when ``shared``: the same model and settings give the same scores in any run)."""
    from . import __version__ as version
    from .sources import cache_root

    key = stage_key({**identity, "hf_posenc": version})
    places = [plan.out / "eval" / f"{label}-{key}.json"]
    if shared:
        places.append(cache_root() / "scores" / f"{key}.json")
    with held_lock(places[-1]):  # two runs scoring the same model wait for each other instead of both working
        for place in places:
            if place.is_file():
                print(f"      found {place}; skipping")
                scores = json.loads(place.read_text())["scores"]
                if place != places[0]:  # found in the source cache: this run's folder gets its copy
                    write_json(places[0], {"label": label, "identity": identity, "scores": scores})
                return scores
        scores = compute()
        for place in places:
            write_json(place, {"label": label, "identity": identity, "scores": scores})
    return scores


@contextlib.contextmanager
def held_lock(path: Path):
    """An exclusive lock on ``<path>.lock`` (POSIX ``flock``; released when the process ends, however it ends)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def compute_scores(plan: Plan, model, tokenizer, limit: int | None, skip_inside: dict | None) -> dict:
    import torch
    from tqdm.auto import tqdm

    from .integrations.long_context import passkey_accuracy, passkey_docs, window_scores

    usable = [n for n in plan.lengths if limit is None or n <= limit]
    todo = [(name, n) for name in plan.corpora for n in usable
            if not (skip_inside and n <= plan.trained_length)]
    docs = passkey_docs(tokenizer, [n for n in plan.passkey_lengths if n in usable], plan.depths, plan.num_samples)
    ppl: dict[str, dict[str, Any]] = {name: {} for name in plan.corpora}
    windows = lambda n: max(1, max(n, plan.eval_tokens) // n)  # noqa: E731  (fewer if the text is short)
    with tqdm(total=sum(n * windows(n) for _, n in todo) + sum(len(d["ids"]) for d in docs), unit="tok", unit_scale=True,
              desc="      scoring", leave=False) as bar:
        for name, path in plan.corpora.items():
            heldout = torch.tensor(tokenizer(path.read_text())["input_ids"])
            for n in plan.lengths:
                if n not in usable:
                    ppl[name][str(n)] = SKIPPED
                elif (name, n) not in todo:
                    ppl[name][str(n)] = {**skip_inside["ppl"][name][str(n)], "same_as": "original"}
                else:
                    ppl[name][str(n)] = window_scores(model, heldout, n, max(n, plan.eval_tokens), LAST_TOKENS)
                    bar.update(n * windows(n))
        passkey = passkey_accuracy(model, docs) if docs else {}
        bar.update(sum(len(d["ids"]) for d in docs))
    for n in plan.lengths:
        if str(n) not in passkey:
            passkey[str(n)] = SKIPPED if n not in usable else unscored_passkey(plan, n)
    return {"ppl": ppl, "passkey": passkey}


def unscored_passkey(plan: Plan, n: int) -> str:
    """Why a usable length has no passkey score: no prompt fits (the instructions fill it), or not run."""
    return TOO_SHORT if n < PASSKEY_MIN or n in plan.passkey_lengths else NOT_RUN


def write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


def load_original(plan: Plan, convert: tuple[str, dict] | None = None):
    import torch
    import transformers

    import hf_posenc

    from .registry import arch_for

    model = transformers.AutoModelForCausalLM.from_pretrained(plan.model_location, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(plan.train.tokenizer or plan.model_location)
    limit = arch_for(model.config).table_limit(model.config)  # a learned table raises past its end
    if convert is not None:
        hf_posenc.convert(model, convert[0], **convert[1])
        limit = None
    return model, tokenizer, limit


# ---- choosing the retrofit --------------------------------------------------------------------------------
def candidates(recipe: Recipe) -> list[dict]:
    """The models :func:`select_model` compares, simplest first: {"model": "training-free" | "fine-tuned",
    "options": method options}. One (the fine-tuned model) for recipes without a training-free baseline."""
    grid = [dict(zip(recipe.select, values)) for values in itertools.product(*recipe.select.values())] or [{}]
    kinds = ["training-free", "fine-tuned"] if recipe.training_free else ["fine-tuned"]
    return [{"model": kind, "options": {**recipe.options, **values}} for kind in kinds for values in grid]


def training_text_tail(plan: Plan) -> str:
    """The end of the fine-tune's training text, enough characters for one selection window (>= 1 per token)."""
    from .training.data import read_texts

    documents, _, _ = read_texts(plan.train.data)
    return "\n\n".join(documents)[-8 * plan.selection_length:]


def selection_window(plan: Plan, tokenizer):
    """(L,) the last L = ``plan.selection_length`` tokens of the fine-tune's training text: what the selection
    scores (the held-out texts stay unseen by every choice)."""
    import torch

    ids = tokenizer(training_text_tail(plan))["input_ids"][-plan.selection_length:]
    if len(ids) < plan.selection_length:
        raise ValueError(f"the training text's end has {len(ids)} tokens, fewer than {plan.selection_length}")
    return torch.tensor(ids)


def load_candidate(plan: Plan, final: Path, candidate: dict):
    """The candidate's model (fp32, eval); its tokenizer is the fine-tune's."""
    import torch

    from .training import load_finetuned

    if candidate["model"] == "training-free":
        return load_original(plan, (plan.recipe.method, candidate["options"]))[0]
    return load_finetuned(final, dtype=torch.float32, posenc_options=candidate["options"]).eval()


def select_model(plan: Plan, final: Path) -> dict:
    """The retrofit: the candidate with the lowest perplexity on one window of the training text at 2x the trained
    context (ties: the simpler, listed first). Every candidate's score goes to ``selection.json``."""
    import transformers

    from .integrations.long_context import window_scores

    options = candidates(plan.recipe)
    if len(options) == 1:
        return {**options[0], "chosen_by": None}
    tokenizer = transformers.AutoTokenizer.from_pretrained(final)
    window = selection_window(plan, tokenizer)
    digest = hashlib.sha256(window.numpy().tobytes()).hexdigest()[:16]
    scored = []
    for candidate in options:
        identity = {"candidate": candidate, "window": digest, "model": plan.train.model}
        if candidate["model"] == "fine-tuned":
            identity["finetune"] = train_identity(plan.train)
        label = f"select-{candidate['model']}"

        def compute(candidate=candidate):
            import torch

            model = load_candidate(plan, final, candidate)
            with torch.no_grad():
                return window_scores(model, window, len(window), len(window), LAST_TOKENS)

        scores = cached(plan, label, identity, compute, shared=candidate["model"] == "training-free")
        print(f"      {candidate['model']} {options_text(candidate['options'])}: perplexity {scores['ppl']:.3f}")
        scored.append({**candidate, **scores})
    best = min(scored, key=lambda c: c["ppl"])  # min keeps the first of equals
    choice = {"model": best["model"], "options": best["options"],
              "chosen_by": {"tokens": len(window), "text": "the end of the training text", "candidates": scored}}
    write_json(plan.out / "selection.json", choice)
    return choice


def retrofit_dir(plan: Plan, final: Path, choice: dict) -> Path:
    """The retrofit as a model folder: the fine-tune's own when it was chosen as trained, else ``OUT/retrofit``
    (the chosen model saved whole, written aside and renamed)."""
    import transformers
    from peft import PeftModel

    from ._fs import replaced_dir

    if choice["model"] == "fine-tuned" and same_options(plan.recipe.method, choice["options"], plan.recipe.options):
        return final
    out = plan.out / "retrofit"
    marker = out / "choice.json"
    if marker.is_file() and json.loads(marker.read_text()) == {**choice, "finetune": str(final)}:
        return out
    model = load_candidate(plan, final, choice)
    if isinstance(model, PeftModel):  # an unmerged LoRA fine-tune: the folder holds the merged weights
        model = model.merge_and_unload()
    tokenizer = transformers.AutoTokenizer.from_pretrained(final)
    with replaced_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "choice.json").write_text(json.dumps({**choice, "finetune": str(final)}, default=str))
    return out


def same_options(method: str, a: dict, b: dict) -> bool:
    """Whether two option dicts configure the method alike (an option left out = its default)."""
    from .registry import method_class

    options = method_class(method).Options
    return options.from_dict(method, a).to_dict() == options.from_dict(method, b).to_dict()


def load_retrofit(final: Path):
    import torch
    import transformers

    from .training import load_finetuned

    model = load_finetuned(final, dtype=torch.float32).eval()
    return model, transformers.AutoTokenizer.from_pretrained(final), None


# ---- report ------------------------------------------------------------------------------------------------
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
    train, recipe, ft = plan.train, plan.recipe, finetune_summary(plan)
    mode = f"LoRA r={train.lora.r}" if train.lora is not None else "full fine-tune"
    extras = ", ".join(f"{k} {v}" for k, v in (("PoSE", train.pose), ("distill", train.distill)) if v is not None)
    wall = f"{ft['seconds']:.0f} s" if ft["seconds"] else "?"
    text = "\n".join([
        f"# Retrofit: {train.model} -> {recipe.method} {recipe.options or ''}",
        "",
        f"Recipe `{recipe.name}`: {recipe.evidence}.",
        "",
        f"Fine-tune: {ft['steps']} steps ({ft['tokens']} training tokens, {wall}), {mode}, seq_len "
        f"{train.seq_len}, batch {train.batch_size} x {train.grad_accum}, lr {train.lr}, on "
        f"{train.data.text or train.data.files}{'; ' + extras if extras else ''}.",
        f"Scored on held-out text the fine-tune never saw ({', '.join(plan.corpora)}): non-overlapping windows of "
        f"each length ({plan.eval_tokens} tokens per length, at least one window); passkey over depths "
        f"{plan.depths} x {plan.num_samples} prompts. `{SKIPPED}`: beyond the original's learned position table; "
        "cells equal to the original's inside its context are so by construction (same logits, tested).",
        "",
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


def selection_text(plan: Plan) -> list[str]:
    """The report's account of the choice: every candidate's perplexity on the training text, and the winner."""
    chosen_by = plan.choice.get("chosen_by")
    if not chosen_by:
        return []
    lines = [f"The retrofit is the {plan.choice['model']} model with {options_text(plan.choice['options'])}: the "
             f"lowest perplexity of these candidates on the last {chosen_by['tokens']} tokens of the fine-tune's "
             "training text (2x the trained context; the held-out texts below were never used to choose):", "",
             f"| candidate | options | perplexity | last {LAST_TOKENS} |", "|---|---|---:|---:|"]
    for c in chosen_by["candidates"]:
        lines.append(f"| {c['model']} | {options_text(c['options'])} | {c['ppl']:.3f} | {c['last']:.3f} |")
    return [*lines, ""]


def plot(plan: Plan, rows: dict[str, dict]) -> list[Path]:
    from .integrations import plotting

    series = {"perplexity": {}, "passkey": {}}
    for label, scores in rows.items():
        for corpus in plan.corpora:
            points = [(n, scores["ppl"][corpus][str(n)]["last"]) for n in plan.lengths
                      if isinstance(scores["ppl"][corpus][str(n)], dict) and "last" in scores["ppl"][corpus][str(n)]]
            series["perplexity"][f"{label} [{corpus}]"] = points
        series["passkey"][label] = [(n, scores["passkey"][str(n)]) for n in plan.lengths
                                    if isinstance(scores["passkey"].get(str(n)), float)]
    return plotting.plot(series, plan.out / "plots", {"trained": plan.trained_length})


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


def stage_count(recipe: Recipe) -> int:
    """fetch, fine-tune, [choose], original, [training-free], retrofit, report."""
    return 5 + recipe.training_free + (len(candidates(recipe)) > 1)


def run_stages(plan: Plan, started: float) -> dict[str, dict]:
    recipe = plan.recipe
    total, step = stage_count(recipe), 2

    def timed(name, fn):
        t0 = time.perf_counter()
        result = fn()
        plan.timings[name] = time.perf_counter() - t0
        return result

    def stage(text):
        nonlocal step
        say(step, total, text)
        step += 1

    stage(f"fine-tuning {recipe.method} {recipe.options or ''} for {plan.train.max_steps} steps at "
          f"{plan.train.seq_len} tokens (recipe {recipe.name})")
    final = timed("fine-tune", lambda: finetune(plan))
    if plan.selection_length:
        stage(f"choosing the retrofit among {len(candidates(recipe))} candidates on {plan.selection_length} tokens of "
              "the training text")
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
    inside_is_original = recipe.original_inside and plan.choice["model"] == "training-free"
    rows[f"retrofit ({recipe.name})"] = timed("retrofit", lambda: score_model(
        plan, "retrofit", {"finetune": train_identity(plan.train), **choice_key(plan.choice)},
        lambda: load_retrofit(retrofit_model), shared=False,
        skip_inside=rows["original"] if inside_is_original else None))
    return rows


def choice_key(choice: dict) -> dict:
    """What the retrofit model is (not how it was chosen); a recipe without a choice keeps its scores' old key."""
    return {} if choice["chosen_by"] is None else {"choice": {"model": choice["model"], "options": choice["options"]}}


def choice_text(choice: dict) -> str:
    return f"the {choice['model']} model, {options_text(choice['options'])}"


def options_text(options: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in options.items())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    started = time.perf_counter()
    try:
        plan = make_plan(args)
    except (ValueError, OSError) as err:
        print(f"hf-posenc retrofit: error: {err}", file=sys.stderr)
        return 2
    total = stage_count(plan.recipe)
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
    from .exporters import export

    model, tokenizer, _ = load_retrofit(retrofit_dir(plan, plan.finetune_dir, plan.choice))
    try:
        out = export(model, plan.out / "export", tokenizer=tokenizer, overwrite=True)
    except ValueError as err:
        print(f"hf-posenc retrofit: the results above are kept, but the export failed: {err}", file=sys.stderr)
        return 2
    print(f"export: {out} (see its README.md)")
    return 0
