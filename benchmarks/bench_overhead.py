"""Per-forward overhead of a converted model, converted vs unconverted in the same run: a tiny GPT-2 / Llama
(2 layers, 4 heads of 8, fp32, B = 1, one thread), where a forward is mostly Python, so what hf_posenc adds per
forward (the pre-hook building the forward's state, the post-hook storing the cache's positions, the attention
function's bookkeeping) is most of the difference.

    python benchmarks/bench_overhead.py                      # gpt2 and llama, alibi rope nope
    python benchmarks/bench_overhead.py --families gpt2 --methods alibi --repeats 9

Two calls: a 16-token forward without a cache, and one decode step on a 48-key cache (cropped back after each step).
Each method runs interleaved with the unconverted model (A B, B A, ...); a cell is the median over repeats of
µs per call (converted) / µs per call (unconverted) from the same repeat, with the absolute difference in µs.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import torch
import transformers

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

FORWARD_TOKENS, CONTEXT = 16, 48  # inside the tiny models' 64 positions (the unconverted GPT-2 stops there)


def tiny(family: str):
    from tiny_models import tiny_model

    torch.manual_seed(0)
    return tiny_model(family).eval()


def model_for(family: str, method: str | None):
    import hf_posenc

    model = tiny(family)
    return model if method is None else hf_posenc.convert(model, method)


def forward_call(model):
    x = torch.randint(4, 300, (1, FORWARD_TOKENS), generator=torch.Generator().manual_seed(0))
    return lambda: model(x)


def decode_call(model):
    x = torch.randint(4, 300, (1, CONTEXT + 1), generator=torch.Generator().manual_seed(1))
    cache = model(x[:, :CONTEXT], use_cache=True).cache
    step = x[:, CONTEXT:]

    def run():
        model(step, cache=cache, use_cache=True)
        cache.crop(-1)  # back to CONTEXT keys: every step is the same step

    return run


def us_per_call(fn, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) * 1e6 / calls


def paired(converted, plain, repeats: int, calls: int) -> tuple[float, float]:
    """(median ratio converted / plain, median µs difference) over interleaved repeats (first one dropped)."""
    ratios, extra = [], []
    for r in range(repeats + 1):
        order = (converted, plain) if r % 2 == 0 else (plain, converted)
        timings = {id(fn): us_per_call(fn, calls) for fn in order}
        if r:
            ratios.append(timings[id(converted)] / timings[id(plain)])
            extra.append(timings[id(converted)] - timings[id(plain)])
    return statistics.median(ratios), statistics.median(extra)


def machine() -> str:
    load = os.getloadavg()
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, {torch.get_num_threads()} thread, load average "
            f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} at the end")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", default=["gpt2", "llama"])
    parser.add_argument("--methods", nargs="+", default=["alibi", "rope", "nope"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.time()
    print("| family | method | forward (16 tokens) | decode step (48 keys) |")
    print("|---|---|---:|---:|")
    with torch.no_grad():
        for family in args.families:
            plain = model_for(family, None)
            base = {"forward": forward_call(plain), "decode": decode_call(plain)}
            for method in args.methods:
                model = model_for(family, method)
                cells = []
                for kind, make in (("forward", forward_call), ("decode", decode_call)):
                    ratio, extra = paired(make(model), base[kind], args.repeats, args.calls)
                    cells.append(f"{ratio:.2f}x ({extra:+.0f} µs)")
                print(f"| {family} | {method} | {' | '.join(cells)} |", flush=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"\n{stamp}, {time.time() - started:.0f} s; {machine()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
