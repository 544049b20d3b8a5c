"""Variants of the rotary retrofit recipe, scored with several windows per length (the main job scores one window
at 8k and 16k). Each variant is the default recipe (``hf_posenc.retrofit.RECIPES["rotary"]``) with some fine-tune
settings replaced; ``training-free`` is the recipe's conversion without a fine-tune. Every row: the last-1024-token
and all-token perplexity of the first ``--windows`` windows of each held-out text at each length.

    OMP_NUM_THREADS=1 python studies/smollm2_recipe_variants.py --out runs/retrofit-smollm2-135m-rotary \
        --rows training-free,default --lengths 8192,16384 --windows 2

``training-free-mscale-0.5``: the same conversion with YaRN's attention temperature at 0.5 (what the retrofit
chooses on SmolLM2). ``--out`` is a retrofit output folder: a fine-tune already there (same settings) is reused, not repeated.
``--fit DIR`` adds the row ``fitted-longrope``: the factors ``hf-posenc fit --out DIR`` found.

Resumable: each window, context-gain reach and passkey prompt is written to ``OUT/cells/<row>/`` as soon as it is
scored (a 16k window is minutes on a CPU), so a rerun, with more windows, lengths or prompts, scores only the
missing units; the row is loaded only when one is missing.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import shlex
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

VARIANTS: dict[str, dict] = {  # row -> TrainConfig overrides on top of the default recipe's
    "default": {},
    "pose-2x": {"pose": {"factor": 2, "chunks": 2}},  # PoSE ids up to 2x the trained context (not 4x)
    "lm-mix": {"distill": {"weight": 1.0, "temperature": 1.0, "lm_weight": 0.5}},
    "lora": {"lora": {"r": 16, "alpha": 32, "dropout": 0.0,
                      "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}, "lr": 2.0e-4},
}
TRAINING_FREE = "training-free"
TRAINING_FREE_VARIANTS: dict[str, dict] = {  # row -> method options on top of the recipe's, no fine-tune
    TRAINING_FREE: {},
    "training-free-mscale-0.5": {"mscale": 0.5},  # the retrofit's choice on SmolLM2 (docs/extrapolation.md §2c)
    "dynamic-ntk": {"scaling": "dynamic", "factor": 4.0},  # transformers' dynamic NTK x4 (the passkey target's row)
    "yarn-x4": {"scaling": "yarn", "factor": 4.0},  # static YaRN x4 (YaRN's own temperature)
    # Dynamic YaRN whose scale grows faster past 8k (1 + growth (L/8k - 1): 2.5 / 3 at 16k instead of 2)
    "training-free-growth-1.5": {"mscale": 0.5, "growth": 1.5},
    "training-free-growth-2": {"mscale": 0.5, "growth": 2.0},
}
# row -> (method, options): another training-free conversion of the original (issue 26's self-extension rows); all
# dynamic: the original inside the trained 8k, the far positions past it
TRAINING_FREE_METHODS: dict[str, tuple[str, dict]] = {
    "self-extend-w4096-g8": ("self_extend", {"window": 4096, "group": 8, "dynamic": True}),
    # log-n attention past 8k: each query at position p scaled by ln(p + 1) / ln(8192) (1.077 at 16k)
    "self-extend-w4096-g8-logn": ("self_extend", {"window": 4096, "group": 8, "dynamic": True, "logn": True}),
    "self-extend-w2048-g8": ("self_extend", {"window": 2048, "group": 8, "dynamic": True}),
    "rerope-w4096": ("rerope", {"window": 4096, "dynamic": True}),
    "rerope-leaky-w4096-k8": ("rerope", {"window": 4096, "leaky": 8.0, "dynamic": True}),
}
FITTED = "fitted-longrope"  # --fit DIR: LongRoPE factors searched by hf-posenc fit (docs/fit.md)
METHOD_ROWS: dict[str, list[str]] = {  # row -> hf-posenc retrofit flags: another method (--out: that run's folder)
    "alibi": ["--method", "alibi", "--lr", "3e-4"],  # as studies/smollm2_cpu_retrofit.py (docs §2a)
    "t5": ["--method", "t5", "--lr", "3e-4"],
}
PASSKEY_DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]  # as the H200 study (docs/extrapolation.md §2b)
TRAINED = 8192  # SmolLM2-135M's trained context: the original's reach in the context-gain column


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="a retrofit output folder (fine-tunes land and are reused here)")
    parser.add_argument("--rows", default=f"{TRAINING_FREE},default",
                        help=f"comma-separated: {', '.join(known_rows())}")
    parser.add_argument("--lengths", default="8192,16384")
    parser.add_argument("--windows", type=int, default=2, help="windows per length, from the start of each text")
    parser.add_argument("--passkey-lengths", default="", help="comma-separated lengths to score passkey at (none: '')")
    parser.add_argument("--passkey-samples", type=int, default=2,
                        help=f"passkey prompts per depth ({len(PASSKEY_DEPTHS)} depths: {PASSKEY_DEPTHS})")
    parser.add_argument("--passkey-depths", default=",".join(map(str, PASSKEY_DEPTHS)),
                        help="comma-separated key depths (a subset splits the prompts over several jobs)")
    parser.add_argument("--gain", action="store_true",
                        help="also the context gain past 8k of the self-extension rows (dynamic: the original within "
                             "8k): last-1k perplexity with the whole window / with its last 8k tokens")
    parser.add_argument("--retrofit-args", default="", help="extra hf-posenc retrofit flags (model, data, steps)")
    parser.add_argument("--corpora", default="", help="comma-separated held-out corpora to score (default: all)")
    parser.add_argument("--fit", default=None,
                        help=f"an hf-posenc fit folder: adds the row {FITTED!r}, rope scaled by its factors.json")
    args = parser.parse_args(argv)
    if args.fit:
        TRAINING_FREE_METHODS[FITTED] = fitted_row(Path(args.fit))
    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in known_rows()]
    if unknown:
        parser.error(f"unknown rows {unknown}; known: {', '.join(known_rows())}")
    if set(rows) & set(METHOD_ROWS) and len(rows) > 1:
        parser.error("a method row (alibi, t5) runs alone: --out is that retrofit's own folder")
    if args.windows < 1:
        parser.error("--windows must be >= 1")
    args.rows = rows
    args.passkey_depths = [float(d) for d in args.passkey_depths.split(",") if d]
    args.lengths, args.passkey_lengths = ([int(n) for n in text.split(",") if n] for text in (args.lengths,
                                                                                              args.passkey_lengths))
    return args


def fitted_row(folder: Path) -> tuple[str, dict]:
    """The conversion hf-posenc fit found (its factors.json: convert's keyword arguments for rope's longrope)."""
    factors = folder / "factors.json"
    if not factors.exists():
        raise SystemExit(f"{factors} does not exist: run hf-posenc fit --out {folder} first (docs/fit.md)")
    return "rope", {"scaling": "longrope", **json.loads(factors.read_text())}


def known_rows() -> list[str]:
    return [*TRAINING_FREE_VARIANTS, *TRAINING_FREE_METHODS, *VARIANTS, *METHOD_ROWS]


def plan_for(row: str, out: str, retrofit_args: str):
    """The retrofit plan of one row (the training-free rows: the default recipe's, never fine-tuned; a method row:
    ``hf-posenc retrofit --method ...``'s)."""
    from hf_posenc import retrofit

    overrides = VARIANTS.get(row, {})

    def variant(spec) -> "retrofit.Recipe":
        default = retrofit.family_recipe(spec)
        return replace(default, name=default.name if not overrides else f"{default.name}-{row}",
                       train={**default.train, **overrides})

    flags = [*METHOD_ROWS.get(row, []), *shlex.split(retrofit_args)]
    plan = retrofit.make_plan(retrofit.parse_args(["--out", out, *flags]), variant)
    return plan, plan.recipe


class Cells:
    """One file per scored unit (a window, a context-gain reach, a passkey prompt) in ``OUT/cells/<row>/``, written
    as it is scored: a study stopped at any point and rerun (with more windows, lengths or prompts) scores only what
    is missing. Each file keeps its identity (the row's conversion or fine-tune, the text's digest, the unit); a file
    whose identity differs was written by another study and is refused, never reused."""

    def __init__(self, folder: Path, identity: dict):
        self.folder, self.identity = folder, identity

    def get(self, name: str, unit: dict, compute: Callable[[], dict]) -> dict:
        from hf_posenc._fs import write_text_atomic

        path, identity = self.folder / f"{name}.json", {**self.identity, **unit}
        if path.exists():
            saved = json.loads(path.read_text())
            if saved["identity"] != identity:
                differ = sorted(k for k in {*identity, *saved["identity"]}
                                if identity.get(k) != saved["identity"].get(k))
                raise SystemExit(f"{path} was scored by another study (differs in {differ}): use another --out")
            return saved["value"]
        value = compute()
        self.folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps({"identity": identity, "value": value}))
        return value


def load_row(row: str, plan, recipe) -> tuple[dict, Callable]:
    """(the row's identity: its conversion or fine-tune; the row's model, loaded on the first call: when a unit is
    first missing)."""
    import torch

    from hf_posenc import retrofit

    if row in TRAINING_FREE_VARIANTS:
        options = {**recipe.options, **TRAINING_FREE_VARIANTS[row]}
        about, conversion = {"finetune": None, "options": options}, (recipe.method, options)
    elif row in TRAINING_FREE_METHODS:
        method, options = TRAINING_FREE_METHODS[row]
        about, conversion = {"finetune": None, "method": method, "options": options}, (method, options)
    else:
        about = {"finetune": {**retrofit.finetune_summary(plan), "dir": str(plan.finetune_dir),
                              "overrides": VARIANTS.get(row, METHOD_ROWS.get(row))}}
        conversion = None

    @functools.cache
    def model():
        with torch.enable_grad():  # a fine-tune may run here, inside the scoring's no_grad
            return (retrofit.load_original(plan, conversion) if conversion
                    else retrofit.load_retrofit(retrofit.finetune(plan)))[0].eval()

    return about, model


def score_row(row: str, args) -> dict:
    import hashlib

    import torch
    import transformers

    from hf_posenc import retrofit
    from hf_posenc.integrations.long_context import passkey_docs, passkey_prompt, passkey_summary, token_nll
    from hf_posenc.training.data import eval_windows

    plan, recipe = plan_for(row, args.out, args.retrofit_args)
    started = time.time()
    result, model = load_row(row, plan, recipe)
    retrofit.fetch_model(plan)
    tokenizer = transformers.AutoTokenizer.from_pretrained(plan.train.tokenizer or plan.model_location)
    cells = Cells(Path(args.out) / "cells" / row, {"row": row, "model": plan.model_location, **result})
    last = retrofit.LAST_TOKENS

    def window_nll(ids: torch.Tensor) -> dict:  # mean NLL (nats) of all targets of ids and of the last ``last``
        nll = token_nll(model(), ids).double()  # (len(ids) - 1,)
        return {"all": nll.mean().item(), "last": nll[-last:].mean().item()}

    with torch.no_grad():
        for corpus, path in plan.corpora.items():
            if args.corpora and corpus not in args.corpora.split(","):
                continue
            text = path.read_text()
            ids = torch.tensor(tokenizer(text)["input_ids"])
            digest = hashlib.sha256(text.encode()).hexdigest()[:16]
            for n in args.lengths:
                windows = eval_windows(ids, n, n * args.windows)  # (W, n)
                if len(windows) == 0:
                    result[f"{corpus}@{n}"] = {"error": f"held-out text has {len(ids)} tokens, fewer than {n}"}
                    continue
                units = [cells.get(f"{corpus}@{n}#{k}", {"text": digest, "length": n, "window": k},
                                   lambda w=w: window_nll(w))
                         for k, w in enumerate(windows)]
                result[f"{corpus}@{n}"] = window_cell(units, n, last)
                print(row, corpus, n, result[f"{corpus}@{n}"], flush=True)
                if args.gain and n > TRAINED and result.get("method"):  # dynamic rows: the original within 8k
                    reach = [cells.get(f"reach:{corpus}@{n}#{k}", {"text": digest, "length": n, "window": k},
                                       lambda w=w: window_nll(w[-TRAINED:]))
                             for k, w in enumerate(windows)]
                    result[f"gain:{corpus}@{n}"] = gain_cell(units, reach)
                    print(row, corpus, n, "context gain", result[f"gain:{corpus}@{n}"], flush=True)
        if args.passkey_lengths:
            docs = passkey_docs(tokenizer, args.passkey_lengths, args.passkey_depths, args.passkey_samples)
            digests = [hashlib.sha256(str(d["ids"]).encode()).hexdigest()[:16] for d in docs]
            prompts = [cells.get(f"passkey:{d['length']}@{d['depth']:g}-{key}", {"prompt": key},
                                 lambda d=d: passkey_prompt(model(), d))
                       for d, key in zip(docs, digests)]
            result["passkey"] = passkey_summary(prompts)
            print(row, "passkey", result["passkey"], flush=True)
    result["prepare_s"] = round(time.time() - started, 1)
    return result


def window_cell(units: list[dict], length: int, last: int) -> dict:
    """window_scores' cell from per-window mean NLLs (equal-length windows: the mean of means is the mean)."""
    mean = lambda key: sum(u[key] for u in units) / len(units)  # noqa: E731
    return {"ppl": math.exp(mean("all")), "last": math.exp(mean("last")), "windows": len(units),
            "last_tokens": min(last, length - 1)}


def gain_cell(units: list[dict], reach: list[dict]) -> dict:
    """context_gain's cell: the row's last-1k NLL with the whole window over the same targets with its last 8k."""
    full = sum(u["last"] for u in units) / len(units)
    short = sum(r["last"] for r in reach) / len(reach)
    return {"gain": math.exp(full - short), "full": math.exp(full), "reach": math.exp(short), "windows": len(units)}


def table(results: dict, lengths: list[int], passkey_lengths: list[int] = ()) -> str:
    """Last-1024-token perplexity per corpus and length, then passkey accuracy (prompts; the answer's mean NLL)."""
    corpora = sorted({key.split("@")[0] for r in results.values() for key in r if "@" in key and ":" not in key})
    gains = [(c, n) for c in corpora for n in lengths if any(f"gain:{c}@{n}" in r for r in results.values())]
    head = ([f"{c} {n}" for c in corpora for n in lengths] + [f"gain {c} {n}" for c, n in gains]
            + [f"passkey {n}" for n in passkey_lengths])
    lines = ["| row | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)]
    for row, r in results.items():
        cells = [r.get(f"{c}@{n}", {}) for c in corpora for n in lengths]
        texts = [f"{x['last']:.2f}" if "last" in x else "—" for x in cells]
        texts += [f"{r[f'gain:{c}@{n}']['gain']:.3f}x" if f"gain:{c}@{n}" in r else "—" for c, n in gains]
        key = r.get("passkey", {})
        texts += [passkey_cell(key, n) for n in passkey_lengths]
        lines.append(f"| {row} | " + " | ".join(texts) + " |")
    return "\n".join(lines) + "\n"


def passkey_cell(scores: dict, n: int) -> str:
    if str(n) not in scores:
        return "—"
    nll = f"; NLL {scores[f'{n}/nll']:.2f}" if f"{n}/nll" in scores else ""  # older results have no NLL
    return f"{scores[str(n)]:.2f} ({scores[f'{n}/n']}{nll})"


def merged(previous: dict, results: dict) -> dict:
    """Earlier results of this folder with this run's: a row scored again keeps its other cells (lengths, passkey
    lengths) when it is the same model (fine-tune folder and options), and is replaced when it is not."""
    out = dict(previous)
    for row, new in results.items():
        old = previous.get(row, {})
        same = old.get("options") == new.get("options") and (
            (old.get("finetune") or {}).get("dir") == (new.get("finetune") or {}).get("dir"))
        out[row] = {**old, **new, "passkey": {**old.get("passkey", {}), **new.get("passkey", {})}} if same else new
    return out


def scored_lengths(results: dict) -> tuple[list[int], list[int]]:
    """(perplexity lengths, passkey lengths) present in any row."""
    ppl = {int(key.split("@")[1]) for r in results.values() for key in r if "@" in key and ":" not in key}
    passkey = {int(key) for r in results.values() for key in r.get("passkey", {}) if key.isdigit()}
    return sorted(ppl), sorted(passkey)


def main(argv=None) -> int:
    from hf_posenc._fs import write_text_atomic

    args = parse_args(argv)
    out = Path(args.out)
    results = {row: score_row(row, args) for row in args.rows}
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"variants-W{args.windows}.json"
    results = merged(json.loads(path.read_text()) if path.exists() else {}, results)
    text = table(results, *scored_lengths(results))
    write_text_atomic(path, json.dumps(results, indent=1))
    write_text_atomic(path.with_suffix(".md"), text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
