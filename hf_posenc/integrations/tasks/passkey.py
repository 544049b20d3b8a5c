"""``posenc_passkey`` / ``posenc_passkey_prose``: passkey retrieval (Mohtashami & Jaggi, 2023).

A random number is hidden in filler text at a depth (fraction of the filler before it); the model must say it
after "The pass key is". One doc per (length, depth, sample), generated deterministically from ``seed``.
A doc of length L has a prompt of at most L - ANSWER_TOKENS tokens, so prompt + answer fit in L.
Metrics: ``"<L>"`` accuracy over all depths, ``"<L>@<depth>"`` accuracy at one depth; a hit is the first
number in the generation equal to the key.

Fillers: ``repeat`` ("The grass is green. The sky is blue. ..." cut at sentence ends) and ``prose`` (real text
from ``filler_file`` / ``text_file``, default Shakespeare held-out, from a seeded offset, cut at words).
Metadata: ``max_seq_lengths``, ``depths`` (default 0, .25, .5, .75, 1), ``num_samples`` per (length, depth)
(default 4), ``seed`` (default 0), ``key_digits`` (default 5), ``tokenizer`` / ``pretrained``.
"""

from __future__ import annotations

import datasets

from .common import (
    LENGTH_KEY, LengthMetricsTask, TaskInputError, check_fits, encode_kwargs, lengths_from, scored, text_from,
    tokenizer_from,
)
from .passkey_text import (  # noqa: F401  (NEEDLE, QUESTION: read by tests as passkey.*)
    ANSWER_TOKENS, NEEDLE, QUESTION, TASK, first_number, prompt, prose_with_tokens, repeat_filler, seeded_key,
)

DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_SAMPLES = 4


def depths_from(metadata: dict) -> list[float]:
    raw = metadata.get("depths", DEFAULT_DEPTHS)
    depths = sorted({float(d) for d in ([raw] if isinstance(raw, (int, float)) else raw)})
    if not depths or depths[0] < 0 or depths[-1] > 1:
        raise TaskInputError(f"depths must be fractions in [0, 1], got {raw!r}")
    return depths


def metric_names(metadata: dict) -> list[str]:
    lengths = lengths_from(metadata)
    return [str(n) for n in lengths] + [f"{n}@{d:g}" for n in lengths for d in depths_from(metadata)]


def build_docs(metadata: dict, filler_kind: str) -> list[dict]:
    """Docs for every (length, depth, sample): prompt, passkey, depth, posenc_length, n_prompt_tokens. Ordered by
    sample, then depth, then length, so that ``--limit N`` keeps every length (and, from N = lengths x depths,
    every depth)."""
    lengths, depths = lengths_from(metadata), depths_from(metadata)
    check_fits(TASK, lengths, metadata)
    tokenizer = tokenizer_from(metadata)
    encode = encode_kwargs(metadata)
    samples, seed = int(metadata.get("num_samples", DEFAULT_SAMPLES)), metadata.get("seed", 0)
    digits = int(metadata.get("key_digits", 5))
    prose = text_from(metadata, "filler_file") if filler_kind == "prose" else None
    names = metric_names(metadata)
    docs = []
    for i in range(samples):
        for depth in depths:
            for length in lengths:
                budget = length - ANSWER_TOKENS
                key, rng = seeded_key(seed, length, depth, i, digits)
                if prose is None:
                    filler, boundary = repeat_filler(tokenizer, budget), ". "
                else:
                    filler, boundary = prose_with_tokens(tokenizer, prose, rng, budget), " "
                text, n = prompt(tokenizer, filler, boundary, key, depth, budget, encode)
                docs.append({
                    "prompt": text, "passkey": key, "depth": depth, LENGTH_KEY: length, "n_prompt_tokens": n,
                    "metric_names": names, "own_metrics": [str(length), f"{length}@{depth:g}"],
                })
    return docs


def build_repeat(**metadata) -> dict[str, datasets.Dataset]:
    """lm-eval ``custom_dataset`` of ``posenc_passkey`` (repeated-sentence filler)."""
    return {"test": datasets.Dataset.from_list(build_docs(metadata, "repeat"))}


def build_prose(**metadata) -> dict[str, datasets.Dataset]:
    """lm-eval ``custom_dataset`` of ``posenc_passkey_prose`` (real-text filler)."""
    return {"test": datasets.Dataset.from_list(build_docs(metadata, "prose"))}


def process_results(doc: dict, results: list[str]) -> dict[str, tuple[float, float]]:
    """Exact match of the first number generated with the passkey, under the doc's length and depth metrics."""
    hit = float(first_number(results[0]) == doc["passkey"])
    return scored(doc, hit, 1.0)


class PasskeyTask(LengthMetricsTask):
    """Metrics ``"<L>"`` and ``"<L>@<depth>"``: retrieval accuracy (higher is better)."""

    @classmethod
    def metric_names(cls, metadata: dict) -> list[str]:
        return metric_names(metadata)
