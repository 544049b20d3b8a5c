"""Self-Extend / ReRoPE speed, converted vs unconverted in the same run: a SmolLM2-135M-shaped Llama (9 query / 3 kv
heads of 64, hidden 576, random weights, fp32, B = 1, ``--layers`` layers, one thread by default), one forward of
``--lengths`` tokens and one decode step on a cache of that many keys.

    python benchmarks/bench_two_pass.py                                   # 4k and 16k, self_extend and rerope
    python benchmarks/bench_two_pass.py --lengths 16384 --methods self_extend --repeats 3

A cell is the median over repeats of time(converted) / time(unconverted), runs interleaved (A B, B A, ...), the
first pair a warm-up. Decode: the cache is the model's own, from a real prefill of the context (each model fills
its own), cropped back to the context after every timed step. The unconverted model runs transformers' SDPA
(the native causal kernel); the converted one hf_posenc's ``auto`` backend (``two-pass-flash`` for the prefill,
``two-pass`` for decode steps).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time

import torch
import transformers

METHODS = {"self_extend": {"window": 2048, "group": 8}, "rerope": {"window": 2048}}
TRAINED = 8192


def smollm2_shaped(layers: int) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=TRAINED, rope_theta=100000.0, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def paired(converted, plain, repeats: int) -> float:
    """Median ratio converted / plain over interleaved repeats, after one warm-up pair."""
    ratios = []
    for r in range(repeats + 1):
        order = (converted, plain) if r % 2 == 0 else (plain, converted)
        times = {id(fn): timed(fn) for fn in order}
        if r:
            ratios.append(times[id(converted)] / times[id(plain)])
    return statistics.median(ratios)


def forward_fn(model, length: int):
    x = torch.randint(0, 49152, (1, length), generator=torch.Generator().manual_seed(0))
    return lambda: model(x, use_cache=False)


def decode_fn(model, length: int):
    x = torch.randint(0, 49152, (1, length + 1), generator=torch.Generator().manual_seed(1))
    cache = model(x[:, :length], use_cache=True).cache

    def run():
        model(x[:, length:], cache=cache, use_cache=True)
        cache.crop(-1)

    return run


def main(argv=None) -> int:
    import hf_posenc

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    plain = smollm2_shaped(args.layers)
    print("| method | tokens | forward | decode step |\n|---|---:|---:|---:|", flush=True)
    with torch.no_grad():
        for method in args.methods:
            model = hf_posenc.convert(smollm2_shaped(args.layers), method, max_position_embeddings=4 * TRAINED,
                                      **METHODS[method])
            for length in args.lengths:
                forward = paired(forward_fn(model, length), forward_fn(plain, length), args.repeats)
                decode = paired(decode_fn(model, length), decode_fn(plain, length), args.repeats)
                print(f"| {method} {METHODS[method]} | {length} | {forward:.2f}x | {decode:.2f}x |", flush=True)
    load = os.getloadavg()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"\n{stamp}, {time.time() - started:.0f} s; torch {torch.__version__}, {args.threads} thread(s), "
          f"{args.layers} layers, load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} at the end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
