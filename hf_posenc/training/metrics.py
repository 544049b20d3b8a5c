"""Metrics: one JSON object per line in ``<output_dir>/metrics.jsonl``, a console line, and Accelerate trackers.
Only the main process writes."""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


def resolve_trackers(report_to: list[str]) -> list[str]:
    """['auto'] -> ['tensorboard'] if installed, else []; ['none'] -> []; other names as given."""
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    if "none" in names:
        return []
    if "auto" in names:
        installed = importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX")
        names = [n for n in names if n != "auto"] + (["tensorboard"] if installed else [])
    return list(dict.fromkeys(names))


class MetricsLog:
    """Append-only: a resumed run adds to the same file."""

    def __init__(self, accelerator, output_dir: str | Path, write_line=print):
        self.accelerator = accelerator
        self.path = Path(output_dir) / METRICS_FILE
        self.write_line = write_line  # tqdm.write on the console, so the bar stays intact
        self.trackers = bool(accelerator.trackers)
        if accelerator.is_main_process and self.path.is_file() and self.path.stat().st_size:
            with self.path.open("rb+") as f:  # a line cut short by a crash: end it, so the next line stays whole
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")

    def log(self, record: dict[str, Any], console: bool = True) -> None:
        if not self.accelerator.is_main_process:
            return
        record = {"time": round(time.time(), 3), **record}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if console:
            self.write_line(format_record(record))
        if self.trackers and "step" in record:
            numbers = {k: v for k, v in _flatten(record).items() if isinstance(v, (int, float)) and k != "time"}
            self.accelerator.log(numbers, step=record["step"])


def format_record(record: dict[str, Any]) -> str:
    parts = []
    for key, value in _flatten(record).items():
        if key == "time":
            continue
        if isinstance(value, float):
            value = f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
        parts.append(f"{key} {value}")
    return " | ".join(parts)


def _flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        else:
            flat[prefix + key] = value
    return flat


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    """Every record of ``<output_dir>/metrics.jsonl``; a line cut short by a crash is skipped."""
    path = Path(output_dir) / METRICS_FILE
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
