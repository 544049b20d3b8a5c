"""T5 training kernels side by side: the trainable banded kernel (what ``auto`` picks) against ``sdpa-blocked`` (what
it picked before) and the native causal kernel, forward + backward, interleaved in one process.

    python benchmarks/bench_t5_train.py                       # attention alone and the 1-layer model, 1k and 2k
    python benchmarks/bench_t5_train.py --lengths 1024 --repeats 3 --rows 32 64 128

Attention alone: B = 1, 12 heads x 64, fp32, q / k / v and the T5 table trainable; cells are the median over repeats
of t(kernel) / t(native causal SDPA) from the same repeat. Model: the 1-layer GPT2Model of bench_posenc.py (all
weights trainable), unconverted vs T5 with ``auto`` (banded) vs T5 with the banded rule switched off (blocked).
One thread (see bench_posenc.py on threads). Prints; writes nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time
from pathlib import Path


def interleaved(fns: dict, repeats: int, base: str) -> dict:
    """{name: (median ms, median ratio to ``base``)}; every repeat runs all of them, the order alternating."""
    for fn in fns.values():
        fn()  # warm-up
    times = {name: [] for name in fns}
    for r in range(repeats):
        items = list(fns.items())
        for name, fn in items if r % 2 == 0 else items[::-1]:
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1000)
    return {name: (statistics.median(t), statistics.median(a / b for a, b in zip(t, times[base])))
            for name, t in times.items()}


def attention_alone(method, length: int, rows_options, repeats: int) -> dict:
    import torch
    import torch.nn.functional as F

    from hf_posenc.backends import sdpa

    q, k, v = (torch.randn(1, 12, length, 64, requires_grad=True) for _ in range(3))
    grad = torch.randn(1, length, 12, 64)
    scaling = 64 ** -0.5

    def native():
        F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling).transpose(1, 2).backward(grad)

    def banded(rows):
        return lambda: sdpa.t5_banded_train_attention(method, q, k, v, scaling, rows=rows).backward(grad)

    def blocked():
        template = sdpa.causal_template(method, torch.arange(length), sdpa.BLOCK_ROWS, torch.float32)
        sdpa.blocked_attention(q, k, v, template, None, scaling, 0.0, False).backward(grad)

    fns = {"native": native, **{f"banded ({r} rows)": banded(r) for r in rows_options}, "blocked": blocked}
    return interleaved(fns, repeats, "native")


def model_level(bench, length: int, repeats: int) -> dict:
    from hf_posenc.backends import sdpa

    size = dict(heads=12, head_dim=64, vocab=50257, trained=1024, max_len=max(4096, length), layers=1)
    baseline, t5 = bench.build(size, None), bench.build(size, "t5")
    x = bench.tokens(size, length)
    rule = sdpa.can_train_banded

    def with_rule(allowed: bool):
        step = bench.backward_fn(t5, x)

        def run():
            sdpa.can_train_banded = rule if allowed else (lambda *args: False)
            try:
                step()
            finally:
                sdpa.can_train_banded = rule

        return run

    fns = {"unconverted": bench.backward_fn(baseline, x), "t5 banded": with_rule(True), "t5 blocked": with_rule(False)}
    return interleaved(fns, repeats, "unconverted")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rows", type=int, nargs="+", default=[64], help="query-block rows of the banded kernel")
    parser.add_argument("--skip-model", action="store_true")
    args = parser.parse_args(argv)

    import torch

    import hf_posenc

    spec = importlib.util.spec_from_file_location("bench_posenc", Path(__file__).with_name("bench_posenc.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    torch.set_num_threads(1)
    size = dict(heads=12, head_dim=64, vocab=64, trained=64, max_len=64, layers=1)
    method = hf_posenc.convert(bench.build(size, None), "t5").base_model.posenc  # the default T5 table, trainable
    for length in args.lengths:
        cells = attention_alone(method, length, args.rows, args.repeats)
        print(f"attention alone, {length}: " + ", ".join(f"{n} {r:.2f}x ({ms:.0f} ms)" for n, (ms, r) in cells.items()),
              flush=True)
    for length in [] if args.skip_model else args.lengths:
        cells = model_level(bench, length, args.repeats)
        print(f"1-layer model, {length}: " + ", ".join(f"{n} {r:.2f}x ({ms:.0f} ms)" for n, (ms, r) in cells.items()),
              flush=True)
    print(f"load average {' / '.join(f'{x:.1f}' for x in os.getloadavg())} at the end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
