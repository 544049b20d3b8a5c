"""Loading the models a run scores (fp32, eval): the original, optionally converted without training; a candidate
retrofit; the retrofit's folder."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

import hf_posenc

from ..registry import arch_for
from ..training import load_finetuned
from .plan import Plan


def load_original(plan: Plan, convert: tuple[str, dict] | None = None):
    model = transformers.AutoModelForCausalLM.from_pretrained(plan.model_location, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(plan.train.tokenizer or plan.model_location)
    limit = arch_for(model.config).table_limit(model.config)  # a learned table raises past its end
    if convert is not None:
        hf_posenc.convert(model, convert[0], **convert[1])
        limit = None
    return model, tokenizer, limit


def load_candidate(plan: Plan, final: Path, candidate: dict):
    """The candidate's model (fp32, eval); its tokenizer is the fine-tune's."""
    if candidate["model"] == "training-free":
        return load_original(plan, (candidate["method"], candidate["options"]))[0]
    return load_finetuned(final, dtype=torch.float32, posenc_options=candidate["options"]).eval()


def load_retrofit(final: Path):
    model = load_finetuned(final, dtype=torch.float32).eval()
    return model, transformers.AutoTokenizer.from_pretrained(final), None
