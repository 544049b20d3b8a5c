"""What self-distillation costs: fine-tune tokens/s with and without ``distill`` (full fine-tuning: a frozen copy of
the original; LoRA: the same weights with adapters disabled and the original positions restored), on a small
random GPT-2 (-> sinusoidal) and Llama (-> RoPE YaRN x4), all in the same run, through ``hf_posenc.training.train``.

    python benchmarks/bench_distill.py                # about a minute on 2 cores
    python benchmarks/bench_distill.py --steps 30 --threads 2 --pose

tokens/s is the recipe's own ``tokens_per_s`` (training time only: forward, teacher forward, backward, optimizer),
the median over the logged windows after the first (which holds the warm-up). Cases run interleaved
(A B C D, then again in reverse order) so that the drift of a shared machine falls on every case alike; the load
average (``os.getloadavg()``) is printed before and after. Numbers are ratios on this machine, not absolutes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # tiny_models: the tiny tokenizer and The Tempest

FAMILIES = {  # family -> (config overrides, method, method options)
    "gpt2": (dict(n_layer=4, n_embd=128, n_head=4, n_positions=1024, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
             "sinusoidal", {}),
    "llama": (dict(num_hidden_layers=4, hidden_size=192, intermediate_size=384, num_attention_heads=6,
                   num_key_value_heads=2, max_position_embeddings=1024), "rope", {"scaling": "yarn", "factor": 4}),
}
CASES = [("full", False), ("full", True), ("lora", False), ("lora", True)]


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f} (1 / 5 / 15 min) on {os.cpu_count()} cores"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps per case and round")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: a shared machine)")
    parser.add_argument("--rounds", type=int, default=2, help="passes over the cases (alternating order)")
    parser.add_argument("--pose", action="store_true", help="PoSE position ids (target 16x seq_len) in every case")
    parser.add_argument("--families", default="gpt2,llama")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from tiny_models import TEXT, tiny_model, train_tiny_tokenizer

    from hf_posenc.training import load_config, read_metrics, train

    work = Path(tempfile.mkdtemp(prefix="bench_distill_"))
    try:
        tokenizer = work / "tokenizer"
        tokenizer.mkdir()
        train_tiny_tokenizer(tokenizer)
        print(f"load before: {load()}; torch threads {args.threads}; B={args.batch_size} L={args.seq_len}, "
              f"{args.steps} steps x {args.rounds} rounds per case, fp32 CPU"
              + (f", PoSE target {16 * args.seq_len}" if args.pose else ""))
        speeds: dict[tuple[str, str, bool], list[float]] = {}
        models = {}
        for family in args.families.split(","):
            overrides, _, _ = FAMILIES[family]
            models[family] = work / family
            tiny_model(family, **overrides).save_pretrained(models[family])
            shutil.copytree(tokenizer, models[family], dirs_exist_ok=True)
        started = time.perf_counter()
        for round_ in range(args.rounds):
            order = [(f, c) for f in models for c in CASES]
            for family, (mode, distill) in order if round_ % 2 == 0 else order[::-1]:
                _, method, options = FAMILIES[family]
                out = work / f"out_{family}_{mode}_{distill}_{round_}"
                values = {
                    "model": str(models[family]), "method": method, "method_options": options,
                    "data": {"files": [str(TEXT)]}, "seq_len": args.seq_len, "batch_size": args.batch_size,
                    "max_steps": args.steps, "warmup_steps": 0, "lr": 1e-4, "eval_every": 0, "eval_tokens": 64,
                    "eval_multipliers": [1], "log_every": max(1, args.steps // 4), "save_every": 0,
                    "report_to": ["none"], "output_dir": str(out), "cpu": True,
                    "lora": {"r": 8} if mode == "lora" else None,
                    "distill": {"weight": 1.0} if distill else None,
                    "pose": {"target_length": 16 * args.seq_len} if args.pose else None,
                }
                train(load_config(overrides=values))
                windows = [r["tokens_per_s"] for r in read_metrics(out) if "tokens_per_s" in r][1:]
                speeds.setdefault((family, mode, distill), []).extend(windows)
        print(f"load after: {load()}; {time.perf_counter() - started:.0f} s\n")
        print("| model | trains | tokens/s plain | tokens/s + distill | distill / plain |")
        print("|---|---|---|---|---|")
        for family in models:
            for mode in ("full", "lora"):
                plain = statistics.median(speeds[(family, mode, False)])
                distilled = statistics.median(speeds[(family, mode, True)])
                print(f"| {family} -> {FAMILIES[family][1]} | {mode} | {plain:.0f} | {distilled:.0f} | "
                      f"{distilled / plain:.2f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
