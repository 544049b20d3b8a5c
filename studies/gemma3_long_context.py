"""Gemma 3 270M at long context: perplexity of each window's last 1k tokens on the held-out corpora, original and
the family's default retrofit (hf_posenc.retrofit.recipes: Dynamic YaRN x4 on the full-attention layers), with the
wall time of each forward.

    HF_POSENC_CACHE=~/.cache/hf_posenc OMP_NUM_THREADS=2 python studies/gemma3_long_context.py \\
        --out studies/results/gemma3_long_context --lengths 8192

One window per (corpus, length) unless ``--windows``: a 270M model with 3 full-attention layers of 32k positions
takes minutes per 8k forward on 2 CPU cores (docs/extrapolation.md, "Gemma 3 270M").

``--chunk N`` feeds each window N tokens at a time through a cache (token_nll's chunked prefill: the same NLL; the
sliding-window layers then attend to their 512 keys only, and no (L, L) mask is built: 64k fits in memory). Dynamic
YaRN follows the input length, so a chunk would set its own scale: with ``--chunk`` the retrofit at length L is
scored as YaRN at L's scale, which is the same model for an input of L tokens (tests/test_studies.py). A rerun
skips the (corpus, variant, length) rows results.json already has.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import transformers

import hf_posenc
from hf_posenc import sources
from hf_posenc._fs import write_text_atomic
from hf_posenc.integrations.long_context import window_scores
from hf_posenc.registry import arch_for
from hf_posenc.retrofit.recipes import family_recipe

CORPORA = ("shakespeare", "django-docs")


def retrofit_options(model) -> tuple[str, dict]:
    """The family's default retrofit, with every option the recipe fixes to one value (its first otherwise)."""
    recipe = family_recipe(arch_for(model.config))
    chosen = {name: values[0] for name, values in recipe.select.items()}
    return recipe.method, {**recipe.options, **chosen}


def load(path: str, variant: str, length: int | None = None):
    """(model, its description). ``length``: the retrofit fixed at that input length (Dynamic YaRN -> YaRN at the
    length's scale; the original inside the trained context), for a chunked prefill."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if variant == "original":
        return model, "original"
    method, options = retrofit_options(model)
    converted = hf_posenc.convert(model, method, **options)
    if length is None or options.get("scaling") != "dynamic_yarn":
        return converted, f"{method} {options}"
    scale = converted.base_model.posenc.dynamic_scale(length)
    fresh = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if scale == 1.0:
        return fresh, f"{method} {options} = the original at {length}"
    fixed = {**{k: v for k, v in options.items() if k != "growth"}, "scaling": "yarn", "factor": scale}
    return hf_posenc.convert(fresh, method, **fixed), f"{method} {options} = {method} {fixed} at {length}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="results.json, table.md")
    parser.add_argument("--lengths", default="8192", help="comma-separated window lengths")
    parser.add_argument("--windows", type=int, default=1, help="windows per (corpus, length)")
    parser.add_argument("--corpora", default=",".join(CORPORA), help="text source names or text files (held-out)")
    parser.add_argument("--model", default="gemma3-270m", help="source name or transformers directory")
    parser.add_argument("--variants", default="original,retrofit")
    parser.add_argument("--chunk", type=int, default=None, help="prefill N tokens at a time (64k: 2048)")
    args = parser.parse_args(argv)
    path = str(sources.resolve_model(args.model))
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.json"
    rows = json.loads(results.read_text()) if results.exists() else []
    done = {(r["corpus"], r["variant"], r["length"], r.get("windows")) for r in rows}
    for corpus in args.corpora.split(","):
        text = Path(corpus) if Path(corpus).is_file() else sources.text_splits(corpus)["heldout"]
        heldout = tokenizer(text.read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
        for variant in args.variants.split(","):
            for length in map(int, args.lengths.split(",")):
                if (corpus, variant, length, args.windows) in done:
                    continue
                model, described = load(path, variant, length if args.chunk else None)
                start = time.perf_counter()
                scores = window_scores(model, heldout, length, args.windows * length, chunk=args.chunk)
                rows.append({"corpus": corpus, "variant": variant, "conversion": described, "length": length,
                             **scores, "chunk": args.chunk, "wall_s": round(time.perf_counter() - start, 1)})
                print(json.dumps(rows[-1]), flush=True)
                write_text_atomic(results, json.dumps(rows, indent=2) + "\n")
    lines = ["| corpus | variant | length | last-1k ppl | all-token ppl | windows | wall s |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['corpus']} | {r['conversion']} | {r['length']} | {r.get('last', float('nan')):.2f} | "
              f"{r.get('ppl', float('nan')):.2f} | {r.get('windows', 0)} | {r['wall_s']} |" for r in rows]
    write_text_atomic(args.out / "table.md", "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
