"""Checkpoints: ``accelerator.save_state`` (model, optimizer, scheduler, every process's RNG) plus a
:class:`TrainState` (step, data position, tokens seen), and the Ctrl-C handler that asks for one.

Layout: ``<output_dir>/checkpoints/step-0000200/``. The data position is the number of micro-batches each process
has consumed; with the epoch-seeded shuffle it pins the next batch exactly, so 2 + 2 resumed steps equal 4.

A run knows its own files by its *identity* (:func:`run_identity`: the config minus what may change on resume,
plus the process count): each checkpoint's run.json holds it, each ``start`` line of metrics.jsonl its
fingerprint. :func:`claim_output_dir` refuses a folder holding another run's checkpoints, metrics or model.
Checkpoints and the final model are saved into a hidden folder and renamed into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

from .._fs import publish_dir, remove_dir, sibling
from .config import ConfigError
from .metrics import METRICS_FILE, read_metrics

CHECKPOINTS = "checkpoints"
LOCK = ".lock"  # in output_dir while a run writes there: "host pid"
RUN_INFO = "run.json"  # in each checkpoint: the identity of the run that wrote it
# config keys that may change when a run is resumed (length, cadence, where things go): not part of its identity
RESUMABLE = ("max_steps", "output_dir", "resume_from", "log_every", "eval_every", "eval_tokens", "eval_multipliers",
             "report_to", "save_every", "keep_checkpoints", "rank_report", "gradient_checkpointing")


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


def run_identity(config, num_processes: int) -> dict[str, Any]:
    """Everything that produced a run's checkpoints (model, method, options, data, optimisation, LoRA, seed, ...),
    as plain JSON values: the config minus :data:`RESUMABLE`, plus the number of processes."""
    values = {k: v for k, v in config.to_dict().items() if k not in RESUMABLE}
    return json.loads(json.dumps({**values, "num_processes": num_processes}, sort_keys=True, default=str))


def fingerprint(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (their run.json written last), oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / RUN_INFO).is_file())


def save_checkpoint(accelerator, output_dir: str | Path, step: int, identity: dict[str, Any], keep: int) -> Path:
    """Save on every process (collective) into a hidden folder; the main process adds run.json, renames it into
    place (replacing an older save of the same step only then) and prunes old checkpoints."""
    path = checkpoint_dir(output_dir, step)
    partial = path.with_name(f".{path.name}.partial")  # the same name on every process; not matched by step-*
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)  # left by a crash
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        info = {"step": step, "fingerprint": fingerprint(identity), "run": identity}
        (partial / RUN_INFO).write_text(json.dumps(info, indent=2) + "\n")
        publish_dir(partial, path)
        if keep:
            for old in list_checkpoints(output_dir)[:-keep]:
                remove_dir(old)
    accelerator.wait_for_everyone()
    return path


def claim_output_dir(output_dir: str | Path, identity: dict[str, Any], resume_from: str | None) -> Path | None:
    """Check that ``output_dir`` holds nothing of another run, then return the checkpoint to resume from (None for
    a fresh run). Refused: another run's checkpoints, metrics or model; a fresh run over this run's checkpoints
    (a later ``resume_from: latest`` would pick the old ones)."""
    out = Path(output_dir)
    fix = f"choose another output_dir, or delete {out} to start over"
    for path in list_checkpoints(out):
        saved = _read_identity(path)
        if saved != identity:
            raise ConfigError(f"{out} holds checkpoints of another run ({path.name}: {_differences(saved, identity)}"
                              f"); {fix}")
    starts = _start_fingerprints(out)
    if any(f != fingerprint(identity) for f in starts):
        raise ConfigError(f"{out / METRICS_FILE} holds metrics of another run ({_config_differences(out, identity)}"
                          f"); {fix}")
    if not starts and (out / "config.json").is_file():
        raise ConfigError(f"{out} holds a model that no fine-tune into it wrote (config.json; is it the model being "
                          "fine-tuned?); choose another output_dir")
    if resume_from is None:
        found = list_checkpoints(out)
        if found:
            raise ConfigError(f"{out} holds checkpoints of this run (newest {found[-1].name}); continue it with "
                              f"--resume_from latest, or delete {out / CHECKPOINTS} to start over")
        return None
    path = resolve_resume(resume_from, out, identity)
    later = [p.name for p in list_checkpoints(out) if p.name > path.name]  # step-0000200 > step-0000100
    if later:
        raise ConfigError(f"{out} holds checkpoints past {path.name} ({', '.join(later)}) that a later resume_from: "
                          f"latest would continue; delete them to go back to {path.name}, or resume into another "
                          "output_dir")
    return path


def resolve_resume(resume_from: str, output_dir: str | Path, identity: dict[str, Any]) -> Path:
    """``'latest'`` or a path -> a complete checkpoint folder written by this run (the same identity)."""
    if resume_from == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"resume_from: latest, but {Path(output_dir) / CHECKPOINTS} holds no checkpoint")
        path = found[-1]
    else:
        path = Path(resume_from)
        if not (path / RUN_INFO).is_file():
            raise FileNotFoundError(f"resume_from: {path} is not a complete checkpoint (no {RUN_INFO})")
    saved = _read_identity(path)
    if saved != identity:
        raise ConfigError(f"resume_from: {path} was written by another run ({_differences(saved, identity)}); "
                          "resume with the same settings, or start a fresh run in another output_dir")
    return path


@contextlib.contextmanager
def final_model_dir(output_dir: str | Path) -> Iterator[Path]:
    """Yield a hidden folder in ``output_dir`` to save the final model into; on success its files are renamed
    into ``output_dir`` (config.json last), so a failed save never leaves new files beside old ones."""
    out = Path(output_dir)
    tmp = sibling(out / "final", "partial")
    tmp.mkdir(parents=True)
    try:
        yield tmp
        entries = sorted(tmp.iterdir(), key=lambda p: p.name == "config.json")
        for entry in entries:
            if entry.is_dir():
                publish_dir(entry, out / entry.name)  # e.g. the LoRA adapter
            else:
                os.replace(entry, out / entry.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_identity(checkpoint: Path) -> dict[str, Any] | None:
    return json.loads((checkpoint / RUN_INFO).read_text()).get("run")  # None: written before run identities


def _start_fingerprints(output_dir: Path) -> list[str | None]:
    """The run fingerprint of every ``start`` line in metrics.jsonl (None where a line has none)."""
    return [r.get("run") for r in read_metrics(output_dir) if r.get("event") == "start"]


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def _differences(saved: dict[str, Any] | None, identity: dict[str, Any]) -> str:
    """``"lr: 0.001 -> 0.003, method: alibi -> t5"`` (saved -> this run)."""
    if saved is None:
        return "no run identity: written by an older hf_posenc"
    a, b = _flat(saved), _flat(identity)
    changed = [f"{k}: {a.get(k)} -> {b.get(k)}" for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
    return ", ".join(changed) or "the same settings, another hf_posenc version"


def _config_differences(out: Path, identity: dict[str, Any]) -> str:
    """What differs from the run whose train_config.json is in ``out`` (best effort: no process count there)."""
    try:
        saved = json.loads((out / "train_config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return "its settings are unknown"
    saved = {k: v for k, v in saved.items() if k not in RESUMABLE}
    mine = {k: v for k, v in identity.items() if k != "num_processes"}
    return _differences(saved, mine) if saved != mine else "another process count or hf_posenc version"


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
        for sig, handler in self._previous.items():  # whatever was there: default, SIG_IGN (nohup, CI), a user's
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: one not set from Python


class OutputLock:
    """``<output_dir>/.lock`` while a run writes there. A second run into the same folder is refused: its resume
    could pick a checkpoint that the first run's pruning deletes a moment later. A lock left by a process that no
    longer runs on this host is taken over. Only the main process locks (``enabled``).

    The folders the lock had to create are removed again on exit when the run left nothing in them (a run refused
    by its checks leaves no folder behind)."""

    def __init__(self, output_dir: str | os.PathLike | None, enabled: bool = True):
        self.path = Path(output_dir) / LOCK if output_dir is not None and enabled else None
        self.owner = f"{socket.gethostname()} {os.getpid()}"
        self.created: list[Path] = []  # folders made for the lock, outermost first

    def __enter__(self) -> "OutputLock":
        if self.path is None:
            return self
        self.created = make_output_dir(self.path.parent)
        try:
            self._acquire()
        except BaseException:
            self._remove_created()
            raise
        return self

    def _acquire(self) -> None:
        while True:
            try:
                with open(self.path, "x") as f:
                    f.write(self.owner)
                return
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
        self._remove_created()

    def _remove_created(self) -> None:
        for folder in reversed(self.created):  # innermost first; a folder something was written into stays
            with contextlib.suppress(OSError):
                folder.rmdir()


def make_output_dir(out: Path) -> list[Path]:
    """Create ``out`` (and missing parents); return the folders created, outermost first. An existing file, or a
    file in the way, is refused with a :class:`ConfigError` naming the fix."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir {out} is an existing file, not a folder; choose another output_dir")
    missing = [p for p in (out, *out.parents) if not p.exists()][::-1]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a parent that is a file, no permission, read-only disk
        raise ConfigError(f"output_dir {out} cannot be created ({err.strerror or err}); choose another "
                          "output_dir") from None
    return missing


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
