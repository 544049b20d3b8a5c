"""SmolLM2-135M retrofits on 2 CPU cores: training-free RoPE scalings vs brief fine-tunes with self-distillation.

    python studies/smollm2_cpu_retrofit.py --out runs/study_cpu [--only default,alibi] [--lengths 1024,...,32768]

Every row is scored by ``hf-posenc retrofit``'s own stages (``hf_posenc.retrofit``) with the same settings: held-out
Shakespeare (the fine-tune corpus' held-out plays) and held-out Django documentation (another domain, so that
forgetting shows), the perplexity of each window's last 1024 tokens and of all its tokens, passkey retrieval.
Rows (each a retrofit run in ``OUT/<name>``; the original's and the training-free rows' scores are shared through
the source cache, so they are computed once):

* ``default``: ``hf-posenc retrofit --finetune`` with no method, the recipe for Llama-style models with its
  fine-tune (Dynamic YaRN x4 + PoSE to 32k + pure self-distillation), competing with the training-free
  candidates; its run also scores the original and Dynamic YaRN training-free;
* ``dynamic-ntk`` / ``yarn``: training-free dynamic NTK x4 and YaRN x4 (scored only);
* ``alibi`` / ``t5``: ``--method alibi`` / ``--method t5`` (LM loss + self-distillation, lr 3e-4).

``results.json`` collects every row (with its training tokens and wall time); ``table.md`` the tables.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from hf_posenc import retrofit

FINETUNED = {
    "default": ["--finetune"],  # the rotary recipe's fine-tune (the retrofit skips it unless asked)
    "alibi": ["--method", "alibi", "--lr", "3e-4"],
    "t5": ["--method", "t5", "--lr", "3e-4"],
}
TRAINING_FREE = {
    "dynamic-ntk": ("rope", {"scaling": "dynamic", "factor": 4.0}),
    "yarn": ("rope", {"scaling": "yarn", "factor": 4.0}),
}


def common_args(args) -> list[str]:
    extra = ["--eval-lengths", args.lengths] if args.lengths else []
    extra += shlex.split(args.retrofit_args) if args.retrofit_args else []
    return extra + (["--passkey-samples", str(args.passkey_samples)] if args.passkey_samples else [])


def run_finetuned(name: str, args, rows: dict) -> None:
    argv = ["--out", str(args.out / name), *FINETUNED[name], *common_args(args)]
    if retrofit.main(argv) != 0:
        raise SystemExit(f"{name}: hf-posenc retrofit {' '.join(argv)} failed")
    plan = retrofit.make_plan(retrofit.parse_args(argv))
    command = f"hf-posenc retrofit {' '.join(argv)}"
    for path in sorted((plan.out / "eval").glob("*.json")):
        saved = json.loads(path.read_text())
        row = {"scores": saved["scores"], "command": command}
        if saved["label"] == "retrofit":
            rows[name] = {**row, "finetune": retrofit.finetune_summary(plan)}
        elif saved["label"] == "original":
            rows.setdefault("original", row)
        elif saved["label"] == "training-free":  # the recipe's conversion before its fine-tune (not select-*)
            rows.setdefault(f"{plan.recipe.method} {retrofit.options_text(plan.recipe.options)}, training-free", row)


def run_training_free(name: str, args, rows: dict) -> None:
    argv = ["--out", str(args.out / "default"), *common_args(args)]
    plan = retrofit.make_plan(retrofit.parse_args(argv))
    retrofit.fetch_model(plan)
    method, options = TRAINING_FREE[name]
    scores = retrofit.score_model(plan, name, {"model": plan.train.model, "method": method, "options": options},
                                  lambda: retrofit.load_original(plan, (method, options)), shared=True)
    rows[name] = {"scores": scores, "command": f"python studies/smollm2_cpu_retrofit.py --only {name}"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", default=None, help=f"comma-separated rows of {[*FINETUNED, *TRAINING_FREE]}")
    parser.add_argument("--lengths", default=None, help="evaluation lengths (default: the retrofit's 1k-16k)")
    parser.add_argument("--passkey-samples", type=int, default=None)
    parser.add_argument("--retrofit-args", default=None,
                        help="more hf-posenc retrofit flags for every row, e.g. '--model DIR --data FILE' (tests)")
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else [*FINETUNED, *TRAINING_FREE]
    path = args.out / "results.json"
    rows = json.loads(path.read_text()) if path.is_file() else {}
    for name in names:
        (run_finetuned if name in FINETUNED else run_training_free)(name, args, rows)
        args.out.mkdir(parents=True, exist_ok=True)
        retrofit.write_json(path, rows)
    plan = retrofit.make_plan(retrofit.parse_args(["--out", str(args.out / "default"), *common_args(args)]))
    text = retrofit.tables(plan, {k: v["scores"] for k, v in rows.items()})
    (args.out / "table.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
