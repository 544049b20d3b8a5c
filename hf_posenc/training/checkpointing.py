"""Checkpoints: ``accelerator.save_state`` (model, optimizer, scheduler, every process's RNG) plus a
:class:`TrainState` (step, data position, tokens seen), and the Ctrl-C handler that asks for one.

Layout: ``<output_dir>/checkpoints/step-0000200/``. The data position is the number of micro-batches each process
has consumed; with the epoch-seeded shuffle it pins the next batch exactly, so 2 + 2 resumed steps equal 4.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .config import ConfigError

CHECKPOINTS = "checkpoints"
LOCK = ".lock"  # in output_dir while a run writes there: "host pid"
RUN_INFO = "run.json"  # in each checkpoint: the settings a resume must match
MUST_MATCH = ("seq_len", "batch_size", "grad_accum", "seed", "num_processes")


@dataclass
class TrainState:
    """Registered with ``accelerator.register_for_checkpointing``, so it is saved and restored with the rest."""

    step: int = 0  # optimizer steps done
    micro_batches: int = 0  # micro-batches consumed per process: the data position
    tokens: int = 0  # training tokens seen, all processes

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key, value in state.items():
            setattr(self, key, int(value))


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"step-{step:07d}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (their run.json written last), oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / RUN_INFO).is_file())


def save_checkpoint(accelerator, output_dir: str | Path, step: int, run_info: dict[str, Any], keep: int) -> Path:
    """Save on every process (collective), then on the main process write run.json and prune old ones."""
    path = checkpoint_dir(output_dir, step)
    accelerator.save_state(str(path))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (path / RUN_INFO).write_text(json.dumps({"step": step, **run_info}, indent=2) + "\n")
        if keep:
            for old in list_checkpoints(output_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return path


def resolve_resume(resume_from: str, output_dir: str | Path, run_info: dict[str, Any]) -> Path:
    """``'latest'`` or a path -> a complete checkpoint folder whose run settings match this run's."""
    if resume_from == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"resume_from: latest, but {Path(output_dir) / CHECKPOINTS} holds no checkpoint")
        path = found[-1]
    else:
        path = Path(resume_from)
        if not (path / RUN_INFO).is_file():
            raise FileNotFoundError(f"resume_from: {path} is not a complete checkpoint (no {RUN_INFO})")
    saved = json.loads((path / RUN_INFO).read_text())
    changed = {k: (saved.get(k), run_info.get(k)) for k in MUST_MATCH if saved.get(k) != run_info.get(k)}
    if changed:
        detail = ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in changed.items())
        raise ConfigError(f"resume_from: {path} was written with other settings ({detail}); the data position "
                         "would not carry over. Resume with the same settings.")
    return path


class StopRequest:
    """Context manager: the first SIGINT / SIGTERM sets :attr:`requested` (the loop then saves a checkpoint at the
    end of the current step and stops); a second SIGINT raises ``KeyboardInterrupt`` at once."""

    def __init__(self):
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class OutputLock:
    """``<output_dir>/.lock`` while a run writes there. A second run into the same folder is refused: its resume
    could pick a checkpoint that the first run's pruning deletes a moment later. A lock left by a process that no
    longer runs on this host is taken over. Only the main process locks (``enabled``)."""

    def __init__(self, output_dir: str | os.PathLike | None, enabled: bool = True):
        self.path = Path(output_dir) / LOCK if output_dir is not None and enabled else None
        self.owner = f"{socket.gethostname()} {os.getpid()}"

    def __enter__(self) -> "OutputLock":
        if self.path is None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                with open(self.path, "x") as f:
                    f.write(self.owner)
                return self
            except FileExistsError:
                holder = self.path.read_text().strip()
                if _holder_alive(holder):
                    raise ConfigError(
                        f"{self.path.parent} is in use by another run ({holder or 'unknown'}); wait for it to stop "
                        f"(Ctrl-C saves a checkpoint), choose another output_dir, or delete {self.path} if that run "
                        "is gone"
                    ) from None
                self.path.unlink(missing_ok=True)

    def __exit__(self, *exc) -> None:
        if self.path is not None and self.path.is_file() and self.path.read_text().strip() == self.owner:
            self.path.unlink()


def _holder_alive(holder: str) -> bool:
    """Whether the ``"host pid"`` in a lock file is a live process (another host's: assumed alive)."""
    host, _, pid = holder.partition(" ")
    if host != socket.gethostname():
        return bool(holder)
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True
