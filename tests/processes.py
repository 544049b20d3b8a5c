"""Multi-process launches for the tests: a free rendezvous port, and a run that, when it hangs, prints where every
process is stuck instead of a bare timeout.

A hung run gets SIGABRT in its whole process group; with ``PYTHONFAULTHANDLER`` set, every Python process in it
(launcher, agent, ranks) writes the stacks of all its threads to stderr before it dies. The first hang is a warning
with those stacks and the run is launched again; a second hang fails the test with them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import warnings

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(command: list[str], env: dict[str, str], timeout: float = 300, attempts: int = 2,
                  **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(command, capture_output=True, text=True)`` in a new session. A run past ``timeout`` seconds is
    killed after its processes print their stacks; it is launched again (``attempts`` in all: gloo and the launcher
    rarely hang on a loaded machine, see the warning) and the last hang fails the test with the stacks."""
    for attempt in range(1, attempts + 1):
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env={**env, "PYTHONFAULTHANDLER": "1"}, start_new_session=True, **kwargs)
        try:
            stdout, stderr = process.communicate(timeout=timeout)
            return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
        except subprocess.TimeoutExpired:
            stdout, stderr = _stacks_of_hung(process)
        report = (f"{' '.join(command[:4])} ... hung for {timeout} s (attempt {attempt} of {attempts}); its output, "
                  f"then every process's stacks:\n{stdout[-4000:]}\n{stderr[-12000:]}")
        if attempt == attempts:
            pytest.fail(report)
        warnings.warn(report, HangWarning, stacklevel=2)
    raise AssertionError("unreachable")


class HangWarning(UserWarning):
    """A launch hung once and was run again; the message holds where each process waited."""


def _stacks_of_hung(process: subprocess.Popen) -> tuple[str, str]:
    os.killpg(process.pid, signal.SIGABRT)  # faulthandler: each process dumps its threads' stacks, then dies
    try:
        return process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        return process.communicate()
