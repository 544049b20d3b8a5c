"""Decode ms/token, converted vs unconverted, same run: a 12-layer GPT-2-shaped model (12 heads of 64, random
weights, fp32, B = 1, one thread) extends a cache of ``--contexts`` keys by ``--steps`` single-token steps.

    python benchmarks/bench_decode.py                                  # 2k and 8k context, alibi t5 rope nope
    python benchmarks/bench_decode.py --contexts 2048 --methods rope --repeats 3

The cache is filled synthetically: the model writes one real token (so the cache is the model's own, created and
wired by its forward as in any decode loop), then each layer's keys and values are replaced by random (1, 12, n, 64)
tensors at positions 0..n-1. Decode speed does not depend on the values, and a real 8k prefill of 12 layers costs
about a minute per model on this machine. After each timed run the cache is cropped back to n keys (``crop``).
Each method runs interleaved with the unconverted model (A B, B A, ...), the first run excluded; a cell is the
median over repeats of ms/token(converted) / ms/token(unconverted) from the same repeat.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_posenc as bp  # noqa: E402  (models, tokens and the machine line are shared with the main benchmark)


def fill(model, size, context: int):
    """The model's own cache after one real token, its keys / values replaced by ``context`` random ones."""
    import torch

    from hf_posenc import positions

    with torch.no_grad():
        cache = model(bp.tokens(size, 1), use_cache=True).cache
    g = torch.Generator().manual_seed(0)
    shape = (1, size["heads"], context, size["head_dim"])
    for layer in cache.layers:
        layer.keys, layer.values = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    cache.__dict__[positions.ATTRIBUTE] = torch.arange(context)[None]  # where the converted model keeps them
    return cache


def decode_fn(model, size, context: int, steps: int):
    import torch

    cache, x = fill(model, size, context), bp.tokens(size, steps, seed=1)

    def run():
        with torch.no_grad():
            t0 = time.perf_counter()
            for t in range(steps):
                model(x[:, t : t + 1], cache=cache, use_cache=True)
            run.per_token = (time.perf_counter() - t0) * 1000 / steps
        cache.crop(-steps)

    return run


def paired(run, baseline, repeats: int):
    run(), baseline()  # warm-up
    ms, base, ratios = [], [], []
    for r in range(repeats):
        for fn in (baseline, run) if r % 2 == 0 else (run, baseline):
            fn()
        ms.append(run.per_token), base.append(baseline.per_token), ratios.append(run.per_token / baseline.per_token)
    return statistics.median(ms), statistics.median(ratios), statistics.median(base)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--methods", nargs="+", default=["alibi", "t5", "rope", "nope"])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    started = time.time()
    size = dict(heads=12, head_dim=64, vocab=50257, trained=1024, layers=args.layers,
                max_len=max(args.contexts) + args.steps + 1)
    baseline = bp.build(size, None)
    rows = {m: [] for m in ["unconverted", *args.methods]}
    for context in args.contexts:
        base_run = decode_fn(baseline, size, context, args.steps)
        bases = []
        for method in args.methods:
            model = bp.build(size, method)
            ms, ratio, base = paired(decode_fn(model, size, context, args.steps), base_run, args.repeats)
            bases.append(base)
            rows[method].append(f"{ratio:.2f}x ({ms:.1f} ms)")
            print(f"{context} {method}: {ratio:.2f}x ({ms:.1f} vs {base:.1f} ms/token)", flush=True)
            del model
        rows["unconverted"].append(f"{statistics.median(bases):.1f} ms")
    print(f"\nCommand: `python benchmarks/bench_decode.py {' '.join(argv if argv is not None else sys.argv[1:])}`  ")
    print(f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {time.time() - started:.0f} s  ")
    print(f"Machine: {bp.machine()}  ")
    print(f"Model: GPT2Model, {args.layers} layers, 12 heads x 64, fp32, B=1, {args.steps} steps per run, "
          f"{args.repeats} repeats. Cells: median ratio ms/token converted / unconverted (median converted ms/token).\n")
    print("| method | " + " | ".join(f"{c} context" for c in args.contexts) + " |")
    print("|---|" + "---|" * len(args.contexts))
    for name, cells in rows.items():
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
