"""``hf-posenc retrofit``: convert, fine-tune, evaluate original vs retrofit at long lengths, plot, report.

    hf-posenc retrofit --method alibi                       # quick offline default (SmolLM2-135M, ~10 min on CPU)
    hf-posenc retrofit --model gpt2 --method rope --steps 300 --seq-len 512 --eval-lengths 512,1024,2048,4096

Each stage leaves its result in the output folder and is skipped when that result is already there, so an
interrupted run picks up where it stopped: the fetched model (source cache), the fine-tune (its checkpoints,
then the final model), and each model's evaluation (``eval/<label>.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_TEXT = "shakespeare"
# the quick preset: a brief full fine-tune at 256 tokens, scored at 1x / 2x / 4x that. Full, not LoRA: on
# SmolLM2 -> ALiBi, 20 LoRA steps (r 16, 2 x 256 tokens) left held-out perplexity at 693 (256 tokens); 30 full
# steps of 4 x 256 tokens at lr 3e-4 reached 139 (1e-3: 157). docs/extrapolation.md has the measurements.
QUICK = {
    "seq_len": 256, "batch_size": 4, "grad_accum": 1, "max_steps": 30, "lr": 3.0e-4, "warmup_steps": 5,
    "eval_every": 0, "save_every": 10, "keep_checkpoints": 1, "log_every": 5, "eval_tokens": 1024,
    "eval_multipliers": [1], "lora": None,
}
QUICK_EVAL = {"lengths": [256, 512, 1024], "num_tokens": 2048, "depths": [0.5], "num_samples": 2}
SKIPPED = "skipped"  # a length the original model cannot take (learned position table)
TOO_SHORT = "n/a"  # passkey below PASSKEY_MIN tokens: the instructions alone fill the prompt
PASSKEY_MIN = 256


@dataclass
class Plan:
    """Everything the run will do, fixed before any work starts."""

    out: Path
    train: Any  # hf_posenc.training.TrainConfig
    lengths: list[int]
    num_tokens: int
    depths: list[float]
    num_samples: int
    heldout: Path
    steps: list[str] = field(default_factory=list)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="hf-posenc retrofit",
        description="Swap a model's position method, fine-tune it briefly, and compare it with the original on "
        "held-out perplexity and passkey retrieval at several lengths. With only --method it runs an offline "
        f"quick preset on {DEFAULT_MODEL} (about 10 minutes on 2 CPU cores). Re-running resumes.",
    )
    parser.add_argument("--method", required=True, help="position method (hf_posenc.available_methods())")
    parser.add_argument("--model", default=None,
                        help=f"hub name, local path or named offline source (default {DEFAULT_MODEL})")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="a method option")
    parser.add_argument("--config", default=None, help="a recipes/configs YAML; flags below override it")
    parser.add_argument("--data", default=None,
                        help=f"training text: a named corpus ({DEFAULT_TEXT}), a file or a folder")
    parser.add_argument("--heldout", default=None,
                        help="held-out text file for evaluation (needed with a file --data; default: the corpus' split)")
    parser.add_argument("--steps", type=int, default=None, help="fine-tune steps")
    parser.add_argument("--seq-len", type=int, default=None, help="fine-tune length (tokens)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--full", action="store_true",
                        help="full fine-tune even if --config asks for LoRA (the quick preset is full already)")
    parser.add_argument("--eval-lengths", default=None,
                        help="comma-separated evaluation lengths (default: 1x, 2x, 4x the fine-tune length)")
    parser.add_argument("--eval-tokens", type=int, default=None, help="held-out tokens scored per length")
    parser.add_argument("--passkey-samples", type=int, default=None, help="passkey prompts per length and depth")
    parser.add_argument("--out", default=None, help="output folder (default runs/retrofit-<model>-<method>)")
    return parser.parse_args(argv)


def positive_lengths(text: str | None, seq_len: int) -> list[int]:
    if text is None:
        return [seq_len, 2 * seq_len, 4 * seq_len]
    try:
        lengths = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--eval-lengths must be comma-separated positive integers, got {text!r}") from None
    if not lengths or min(lengths) < 1:
        raise ValueError(f"--eval-lengths must be comma-separated positive integers, got {text!r}")
    return sorted(set(lengths))


def make_plan(args: argparse.Namespace) -> Plan:
    """Validate the method, options, config keys, lengths and held-out text before any work starts (the model
    itself is checked, and its disk need, by :func:`fetch_model`)."""
    from .cli import _parse_option
    from .training import load_config

    for name in ("steps", "seq_len", "batch_size", "eval_tokens", "passkey_samples"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    model = args.model or DEFAULT_MODEL
    quick = args.config is None
    overrides: dict[str, Any] = dict(QUICK) if quick else {}
    if args.full:
        overrides["lora"] = None
    overrides.update({"model": model, "method": args.method,
                      "method_options": dict(_parse_option(o, argparse.ArgumentParser()) for o in args.option)})
    data = args.data or (DEFAULT_TEXT if quick else None)
    if data is not None:
        overrides["data"] = {"text": data} if not Path(data).exists() else {"files": [data]}
    if args.heldout is not None:
        overrides["data.heldout_files"] = [args.heldout]
    for flag, key in (("steps", "max_steps"), ("seq_len", "seq_len"), ("batch_size", "batch_size"), ("lr", "lr")):
        if getattr(args, flag) is not None:
            overrides[key] = getattr(args, flag)
    slug = "-".join(Path(str(model)).name.split())
    out = Path(args.out or f"runs/retrofit-{slug}-{args.method}")
    overrides["output_dir"] = str(out / "finetune")
    train = load_config(args.config, [], overrides)
    lengths = positive_lengths(args.eval_lengths, train.seq_len)
    plan = Plan(
        out=out, train=train, lengths=lengths,
        num_tokens=args.eval_tokens or (QUICK_EVAL["num_tokens"] if quick else 4 * max(lengths)),
        depths=list(QUICK_EVAL["depths"]) if quick else [0.0, 0.5, 1.0],
        num_samples=args.passkey_samples or (QUICK_EVAL["num_samples"] if quick else 5),
        heldout=heldout_file(train),
    )
    check_text(plan)
    return plan


def heldout_file(train) -> Path:
    """The held-out text evaluations read: the corpus' held-out split, or the training files' tail."""
    from . import sources

    if train.data.heldout_files:
        return Path(train.data.heldout_files[0])
    if train.data.text:
        return sources.text_splits(train.data.text)["heldout"]
    raise ValueError("retrofit needs held-out text: use a named corpus (--data shakespeare) or pass --heldout FILE")


def check_text(plan: Plan) -> None:
    text = plan.heldout.read_text(errors="ignore")
    # a crude lower bound: every token is at least one character
    if len(text) < max(plan.lengths):
        raise ValueError(
            f"held-out text {plan.heldout} has {len(text)} characters, fewer than one {max(plan.lengths)}-token "
            "window; use a longer text or shorter --eval-lengths"
        )


def fetch_model(plan: Plan, margin: float | None = None) -> str:
    """Materialise a named source (cached), check the model's config and that the disk has ``margin`` x the
    model's size free for checkpoints and the final model (default 3 with LoRA; 8 for a full fine-tune, whose
    checkpoints hold the weights and AdamW's two moments, two of them while the newest is written). Returns the
    model's location."""
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
    return str(location)


# ---- stages ------------------------------------------------------------------------------------------------
def say(step: int, total: int, text: str) -> None:
    print(f"[{step}/{total}] {text}", flush=True)


def finetune(plan: Plan) -> Path:
    """Run (or resume, or skip) the fine-tune; returns the final model directory."""
    from .training import list_checkpoints, train

    out = Path(plan.train.output_dir)
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


def evaluate(plan: Plan, label: str, load) -> dict[str, dict[str, float | str]]:
    """{task: {length: value}} for one model; cached in ``eval/<label>.json`` with the settings it used."""
    from .integrations.lm_eval_model import evaluate as lm_evaluate

    settings = {"lengths": plan.lengths, "num_tokens": plan.num_tokens, "depths": plan.depths,
                "num_samples": plan.num_samples, "heldout": str(plan.heldout)}
    cache = plan.out / "eval" / f"{label}.json"
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("settings") == settings:
            print(f"      found {cache}; skipping")
            return saved["scores"]
    model, tokenizer, limit = load()
    usable = [n for n in plan.lengths if limit is None or n <= limit]
    metadata = {"text_file": str(plan.heldout), "num_tokens": plan.num_tokens, "depths": plan.depths,
                "num_samples": plan.num_samples, "filler_file": str(plan.heldout)}
    scores: dict[str, dict[str, float | str]] = {}
    for task, lengths in (("posenc_ppl", usable), ("posenc_passkey", [n for n in usable if n >= PASSKEY_MIN])):
        results = {}
        if lengths:
            results = lm_evaluate(model, tokenizer, tasks=[task], lengths=lengths, max_length=max(usable),
                                  name=label, metadata=metadata, output_path=plan.out / "eval" / label)["results"][task]
        scores[task] = {
            str(n): results[f"{n},none"] if n in lengths else (SKIPPED if n not in usable else TOO_SHORT)
            for n in plan.lengths
        }
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps({"settings": settings, "scores": scores}, indent=1))
    os.replace(tmp, cache)
    return scores


def load_original(plan: Plan):
    import torch
    import transformers

    from .registry import arch_for
    from .sources import resolve_model

    location = resolve_model(plan.train.model)
    model = transformers.AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(plan.train.tokenizer or location)
    learned = arch_for(model.config).position_table is not None  # a table that raises past its end
    return model, tokenizer, model.config.max_position_embeddings if learned else None


def load_retrofit(final: Path):
    import torch
    import transformers

    from .training import load_finetuned

    model = load_finetuned(final, dtype=torch.float32).eval()
    return model, transformers.AutoTokenizer.from_pretrained(final), None


# ---- report ------------------------------------------------------------------------------------------------
def fmt(value: float | str, task: str) -> str:
    if isinstance(value, str):
        return value
    if task == "posenc_ppl":
        return f"{value:.2f}" if math.isfinite(value) else "inf"
    return f"{value:.2f}"


def report_table(plan: Plan, original: dict, retrofit: dict) -> str:
    rows = ["| length | original ppl | retrofit ppl | original passkey | retrofit passkey |",
            "|---:|---:|---:|---:|---:|"]
    for n in plan.lengths:
        key = str(n)
        rows.append(
            f"| {n} | {fmt(original['posenc_ppl'][key], 'posenc_ppl')} | {fmt(retrofit['posenc_ppl'][key], 'posenc_ppl')}"
            f" | {fmt(original['posenc_passkey'][key], 'p')} | {fmt(retrofit['posenc_passkey'][key], 'p')} |"
        )
    return "\n".join(rows)


def write_report(plan: Plan, original: dict, retrofit: dict, seconds: float) -> Path:
    train = plan.train
    mode = f"LoRA r={train.lora.r}" if train.lora is not None else "full fine-tune"
    text = "\n".join([
        f"# Retrofit: {train.model} -> {train.method}",
        "",
        f"Fine-tune: {train.max_steps} steps, {mode}, seq_len {train.seq_len}, batch {train.batch_size} x "
        f"{train.grad_accum}, lr {train.lr}, on {train.data.text or train.data.files}. Method options: "
        f"{train.method_options or 'defaults'}.",
        f"Evaluation: held-out perplexity on {plan.num_tokens} tokens per length ({plan.heldout.name}); passkey "
        f"accuracy over depths {plan.depths} x {plan.num_samples} prompts per length. `{SKIPPED}`: beyond the "
        "original model's learned position table.",
        "",
        report_table(plan, original, retrofit),
        "",
        f"Wall time of this run: {seconds:.0f} s (stages found done were skipped). Plots: plots/*.png.",
        "",
    ])
    path = plan.out / "report.md"
    path.write_text(text)
    return path


def plot(plan: Plan) -> list[Path]:
    from .integrations import plotting

    series, trained = plotting.collect(plotting.load_results([plan.out / "eval"]))
    return plotting.plot(series, plan.out / "plots", trained)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    started = time.perf_counter()
    try:
        plan = make_plan(args)
    except (ValueError, OSError) as err:
        print(f"hf-posenc retrofit: error: {err}", file=sys.stderr)
        return 2
    total = 5
    say(1, total, f"getting the model {plan.train.model}")
    try:
        location = fetch_model(plan)
    except (ValueError, OSError) as err:
        print(f"hf-posenc retrofit: error: {err}", file=sys.stderr)
        return 2
    print(f"      {location}")
    say(2, total, f"fine-tuning {plan.train.method} for {plan.train.max_steps} steps at {plan.train.seq_len} tokens")
    try:
        final = finetune(plan)
        say(3, total, f"evaluating the original model at {plan.lengths}")
        original = evaluate(plan, "original", lambda: load_original(plan))
        say(4, total, f"evaluating the retrofit ({plan.train.method}) at {plan.lengths}")
        retrofit = evaluate(plan, f"retrofit-{plan.train.method}", lambda: load_retrofit(final))
    except KeyboardInterrupt as stop:
        print(f"\ninterrupted: {stop or 're-run the same command to resume'}", file=sys.stderr)
        return 130
    say(5, total, "writing plots and the report")
    plot(plan)
    report = write_report(plan, original, retrofit, time.perf_counter() - started)
    print("\n" + report_table(plan, original, retrofit) + f"\n\nreport: {report}")
    return 0
