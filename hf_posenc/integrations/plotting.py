"""``hf-posenc plot``: perplexity and passkey accuracy against input length, one line per model, log-x, from
lm-eval result folders (the ALiBi paper's Figure 3 layout).

    hf-posenc plot results/ more_results/ --out docs/plots/     # -> perplexity.png, passkey.png (+ needle.png)
    hf-posenc plot --positions converted_model/ --out docs/plots/  # -> positions_<L>.png, positions_distance.png

Reads every ``*.json`` with a ``results`` entry under the given folders (lm-eval's ``results_<date>.json``).
Per-length metrics are the keys ``"<length>,none"`` of ``posenc_ppl`` (perplexity panel) and of
``posenc_passkey*`` / RULER ``niah_*`` (retrieval panel; RULER's -1 = length not run is skipped).
Uses matplotlib's Agg canvas directly: no pyplot, no display, the caller's backend untouched.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import defaultdict
from pathlib import Path
from typing import Iterable

from .._fs import sibling

PANELS = {
    "perplexity": ("Perplexity", ("posenc_ppl",)),
    "passkey": ("Passkey accuracy", ("posenc_passkey", "niah_")),
}
Series = dict[str, dict[str, list[tuple[int, float]]]]  # panel -> label -> [(length, value)] sorted by length


def load_results(paths: Iterable[str | Path]) -> list[dict]:
    """lm-eval result dicts from files or folders (searched recursively), oldest run first."""
    found = []
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist")
        for file in sorted(path.rglob("*.json")) if path.is_dir() else [path]:
            try:
                data = json.loads(file.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(data, dict) and isinstance(data.get("results"), dict):
                found.append(data)
    return sorted(found, key=lambda r: r.get("date") or 0)


def model_label(result: dict) -> str:
    """The checkpoint's folder / hub name from ``model_args``, plus ``+method`` when converted on load."""
    config = result.get("config") or {}
    args = config.get("model_args") or {}
    if isinstance(args, str):
        args = dict(part.split("=", 1) for part in args.split(",") if "=" in part)
    name = str(args.get("pretrained") or result.get("model_name") or config.get("model") or "model")
    label = Path(name.rstrip("/")).name or name
    return f"{label}+{args['posenc']}" if args.get("posenc") else label


def collect(results: Iterable[dict]) -> tuple[Series, dict[str, int]]:
    """(series, trained length per label). Later runs overwrite earlier ones at the same (label, length)."""
    points: dict[str, dict[str, dict[int, float]]] = {panel: defaultdict(dict) for panel in PANELS}
    trained: dict[str, int] = {}
    for result in results:
        base = model_label(result)
        if (result.get("config") or {}).get("trained_length"):
            trained[base] = int(result["config"]["trained_length"])
        for task, metrics in result["results"].items():
            panel = _panel(task)
            if panel is None:
                continue
            label = base if task in ("posenc_ppl", "posenc_passkey") else f"{base} [{task}]"
            for key, value in metrics.items():
                length, _, _filter = key.partition(",")
                if length.isdigit() and isinstance(value, (int, float)) and math.isfinite(value) and value >= 0:
                    points[panel][label][int(length)] = float(value)
    series = {panel: {label: sorted(by_length.items()) for label, by_length in sorted(labels.items())}
              for panel, labels in points.items()}
    return series, trained


def _panel(task: str) -> str | None:
    for panel, (_, prefixes) in PANELS.items():
        if task.startswith(prefixes):
            return panel
    return None


def plot(series: Series, out_dir: str | Path, trained: dict[str, int] | None = None) -> list[Path]:
    """One PNG per panel that has data (``perplexity.png``, ``passkey.png``); returns their paths."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, NullLocator

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for panel, lines in series.items():
        if not lines:
            continue
        ylabel = PANELS[panel][0]
        fig = Figure(figsize=(6.4, 4.4), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        lengths = sorted({n for points in lines.values() for n, _ in points})
        for label, points in lines.items():
            ax.plot([n for n, _ in points], [v for _, v in points], marker="o", label=label)
        for length in sorted(set((trained or {}).values())):
            ax.axvline(length, color="grey", linestyle=":", linewidth=1)
            ax.annotate(f"trained {length}", (length, 1), xycoords=("data", "axes fraction"), rotation=90,
                        va="top", ha="right", fontsize=8, color="grey")
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(lengths))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([str(n) for n in lengths], rotation=45 if len(lengths) > 6 else 0)
        values = [v for points in lines.values() for _, v in points]
        if panel == "perplexity" and min(values) > 0 and max(values) / min(values) > 20:
            ax.set_yscale("log")
        if panel == "passkey":
            ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("Inference input tokens")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        path, tmp = out / f"{panel}.png", sibling(out / f"{panel}.png", "partial")
        fig.savefig(tmp, dpi=150, format="png")
        os.replace(tmp, path)  # an old plot stays whole until the new one is
        written.append(path)
    return written


def needle_grid(results: list[dict]) -> dict[str, dict[tuple[float, int], float]]:
    """label -> {(depth, length): accuracy} from passkey results' ``"<L>@<depth>,<filter>"`` metrics."""
    grids: dict[str, dict[tuple[float, int], float]] = {}
    for result in results:
        base = model_label(result)
        for task, metrics in result["results"].items():
            if not task.startswith("posenc_passkey"):
                continue
            label = base if task == "posenc_passkey" else f"{base} [{task}]"
            for key, value in metrics.items():
                name = key.partition(",")[0]
                length, at, depth = name.partition("@")
                if at and length.isdigit() and isinstance(value, (int, float)):
                    try:
                        grids.setdefault(label, {})[(float(depth), int(length))] = float(value)
                    except ValueError:
                        continue
    return grids


def main(argv: list[str] | None = None) -> int:
    from . import position_plots

    parser = argparse.ArgumentParser(prog="hf-posenc plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="*", help="lm-eval --output_path folders or result JSON files")
    parser.add_argument("--positions", metavar="MODEL",
                        help="a converted model (folder or hub name): plot its position term per head "
                             "(hf_posenc/integrations/position_plots.py says what is drawn)")
    parser.add_argument("--lengths", type=int, nargs="+", default=list(position_plots.LENGTHS),
                        help=f"lengths of the --positions heatmaps (default: {' '.join(map(str, position_plots.LENGTHS))})")
    parser.add_argument("--out", default=".", help="folder for the pictures (default: .)")
    args = parser.parse_args(argv)
    if not args.results and not args.positions:
        parser.error("give lm-eval result folders / files, --positions MODEL, or both")
    if any(n < 2 for n in args.lengths):
        parser.error("--lengths must be at least 2")
    written = []
    if args.positions:
        from ..convert import from_pretrained

        try:
            model = from_pretrained(args.positions)
            written += position_plots.plot_positions(model, args.out, args.lengths, label=Path(args.positions).name)
        except (OSError, ValueError) as err:
            print(f"hf-posenc plot: error: --positions {args.positions}: {err}", file=sys.stderr)
            return 2
    if args.results:
        try:
            results = load_results(args.results)
        except FileNotFoundError as err:
            print(f"hf-posenc plot: error: {err}", file=sys.stderr)
            return 2
        series, trained = collect(results)
        found = plot(series, args.out, trained) + position_plots.plot_needles(needle_grid(results),
                                                                              args.out)
        if not found:
            print(f"hf-posenc plot: error: no posenc_ppl / posenc_passkey / niah_* results in "
                  f"{', '.join(args.results)}", file=sys.stderr)
            return 2
        written += found
    for path in written:
        print(path)
    return 0
