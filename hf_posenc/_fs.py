"""Writes that are complete or absent: save into a temp name beside the target, then rename. Standard library
only, so ``hf-posenc convert`` and the training code share it without importing anything optional."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator


class OutputExistsError(FileExistsError):
    """The output is an existing file, or a folder holding something, and replacing it was not asked for."""


def check_output_dir(out: str | os.PathLike, overwrite: bool = False, flag: str = "--overwrite") -> None:
    """Refuse an existing file, and a non-empty folder unless ``overwrite``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} is an existing file, not a folder; choose another output folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"{out} is not empty; choose another output folder, or pass {flag} to replace it")


def sibling(path: Path, tag: str) -> Path:
    """A hidden, unique name beside ``path``: ``.<name>.<tag>-<pid>-<random>``."""
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def publish_dir(tmp: Path, out: Path) -> None:
    """Rename the complete folder ``tmp`` to ``out``; an existing ``out`` is moved aside first and deleted last.
    (POSIX cannot swap two folders in one step: a crash in between leaves both, nothing is lost.)"""
    old = None
    if out.exists():
        old = sibling(out, "old")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        remove_dir(old)


def remove_dir(path: Path) -> None:
    """Delete a folder so that no half-deleted copy stays under its name (renamed away first)."""
    doomed = sibling(path, "deleting")
    path.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


@contextlib.contextmanager
def replaced_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a new empty folder beside ``out``; when the block succeeds it becomes ``out`` (an existing ``out``
    is replaced only then), when it fails it is deleted and ``out`` stays as it was."""
    out = Path(out)
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = sibling(out, "partial")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_dir(tmp, out)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to a temp file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    tmp = sibling(path, "partial")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
