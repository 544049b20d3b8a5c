"""Fine-tuning throughput as a fraction of the machine's FLOP peak: SmolLM2-135M (local source cache, ``hf-posenc
fetch smollm2-135m``) converted to RoPE Dynamic YaRN x4, fp32, one (1, ``--seq``) batch per step, plain PyTorch
steps (no data loading), in the same run:

- ``full``: AdamW on every weight; 6 N FLOPs per trained token (forward 2 N, backward 4 N);
- ``lora``: PEFT LoRA r = 8 on q/k/v/o, AdamW on the adapters; ~4 N per token (the backward needs activation
  gradients through every weight, no weight gradients of the frozen ones);
- ``distill``: ``full`` plus the teacher's forward (the original positions, ``hf_posenc.original_positions``) and
  the KL term; 8 N per token.

N counts each parameter once (the tied embedding is the LM head's matmul). The peak is given two ways: the nominal
``--peak-gflops`` (default 157: 2 Zen3 cores, 2 x 16 fp32 FLOPs/cycle x 2.45 GHz, DESIGN.md) and an fp32 matmul of
the model's own MLP shape measured in the same run (what the BLAS reaches here, with the same threads).

    python benchmarks/bench_flops.py --threads 2 --seq 512 --steps 3
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_posenc as bp  # noqa: E402

FLOPS_PER_TOKEN = {"full": 6, "lora": 4, "distill": 8}  # x N


def matmul_gflops(tokens: int, hidden: int, inner: int, repeats: int = 5) -> float:
    import torch

    a, b = torch.randn(tokens, hidden), torch.randn(hidden, inner)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * tokens * hidden * inner / best / 1e9


def step_fn(mode: str, path: str, seq: int):
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    import hf_posenc

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = hf_posenc.convert(model, "rope", scaling="dynamic_yarn", factor=4.0).train()
    params = sum(p.numel() for p in model.parameters())  # unique parameters (tied weights once)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    x = torch.randint(0, model.config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0))

    def step():
        if mode == "distill":
            with torch.no_grad(), hf_posenc.original_positions(model):
                teacher = model(x).logits
            logits = model(x).logits
            loss = F.kl_div(logits.log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="batchmean")
        else:
            loss = model(x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, params


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", nargs="+", default=list(FLOPS_PER_TOKEN), choices=list(FLOPS_PER_TOKEN))
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--peak-gflops", type=float, default=157.0)
    args = parser.parse_args(argv)

    import torch

    from hf_posenc import sources

    torch.set_num_threads(args.threads)
    started = time.time()
    path = str(sources.resolve_model("smollm2-135m"))
    rows = []
    for mode in args.modes:
        step, params = step_fn(mode, path, args.seq)
        step()  # warm-up
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        blas = matmul_gflops(args.seq, 576, 1536)  # SmolLM2's MLP shape, measured next to the steps
        tokens_per_s = args.seq / statistics.median(times)
        gflops = FLOPS_PER_TOKEN[mode] * params * tokens_per_s / 1e9
        rows.append((mode, tokens_per_s, gflops, blas))
        print(f"{mode}: {tokens_per_s:.0f} tokens/s, {gflops:.0f} GFLOPS; matmul {blas:.0f} GFLOPS", flush=True)
        del step
    print(f"\nCommand: `python benchmarks/bench_flops.py {' '.join(argv if argv is not None else sys.argv[1:])}`  ")
    print(f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {time.time() - started:.0f} s  ")
    print(f"Machine: {bp.machine()}  ")
    print(f"Model: SmolLM2-135M (N = {params / 1e6:.1f} M), RoPE dynamic_yarn x4, fp32, B=1 x {args.seq} tokens, "
          f"AdamW, median of {args.steps} steps after one warm-up.\n")
    print(f"| mode | FLOPs/token | tokens/s | GFLOPS | of nominal peak ({args.peak_gflops:.0f}) | of measured matmul |")
    print("|---|---|---|---|---|---|")
    for mode, tps, gflops, blas in rows:
        print(f"| {mode} | {FLOPS_PER_TOKEN[mode]} N | {tps:.0f} | {gflops:.0f} | {gflops / args.peak_gflops:.0%} | "
              f"{gflops / blas:.0%} ({blas:.0f}) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
