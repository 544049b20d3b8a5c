"""The plan of a run: everything it will do, fixed before any work starts (built by :func:`~.args.make_plan`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .recipes import Recipe


@dataclass
class Plan:
    """Everything the run will do, fixed before any work starts."""

    out: Path
    recipe: Recipe
    train: Any  # hf_posenc.training.TrainConfig
    trained_length: int  # the original's context (its position limit / trained RoPE context)
    lengths: list[int]
    corpora: dict[str, Path]  # name -> held-out text file
    eval_tokens: int
    passkey_lengths: list[int]
    depths: list[float]
    num_samples: int
    retrieval_length: int = 0  # past the trained context: passkey for the retrofit row only (0: none)
    retrieval_depths: list[float] = field(default_factory=list)
    retrieval_samples: int = 0  # prompts per depth at retrieval_length
    selection_length: int = 0  # tokens of the fine-tune text the selection scores each candidate on (0: none)
    finetune: bool = True  # whether this run fine-tunes (the recipe's default, or --finetune)
    fit_budget: int = 0  # forward passes for fitting LongRoPE factors (hf-posenc fit), 0: no fitted candidate
    fit_target: int = 0  # the length the factors are fitted for (the recipe's factor x the trained context)
    fitted: list = field(default_factory=list)  # the fitted candidate, once the fit stage has run
    fit_summary: dict = field(default_factory=dict)  # its OUT/fit-*/fit.json and folder
    model_location: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    choice: dict = field(default_factory=dict)  # what :func:`select_model` chose (set after the fine-tune)

    @property
    def finetune_dir(self) -> Path:
        return Path(self.train.output_dir)
