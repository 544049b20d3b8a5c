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


def test_a_hung_launch_fails_with_every_process_stack():
    """The multi-process tests' runner: a hang ends in a failure that shows where each process waits."""
    import pytest
    from processes import run_processes

    child = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); " \
            "time.sleep(60)"
    with pytest.raises(pytest.fail.Exception) as failure:
        run_processes([sys.executable, "-c", child], {}, timeout=3, attempts=1)
    assert str(failure.value).count("(most recent call first)") == 2  # the launcher's stack and its child's


def test_a_launch_that_hangs_once_is_run_again_with_a_warning(tmp_path):
    import pytest
    from processes import HangWarning, run_processes

    marker = tmp_path / "ran"
    once = f"import pathlib, time; p = pathlib.Path({str(marker)!r}); first = not p.exists(); p.touch(); " \
           "time.sleep(60 if first else 0); print('done')"
    with pytest.warns(HangWarning, match="most recent call first"):
        done = run_processes([sys.executable, "-c", once], {}, timeout=3)
    assert done.returncode == 0 and done.stdout == "done\n"
