"""Project hygiene: CI runs exactly the README's test command; import stays light."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_test_command() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- test-command -->\s*```(?:bash|sh)?\n(.+?)\n```", text, re.S)
    assert match, "README.md must show the test command in a fenced block after <!-- test-command -->"
    return match.group(1).strip()


def test_ci_runs_the_readme_test_command():
    command = readme_test_command()
    ci = (ROOT / ".ci" / "run").read_text()
    assert command.startswith("python3 -m venv .venv && . .venv/bin/activate && ")
    setup_and_test = command.split(" && ", 2)[2]  # CI makes and activates the venv on its own lines
    assert setup_and_test in ci.splitlines(), f"{setup_and_test!r} not a line of .ci/run"


def test_import_is_light():
    """`import hf_posenc` pulls in no optional dependency beyond what transformers itself imports."""
    optional = "('lm_eval', 'accelerate', 'peft', 'matplotlib', 'datasets', 'yaml', 'tqdm')"
    probe = f"import sys, {{}}; print(sorted(m for m in {optional} if m in sys.modules))"
    run = lambda mod: subprocess.run([sys.executable, "-c", probe.format(mod)], capture_output=True, text=True,
                                     check=True).stdout.strip()
    baseline = run("transformers.modeling_utils, transformers.models.t5.modeling_t5")
    assert run("hf_posenc") == baseline
