"""Choosing the retrofit by measurement: the candidates a recipe compares (training-free or fine-tuned, over its
option grid), scored on the end of the training text (the held-out texts stay unseen), and the chosen model's
folder."""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import torch
import transformers

from .._fs import replaced_dir
from ..integrations.long_context import window_scores
from ..registry import method_class
from ..training.data import read_texts
from .models import load_candidate
from .plan import Plan
from .recipes import Recipe
from .scores import LAST_TOKENS
from .stages import cached, train_identity, write_json


def candidates(recipe: Recipe, finetune: bool = True) -> list[dict]:
    """The models :func:`select_model` compares, simplest first: {"model": "training-free" | "fine-tuned",
    "method": ..., "options": method options}: the recipe's method over its option grid (training-free where the
    recipe has a training-free baseline, fine-tuned where ``finetune``), then its alternative training-free
    conversions. One (the fine-tuned model) for recipes without a training-free baseline."""
    grid = [dict(zip(recipe.select, values)) for values in itertools.product(*recipe.select.values())] or [{}]
    kinds = (["training-free"] if recipe.training_free else []) + (["fine-tuned"] if finetune else [])
    own = [{"model": kind, "method": recipe.method, "options": {**recipe.options, **values}}
           for kind in kinds for values in grid]
    others = [{"model": "training-free", "method": method, "options": dict(options)}
              for method, options in (recipe.alternatives if recipe.training_free else ())]
    return own + others


def training_text_tail(plan: Plan) -> str:
    """The end of the fine-tune's training text, enough characters for one selection window (>= 1 per token)."""
    documents, _, _ = read_texts(plan.train.data)
    return "\n\n".join(documents)[-8 * plan.selection_length:]


def selection_window(plan: Plan, tokenizer):
    """(L,) the last L = ``plan.selection_length`` tokens of the fine-tune's training text: what the selection
    scores (the held-out texts stay unseen by every choice)."""
    ids = tokenizer(training_text_tail(plan))["input_ids"][-plan.selection_length:]
    if len(ids) < plan.selection_length:
        raise ValueError(f"the training text's end has {len(ids)} tokens, fewer than {plan.selection_length}")
    return torch.tensor(ids)


def select_model(plan: Plan, final: Path) -> dict:
    """The retrofit: the candidate with the lowest perplexity on one window of the training text at 2x the trained
    context (ties: the simpler, listed first). Every candidate's score goes to ``selection.json``."""
    options = candidates(plan.recipe, plan.finetune) + plan.fitted  # fitted: the LongRoPE fit's (--fit-budget)
    if len(options) == 1:
        return {**options[0], "chosen_by": None}
    tokenizer = transformers.AutoTokenizer.from_pretrained(final or plan.model_location)
    window = selection_window(plan, tokenizer)
    digest = hashlib.sha256(window.numpy().tobytes()).hexdigest()[:16]
    scored = []
    for candidate in options:
        identity = {"candidate": candidate, "window": digest, "model": plan.train.model}
        if candidate["model"] == "fine-tuned":
            identity["finetune"] = train_identity(plan.train)
        label = f"select-{candidate['model']}"

        def compute(candidate=candidate):
            model = load_candidate(plan, final, candidate)
            with torch.no_grad():
                return window_scores(model, window, len(window), len(window), LAST_TOKENS)

        scores = cached(plan, label, identity, compute, shared=candidate["model"] == "training-free")
        print(f"      {candidate_text(candidate)}: perplexity {scores['ppl']:.3f}")
        scored.append({**candidate, **scores})
    best = min(scored, key=lambda c: c["ppl"])  # min keeps the first of equals
    choice = {"model": best["model"], "method": best["method"], "options": best["options"],
              "chosen_by": {"tokens": len(window), "text": "the end of the training text", "candidates": scored}}
    write_json(plan.out / "selection.json", choice)
    return choice


def retrofit_dir(plan: Plan, final: Path, choice: dict) -> Path:
    """The retrofit as a model folder: the fine-tune's own when it was chosen as trained, else ``OUT/retrofit``
    (the chosen model saved whole, written aside and renamed)."""
    from peft import PeftModel  # the train extra's; imported here so the package imports without it

    if (choice["model"] == "fine-tuned" and choice["method"] == plan.recipe.method
            and same_options(plan.recipe.method, choice["options"], plan.recipe.options)):
        return final
    out = plan.out / "retrofit"
    marker = out / "choice.json"
    if marker.is_file() and json.loads(marker.read_text()) == {**choice, "finetune": str(final)}:
        return out
    model = load_candidate(plan, final, choice)
    if isinstance(model, PeftModel):  # an unmerged LoRA fine-tune: the folder holds the merged weights
        model = model.merge_and_unload()
    tokenizer = transformers.AutoTokenizer.from_pretrained(final or plan.model_location)
    with replaced_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "choice.json").write_text(json.dumps({**choice, "finetune": str(final)}, default=str))
    return out


def same_options(method: str, a: dict, b: dict) -> bool:
    """Whether two option dicts configure the method alike (an option left out = its default)."""
    options = method_class(method).Options
    return options.from_dict(method, a).to_dict() == options.from_dict(method, b).to_dict()


def choice_key(choice: dict) -> dict:
    """What the retrofit model is (not how it was chosen); a recipe without a choice keeps its scores' old key."""
    if choice["chosen_by"] is None:
        return {}
    return {"choice": {"model": choice["model"], "method": choice["method"], "options": choice["options"]}}


def choice_text(choice: dict) -> str:
    return f"the {choice['model']} model, {candidate_text(choice)}"


def candidate_text(candidate: dict) -> str:
    return f"{candidate['model']} {candidate['method']} {options_text(candidate['options'])}"


def options_text(options: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in options.items())
