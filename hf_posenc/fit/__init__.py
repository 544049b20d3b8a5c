"""``hf-posenc fit``: LongRoPE's per-frequency factors for a target length, searched by forward passes only.

    hf-posenc fit --model smollm2-135m --target-length 32768 --data shakespeare --budget 400 --out fit-32k
    accelerate launch --num_processes 4 -m hf_posenc.cli fit ...      # candidates spread over 4 processes

The score of a candidate (:mod:`.objective`) is measured on the model's calibration text (the training split of a
named corpus, never its held-out split); the search (:mod:`.search`) is LongRoPE's evolutionary one; the loop
(:mod:`.run`) is resumable and keyed by the run's identity. ``OUT/factors.json`` holds the best factors as
``convert``'s keyword arguments::

    hf_posenc.convert(model, "rope", scaling="longrope", **json.load(open("OUT/factors.json")))
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import transformers

from ..cli import first_line
from ..sources import resolve_model
from .run import EVALUATIONS, FACTORS, SUMMARY, FitSettings, IdentityError
from .setup import fit, process_state

__all__ = ["EVALUATIONS", "FACTORS", "SUMMARY", "FitSettings", "IdentityError", "fit", "main", "parse_args"]


def parse_args(argv: list[str]) -> tuple[FitSettings, argparse.ArgumentParser]:
    parser = argparse.ArgumentParser(prog="hf-posenc fit", description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--model", required=True, help="a Llama-style checkpoint: local folder or named source (hf-posenc fetch)")
    add("--target-length", type=int, required=True, help="the context to fit for (> the model's trained context)")
    add("--data", required=True, help="calibration text: a named corpus (its training split is read, never the "
        "held-out one) or a text file of training text (all of it is read: never pass held-out text)")
    add("--budget", type=int, required=True, help="forward passes in all, over every rerun of this fit")
    add("--out", type=Path, required=True, help="folder of evaluations.jsonl, factors.json, fit.json (rerun resumes)")
    defaults = FitSettings("", 0, "", 0, Path())
    add("--population", type=int, default=defaults.population, help="candidates per generation")
    add("--seed", type=int, default=defaults.seed, help="the search's random seed")
    add("--windows", type=int, default=defaults.windows, help="calibration windows of the target length scored")
    add("--last-tokens", type=int, default=defaults.last_tokens, help="perplexity of each window's last N tokens")
    add("--passkey-samples", type=int, default=defaults.passkey_samples,
        help="passkey prompts per depth (0.25, 0.5, 0.75) for the needle-driven loss; 0: perplexity only")
    add("--needle-weight", type=float, default=defaults.needle_weight, help="weight of the needle loss (nats)")
    add("--mutation", type=float, default=defaults.mutation, help="standard deviation of a mutation (log-factor)")
    add("--start-tokens", type=int, default=defaults.start_tokens,
        help="LongRoPE's n-hat: first positions kept unscaled (> 0: no native export)")
    args = parser.parse_args(argv)
    settings = FitSettings(args.model, args.target_length, args.data, args.budget, args.out, args.population,
                           args.seed, args.windows, args.last_tokens, args.passkey_samples, args.needle_weight,
                           args.mutation, args.start_tokens)
    problem = check_settings(settings)
    if problem:
        parser.error(problem)
    return settings, parser


def check_settings(settings: FitSettings) -> str | None:
    """The first bad setting, named with what it needs; None when all are fine."""
    positive = {"--target-length": settings.target_length, "--budget": settings.budget,
                "--population": settings.population, "--windows": settings.windows,
                "--last-tokens": settings.last_tokens}
    for flag, value in positive.items():
        if value < 1:
            return f"{flag} must be >= 1, got {value}"
    for flag, value in {"--passkey-samples": settings.passkey_samples, "--start-tokens": settings.start_tokens,
                        "--needle-weight": settings.needle_weight}.items():
        if value < 0:
            return f"{flag} must be >= 0, got {value}"
    if not settings.mutation > 0:
        return f"--mutation must be > 0, got {settings.mutation}"
    return None


def load(model: str):
    """(unconverted causal LM on this process' device, its tokenizer)."""
    location = resolve_model(model)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(location).to(process_state().device).eval()
    return loaded, transformers.AutoTokenizer.from_pretrained(location)


def main(argv: list[str] | None = None) -> int:
    settings, parser = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        model, tokenizer = load(settings.model)
    except (OSError, ValueError) as err:
        parser.error(f"--model {settings.model}: {first_line(err)}")
    try:
        top = fit(settings, model, tokenizer)
    except ValueError as err:  # bad input, another fit's OUT, a corpus too short: nothing of this run written
        parser.error(str(err))
    print(f"best of {settings.out / EVALUATIONS}: score {top['score']:.4f} (last-token perplexity "
          f"{top['last_ppl']:.3f}, needle NLL {top['needle_nll']}); convert with "
          f"scaling='longrope' and the options in {settings.out / FACTORS}")
    return 0
