"""lm-eval task YAMLs bundled with hf_posenc (``posenc_ppl``, ``posenc_passkey``, ``posenc_passkey_prose``; tag
``posenc`` runs all three) and the Python they reference. ``hf-posenc eval`` puts TASKS_DIR on lm-eval's
include path."""

from pathlib import Path

TASKS_DIR = Path(__file__).parent


class TaskInputError(ValueError):
    """Bad task metadata (lengths, text file, tokenizer); the message says what to pass instead."""
