"""Command line of the fine-tune recipe: ``main(argv)`` parses ``--config`` plus ``--key value`` overrides and runs
:func:`hf_posenc.training.train`. Exit codes: 0 done, 2 bad input (one line on stderr), 130 stopped by Ctrl-C."""

from __future__ import annotations

import sys

USAGE = """\
usage: accelerate launch recipes/finetune.py --config CONFIG.yaml [--key value ...]
       python recipes/finetune.py --config CONFIG.yaml [--key value ...]

Fine-tune a model after swapping its position encoding, so it works past its old position limit.
Flags override YAML keys: --max_steps 200, --lora.r 16 (turns LoRA on), --resume_from latest.
Values are read as YAML (--eval_multipliers [1,2,8]). See docs/finetune.md.

config keys:"""


def usage() -> str:
    from .config import SECTION, reference

    lines = [USAGE]
    for key, help, default in reference():
        lines.append(f"  --{key:<26} {help}" + ("" if default == SECTION else f" [default: {default}]"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    from . import ConfigError, DataError, load_config, train

    try:
        result = train(load_config(argv=argv))
    except (ConfigError, DataError, FileNotFoundError) as err:
        print(f"finetune: error: {err}", file=sys.stderr)
        return 2
    return 130 if result.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
