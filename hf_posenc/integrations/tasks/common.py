"""What the bundled long-context tasks share: lengths, tokenizer and text from ``--metadata``, and a task class
whose metrics are one per sequence length.

lm-eval hands every task's ``custom_dataset`` the merged ``--model_args`` and ``--metadata`` as keyword
arguments (RULER reads ``max_seq_lengths`` and ``tokenizer`` / ``pretrained`` the same way). Each doc records
its length under ``posenc_length``; ``process_results`` returns a ``(value, weight)`` pair for *every* length,
weight 0 for the lengths the doc is not about, so every metric is scored on every doc and the aggregation
``sum(value) / sum(weight)`` only counts the doc's own length.

Docs interleave the lengths, so lm-eval's ``--limit N`` (the first N docs) keeps every length; a ``--limit`` or
``--samples`` that still leaves a metric without a doc is refused (its score would be NaN).
"""

from __future__ import annotations

import functools
import itertools
import math
from pathlib import Path
from typing import Any, Iterable

from lm_eval.api.task import ConfigurableTask

from . import TaskInputError  # noqa: F401  (re-exported: tasks raise it)

DEFAULT_LENGTHS = (512, 1024, 2048, 4096)
LENGTH_KEY = "posenc_length"  # in every doc: the sequence length (tokens) the doc is built for

# tokenizers handed over in memory by ``lm_eval_model.evaluate``: metadata carries only their key
_IN_MEMORY_TOKENIZERS: dict[str, Any] = {}


def lengths_from(metadata: dict) -> list[int]:
    """``max_seq_lengths`` (list of ints, or one int) -> sorted unique positive ints; default DEFAULT_LENGTHS."""
    raw = metadata.get("max_seq_lengths", DEFAULT_LENGTHS)
    raw = [raw] if isinstance(raw, (int, str)) else list(raw)
    try:
        lengths = sorted({int(x) for x in raw})
    except (TypeError, ValueError):
        raise TaskInputError(f"max_seq_lengths must be a list of integers, got {raw!r}") from None
    if not lengths or lengths[0] < 1:
        raise TaskInputError(f"max_seq_lengths must be positive integers, got {raw!r}")
    return lengths


def check_fits(task: str, lengths: Iterable[int], metadata: dict) -> None:
    """Fail early when a length exceeds an explicit ``max_length`` model argument (lm-eval would otherwise
    truncate or split the input silently)."""
    max_length = metadata.get("max_length")
    too_long = [n for n in lengths if max_length and n > int(max_length)]
    if too_long:
        raise TaskInputError(
            f"{task}: length(s) {too_long} exceed max_length={max_length} in --model_args; raise max_length "
            f"(a learned-position model must be converted first, e.g. posenc=alibi) or drop those lengths"
        )


def register_tokenizer(tokenizer) -> str:
    """Make an in-memory tokenizer reachable from task metadata; returns the key to pass as ``tokenizer``."""
    key = f"in-memory:{id(tokenizer)}"
    _IN_MEMORY_TOKENIZERS[key] = tokenizer
    return key


def tokenizer_from(metadata: dict):
    """The tokenizer named by metadata ``tokenizer`` (preferred) or ``pretrained`` (the model's path)."""
    name = metadata.get("tokenizer") or metadata.get("pretrained")
    if not isinstance(name, str) or not name:
        raise TaskInputError(
            "the posenc tasks size their inputs in tokens and need a tokenizer: pass pretrained=<path> in "
            "--model_args or tokenizer=<path> in --metadata"
        )
    if name in _IN_MEMORY_TOKENIZERS:
        return _IN_MEMORY_TOKENIZERS[name]
    return _load_tokenizer(name)


@functools.cache
def _load_tokenizer(name: str):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(name)


def text_from(metadata: dict, key: str = "text_file") -> str:
    """The text in metadata ``key`` (a path), else the Shakespeare held-out split from ``hf_posenc.sources``."""
    path = metadata.get(key) or metadata.get("text_file")
    if path is None:
        try:
            from hf_posenc import sources
        except ImportError:
            raise TaskInputError(
                f"no text given: pass --metadata '{{\"{key}\": \"/path/to/text.txt\"}}' (the default Shakespeare "
                "held-out text needs hf_posenc.sources, which this install lacks)"
            ) from None
        path = sources.text_splits("shakespeare")["heldout"]
    path = Path(path).expanduser()
    if not path.is_file():
        raise TaskInputError(f"{key}={str(path)!r} is not a file")
    return path.read_text(encoding="utf-8")


def encode_kwargs(metadata: dict) -> dict:
    """How lm-eval's HF model encodes a request: ``add_bos_token`` from model_args if given, else the default."""
    add_bos = metadata.get("add_bos_token")
    return {} if add_bos is None else {"add_special_tokens": bool(add_bos)}


def interleave(groups: list[list[dict]]) -> list[dict]:
    """``[[a1, a2, a3], [b1]] -> [a1, b1, a2, a3]``: the first doc of every group, then the second, ..."""
    skip = object()
    return [doc for row in itertools.zip_longest(*groups, fillvalue=skip) for doc in row if doc is not skip]


# --- metrics -------------------------------------------------------------------------------------------------
def scored(doc: dict, value: float, weight: float) -> dict[str, tuple[float, float]]:
    """``{metric: (value, weight)}`` for every metric of the task (``doc["metric_names"]``): the doc's own
    metrics (``doc["own_metrics"]``) get ``(value, weight)``, the others ``(0, 0)``."""
    own = set(doc["own_metrics"])
    return {name: (value, weight) if name in own else (0.0, 0.0) for name in doc["metric_names"]}


def weighted_mean(items: list[tuple[float, float]]) -> float:
    """sum(value) / sum(weight); nan when no doc had this metric (LengthMetricsTask refuses runs where that
    happens)."""
    total = sum(w for _, w in items)
    return sum(v for v, _ in items) / total if total else math.nan


def weighted_perplexity(items: list[tuple[float, float]]) -> float:
    """exp(-sum(loglikelihood) / sum(tokens)): the perplexity of all tokens scored at one length."""
    mean = weighted_mean(items)
    return math.exp(-mean) if not math.isnan(mean) else math.nan


class LengthMetricsTask(ConfigurableTask):
    """A YAML task (``class: !function ...``) whose ``metric_list`` is built from the run's metadata: one metric
    per length (named by the length, as RULER does) plus whatever :meth:`extra_metrics` adds."""

    aggregation_fn = staticmethod(weighted_mean)
    higher_is_better_value = True

    def __init__(self, config: dict | None = None):
        config = {k: v for k, v in (config or {}).items() if k != "class"}
        names = self.metric_names(config.get("metadata") or {})
        config["metric_list"] = [
            {"metric": name, "aggregation": self.aggregation_fn, "higher_is_better": self.higher_is_better_value}
            for name in names
        ]
        super().__init__(config=config)

    @classmethod
    def metric_names(cls, metadata: dict) -> list[str]:
        return [str(n) for n in lengths_from(metadata)]

    def build_all_requests(self, *, limit: int | None = None, samples: list[int] | None = None, **kwargs) -> None:
        """lm-eval's, after checking that ``limit`` / ``samples`` leave every metric at least one doc."""
        self.check_coverage(limit, samples)
        return super().build_all_requests(limit=limit, samples=samples, **kwargs)

    def check_coverage(self, limit: int | None, samples: list[int] | None) -> None:
        """Raise TaskInputError when the docs kept by ``--limit`` / ``--samples`` miss a metric (a NaN score)."""
        if not limit and not samples:
            return
        docs = list(self.eval_docs)
        kept = [docs[i] for i in samples] if samples else docs[:int(limit)]
        names = docs[0]["metric_names"] if docs else []
        covered = {name for doc in kept for name in doc["own_metrics"]}
        missing = [name for name in names if name not in covered]
        if not missing:
            return
        seen, needed = set(), len(docs)
        for i, doc in enumerate(docs, 1):  # the shortest prefix that covers every metric
            seen.update(doc["own_metrics"])
            if seen >= set(names):
                needed = i
                break
        chosen = f"--samples {samples}" if samples else f"--limit {limit}"
        raise TaskInputError(
            f"{self.config.task}: {chosen} leaves no document for metric(s) {missing}, which would score NaN; use "
            f"--limit {needed} or more (or fewer lengths / depths in --metadata)"
        )
