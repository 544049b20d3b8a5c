"""``hf-posenc eval``: lm-eval's own command line (``run`` / ``ls`` / ``validate``, every flag) with the
``hf-posenc`` model registered and the bundled tasks on the include path.

    hf-posenc eval --model hf-posenc --model_args pretrained=gpt2-alibi,max_length=8192 \\
        --tasks posenc_ppl,posenc_passkey --metadata '{"max_seq_lengths":[1024,2048,4096,8192]}' --output_path out/

Differences from ``lm-eval``: ``--model`` defaults to ``hf-posenc``; a user ``--include_path`` is searched
after the bundled tasks; when every task asked for is bundled, lm-eval's ~14k built-in task configs are not
indexed (that index alone takes ~10 s); input errors print one line and exit 2 (``HF_POSENC_TRACEBACK=1``
shows the traceback).
"""

from __future__ import annotations

import contextlib
import os
import sys
from argparse import Namespace

from .tasks import TASKS_DIR


def main(argv: list[str] | None = None) -> int:
    from lm_eval._cli import HarnessCLI  # what lm_eval.__main__.cli_evaluate runs
    from lm_eval.utils import setup_logging

    from .lm_eval_model import MODEL_NAME, bundled_task_names  # registers the hf-posenc model

    argv = list(sys.argv[1:] if argv is None else argv)
    saved_argv, sys.argv = sys.argv, ["hf-posenc eval", *argv]  # HarnessCLI parses sys.argv
    try:
        setup_logging()
        cli = HarnessCLI()
        args = cli.parse_args()
        bundled = bundled_task_names()
        requested = _prepare(args, MODEL_NAME, bundled)
        with _bundled_tasks_only(bool(requested) and set(requested) <= bundled):
            cli.execute(args)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except (ValueError, OSError) as err:
        if os.environ.get("HF_POSENC_TRACEBACK"):
            raise
        print(f"hf-posenc eval: error: {err}", file=sys.stderr)
        return 2
    finally:
        sys.argv = saved_argv
    return 0


def _prepare(args: Namespace, model_name: str, bundled: set[str]) -> list[str]:
    """Add the bundled tasks to the include path, default the model, reject unknown ``posenc*`` task names;
    returns the requested task names (empty when tasks come from elsewhere, e.g. ``--config``)."""
    if hasattr(args, "include_path"):
        extra = args.include_path.split(os.pathsep) if isinstance(args.include_path, str) else []
        args.include_path = [str(TASKS_DIR), *extra]
    if getattr(args, "command", None) == "run" and not args.model:
        args.model = model_name
    _named_model_to_path(getattr(args, "model_args", None))
    requested = [name for item in (getattr(args, "tasks", None) or []) for name in item.split(",") if name]
    unknown = [name for name in requested if name.startswith("posenc") and name not in bundled]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; the bundled tasks are {sorted(bundled)}")
    return requested


def _named_model_to_path(model_args: dict | None) -> None:
    """``pretrained=<an hf_posenc.sources name>`` (smollm2-135m) becomes its cached folder, fetched if needed, before
    lm-eval reads the model args: RULER's tasks load their tokenizer from ``pretrained`` with AutoTokenizer, which
    knows folders and hub ids, not this package's names."""
    from .lm_eval_model import resolve_pretrained

    if isinstance(model_args, dict) and isinstance(model_args.get("pretrained"), str):
        model_args["pretrained"] = resolve_pretrained(model_args["pretrained"])


@contextlib.contextmanager
def _bundled_tasks_only(active: bool):
    """While active, lm-eval's TaskManager indexes only the include path (not its own task configs)."""
    import lm_eval.tasks

    original = lm_eval.tasks.TaskManager
    if not active:
        yield
        return

    class BundledOnly(original):
        def __init__(self, *args, **kwargs):
            kwargs["include_defaults"] = False
            super().__init__(*args, **kwargs)

    lm_eval.tasks.TaskManager = BundledOnly
    try:
        yield
    finally:
        lm_eval.tasks.TaskManager = original
