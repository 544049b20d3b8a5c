"""Which conversion and fine-tune a retrofit gets: the quick fine-tune every recipe starts from, the recipe
measured best for each family (:data:`RECIPES`), and the one for an explicit ``--method``."""

from __future__ import annotations

from dataclasses import dataclass, field

# the quick fine-tune every recipe starts from: full fine-tuning (on SmolLM2 -> ALiBi, 20 LoRA steps left held-out
# perplexity at 693, 30 full steps at 146; docs/extrapolation.md), short windows, few steps
QUICK = {
    "seq_len": 512, "batch_size": 2, "grad_accum": 1, "max_steps": 40, "lr": 5.0e-5, "warmup_steps": 4,
    "eval_every": 0, "save_every": 10, "keep_checkpoints": 1, "log_every": 5, "eval_tokens": 1024,
    "eval_multipliers": [1], "lora": None, "report_to": ["none"],
}


@dataclass(frozen=True)
class Recipe:
    """What a retrofit converts to and how it fine-tunes; ``evidence`` is the measurement that chose it."""

    name: str
    method: str
    options: dict
    train: dict  # TrainConfig overrides on top of QUICK; "pose.factor" is turned into pose.target_length
    evidence: str
    training_free: bool = False  # also score the converted model before the fine-tune (a training-free baseline)
    original_inside: bool = False  # the conversion equals the original up to the trained context (by construction)
    # method option -> values: with a training-free baseline, the retrofit is the best of {training-free,
    # fine-tuned} x these values on the fine-tune's own text at 2x the trained context (:func:`select_model`);
    # an option with one value is set on every candidate (chosen by other evidence), not chosen
    select: dict = field(default_factory=dict)
    # other training-free conversions, (method, options), that compete with the candidates above
    alternatives: tuple[tuple[str, dict], ...] = ()
    # whether a run fine-tunes by default: False where no fine-tune measured better than the training-free
    # candidates on this hardware budget (``hf-posenc retrofit --finetune`` forces one); ``skip_reason`` says why
    finetune: bool = True
    skip_reason: str = ""


RECIPES: dict[str, Recipe] = {
    # a model with a native rotary (Llama-style): training-free conversions that are the original inside the trained
    # context, chosen on the training text: its own RoPE scaled by Dynamic YaRN, or Self-Extend / ReRoPE past it;
    # the fine-tune (PoSE positions up to 4x the trained context, distilled from the original) only on request
    "rotary": Recipe(
        name="rotary", method="rope", options={"scaling": "dynamic_yarn", "factor": 4.0},
        train={"pose": {"factor": 4, "chunks": 2}, "distill": {"weight": 1.0, "temperature": 1.0, "lm_weight": 0.0}},
        evidence="docs/extrapolation.md section 2 (SmolLM2-135M, CPU): Dynamic YaRN x4 is the original up to 8k "
                 "and the best training-free scaling past it (its scale grown 1.5x faster past 8k finds the 16k "
                 "passkey as often as dynamic NTK); Self-Extend (W = 4096, G 8) and ReRoPE (W 4096), also the "
                 "original inside 8k, do better past it (section 2e); log-n attention past 8k lifts Self-Extend's "
                 "passkey at 16k from 0.80 to 0.90 for 0.2 % of training-text perplexity (section 2e); YaRN's "
                 "attention temperature and the conversion are chosen on the training text",
        training_free=True, original_inside=True, select={"mscale": [1.0, 0.5], "growth": [1.5]},
        alternatives=(("self_extend", {"group": 8, "dynamic": True, "logn": True}),  # window: trained context / 2
                      ("rerope", {"dynamic": True})),
        finetune=False,
        skip_reason="the 40-step PoSE + self-distillation fine-tune lost the choice to the training-free "
                    "conversions in every measured run on SmolLM2 (docs/extrapolation.md 2c-2d); --finetune runs it"),
    # a learned absolute table (GPT-2, BERT): ALiBi, fine-tuned on the LM loss and distilled from the original
    "learned": Recipe(
        name="alibi-distill", method="alibi", options={},
        train={"lr": 3.0e-4, "distill": {"weight": 1.0, "temperature": 1.0, "lm_weight": 1.0}},
        evidence="docs/extrapolation.md section 1 (GPT-2 pretrained here): ALiBi is the flattest retrofit from 1x "
                 "to 16x the trained length (148.9 / 146.5); self-distillation keeps the original's predictions"),
}


def family_recipe(spec) -> Recipe:
    """The default recipe for an arch spec: by where its native positions live."""
    return RECIPES["rotary" if spec.rotary is not None else "learned"]


def method_recipe(method: str, options: dict) -> Recipe:
    """``--method``: the quick fine-tune with the LM loss plus self-distillation, for any method."""
    return Recipe(name=method, method=method, options=options,
                  train={"distill": {"weight": 1.0, "temperature": 1.0, "lm_weight": 1.0}},
                  evidence="chosen with --method")
