"""Does sharper attention find the passkey SmolLM2-135M misses inside its own 8k? (issue 26, docs/extrapolation.md 2e)

The key placed just before the question (depth 1) is lost by the unconverted model at 4k and 8k. This scores those
prompts with every attention logit multiplied by a constant t^2: the model converted to ``rope`` with ``longrope``
scaling whose factors are all 1 (the original frequencies) and ``attention_factor`` t (cos and sin scaled by t, so
q . k by t^2). t = 1 is the original. One JSON line per prompt, appended to ``--out`` (a rerun appends again).

    OMP_NUM_THREADS=1 python studies/smollm2_attention_temperature.py --lengths 4096,8192 --factors 1.038,1.1,0.95 \
        --out runs/attention_temperature.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="4096,8192", help="comma-separated prompt lengths (tokens)")
    parser.add_argument("--factors", default="1.038", help="comma-separated t (cos/sin scale; logits x t^2); 1 = none")
    parser.add_argument("--depths", default="1", help="comma-separated key depths (1: just before the question)")
    parser.add_argument("--samples", type=int, default=2, help="keys per (length, depth)")
    parser.add_argument("--out", type=Path, required=True, help="a .jsonl file, appended to")
    return parser.parse_args(argv)


def sharpened(path: Path, t: float):
    """SmolLM2 with every attention logit x t^2 (t = 1: the original, unconverted)."""
    import torch
    import transformers

    import hf_posenc

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if t != 1.0:
        pairs = model.config.head_dim // 2
        hf_posenc.convert(model, "rope", scaling="longrope", factor=2.0, long_factor=[1.0] * pairs,
                          attention_factor=t)  # inside the trained 8k: short_factor (all 1), cos/sin x t
    return model


def main(argv=None) -> int:
    import transformers

    from hf_posenc import sources
    from hf_posenc.integrations.long_context import passkey_docs, passkey_prompt

    args = parse_args(argv)
    path = Path(sources.resolve_model("smollm2-135m"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    lengths = [int(n) for n in args.lengths.split(",")]
    docs = passkey_docs(tokenizer, lengths, [float(d) for d in args.depths.split(",")], args.samples)
    for t in (float(f) for f in args.factors.split(",")):
        model = sharpened(path, t)
        for index, doc in enumerate(docs):
            started = time.time()
            record = {**passkey_prompt(model, doc), "t": t, "prompt": index, "seconds": round(time.time() - started, 1)}
            print(json.dumps(record), flush=True)
            with args.out.open("a") as f:
                f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
