"""Decode ms/token, converted vs unconverted, same run: a 12-layer GPT-2-shaped model (12 heads of 64, random
weights, fp32, B = 1, one thread) extends a cache of ``--contexts`` keys by ``--steps`` single-token steps.

    python benchmarks/bench_decode.py                                  # 2k and 8k context, alibi t5 rope nope
    python benchmarks/bench_decode.py --contexts 2048 --methods rope --repeats 3

The cache is filled synthetically: the model writes one real token (so the cache is the model's own, created and
wired by its forward as in any decode loop), then each layer's keys and values are replaced by random (1, 12, n, 64)
tensors at positions 0..n-1. Decode speed does not depend on the values, and a real 8k prefill of 12 layers costs
about a minute per model on this machine. After each timed run the cache is cropped back to n keys (``crop``).
Each method runs interleaved with the unconverted model (A B, B A, ...), the first run excluded; a cell is the
median over repeats of ms/token(converted) / ms/token(unconverted) from the same repeat; ``--steps 1`` interleaves
every token.

Second table, the method's own cost per decode step, less exposed to the machine's load than whole steps (one
call, interleaved batches, minima), though not immune to it at 8k, where the call reads 2 x 25 MB of cache: one attention
call of a real decode step at each context is captured (layer 0, inside the model's forward, so the per-forward
state such as the shared bias row is live as for layers 2..n) and run 1000 times through hf_posenc's attention
function and through transformers' SDPA function on the same query / keys / values (minimum of 7 interleaved batches
each); the difference times the layer count, over the unconverted model's median ms/token, is the share of a step
the method adds in attention. Not counted: its once-per-forward work (position bookkeeping, building the bias row:
tens of microseconds). Methods that rotate keys in attention (RoPE) are not measured this way (a repeated call would
rotate differently: the cache's write hook rotates the new key once).
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
    positions.ensure_record(cache).positions = torch.arange(context)[None]  # where the converted model keeps them
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
    # min(ms) / min(base): each model's fastest run; load on a shared machine only adds time, so the minima are
    # the least disturbed estimate of the cost itself (timeit's rule), the median ratio the typical one
    return statistics.median(ms), statistics.median(ratios), statistics.median(base), min(ms) / min(base)


def attention_call_us(model, size, context: int, calls: int = 1000) -> tuple[float, float]:
    """(µs per call through hf_posenc's attention function, µs through transformers' SDPA function) on one captured
    decode-step call of layer 0 (see the module doc)."""
    import torch
    from transformers import AttentionInterface

    from hf_posenc import attention
    from hf_posenc._seams import sdpa_attention_forward

    cache, x, timings = fill(model, size, context), bp.tokens(size, 1), {}

    def batch_us(fn, args, kwargs) -> float:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn(*args, **kwargs)
        return (time.perf_counter() - t0) * 1e6 / calls

    def capture(module, query, key, value, mask, *args, **kwargs):
        if not timings and module.layer_idx == 0:
            ours = (attention.posenc_attention_forward, (module, query, key, value, mask, *args), kwargs)
            theirs = (sdpa_attention_forward, (module, query, key, value, None, *args),
                      {k: v for k, v in kwargs.items() if k != "is_causal"})
            batch_us(*ours), batch_us(*theirs)  # warm-up
            runs = {"posenc": [], "sdpa": []}
            for r in range(7):  # interleaved batches, so that the neighbours' load falls on both alike
                for name, call in (("posenc", ours), ("sdpa", theirs))[:: 1 if r % 2 == 0 else -1]:
                    runs[name].append(batch_us(*call))
            timings.update({name: min(us) for name, us in runs.items()})
        return attention.posenc_attention_forward(module, query, key, value, mask, *args, **kwargs)

    AttentionInterface.register(attention.ATTN_IMPLEMENTATION, capture)
    try:
        with torch.no_grad():
            model(x, cache=cache, use_cache=True)
    finally:
        attention.register()  # the real attention function again
    return timings["posenc"], timings["sdpa"]


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
    own = {m: [] for m in args.methods}
    for context in args.contexts:
        base_run = decode_fn(baseline, size, context, args.steps)
        bases = []
        for method in args.methods:
            model = bp.build(size, method)
            ms, ratio, base, fastest = paired(decode_fn(model, size, context, args.steps), base_run, args.repeats)
            bases.append(base)
            rows[method].append(f"{ratio:.2f}x, min {fastest:.2f}x ({ms:.1f} ms)")
            print(f"{context} {method}: {ratio:.2f}x, min {fastest:.2f}x ({ms:.1f} vs {base:.1f} ms/token)",
                  flush=True)
            own[method].append(own_cost_cell(model, size, context, args.layers, base))
            print(f"{context} {method} own cost: {own[method][-1]}", flush=True)
            del model
        rows["unconverted"].append(f"{statistics.median(bases):.1f} ms")
    print(f"\nCommand: `python benchmarks/bench_decode.py {' '.join(argv if argv is not None else sys.argv[1:])}`  ")
    print(f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {time.time() - started:.0f} s  ")
    print(f"Machine: {bp.machine()}  ")
    print(f"Model: GPT2Model, {args.layers} layers, 12 heads x 64, fp32, B=1, {args.steps} steps per run, "
          f"{args.repeats} repeats. Cells: median ratio ms/token converted / unconverted, ratio of the two fastest runs "
          f"(min), (median converted ms/token).\n")
    print("| method | " + " | ".join(f"{c} context" for c in args.contexts) + " |")
    print("|---|" + "---|" * len(args.contexts))
    for name, cells in rows.items():
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\nThe method's own cost in attention per decode step: (µs per call through hf_posenc - through SDPA) x "
          f"{args.layers} layers, as a share of the unconverted median ms/token (µs per call: hf_posenc / SDPA).\n")
    print("| method | " + " | ".join(f"{c} context" for c in args.contexts) + " |")
    print("|---|" + "---|" * len(args.contexts))
    for name, cells in own.items():
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


def own_cost_cell(model, size, context: int, layers: int, base_ms: float) -> str:
    if model.base_model.posenc.rotate_in_attention:  # where convert() registers the method
        return "n/a (rotates keys)"
    posenc_us, sdpa_us = attention_call_us(model, size, context)
    share = (posenc_us - sdpa_us) * layers / (base_ms * 1000)
    return f"{share:+.1%} ({posenc_us:.0f} / {sdpa_us:.0f} µs)"


if __name__ == "__main__":
    raise SystemExit(main())
