"""Passkey prompts (Mohtashami & Jaggi, 2023) as plain functions: no lm-eval, no datasets.

The ``posenc_passkey`` tasks (``passkey.py``) and the studies that run where lm-eval is not installed
(``studies/smollm2_long_context.py``) build the same prompts from here.
"""

from __future__ import annotations

import random
import re

from . import TaskInputError

TASK = "posenc_passkey"
ANSWER_TOKENS = 12  # room kept for the answer; equals generation_kwargs.max_gen_toks in the YAMLs

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)
REPEAT = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"


def seeded_key(seed, length: int, depth: float, sample: int, digits: int = 5) -> tuple[str, random.Random]:
    """The passkey of doc (length, depth, sample) and the generator it came from (the prose filler draws its start
    from it next): the same docs for the same seed wherever they are built."""
    rng = random.Random(f"{seed}:{length}:{depth:g}:{sample}")
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1)), rng


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


def prose_with_tokens(tokenizer, text: str, rng: random.Random, tokens: int) -> str:
    state, chars = rng.getstate(), 6 * tokens + 64
    while True:  # the same seeded start, more characters, until the filler holds enough tokens
        rng.setstate(state)
        filler = prose_filler(text, rng, chars)
        if len(tokenizer.encode(filler, add_special_tokens=False)) >= tokens:
            return filler
        chars *= 2


def first_number(generation: str) -> str | None:
    match = re.search(r"\d+", generation)
    return match.group(0) if match else None
