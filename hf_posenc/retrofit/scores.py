"""A model's long-context scores: held-out perplexity at each length and passkey accuracy, cached as a stage."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from ..integrations.long_context import passkey_accuracy, passkey_docs, window_scores
from .plan import Plan
from .stages import cached

LAST_TOKENS = 1024  # the "last" perplexity: each window's last 1024 targets
SKIPPED = "skipped"  # a length the original model cannot take (learned position table)
TOO_SHORT = "n/a"  # passkey below PASSKEY_MIN tokens: the instructions alone fill the prompt
PASSKEY_MIN = 256
NOT_RUN = "—"  # passkey past half the trained context: not scored in the quick run (a forward per prompt)
RETRIEVAL_DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]  # the retrofit's passkey past the context: every depth, as the studies


def eval_settings(plan: Plan, retrieval: bool = False) -> dict:
    settings = {"lengths": plan.lengths, "eval_tokens": plan.eval_tokens, "last_tokens": LAST_TOKENS,
                "corpora": {name: file_digest(path) for name, path in plan.corpora.items()},
                "passkey": [plan.passkey_lengths, plan.depths, plan.num_samples]}
    if retrieval and plan.retrieval_length:
        settings["retrieval"] = [plan.retrieval_length, plan.retrieval_depths, plan.retrieval_samples]
    return settings


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def score_model(plan: Plan, label: str, identity: Any, load: Callable, shared: bool,
                skip_inside: dict | None = None, retrieval: bool = False) -> dict:
    """{"ppl": {corpus: {length: scores | SKIPPED}}, "passkey": {...}} for one model, cached by :func:`cached`.
    ``skip_inside``: scores to reuse at lengths <= the trained context (a conversion that equals the original
    there); ``retrieval``: also the passkey at ``plan.retrieval_length`` (the retrofit's row)."""

    def compute():
        model, tokenizer, limit = load()
        return compute_scores(plan, model, tokenizer, limit, skip_inside, retrieval)

    return cached(plan, label, {"model": identity, "settings": eval_settings(plan, retrieval)}, compute, shared)


def compute_scores(plan: Plan, model, tokenizer, limit: int | None, skip_inside: dict | None,
                   retrieval: bool = False) -> dict:
    usable = [n for n in plan.lengths if limit is None or n <= limit]
    todo = [(name, n) for name in plan.corpora for n in usable
            if not (skip_inside and n <= plan.trained_length)]
    docs = passkey_docs(tokenizer, [n for n in plan.passkey_lengths if n in usable], plan.depths, plan.num_samples)
    if retrieval and plan.retrieval_length in usable:
        docs += passkey_docs(tokenizer, [plan.retrieval_length], plan.retrieval_depths, plan.retrieval_samples)
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
        passkey = passkey_accuracy(model, docs, done=bar.update) if docs else {}
    for n in plan.lengths:
        if str(n) not in passkey:
            passkey[str(n)] = SKIPPED if n not in usable else unscored_passkey(plan, n)
    return {"ppl": ppl, "passkey": passkey}


def unscored_passkey(plan: Plan, n: int) -> str:
    """Why a usable length has no passkey score: no prompt fits (the instructions fill it), or not run."""
    return TOO_SHORT if n < PASSKEY_MIN or n in plan.passkey_lengths else NOT_RUN
