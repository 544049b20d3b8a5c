"""What ``hf-posenc fit`` minimises, by forward passes only, on the model's own calibration text (the training split
of the named corpus, or the file given: never held-out text):

    score = ln(perplexity of the last ``last_tokens`` targets of each window of the target length)
            + needle_weight x mean NLL (nats) of the answer tokens of synthetic passkey prompts of the target length

Both terms are mean negative log-likelihoods in nats; the second is LongRoPE2's "needle-driven" loss (the passkey
prompts of :func:`..integrations.long_context.passkey_docs`). One candidate costs ``windows`` + prompts forwards.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..integrations.long_context import passkey_accuracy, passkey_docs, token_nll
from ..training.config import DataArgs
from ..training.data import read_texts

PASSKEY_DEPTHS = (0.25, 0.5, 0.75)


@dataclass(frozen=True)
class Objective:
    """The calibration inputs of one fit: (windows, L) token ids and the passkey prompts."""

    windows: torch.Tensor
    docs: list[dict]
    last_tokens: int
    needle_weight: float

    @property
    def forwards(self) -> int:
        """Forward passes per candidate."""
        return len(self.windows) + len(self.docs)


def calibration_text(data: str) -> list[str]:
    """The training documents of ``data``: a named corpus' training split, or the text file(s) given."""
    from pathlib import Path

    args = DataArgs(files=[data]) if Path(data).exists() else DataArgs(text=data)
    args.validate()
    documents, _, _ = read_texts(args)  # the held-out split is not read
    return documents


def calibration_windows(documents: list[str], tokenizer, length: int, count: int) -> torch.Tensor:
    """(count, length): the last count x length tokens of the training text, in order."""
    needed = count * length
    tail = "\n\n".join(documents)[-8 * needed:]  # >= 1 character per token
    ids = tokenizer(tail)["input_ids"][-needed:]
    if len(ids) < needed:
        raise ValueError(f"the calibration text has {len(ids)} tokens at its end, fewer than {count} window(s) of "
                         f"{length}; use a longer corpus or fewer --windows")
    return torch.tensor(ids).view(count, length)


def build_objective(data: str, tokenizer, length: int, windows: int, samples: int, last_tokens: int,
                    needle_weight: float) -> Objective:
    docs = passkey_docs(tokenizer, [length], PASSKEY_DEPTHS, samples) if samples else []
    if samples and not docs:
        raise ValueError(f"the tokenizer needs more than {length} tokens for a passkey prompt; pass "
                         "--passkey-samples 0 (perplexity only) or a longer --target-length")
    return Objective(calibration_windows(calibration_text(data), tokenizer, length, windows), docs,
                     min(last_tokens, length - 1), needle_weight)


def candidate_model(original, options: dict):
    """A copy of the unconverted ``original`` converted to rope longrope with ``options``."""
    import hf_posenc

    return hf_posenc.convert(copy.deepcopy(original), "rope", scaling="longrope", **options).eval()


@torch.no_grad()
def evaluate(model, objective: Objective, done: Callable[[int], Any] | None = None) -> dict:
    """{"score", "last_ppl", "needle_nll", "passkey" (accuracy), "forwards"} of one converted model; ``done(1)``
    after each forward (a progress bar's ``update``: a forward at 16k is minutes on a CPU)."""
    done = done or (lambda forwards: None)
    tails = []
    for window in objective.windows:
        tails.append(token_nll(model, window)[-objective.last_tokens:])
        done(1)
    nll = torch.stack(tails).double().mean()
    result = {"last_ppl": math.exp(float(nll)), "needle_nll": None, "passkey": None,
              "forwards": objective.forwards}
    score = float(nll)
    if objective.docs:
        length = str(objective.docs[0]["length"])
        passkey = passkey_accuracy(model, objective.docs, done=lambda tokens: done(1))
        result.update(needle_nll=passkey[f"{length}/nll"], passkey=passkey[length])
        score += objective.needle_weight * passkey[f"{length}/nll"]
    return {"score": score, **result}
