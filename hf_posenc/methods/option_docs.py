"""docs/methods.md's option tables, generated from each options dataclass's ``help`` metadata.

Each table sits between ``<!-- options: NAME -->`` and ``<!-- /options -->``; tests/test_methods.py checks that the
file holds exactly what :func:`render` gives. Regenerate after changing an option:

    python -m hf_posenc.methods.option_docs docs/methods.md
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

from .base import MethodOptions

BLOCK = re.compile(r"(<!-- options: (\w+) -->\n)(.*?)(<!-- /options -->)", re.S)


def option_table(options: type[MethodOptions]) -> str:
    """The markdown table of one options dataclass: option, default, and its ``help`` text."""
    fields = dataclasses.fields(options)
    if not fields:
        return "No options.\n"
    rows = ["| option | default | meaning |", "|---|---|---|"]
    for f in fields:
        rows.append(f"| `{f.name}` | `{f.default!r}` | {f.metadata['help']} |")
    return "\n".join(rows) + "\n"


def render(text: str, methods: dict) -> str:
    """``text`` with every options block replaced by the table of the method it names."""

    def table(match: re.Match) -> str:
        name = match.group(2)
        if name not in methods:
            raise ValueError(f"docs name an options table for unknown method {name!r}")
        return match.group(1) + option_table(methods[name].Options) + match.group(4)

    return BLOCK.sub(table, text)


def documented(text: str) -> list[str]:
    return [m.group(2) for m in BLOCK.finditer(text)]


def main(argv: list[str] | None = None) -> int:
    from .._fs import write_text_atomic
    from ..registry import METHODS

    path = Path((argv or sys.argv[1:] or ["docs/methods.md"])[0])
    write_text_atomic(path, render(path.read_text(encoding="utf-8"), METHODS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
