"""Compiled static-cache generation, converted vs unconverted, same run: ``generate`` with a ``StaticCache`` and
transformers' compiled decode step (``CompileConfig``, inductor, CPU), GPT-2-shaped LM (12 heads of 64, random
weights, fp32, B = 1, one thread).

    python benchmarks/bench_compiled_generate.py --layers 4 --prompt 512 --new 33

ms/token = (t(generate ``--new`` tokens) - t(generate 1 token)) / (new - 1): the prefill (not compiled) cancels.
Both calls use caches of the same capacity, so the compiled step is shared. The first calls (compile) are excluded
and reported as the warm-up time; the run also counts dynamo frames compiled after warm-up (0 expected). Each
method runs interleaved with the unconverted model; a cell is the median over repeats of the ratio.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_posenc as bp  # noqa: E402


def generate_fn(model, prompt, new: int, capacity: int):
    import torch
    from transformers import CompileConfig, StaticCache

    config = CompileConfig(fullgraph=False, mode=None)  # mode "reduce-overhead" is CUDA graphs
    config._compile_all_devices = True  # transformers compiles the decode step on CUDA only unless told

    def generate(n):
        cache = StaticCache(config=model.config, max_cache_len=capacity)
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                           past_key_values=cache, compile_config=config)

    def run():
        t0 = time.perf_counter()
        generate(1)
        t1 = time.perf_counter()
        generate(new)
        t2 = time.perf_counter()
        run.per_token = ((t2 - t1) - (t1 - t0)) * 1000 / (new - 1)

    return run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["rope", "alibi", "t5"])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new", type=int, default=33)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    import torch
    from torch._dynamo.utils import counters

    torch.set_num_threads(args.threads)
    started = time.time()
    capacity = args.prompt + args.new
    size = dict(heads=12, head_dim=64, vocab=50257, trained=1024, layers=args.layers, max_len=capacity)
    prompt = bp.tokens(size, args.prompt)
    models = {"unconverted": bp.build(size, None, head=True)}
    models.update({m: bp.build(size, m, head=True) for m in args.methods})
    runs = {name: generate_fn(model, prompt, args.new, capacity) for name, model in models.items()}
    warmup = {}
    for name, run in runs.items():
        t0 = time.perf_counter()
        run()
        warmup[name] = time.perf_counter() - t0
    counters.clear()
    per_token = {name: [] for name in runs}
    ratios = {m: [] for m in args.methods}
    for r in range(args.repeats):
        for method in args.methods:
            for name in ("unconverted", method) if r % 2 == 0 else (method, "unconverted"):
                runs[name]()
                per_token[name].append(runs[name].per_token)
            ratios[method].append(per_token[method][-1] / per_token["unconverted"][-1])
    frames_after_warmup = counters["frames"]["total"]
    print(f"Command: `python benchmarks/bench_compiled_generate.py {' '.join(argv if argv is not None else sys.argv[1:])}`  ")
    print(f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {time.time() - started:.0f} s  ")
    print(f"Machine: {bp.machine()}  ")
    print(f"Model: GPT2LMHeadModel, {args.layers} layers, 12 heads x 64, fp32, B=1, StaticCache of {capacity}, prompt "
          f"{args.prompt}, {args.new} new tokens, inductor. Frames compiled after warm-up: {frames_after_warmup}.\n")
    print("| model | ms/token (median) | ratio to unconverted (median) | warm-up incl. compile |")
    print("|---|---|---|---|")
    for name in runs:
        ratio = "1.00x" if name == "unconverted" else f"{statistics.median(ratios[name]):.2f}x"
        print(f"| {name} | {statistics.median(per_token[name]):.1f} ms | {ratio} | {warmup[name]:.0f} s |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
