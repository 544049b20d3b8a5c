"""Held-out perplexity at a given length: exp(mean token NLL) over non-overlapping windows of that length.

Causal: every token but each window's first is a target. MLM: pseudo-perplexity, exp of the masked-token loss,
with masks fixed by window index (the same at every evaluation, so numbers compare across steps). Windows are
split across processes and the sums reduced, so every process must call this at the same step.
"""

from __future__ import annotations

import math

import torch

from .data import eval_windows, mask_for_mlm, mask_seed


@torch.no_grad()
def perplexity(accelerator, model, heldout: torch.Tensor, length: int, max_tokens: int, tokens_per_batch: int,
               objective: str, collator=None, seed: int = 0) -> float:
    """Perplexity of (unwrapped) ``model`` on ``heldout`` windows of ``length`` tokens; about
    ``tokens_per_batch`` tokens per forward."""
    windows = eval_windows(heldout, length, max_tokens)  # (W, length)
    index = torch.arange(windows.shape[0])[accelerator.process_index :: accelerator.num_processes]
    batch = max(1, tokens_per_batch // length)
    was_training = model.training
    model.eval()
    nll = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    count = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    try:
        for start in range(0, index.numel(), batch):
            rows = index[start : start + batch]
            ids = windows[rows]
            if objective == "mlm":
                inputs = mask_for_mlm(collator, ids, mask_seed(seed, int(rows[0]), 0) + 7)
                targets = int((inputs["labels"] != -100).sum())
            else:
                inputs = {"input_ids": ids, "labels": ids}
                targets = ids.shape[0] * (length - 1)
            if targets == 0:
                continue
            inputs = {k: v.to(accelerator.device) for k, v in inputs.items()}
            with accelerator.autocast():
                loss = model(**inputs).loss
            nll += loss.double() * targets
            count += targets
    finally:
        model.train(was_training)
    nll, count = accelerator.reduce(nll, "sum"), accelerator.reduce(count, "sum")
    return math.exp(float(nll / count.clamp_min(1)))
