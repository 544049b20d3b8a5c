"""Long-context scores of a causal LM without lm-eval's per-request machinery: one forward per window.

* :func:`window_scores`: held-out perplexity at a length, over non-overlapping windows scored from scratch, and the
  perplexity of each window's last ``last_tokens`` targets (the tokens that see the most context: where a model past
  its range breaks first). Both come from the same forward; the LM head runs on chunks of positions, so no
  (L, vocab) logits are ever held.
* :func:`passkey_docs` / :func:`passkey_accuracy`: the ``posenc_passkey`` prompts (repeated-sentence filler); a hit is
  a greedy continuation that reproduces the key, checked in one forward by teacher forcing (argmax at every answer
  position). :func:`passkey_prompt` scores one prompt and :func:`passkey_summary` sums records, for a study that
  keeps each prompt's record as it goes.

``hf-posenc retrofit`` and the studies score with these; ``hf-posenc eval`` (lm-eval) has the same prompts and
windows as tasks.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
import transformers

from .._seams import CACHE_KEYWORD
from ..training.data import eval_windows

HEAD_CHUNK = 4096  # positions per lm_head call: (chunk, vocab) fp32 logits at a time, never (L, vocab)


def autocast(device: torch.device):
    enabled = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


@torch.no_grad()
def token_nll(model, ids: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """NLL of ids[1:] given the prefix, for one (L,) window: (L - 1,) fp32 on the CPU.

    ``chunk``: the window goes through the model ``chunk`` tokens at a time with a cache (a chunked prefill). The
    NLL is the full forward's for any model whose cache gives its full forward (tests/test_long_context.py); a
    sliding-window layer then attends to its window only, instead of to every position under a mask, which makes
    Gemma 3 at 64k several times cheaper. A model that scales by the input length (dynamic NTK / YaRN, dynamic
    self-extension) sees each chunk's length, not the window's: score those whole."""
    device = model.device
    head = model.get_output_embeddings()
    cache = transformers.DynamicCache(config=model.config) if chunk else None
    step = chunk or len(ids)
    out = []
    with autocast(device):
        for start in range(0, len(ids) - 1, step):
            part = ids[start : start + step].to(device)
            hidden = model.base_model(input_ids=part[None], use_cache=cache is not None, **{CACHE_KEYWORD: cache})
            hidden = hidden.last_hidden_state[0]  # (len(part), D): position p predicts ids[start + p + 1]
            targets = ids[start + 1 : start + len(part) + 1].to(device)
            hidden = hidden[: len(targets)]
            out += [F.cross_entropy(head(hidden[s : s + HEAD_CHUNK]).float(), targets[s : s + HEAD_CHUNK],
                                    reduction="none") for s in range(0, len(targets), HEAD_CHUNK)]
    return torch.cat(out).cpu()


def window_scores(model, heldout: torch.Tensor, length: int, max_tokens: int, last_tokens: int = 1024,
                  chunk: int | None = None) -> dict:
    """{"ppl": all targets, "last": the last ``last_tokens`` targets of each window, "windows": n} at ``length``;
    {"error": ...} when the text is shorter than one window. ``chunk``: :func:`token_nll`'s chunked prefill."""
    windows = eval_windows(heldout, length, max_tokens)  # (n, L)
    if len(windows) == 0:
        return {"error": f"held-out text has {len(heldout)} tokens, fewer than {length}"}
    nll = torch.stack([token_nll(model, w, chunk) for w in windows])  # (n, L - 1)
    return {"ppl": math.exp(nll.double().mean()), "last": math.exp(nll[:, -last_tokens:].double().mean()),
            "windows": len(windows), "last_tokens": min(last_tokens, length - 1)}


def context_gain(model, original, heldout: torch.Tensor, length: int, max_tokens: int, reach: int,
                 last_tokens: int = 1024) -> dict:
    """Does ``model`` use the context past ``original``'s reach? For each window of ``length`` tokens, the
    perplexity of its last ``last_tokens`` targets by ``model`` with the whole window, over the same targets by
    ``original`` with only the window's last ``reach`` tokens: {"gain": ratio (< 1: the extra context helps),
    "full": ..., "reach": ..., "windows": n}."""
    windows = eval_windows(heldout, length, max_tokens)  # (n, L)
    if len(windows) == 0 or length <= reach:
        return {"error": f"needs windows of {length} > {reach} tokens; the text has {len(heldout)}"}
    full = torch.stack([token_nll(model, w)[-last_tokens:] for w in windows]).double().mean()
    short = torch.stack([token_nll(original, w[-reach:])[-last_tokens:] for w in windows]).double().mean()
    return {"gain": math.exp(full - short), "full": math.exp(full), "reach": math.exp(short), "windows": len(windows)}


def passkey_docs(tokenizer, lengths, depths, samples: int) -> list[dict]:
    """The posenc_passkey prompts (repeat filler), each with its answer tokens; built once for every model."""
    from .tasks import TaskInputError
    from .tasks.passkey_text import ANSWER_TOKENS, prompt, repeat_filler, seeded_key

    docs = []
    for length in lengths:
        budget = length - ANSWER_TOKENS
        filler = repeat_filler(tokenizer, budget)
        for depth in depths:
            for i in range(samples):
                key, _ = seeded_key(0, length, depth, i)
                try:
                    text, _ = prompt(tokenizer, filler, ". ", key, depth, budget)
                except TaskInputError:  # the instructions alone need more tokens than this length (tiny tokenizers)
                    continue
                ids = tokenizer(text)["input_ids"]
                full = tokenizer(text + " " + key)["input_ids"]
                if full[: len(ids)] != ids:  # the answer must not merge with the prompt's last token
                    raise RuntimeError(f"tokenizer merges the passkey into the prompt at length {length}")
                docs.append({"length": length, "depth": depth, "ids": full, "answer_from": len(ids)})
    return docs


def passkey_accuracy(model, docs: list[dict], done: Callable[[int], Any] | None = None) -> dict[str, float]:
    """{"<L>": accuracy, "<L>@<depth>": accuracy, "<L>/n": prompts, "<L>/nll": mean NLL (nats) of the answer
    tokens}; hit = argmax reproduces every answer token. The NLL is the continuous score behind the hits: it tells
    two models with the same hit count apart, and moves before a hit flips. ``done(tokens)`` after each prompt
    (a progress bar's ``update``: a 16k prompt takes minutes on a CPU)."""
    records = []
    for doc in docs:
        records.append(passkey_prompt(model, doc))
        if done is not None:
            done(len(doc["ids"]))
    return passkey_summary(records)


@torch.no_grad()
def passkey_prompt(model, doc: dict) -> dict:
    """One prompt in one forward: {"length", "depth", "hit": 1.0 when the argmax at every answer position is the
    answer token, "nll": mean NLL (nats) of the answer tokens}."""
    device = model.device
    ids = torch.tensor(doc["ids"], device=device)
    a = doc["answer_from"]
    with autocast(device):
        hidden = model.base_model(input_ids=ids[None], use_cache=False).last_hidden_state[0, a - 1 : -1]
        logits = model.get_output_embeddings()(hidden).float()  # (answer tokens, vocab)
    return {"length": doc["length"], "depth": doc["depth"], "hit": float(torch.equal(logits.argmax(-1), ids[a:])),
            "nll": float(F.cross_entropy(logits, ids[a:]))}


def passkey_summary(records: list[dict]) -> dict[str, float]:
    """passkey_accuracy's scores from :func:`passkey_prompt` records (scored in one run or in several)."""
    hits: dict[str, list[float]] = {}
    nlls: dict[str, list[float]] = {}
    for r in records:
        for key in (str(r["length"]), f"{r['length']}@{r['depth']:g}"):
            hits.setdefault(key, []).append(r["hit"])
        nlls.setdefault(str(r["length"]), []).append(r["nll"])
    scores = {key: sum(v) / len(v) for key, v in hits.items()}
    scores.update({f"{key}/n": len(v) for key, v in hits.items() if "@" not in key})
    scores.update({f"{key}/nll": sum(v) / len(v) for key, v in nlls.items()})
    return scores
