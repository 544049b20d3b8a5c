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

import random
import re

import datasets

from .common import (
    LENGTH_KEY, LengthMetricsTask, TaskInputError, check_fits, encode_kwargs, lengths_from, scored, text_from,
    tokenizer_from,
)

TASK = "posenc_passkey"
ANSWER_TOKENS = 12  # room kept for the answer; equals generation_kwargs.max_gen_toks in the YAMLs
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_SAMPLES = 4

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)
REPEAT = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"


def depths_from(metadata: dict) -> list[float]:
    raw = metadata.get("depths", DEFAULT_DEPTHS)
    depths = sorted({float(d) for d in ([raw] if isinstance(raw, (int, float)) else raw)})
    if not depths or depths[0] < 0 or depths[-1] > 1:
        raise TaskInputError(f"depths must be fractions in [0, 1], got {raw!r}")
    return depths


def metric_names(metadata: dict) -> list[str]:
    lengths = lengths_from(metadata)
    return [str(n) for n in lengths] + [f"{n}@{d:g}" for n in lengths for d in depths_from(metadata)]


def assemble(before: str, key: str, after: str) -> str:
    """INTRO, filler before, needle, filler after, QUESTION (empty filler parts leave no gap)."""
    body = " ".join(part for part in (before, NEEDLE.format(key=key), after) if part)
    return f"{INTRO}\n{body}\n{QUESTION}"


def prompt(tokenizer, filler: str, boundary: str, key: str, depth: float, budget: int,
           encode: dict | None = None) -> tuple[str, int]:
    """The passkey prompt within ``budget`` tokens, needle after ``depth`` of the filler; (text, tokens).

    ``filler`` must hold at least ``budget`` tokens; it is cut at the last ``boundary`` (". " or " ")."""
    encode = encode or {}
    count = lambda text: len(tokenizer.encode(text, **encode))  # noqa: E731
    room = budget - count(assemble("", key, ""))
    if room < 0:
        raise TaskInputError(
            f"{TASK}: a prompt of {budget + ANSWER_TOKENS} tokens is too short; this tokenizer needs at least "
            f"{budget + ANSWER_TOKENS - room} tokens for the instructions, needle, question and answer"
        )
    spans = tokenizer(filler, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    if len(spans) < room:
        raise TaskInputError(f"{TASK}: the filler text has {len(spans)} tokens, {room} are needed")
    while True:
        n_before = round(depth * room)
        middle = _snap(filler, spans[n_before - 1][1], boundary) if n_before else 0
        end = _snap(filler, spans[room - 1][1], boundary) if room else 0
        text = assemble(filler[:middle].strip(), key, filler[middle:max(end, middle)].strip())
        n = count(text)
        if n <= budget:
            return text, n
        room = max(0, room - (n - budget))


def _snap(text: str, pos: int, boundary: str) -> int:
    """The cut at or before character ``pos`` that ends on ``boundary`` (a sentence end keeps its period)."""
    if pos >= len(text):
        return len(text)
    i = text.rfind(boundary, 0, pos + 1)
    return i + len(boundary.rstrip()) if i >= 0 else 0


def repeat_filler(tokenizer, tokens: int) -> str:
    """The classic filler sentences, repeated to at least ``tokens`` tokens."""
    unit = max(1, len(tokenizer.encode(REPEAT, add_special_tokens=False)))
    return " ".join([REPEAT] * (tokens // unit + 2))


def prose_filler(text: str, rng: random.Random, chars: int) -> str:
    """``chars`` characters of whitespace-normalised ``text`` from a seeded word start, wrapping around."""
    words = text.split()
    if not words:
        raise TaskInputError(f"{TASK}: the prose filler text is empty")
    start = rng.randrange(len(words))
    out, size, i = [], 0, start
    while size < chars:
        out.append(words[i % len(words)])
        size += len(out[-1]) + 1
        i += 1
    return " ".join(out)


def build_docs(metadata: dict, filler_kind: str) -> list[dict]:
    """Docs for every (length, depth, sample): prompt, passkey, depth, posenc_length, n_prompt_tokens."""
    lengths, depths = lengths_from(metadata), depths_from(metadata)
    check_fits(TASK, lengths, metadata)
    tokenizer = tokenizer_from(metadata)
    encode = encode_kwargs(metadata)
    samples, seed = int(metadata.get("num_samples", DEFAULT_SAMPLES)), metadata.get("seed", 0)
    digits = int(metadata.get("key_digits", 5))
    prose = text_from(metadata, "filler_file") if filler_kind == "prose" else None
    names = metric_names(metadata)
    docs = []
    for length in lengths:
        budget = length - ANSWER_TOKENS
        for depth in depths:
            for i in range(samples):
                rng = random.Random(f"{seed}:{length}:{depth:g}:{i}")
                key = str(rng.randint(10 ** (digits - 1), 10**digits - 1))
                if prose is None:
                    filler, boundary = repeat_filler(tokenizer, budget), ". "
                else:
                    filler, boundary = _prose_with_tokens(tokenizer, prose, rng, budget), " "
                text, n = prompt(tokenizer, filler, boundary, key, depth, budget, encode)
                docs.append({
                    "prompt": text, "passkey": key, "depth": depth, LENGTH_KEY: length, "n_prompt_tokens": n,
                    "metric_names": names, "own_metrics": [str(length), f"{length}@{depth:g}"],
                })
    return docs


def _prose_with_tokens(tokenizer, text: str, rng: random.Random, tokens: int) -> str:
    state, chars = rng.getstate(), 6 * tokens + 64
    while True:  # the same seeded start, more characters, until the filler holds enough tokens
        rng.setstate(state)
        filler = prose_filler(text, rng, chars)
        if len(tokenizer.encode(filler, add_special_tokens=False)) >= tokens:
            return filler
        chars *= 2


def build_repeat(**metadata) -> dict[str, datasets.Dataset]:
    """lm-eval ``custom_dataset`` of ``posenc_passkey`` (repeated-sentence filler)."""
    return {"test": datasets.Dataset.from_list(build_docs(metadata, "repeat"))}


def build_prose(**metadata) -> dict[str, datasets.Dataset]:
    """lm-eval ``custom_dataset`` of ``posenc_passkey_prose`` (real-text filler)."""
    return {"test": datasets.Dataset.from_list(build_docs(metadata, "prose"))}


def first_number(generation: str) -> str | None:
    match = re.search(r"\d+", generation)
    return match.group(0) if match else None


def process_results(doc: dict, results: list[str]) -> dict[str, tuple[float, float]]:
    """Exact match of the first number generated with the passkey, under the doc's length and depth metrics."""
    hit = float(first_number(results[0]) == doc["passkey"])
    return scored(doc, hit, 1.0)


class PasskeyTask(LengthMetricsTask):
    """Metrics ``"<L>"`` and ``"<L>@<depth>"``: retrieval accuracy (higher is better)."""

    @classmethod
    def metric_names(cls, metadata: dict) -> list[str]:
        return metric_names(metadata)
