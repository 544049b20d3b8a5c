"""``hf-posenc retrofit``: convert, fine-tune briefly, and score the original, the best training-free conversion and
the retrofit inside and past the original's trained context, on the fine-tune corpus' held-out text and on a
held-out corpus of another domain (so that forgetting shows).

    hf-posenc retrofit                                   # offline default: SmolLM2-135M, the recipe for its family
    hf-posenc retrofit --method alibi                    # any method, same quick fine-tune
    hf-posenc retrofit --model gpt2 --method rope --steps 300 --seq-len 512 --eval-lengths 512,1024,2048,4096

Without ``--method`` the recipe measured best for the model's family runs (:data:`RECIPES`; the report says which
and the measurement behind it). Each stage leaves its result in the output folder, keyed by everything that
produced it, and is skipped when that result is there: the fetched model (source cache), the fine-tune
(``finetune-<recipe>-<key>``: checkpoints, then the final model) and each model's scores (``eval/<label>-<key>.json``;
those of the unconverted and the training-free models also in the source cache, as they do not depend on the run).

One job per module: ``recipes`` (which conversion and fine-tune), ``plan`` (the run's plan), ``args`` (the command
line -> a validated plan), ``stages`` (keys, locks, resumable stage results), ``models`` (loading what is scored),
``scores`` (long-context scores), ``select`` (choosing the retrofit by measurement), ``report``, ``plots`` and
``run`` (the command). This package re-exports their public names.
"""

from .args import (
    DEFAULT_MODEL, DEFAULT_TEXT, OTHER_DOMAIN, check_text, corpora, default_lengths, make_plan, model_facts,
    parse_args, positive_lengths,
)
from .models import load_candidate, load_original, load_retrofit
from .plan import Plan
from .plots import plot
from .recipes import QUICK, RECIPES, Recipe, family_recipe, method_recipe
from .report import cell, passkey_table, ppl_table, selection_text, tables, write_report
from .run import export_retrofit, logs_to_file, main, run_stages, say, stage_count
from .scores import (
    LAST_TOKENS, NOT_RUN, PASSKEY_MIN, RETRIEVAL_DEPTHS, SKIPPED, TOO_SHORT, compute_scores, eval_settings,
    file_digest, score_model, unscored_passkey,
)
from .select import (
    candidates, choice_key, choice_text, options_text, retrofit_dir, same_options, select_model, selection_window,
    training_text_tail,
)
from .stages import cached, fetch_model, finetune, finetune_summary, held_lock, stage_key, train_identity, write_json

__all__ = [
    "DEFAULT_MODEL", "DEFAULT_TEXT", "LAST_TOKENS", "NOT_RUN", "OTHER_DOMAIN", "PASSKEY_MIN", "QUICK", "RECIPES",
    "RETRIEVAL_DEPTHS", "SKIPPED", "TOO_SHORT", "Plan", "Recipe", "cached", "candidates", "cell", "check_text",
    "choice_key",
    "choice_text", "compute_scores", "corpora", "default_lengths", "eval_settings", "export_retrofit",
    "family_recipe", "fetch_model", "file_digest", "finetune", "finetune_summary", "held_lock", "load_candidate",
    "load_original", "load_retrofit", "logs_to_file", "main", "make_plan", "method_recipe", "model_facts",
    "options_text", "parse_args", "passkey_table", "plot", "positive_lengths", "ppl_table", "retrofit_dir",
    "run_stages", "same_options", "say", "score_model", "select_model", "selection_text", "selection_window",
    "stage_count", "stage_key", "tables", "train_identity", "training_text_tail", "unscored_passkey",
    "write_json", "write_report",
]
