"""Converted vs unconverted model, same machine, same run: forward, forward+backward, decode, peak memory and
LoRA fine-tune throughput for every position method, printed as ratios and written to docs/performance.md.

    python benchmarks/bench_posenc.py                 # full CPU run (about 10 minutes on 2 cores)
    python benchmarks/bench_posenc.py --quick         # tiny sizes, seconds (used by tests/test_backends.py)

Models: GPT-2 with 12 heads of 64 dims (hidden 768, GPT-2 small's attention shape), random weights, fp32, B=1,
dropout off. Forward / forward+backward / decode / memory use ``GPT2Model`` (no LM head, so the 50k-vocab
projection does not dilute the attention cost) with ``--layers`` layers (default 1: the ratios are per layer;
one layer only makes the per-forward overheads, e.g. building a shared bias, weigh more). Fine-tuning uses a
full 12-layer ``GPT2LMHeadModel`` (GPT-2 small) with PEFT LoRA on ``c_attn``. The unconverted baseline is the same
architecture with learned positions and ``n_positions`` raised to the longest length measured.

Threads: 1 by default. On a shared, loaded 2-core machine every 2-thread OpenMP region waits for a peer thread
that another process holds (measured here: a one-head 1024x1024 flash-attention backward takes 7 ms with 1 thread
and 345 ms with 2), which measures the neighbours, not the kernels. ``--threads 2`` on a quiet machine.
Timing: each converted model runs interleaved with the baseline (A B A B ..., the order alternating), warm-up
calls excluded (they include FlexAttention's compile); a ratio is the median over repeats of t(converted) /
t(baseline) from the same repeat, which cancels most of the drift of a shared, loaded machine.
Memory: one fresh subprocess per case; after a warm-up forward the kernel's peak-RSS counter is reset
(``/proc/self/clear_refs``), then one forward runs; reported: peak RSS (VmHWM) and the forward's own working set
(VmHWM - RSS before the forward).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "performance.md"
BEGIN, END = "<!-- bench:cpu:begin -->", "<!-- bench:cpu:end -->"

METHODS = ("alibi", "t5", "rope", "nope", "sinusoidal", "shaw")
METHOD_OPTIONS = {"shaw": {"max_distance": 16}}


# ---- models ----------------------------------------------------------------------------------------------
def gpt2_config(size, n_positions, layers=None):
    import transformers

    return transformers.GPT2Config(
        n_layer=layers or size["layers"], n_head=size["heads"], n_embd=size["heads"] * size["head_dim"],
        vocab_size=size["vocab"], n_positions=n_positions, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )


def build(size, method: str | None, backend: str = "auto", head: bool = False, layers=None):
    """Unconverted (method None, n_positions = longest length) or converted GPT-2; same seed, eval mode."""
    import torch
    import transformers

    import hf_posenc

    torch.manual_seed(0)
    cls = transformers.GPT2LMHeadModel if head else transformers.GPT2Model
    if method is None:
        return cls(gpt2_config(size, max(size["max_len"], size["trained"]), layers)).eval()
    model = cls(gpt2_config(size, size["trained"], layers)).eval()
    return hf_posenc.convert(model, method, backend=backend, **METHOD_OPTIONS.get(method, {}))


def tokens(size, length: int, seed: int = 0):
    import torch

    return torch.randint(0, size["vocab"], (1, length), generator=torch.Generator().manual_seed(seed))


# ---- timing ----------------------------------------------------------------------------------------------
def paired(candidates: dict, baseline, repeats: int, warmup: int = 1) -> dict:
    """{name: (median ms, median ratio to baseline)} with baseline and candidate interleaved in each repeat."""
    results = {}
    for name, run in candidates.items():
        for _ in range(warmup):
            baseline()
            run()
        base_ms, ms, ratios = [], [], []
        for r in range(repeats):
            order = (baseline, run) if r % 2 == 0 else (run, baseline)
            times = {}
            for fn in order:
                t0 = time.perf_counter()
                fn()
                times[fn] = (time.perf_counter() - t0) * 1000
            base_ms.append(times[baseline])
            ms.append(times[run])
            ratios.append(times[run] / times[baseline])
        results[name] = (statistics.median(ms), statistics.median(ratios), statistics.median(base_ms))
    return results


def forward_fn(model, x):
    import torch

    def run():
        with torch.no_grad():
            model(x)

    return run


def backward_fn(model, x):
    def run():
        model.zero_grad(set_to_none=True)
        model(x).last_hidden_state.float().pow(2).mean().backward()

    return run


def decode_fn(model, size, context: int, steps: int):
    """ms per token: a fresh prefill of ``context`` tokens (untimed), then ``steps`` single-token steps."""
    import torch

    x = tokens(size, context + steps, seed=1)

    def run():
        with torch.no_grad():
            out = model(x[:, :context], use_cache=True)
            cache = out.cache
            t0 = time.perf_counter()
            for t in range(context, context + steps):
                cache = model(x[:, t : t + 1], cache=cache, use_cache=True).cache
            run.per_token = (time.perf_counter() - t0) * 1000 / steps

    return run


def paired_decode(candidates: dict, baseline, repeats: int) -> dict:
    results = {}
    for name, run in candidates.items():
        baseline()
        run()  # warm-up
        base, ms, ratios = [], [], []
        for r in range(repeats):
            for fn in (baseline, run) if r % 2 == 0 else (run, baseline):
                fn()
            base.append(baseline.per_token)
            ms.append(run.per_token)
            ratios.append(run.per_token / baseline.per_token)
        results[name] = (statistics.median(ms), statistics.median(ratios), statistics.median(base))
    return results


# ---- memory (subprocess per case) --------------------------------------------------------------------------
def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def memory_case(size, method: str | None, backend: str, length: int) -> dict:
    import torch

    model = build(size, method, backend)
    x = tokens(size, length)
    with torch.no_grad():
        model(x)  # warm-up (FlexAttention compiles here)
        before = _rss_kb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        model(x)
        peak = _rss_kb("VmHWM")
    return {"peak_mb": peak / 1024, "forward_mb": (peak - before) / 1024}


def run_memory_case(args, method, backend, length) -> dict:
    cmd = [sys.executable, __file__, "--memory-case", f"{method or 'none'}:{backend}:{length}"]
    if args.quick:
        cmd.append("--quick")
    cmd += ["--layers", str(args.layers), "--threads", str(args.threads)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- fine-tune -------------------------------------------------------------------------------------------
def finetune_fn(size, method: str | None, length: int, layers: int):
    import torch
    from peft import LoraConfig, get_peft_model

    model = build(size, method, head=True, layers=layers).train()
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"], fan_in_fan_out=True))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = tokens(size, length, seed=2)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=x, labels=x).loss.backward()
        optimizer.step()

    return step


# ---- report ----------------------------------------------------------------------------------------------
def machine() -> str:
    import torch
    import transformers

    cpu = "?"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        cpu = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except Exception:  # pragma: no cover - no lscpu
        pass
    load = os.getloadavg()
    return (
        f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), transformers "
        f"{transformers.__version__}, Python {platform.python_version()}, load average {load[0]:.1f} / "
        f"{load[1]:.1f} / {load[2]:.1f} at the end"
    )


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def ratio(cell) -> str:
    ms, r, base = cell
    return f"{r:.2f}x ({ms:.0f} ms)" if ms >= 10 else f"{r:.2f}x ({ms:.1f} ms)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for tests: seconds")
    parser.add_argument("--layers", type=int, default=1, help="layers of the forward/backward/decode/memory model")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: see the module doc)")
    parser.add_argument("--lengths", type=int, nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--skip", nargs="*", default=[], choices=["forward", "backward", "backends", "decode",
                                                                 "memory", "finetune"])
    parser.add_argument("--out", type=Path, default=None, help=f"markdown file to update (default {DOC}; "
                        "--quick writes nothing unless given)")
    parser.add_argument("--memory-case", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    import torch

    import hf_posenc  # noqa: F401

    torch.set_num_threads(args.threads)
    if args.quick:
        size = dict(heads=4, head_dim=16, vocab=256, trained=64, max_len=256, layers=args.layers)
        lengths = args.lengths or [96, 160]
        repeats = args.repeats or 2
        decode_context, decode_steps, ft_len, ft_layers, ft_steps = 96, 3, 96, 1, 2
    else:
        size = dict(heads=12, head_dim=64, vocab=50257, trained=1024, max_len=4096, layers=args.layers)
        lengths = args.lengths or [1024, 2048, 4096]
        repeats = args.repeats or 5
        decode_context, decode_steps, ft_len, ft_layers, ft_steps = 2048, 64, 1024, 12, 5
    size["max_len"] = max([size["max_len"], *lengths, decode_context + decode_steps])

    if args.memory_case:
        method, backend, length = args.memory_case.split(":")
        print(json.dumps(memory_case(size, None if method == "none" else method, backend, int(length))))
        return 0

    started = time.time()
    command = "python benchmarks/bench_posenc.py " + " ".join(argv if argv is not None else sys.argv[1:])
    sections = []
    say = lambda text: print(text, flush=True)  # noqa: E731
    out = args.out if args.out is not None else (None if args.quick else DOC)

    def report(final: bool = False) -> None:
        """Write what is measured so far (after every section, so an interrupted run keeps its tables)."""
        header = (
            f"Command: `{command.strip()}`  \n"
            f"Date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}, "
            f"{time.time() - started:.0f} s{'' if final else ' (interrupted: sections so far)'}  \n"
            f"Machine: {machine()}  \n"
            f"Model: GPT-2, {size['heads']} heads x {size['head_dim']}, {args.layers} layers (fine-tune: "
            f"{ft_layers}), vocab {size['vocab']}, B=1, fp32. Cells: median ratio converted / unconverted (median "
            "converted time)."
        )
        if final:
            say(header)
        if out is not None:
            write(out, header + "\n\n" + "\n\n".join(sections))
            if final:
                say(f"\nwrote {out}")
    say(f"# {command.strip()}\n")

    baseline = build(size, None)
    models = {m: build(size, m) for m in args.methods}
    long = max(lengths)

    if "forward" not in args.skip:
        rows = []
        cells = {m: [] for m in args.methods}
        base_ms = []
        for length in lengths:
            x = tokens(size, length)
            res = paired({m: forward_fn(models[m], x) for m in args.methods}, forward_fn(baseline, x), repeats)
            for m in args.methods:
                cells[m].append(ratio(res[m]))
            base_ms.append(f"{statistics.median(r[2] for r in res.values()):.0f} ms")
        rows = [["unconverted", *base_ms]] + [[m, *cells[m]] for m in args.methods]
        text = "### Forward (no grad), backend auto\n\n" + table(["method", *map(str, lengths)], rows)
        sections.append(text)
        report()
        say(text + "\n")

    if "backward" not in args.skip:
        cells = {m: [] for m in args.methods}
        base_ms = []
        bw_lengths = lengths[:2] if not args.quick else lengths
        for length in bw_lengths:
            x = tokens(size, length)
            res = paired({m: backward_fn(models[m], x) for m in args.methods}, backward_fn(baseline, x),
                         max(2, repeats - 2))
            for m in args.methods:
                cells[m].append(ratio(res[m]))
            base_ms.append(f"{statistics.median(r[2] for r in res.values()):.0f} ms")
        rows = [["unconverted", *base_ms]] + [[m, *cells[m]] for m in args.methods]
        text = "### Forward + backward (all weights trainable), backend auto\n\n" + table(
            ["method", *map(str, bw_lengths)], rows
        )
        sections.append(text)
        report()
        say(text + "\n")

    if "backends" not in args.skip:
        rows = []
        for m in [m for m in ("alibi", "t5") if m in args.methods]:
            names = ("sdpa", "eager") if args.quick else ("sdpa", "flex", "eager")  # auto: the forward table
            variants = {b: build(size, m, backend=b) for b in names}
            cells = {b: [] for b in variants}
            for length in lengths:
                x = tokens(size, length)
                res = paired({b: forward_fn(variants[b], x) for b in variants}, forward_fn(baseline, x),
                             max(2, repeats - 2))
                for b in variants:
                    cells[b].append(ratio(res[b]))
            rows += [[m, b, *cells[b]] for b in variants]
            del variants
        if rows:
            text = "### Forward (no grad) by backend\n\n" + table(["method", "backend", *map(str, lengths)], rows)
            sections.append(text)
            report()
            say(text + "\n")

    if "decode" not in args.skip:
        res = paired_decode(
            {m: decode_fn(models[m], size, decode_context, decode_steps) for m in args.methods},
            decode_fn(baseline, size, decode_context, decode_steps), repeats,
        )
        base = statistics.median(r[2] for r in res.values())
        rows = [["unconverted", f"{base:.2f} ms/token"]] + [
            [m, f"{res[m][1]:.2f}x ({res[m][0]:.2f} ms/token)"] for m in args.methods
        ]
        text = f"### Decode, {decode_steps} steps after a {decode_context}-token prefill, backend auto\n\n" + table(
            ["method", "ms/token ratio"], rows
        )
        sections.append(text)
        report()
        say(text + "\n")

    if "memory" not in args.skip:
        del models
        cases = [(None, "auto")] + [(m, "auto") for m in (args.methods[:1] if args.quick else args.methods)]
        if not args.quick:
            cases += [(m, b) for m in ("alibi", "t5") if m in args.methods for b in ("sdpa", "flex")]
        results = {case: run_memory_case(args, case[0], case[1], long) for case in cases}
        base = results[(None, "auto")]
        rows = [["unconverted", "-", f"{base['peak_mb']:.0f} MB", f"{base['forward_mb']:.0f} MB"]]
        for (m, b), r in list(results.items())[1:]:
            rows.append([
                m, b, f"{r['peak_mb']:.0f} MB ({100 * (r['peak_mb'] / base['peak_mb'] - 1):+.1f} %)",
                f"{r['forward_mb']:.0f} MB ({r['forward_mb'] - base['forward_mb']:+.0f} MB)",
            ])
        text = f"### Peak memory, forward (no grad) at {long} tokens\n\n" + table(
            ["method", "backend", "peak RSS", "forward working set"], rows
        )
        sections.append(text)
        report()
        say(text + "\n")

    if "finetune" not in args.skip:
        res = paired(
            {"alibi": finetune_fn(size, "alibi", ft_len, ft_layers)}, finetune_fn(size, None, ft_len, ft_layers),
            ft_steps,
        )
        ms, r, base = res["alibi"]
        rows = [["unconverted", f"{ft_len / base * 1000:.0f} tokens/s", "-"],
                ["alibi", f"{1 / r:.2f}x", f"{base / ms:.2f}x ({ft_len / ms * 1000:.0f} tokens/s)"]]
        text = (
            f"### Fine-tune, LoRA (r=8, c_attn) + AdamW, {ft_layers}-layer GPT2LMHeadModel, {ft_len} tokens/step, "
            f"backend auto, {ft_steps} steps each\n\n"
            + table(["model", "tokens/s ratio (median of paired steps)", "ratio of median step times"], rows)
        )
        sections.append(text)
        report()
        say(text + "\n")

    report(final=True)
    return 0


def write(path: Path, body: str) -> None:
    """Replace the block between the bench markers in ``path`` (create the file if needed)."""
    block = f"{BEGIN}\n{body}\n{END}"
    text = path.read_text() if path.exists() else "# Performance\n\n" + BEGIN + "\n" + END + "\n"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
