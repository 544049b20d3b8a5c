"""``posenc_ppl``: perplexity at each sequence length, the ALiBi paper's non-overlapping evaluation.

For a length L the text is cut into consecutive windows of L tokens (from the start, ``num_tokens // L``
windows, at least one); each window is one doc, scored from scratch with ``loglikelihood_rolling`` (lm-eval
prepends its prefix token, so all n <= L tokens of a window are predicted and the input is at most L long).
Metric ``"L"`` = exp(-sum of loglikelihoods / sum of scored tokens) over the windows of length L. With
``num_tokens`` a multiple of every length, every length scores the same leading ``num_tokens`` tokens.

Metadata: ``max_seq_lengths`` (default 512..4096), ``text_file`` (default: Shakespeare held-out via
``hf_posenc.sources``), ``num_tokens`` (tokens scored per length, default 16384), ``tokenizer`` / ``pretrained``.
"""

from __future__ import annotations

import datasets

from .common import (
    LENGTH_KEY, LengthMetricsTask, TaskInputError, check_fits, encode_kwargs, interleave, lengths_from, scored,
    text_from, tokenizer_from, weighted_perplexity,
)

TASK = "posenc_ppl"
DEFAULT_NUM_TOKENS = 16384


def windows(tokenizer, text: str, length: int, num_tokens: int = DEFAULT_NUM_TOKENS,
            encode: dict | None = None) -> list[dict]:
    """Consecutive windows of ``text``, each re-encoding (as lm-eval will) to n <= ``length`` tokens.

    Returns docs ``{"text", "n_tokens", "posenc_length"}``; n == length except where a cut token does not
    survive re-encoding. Raises TaskInputError if the text holds fewer than ``length`` tokens."""
    encode = encode or {}
    ids, spans = _token_spans(tokenizer, text)
    available = len(ids) // length
    if available == 0:
        raise TaskInputError(
            f"{TASK}: the text has {len(ids)} tokens, fewer than one window of {length}; give a longer text_file"
        )
    docs = []
    for k in range(min(max(1, num_tokens // length), available)):
        start, end = k * length, (k + 1) * length
        while True:  # shrink until the re-encoded window fits (usually no iteration)
            chunk = text[spans[start][0]:spans[end - 1][1]]
            n = len(tokenizer.encode(chunk, **encode))
            if n <= length:
                break
            end -= 1
            if end == start:
                raise TaskInputError(f"{TASK}: cannot cut a window of {length} tokens that re-encodes to fit")
        docs.append({"text": chunk, "n_tokens": n, LENGTH_KEY: length})
    return docs


def _token_spans(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """(ids, character span of each id); fast tokenizers only (they report offsets)."""
    if not getattr(tokenizer, "is_fast", False):
        raise TaskInputError(f"{TASK} needs a fast (Rust) tokenizer to cut windows at token boundaries")
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return encoding["input_ids"], encoding["offset_mapping"]


def build(**metadata) -> dict[str, datasets.Dataset]:
    """lm-eval ``custom_dataset``: ``{"test": docs}``, the windows of every length, lengths interleaved (first
    window of each length, then the second, ...) so that ``--limit N`` keeps every length."""
    lengths = lengths_from(metadata)
    check_fits(TASK, lengths, metadata)
    tokenizer = tokenizer_from(metadata)
    text = text_from(metadata)
    num_tokens = int(metadata.get("num_tokens", DEFAULT_NUM_TOKENS))
    names = [str(n) for n in lengths]
    per_length = [
        [{**doc, "metric_names": names, "own_metrics": [str(n)]}
         for doc in windows(tokenizer, text, n, num_tokens, encode_kwargs(metadata))]
        for n in lengths
    ]
    return {"test": datasets.Dataset.from_list(interleave(per_length))}


def process_results(doc: dict, results: list[float]) -> dict[str, tuple[float, float]]:
    """(loglikelihood of the window, its token count) under the window's length; (0, 0) elsewhere."""
    (loglikelihood,) = results
    return scored(doc, float(loglikelihood), float(doc["n_tokens"]))


class PerplexityTask(LengthMetricsTask):
    """Metrics ``"<L>"``: token-level perplexity of the windows of length L (lower is better)."""

    aggregation_fn = staticmethod(weighted_perplexity)
    higher_is_better_value = False
