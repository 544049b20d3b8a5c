"""Converted vs unconverted model, same machine, same run: forward, forward+backward, decode, peak memory and
LoRA fine-tune throughput for every position method, printed as ratios and written to docs/performance.md.

    python benchmarks/bench_posenc.py                 # full CPU run (about 10 minutes on 2 cores)
    python benchmarks/bench_posenc.py --quick         # tiny sizes, seconds (used by tests/test_backends.py)
    python benchmarks/bench_posenc.py --device cuda --time-budget 80   # GPU run, bf16 (about 1-1.5 minutes)

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

GPU (``--device cuda``, default dtype bf16): the same sections and ratios with a 12-layer GPT2Model (GPT-2 small
without the LM head), lengths 1k-16k, 3 repeats; every timed call is bracketed by ``torch.cuda.synchronize()``.
Memory is measured in-process, one model on the GPU at a time: ``torch.cuda.reset_peak_memory_stats()`` after a
warm-up forward, then one forward; reported: ``max_memory_allocated`` and the forward's working set (that peak minus
``memory_allocated`` before the forward). Eager-attention cases (Shaw, ``backend="eager"``) above ``--eager-max``
tokens are skipped. Results go to the ``bench:gpu`` block of docs/performance.md (or ``--out``).
``--time-budget S`` skips what is left (sections, lengths, cases) once S seconds have passed, writing what is done;
a failing case writes ``error: ...`` in its cell instead of stopping the run.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "performance.md"
BEGIN, END = "<!-- bench:cpu:begin -->", "<!-- bench:cpu:end -->"
GPU_BEGIN, GPU_END = "<!-- bench:gpu:begin -->", "<!-- bench:gpu:end -->"
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}

# set by main(): the device / dtype models and inputs live on, and the synchronisation around every timed call
DEVICE = "cpu"
DTYPE = "fp32"


def sync() -> None:
    if DEVICE == "cuda":
        import torch

        torch.cuda.synchronize()


def failure(exc: BaseException) -> str:
    """A table cell for a case that raised: ``error: <type>: <first line, short>`` (markdown-safe)."""
    message = (str(exc).strip().splitlines() or [""])[0]
    message = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    if len(message) > 100:
        message = message[:97] + "..."
    return "error: " + message.replace("|", "/").replace("`", "'")


def recover(exc: BaseException) -> str:
    """Print the traceback, free the GPU cache, return the cell text."""
    traceback.print_exc(file=sys.stderr)
    gc.collect()
    if DEVICE == "cuda":
        import torch

        torch.cuda.empty_cache()
    return failure(exc)

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
    with torch.device(DEVICE):  # random init directly on the device (fast on a GPU)
        if method is None:
            model = cls(gpt2_config(size, max(size["max_len"], size["trained"]), layers)).eval()
        else:
            model = cls(gpt2_config(size, size["trained"], layers)).eval()
            model = hf_posenc.convert(model, method, backend=backend, **METHOD_OPTIONS.get(method, {}))
    return model.to(device=DEVICE, dtype=getattr(torch, DTYPES[DTYPE]))


def tokens(size, length: int, seed: int = 0):
    import torch

    ids = torch.randint(0, size["vocab"], (1, length), generator=torch.Generator().manual_seed(seed))
    return ids.to(DEVICE)


# ---- timing ----------------------------------------------------------------------------------------------
BUDGET_SKIP = "skipped (time budget)"


def paired(candidates: dict, baseline, repeats: int, warmup: int = 1, stop=None) -> dict:
    """{name: (median ms, median ratio to baseline, median baseline ms)} with baseline and candidate interleaved in
    each repeat; a candidate that raises (or whose baseline does) gets ``"error: ..."`` instead, and once ``stop()``
    is true the candidates left get ``BUDGET_SKIP``."""
    results = {}
    for name, run in candidates.items():
        if stop is not None and stop():
            results[name] = BUDGET_SKIP
            continue
        try:
            for _ in range(warmup):
                baseline()
                run()
            base_ms, ms, ratios = [], [], []
            for r in range(repeats):
                order = (baseline, run) if r % 2 == 0 else (run, baseline)
                times = {}
                for fn in order:
                    sync()
                    t0 = time.perf_counter()
                    fn()
                    sync()
                    times[fn] = (time.perf_counter() - t0) * 1000
                base_ms.append(times[baseline])
                ms.append(times[run])
                ratios.append(times[run] / times[baseline])
            results[name] = (statistics.median(ms), statistics.median(ratios), statistics.median(base_ms))
        except Exception as exc:  # one failing case must not end the run (GPU time is scarce)
            results[name] = recover(exc)
    return results


def base_median(results: dict) -> str:
    """Median baseline time over the cases that ran, as a cell."""
    times = [r[2] for r in results.values() if not isinstance(r, str)]
    return f"{statistics.median(times):.1f} ms" if times else "-"


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
    # transformers >= 5.2x names the cache ``cache`` (``past_key_values`` deprecated); older 5.x: ``past_key_values``
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def cache_of(out):
        cache = getattr(out, "cache", None)
        return cache if cache is not None else out.past_key_values

    def run():
        with torch.no_grad():
            out = model(x[:, :context], use_cache=True)
            cache = cache_of(out)
            sync()
            t0 = time.perf_counter()
            for t in range(context, context + steps):
                cache = cache_of(model(x[:, t : t + 1], use_cache=True, **{name: cache}))
            sync()
            run.per_token = (time.perf_counter() - t0) * 1000 / steps

    return run


def paired_decode(candidates: dict, baseline, repeats: int, stop=None) -> dict:
    results = {}
    for name, run in candidates.items():
        if stop is not None and stop():
            results[name] = BUDGET_SKIP
            continue
        try:
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
        except Exception as exc:
            results[name] = recover(exc)
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
    """CPU: one fresh process per case (peak RSS cannot be reset for one process's earlier allocations)."""
    cmd = [sys.executable, __file__, "--memory-case", f"{method or 'none'}:{backend}:{length}"]
    if args.quick:
        cmd.append("--quick")
    cmd += ["--layers", str(args.layers), "--threads", str(args.threads), "--device", "cpu", "--dtype", args.dtype]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError((out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def cuda_memory_case(size, method: str | None, backend: str, lengths: list) -> dict:
    """GPU, in-process, this model alone on the device: {length: {"peak_mb", "forward_mb"} or "error: ..."}."""
    import torch

    mb = 1024 * 1024
    results = {}
    model = build(size, method, backend)
    try:
        for length in lengths:
            try:
                x = tokens(size, length)
                with torch.no_grad():
                    model(x)  # warm-up (FlexAttention compiles here)
                    sync()
                    before = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                    model(x)
                    sync()
                    peak = torch.cuda.max_memory_allocated()
                results[length] = {"peak_mb": peak / mb, "forward_mb": (peak - before) / mb}
            except Exception as exc:
                results[length] = recover(exc)
    finally:
        del model
        gc.collect()
        torch.cuda.empty_cache()
    return results


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

    if DEVICE == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return (
            f"{torch.cuda.get_device_name()} ({props.total_memory / 1024 ** 3:.0f} GiB), torch {torch.__version__}, "
            f"CUDA {torch.version.cuda}, transformers {transformers.__version__}, Python {platform.python_version()}, "
            f"{os.cpu_count()} CPUs"
        )
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
    if isinstance(cell, str):  # "error: ..." / "skipped ..."
        return cell
    ms, r, base = cell
    digits = 0 if ms >= 10 else 1 if ms >= 1 else 2
    return f"{r:.2f}x ({ms:.{digits}f} ms)"


SECTIONS = ("forward", "backward", "backends", "decode", "memory", "finetune")
# GPU: the sections that compile FlexAttention (memory's flex cases, then the by-backend table) last, so that a time
# budget keeps the cheap ones; memory before backends: its auto cases (no compile) come first.
GPU_ORDER = ("forward", "backward", "decode", "finetune", "memory", "backends")


def parse_args(argv=None, cuda_available=None) -> argparse.Namespace:
    """Parse and validate; ``--dtype`` defaults to fp32 on CPU and bf16 on CUDA. ``cuda_available`` (tests) stands
    in for ``torch.cuda.is_available()``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for tests: seconds")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp32 on cpu, bf16 on cuda")
    parser.add_argument("--layers", type=int, default=None,
                        help="layers of the forward/backward/decode/memory model (default 1 on cpu, 12 on cuda)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: see the module doc)")
    parser.add_argument("--lengths", type=int, nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--skip", nargs="*", default=[], choices=list(SECTIONS))
    parser.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                        help="skip what is left (sections, lengths, cases) after this many seconds; write what is done")
    parser.add_argument("--eager-max", type=int, default=None,
                        help="longest input for eager attention (Shaw, backend eager); default: none on cpu, 4096 "
                        "on cuda")
    parser.add_argument("--out", type=Path, default=None, help=f"markdown file to update (default {DOC}; "
                        "--quick writes nothing unless given)")
    parser.add_argument("--memory-case", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "cuda":
        if cuda_available is None:
            import torch

            cuda_available = torch.cuda.is_available()
        if not cuda_available:
            parser.error("--device cuda: torch.cuda.is_available() is False (no GPU, or a CPU-only torch build)")
    if args.dtype is None:
        args.dtype = "bf16" if args.device == "cuda" else "fp32"
    if args.layers is None:
        args.layers = 12 if args.device == "cuda" and not args.quick else 1
    if args.eager_max is None:
        args.eager_max = 4096 if args.device == "cuda" and not args.quick else 0  # 0: no limit
    if args.time_budget is not None and args.time_budget < 0:
        parser.error("--time-budget must be >= 0")
    return args


def main(argv=None) -> int:
    global DEVICE, DTYPE

    started = time.time()
    args = parse_args(argv)
    DEVICE, DTYPE = args.device, args.dtype
    gpu = DEVICE == "cuda"

    import torch

    import hf_posenc  # noqa: F401

    torch.set_num_threads(args.threads)  # CPU ops only (on cuda: host-side work)
    if args.quick:
        size = dict(heads=4, head_dim=16, vocab=256, trained=64, max_len=256, layers=args.layers)
        lengths = args.lengths or [96, 160]
        repeats = args.repeats or 2
        decode_context, decode_steps, ft_len, ft_layers, ft_steps = 96, 3, 96, 1, 2
        bw_lengths = lengths
    elif gpu:
        size = dict(heads=12, head_dim=64, vocab=50257, trained=1024, max_len=16384, layers=args.layers)
        lengths = args.lengths or [1024, 2048, 4096, 8192, 16384]
        repeats = args.repeats or 3
        decode_context, decode_steps, ft_len, ft_layers, ft_steps = 4096, 16, 2048, 12, 5
        bw_lengths = [n for n in lengths if n <= 4096] or lengths[:1]
    else:
        size = dict(heads=12, head_dim=64, vocab=50257, trained=1024, max_len=4096, layers=args.layers)
        lengths = args.lengths or [1024, 2048, 4096]
        repeats = args.repeats or 5
        decode_context, decode_steps, ft_len, ft_layers, ft_steps = 2048, 64, 1024, 12, 5
        bw_lengths = lengths[:2]
    size["max_len"] = max([size["max_len"], *lengths, decode_context + decode_steps])

    if args.memory_case:
        method, backend, length = args.memory_case.split(":")
        print(json.dumps(memory_case(size, None if method == "none" else method, backend, int(length))))
        return 0

    command = "python benchmarks/bench_posenc.py " + " ".join(argv if argv is not None else sys.argv[1:])
    sections = []
    skipped = []
    say = lambda text: print(text, flush=True)  # noqa: E731
    out = args.out if args.out is not None else (None if args.quick else DOC)
    markers = (GPU_BEGIN, GPU_END) if gpu else (BEGIN, END)

    def over_budget() -> bool:
        return args.time_budget is not None and time.time() - started > args.time_budget

    def eager_ok(method: str | None, backend: str, length: int) -> bool:
        eager = backend == "eager" or method == "shaw"
        return not (eager and args.eager_max and length > args.eager_max)

    eager_skip = f"skipped (eager > {args.eager_max})"
    budget_skip = BUDGET_SKIP

    def report(final: bool = False, partial: str | None = None) -> None:
        """Write what is measured so far (after every section, so an interrupted run keeps its tables)."""
        status = "" if final else " (interrupted: sections so far)"
        header = (
            f"Command: `{command.strip()}`  \n"
            f"Date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}, "
            f"{time.time() - started:.0f} s{status}  \n"
            f"Machine: {machine()}  \n"
            f"Model: GPT-2, {size['heads']} heads x {size['head_dim']}, {args.layers} layers (fine-tune: "
            f"{ft_layers}), vocab {size['vocab']}, B=1, {args.dtype}, device {DEVICE}. Cells: median ratio converted / "
            "unconverted (median converted time)."
        )
        if skipped:
            header += f"  \nSkipped (time budget {args.time_budget:g} s): {', '.join(skipped)}."
        if final:
            say(header)
        if out is not None:
            body = sections + ([partial] if partial else [])
            write(out, header + "\n\n" + "\n\n".join(body), *markers)
            if final:
                say(f"\nwrote {out}")

    def publish(text: str, done: bool) -> None:
        """A section's table: written as it grows (per length), kept in ``sections`` once complete."""
        if done:
            sections.append(text)
            report()
            say(text + "\n")
        else:
            report(partial=text + "\n\n(section in progress)")

    say(f"# {command.strip()}\n")

    def build_all(methods, backend="auto") -> dict:
        built = {}
        for m in methods:
            try:
                built[m] = build(size, m, backend)
            except Exception as exc:
                built[m] = recover(exc)
        return built

    try:
        baseline = build(size, None)
    except Exception as exc:  # nothing to compare against: say why in the output and stop
        sections.append(f"### Unconverted baseline\n\n{recover(exc)}")
        report(final=True)
        return 1
    models = build_all(args.methods)
    long = max(lengths)

    def timed_rows(title, names, variants, fn, lengths_, reps, label_rows):
        """Run ``fn(model, x)`` for every variant against the baseline per length; publish the table per length.
        ``variants``: {"method" or "method:backend": model or error string}; ``label_rows(key)`` -> the row's
        leading cells."""
        cells = {k: [] for k in variants}
        base_ms = []
        header = names + [str(n) for n in lengths_]

        def text():
            done = len(base_ms)
            pad = lambda row: row + [budget_skip] * (len(lengths_) - done)  # noqa: E731
            rows = [pad(["unconverted"] + ["-"] * (len(names) - 1) + base_ms)]
            rows += [pad(label_rows(k) + cells[k]) for k in variants]
            return title + "\n\n" + table(header, rows)

        for length in lengths_:
            if over_budget():
                break
            x = tokens(size, length)
            runnable = {k: fn(v, x) for k, v in variants.items()
                        if not isinstance(v, str) and eager_ok(*(k.split(":") + ["auto"])[:2], length)}
            res = paired(runnable, fn(baseline, x), reps, stop=over_budget)
            for k, v in variants.items():
                if isinstance(v, str):
                    cells[k].append(v)
                elif k not in runnable:
                    cells[k].append(eager_skip)
                else:
                    cells[k].append(ratio(res[k]))
            base_ms.append(base_median(res))
            del x
            if length != lengths_[-1]:
                publish(text(), done=False)
        if len(base_ms) < len(lengths_):
            skipped.append(f"{title.lstrip('# ').split(',')[0]} at {', '.join(map(str, lengths_[len(base_ms):]))}")
        return text()

    def forward_section():
        title = "### Forward (no grad), backend auto"
        return timed_rows(title, ["method"], models, forward_fn, lengths, repeats, lambda m: [m])

    def backward_section():
        title = "### Forward + backward (all weights trainable), backend auto"
        return timed_rows(title, ["method"], models, backward_fn, bw_lengths, max(2, repeats - 2) if not gpu
                          else repeats, lambda m: [m])

    def backends_section():
        nonlocal baseline
        if baseline is None:  # the GPU memory section released it
            baseline = build(size, None)
        names = ("sdpa", "eager") if args.quick else ("sdpa", "flex", "eager")  # auto: the forward table
        variants = {}
        for m in [m for m in ("alibi", "t5") if m in args.methods]:
            for b in names:
                try:
                    variants[f"{m}:{b}"] = build(size, m, backend=b)
                except Exception as exc:
                    variants[f"{m}:{b}"] = recover(exc)
        if not variants:
            return None
        text = timed_rows("### Forward (no grad) by backend", ["method", "backend"], variants, forward_fn, lengths,
                          max(2, repeats - 2) if not gpu else repeats, lambda k: k.split(":"))
        del variants
        gc.collect()
        if gpu:
            torch.cuda.empty_cache()
        return text

    def decode_section():
        runnable = {m: decode_fn(models[m], size, decode_context, decode_steps) for m in args.methods
                    if not isinstance(models[m], str) and eager_ok(m, "auto", decode_context)}
        res = paired_decode(runnable, decode_fn(baseline, size, decode_context, decode_steps), repeats,
                           stop=over_budget)
        times = [r[2] for r in res.values() if not isinstance(r, str)]
        base = f"{statistics.median(times):.2f} ms/token" if times else "-"
        rows = [["unconverted", base]]
        for m in args.methods:
            r = models[m] if isinstance(models[m], str) else res.get(m, eager_skip)
            rows.append([m, r if isinstance(r, str) else f"{r[1]:.2f}x ({r[0]:.2f} ms/token)"])
        return f"### Decode, {decode_steps} steps after a {decode_context}-token prefill, backend auto\n\n" + table(
            ["method", "ms/token ratio"], rows
        )

    def memory_section():
        nonlocal models, baseline
        models = baseline = None  # GPU: one model on the device at a time; CPU: fresh processes anyway
        gc.collect()
        if gpu:
            torch.cuda.empty_cache()
        cases = [(None, "auto")] + [(m, "auto") for m in (args.methods[:1] if args.quick else args.methods)]
        if not args.quick:
            cases += [(m, b) for m in ("alibi", "t5") if m in args.methods for b in ("sdpa", "flex")]
        if gpu:
            return gpu_memory_table(cases)
        results = {}
        for case in cases:
            if over_budget():
                results[case] = budget_skip
                continue
            try:
                results[case] = run_memory_case(args, case[0], case[1], long)
            except Exception as exc:
                results[case] = recover(exc)
        base = results[(None, "auto")]
        if isinstance(base, str):
            rows = [["unconverted", "-", base, base]]
        else:
            rows = [["unconverted", "-", f"{base['peak_mb']:.0f} MB", f"{base['forward_mb']:.0f} MB"]]
        for (m, b), r in list(results.items())[1:]:
            if isinstance(r, str) or isinstance(base, str):
                rows.append([m, b, r if isinstance(r, str) else "-", r if isinstance(r, str) else "-"])
                continue
            rows.append([
                m, b, f"{r['peak_mb']:.0f} MB ({100 * (r['peak_mb'] / base['peak_mb'] - 1):+.1f} %)",
                f"{r['forward_mb']:.0f} MB ({r['forward_mb'] - base['forward_mb']:+.0f} MB)",
            ])
        return f"### Peak memory, forward (no grad) at {long} tokens\n\n" + table(
            ["method", "backend", "peak RSS", "forward working set"], rows
        )

    def gpu_memory_table(cases):
        mem_lengths = sorted({n for n in (4096, long) if n <= long} or {long})
        results = {}
        for m, b in cases:
            if over_budget():
                results[(m, b)] = {n: budget_skip for n in mem_lengths}
                continue
            runnable = [n for n in mem_lengths if eager_ok(m, b, n)]
            try:
                r = cuda_memory_case(size, m, b, runnable) if runnable else {}
            except Exception as exc:  # the build itself failed
                r = {n: recover(exc) for n in runnable}
            results[(m, b)] = {n: r.get(n, eager_skip) for n in mem_lengths}
        base = results[(None, "auto")]
        header = ["method", "backend"]
        for n in mem_lengths:
            header += [f"peak allocated, {n}", f"forward working set, {n}"]
        rows = []
        for (m, b), per_length in results.items():
            row = [m or "unconverted", "-" if m is None else b]
            for n in mem_lengths:
                r, ref = per_length[n], base[n]
                if isinstance(r, str):
                    row += [r, r]
                elif m is None or isinstance(ref, str):
                    row += [f"{r['peak_mb']:.0f} MB", f"{r['forward_mb']:.0f} MB"]
                else:
                    row += [f"{r['peak_mb']:.0f} MB ({100 * (r['peak_mb'] / ref['peak_mb'] - 1):+.1f} %)",
                            f"{r['forward_mb']:.0f} MB ({r['forward_mb'] - ref['forward_mb']:+.0f} MB)"]
            rows.append(row)
        return ("### Peak GPU memory, forward (no grad), torch.cuda.max_memory_allocated (one model on the GPU; "
                "working set = peak - allocated before the forward)\n\n" + table(header, rows))

    def finetune_section():
        try:
            res = paired(
                {"alibi": finetune_fn(size, "alibi", ft_len, ft_layers)}, finetune_fn(size, None, ft_len, ft_layers),
                ft_steps,
            )
            cell = res["alibi"]
        except Exception as exc:
            cell = recover(exc)
        if isinstance(cell, str):
            rows = [["unconverted", "-", "-"], ["alibi", cell, cell]]
        else:
            ms, r, base = cell
            rows = [["unconverted", f"{ft_len / base * 1000:.0f} tokens/s", "-"],
                    ["alibi", f"{1 / r:.2f}x", f"{base / ms:.2f}x ({ft_len / ms * 1000:.0f} tokens/s)"]]
        gc.collect()
        if gpu:
            torch.cuda.empty_cache()
        return (
            f"### Fine-tune, LoRA (r=8, c_attn) + AdamW, {ft_layers}-layer GPT2LMHeadModel, {ft_len} tokens/step, "
            f"backend auto, {ft_steps} steps each\n\n"
            + table(["model", "tokens/s ratio (median of paired steps)", "ratio of median step times"], rows)
        )

    run_section = {"forward": forward_section, "backward": backward_section, "backends": backends_section,
                   "decode": decode_section, "memory": memory_section, "finetune": finetune_section}
    for name in GPU_ORDER if gpu else SECTIONS:
        if name in args.skip:
            continue
        if over_budget():
            skipped.append(name)
            say(f"skipped {name}: time budget of {args.time_budget:g} s used")
            continue
        t0 = time.time()
        try:
            text = run_section[name]()
        except Exception as exc:  # a whole section failing (e.g. building its models): say so, go on
            text = f"### {name}\n\n{recover(exc)}"
        if text is not None:
            publish(text, done=True)
        say(f"({name}: {time.time() - t0:.1f} s)\n")

    report(final=True)
    return 0


def write(path: Path, body: str, begin: str = BEGIN, end: str = END) -> None:
    """Replace the block between the ``begin`` / ``end`` markers in ``path`` (create the file if needed)."""
    block = f"{begin}\n{body}\n{end}"
    text = path.read_text() if path.exists() else "# Performance\n\n" + begin + "\n" + end + "\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
