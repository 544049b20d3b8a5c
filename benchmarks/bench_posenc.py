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
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "performance.md"
BEGIN, END = "<!-- bench:cpu:begin -->", "<!-- bench:cpu:end -->"
GPU_BEGIN, GPU_END = "<!-- bench:gpu:begin -->", "<!-- bench:gpu:end -->"
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def sync(device: str = "cpu") -> None:
    """Wait for the device's queued work (a no-op on the CPU): brackets every timed call."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def release(device: str = "cpu") -> None:
    """Collect garbage and, on a GPU, return the freed blocks of the caching allocator."""
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


def failure(exc: BaseException) -> str:
    """A table cell for a case that raised: ``error: <type>: <first line, short>`` (markdown-safe)."""
    message = (str(exc).strip().splitlines() or [""])[0]
    message = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    if len(message) > 100:
        message = message[:97] + "..."
    return "error: " + message.replace("|", "/").replace("`", "'")


def recover(exc: BaseException, device: str = "cpu") -> str:
    """Print the traceback, free the GPU cache, return the cell text."""
    traceback.print_exc(file=sys.stderr)
    release(device)
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


def build(size, method: str | None, backend: str = "auto", head: bool = False, layers=None, *, device: str = "cpu",
          dtype: str = "fp32"):
    """Unconverted (method None, n_positions = longest length) or converted GPT-2; same seed, eval mode, on
    ``device`` in ``dtype`` (a ``DTYPES`` key)."""
    import torch
    import transformers

    import hf_posenc

    torch.manual_seed(0)
    cls = transformers.GPT2LMHeadModel if head else transformers.GPT2Model
    with torch.device(device):  # random init directly on the device (fast on a GPU)
        if method is None:
            model = cls(gpt2_config(size, max(size["max_len"], size["trained"]), layers)).eval()
        else:
            model = cls(gpt2_config(size, size["trained"], layers)).eval()
            model = hf_posenc.convert(model, method, backend=backend, **METHOD_OPTIONS.get(method, {}))
    return model.to(device=device, dtype=getattr(torch, DTYPES[dtype]))


def tokens(size, length: int, seed: int = 0, *, device: str = "cpu"):
    """(1, length) random token ids on ``device``, the same for the same seed."""
    import torch

    ids = torch.randint(0, size["vocab"], (1, length), generator=torch.Generator().manual_seed(seed))
    return ids.to(device)


# ---- timing ----------------------------------------------------------------------------------------------
BUDGET_SKIP = "skipped (time budget)"


def paired(candidates: dict, baseline, repeats: int, warmup: int = 1, stop=None, device: str = "cpu") -> dict:
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
                    sync(device)
                    t0 = time.perf_counter()
                    fn()
                    sync(device)
                    times[fn] = (time.perf_counter() - t0) * 1000
                base_ms.append(times[baseline])
                ms.append(times[run])
                ratios.append(times[run] / times[baseline])
            results[name] = (statistics.median(ms), statistics.median(ratios), statistics.median(base_ms))
        except Exception as exc:  # one failing case must not end the run (GPU time is scarce)
            results[name] = recover(exc, device)
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


def cache_of(out):
    """The KV cache of a model output: ``cache`` (transformers >= 5.2x) or ``past_key_values`` (older)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


class DecodeRun:
    """A timed call: a fresh prefill of ``context`` tokens (untimed), then ``steps`` single-token steps; each call
    leaves their ms per token in ``per_token``."""

    def __init__(self, model, size, context: int, steps: int, device: str = "cpu"):
        self.model, self.context, self.steps, self.device = model, context, steps, device
        self.x = tokens(size, context + steps, seed=1, device=device)
        # the cache argument: ``cache`` on transformers >= 5.2x (``past_key_values`` deprecated), else the old name
        params = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.per_token = None

    def __call__(self) -> None:
        import torch

        x, context = self.x, self.context
        with torch.no_grad():
            cache = cache_of(self.model(x[:, :context], use_cache=True))
            sync(self.device)
            t0 = time.perf_counter()
            for t in range(context, context + self.steps):
                cache = cache_of(self.model(x[:, t : t + 1], use_cache=True, **{self.cache_arg: cache}))
            sync(self.device)
            self.per_token = (time.perf_counter() - t0) * 1000 / self.steps


def paired_decode(candidates: dict, baseline, repeats: int, stop=None, device: str = "cpu") -> dict:
    """``paired`` for ``DecodeRun``s: the ratio of their ``per_token`` (the prefill is not timed)."""
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
            results[name] = recover(exc, device)
    return results


# ---- memory (subprocess per case) --------------------------------------------------------------------------
def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def memory_case(size, method: str | None, backend: str, length: int, device: str = "cpu", dtype: str = "fp32") -> dict:
    """This process's peak RSS and the forward's working set (MB) for one forward of ``length`` tokens."""
    import torch

    model = build(size, method, backend, device=device, dtype=dtype)
    x = tokens(size, length, device=device)
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


def cuda_memory_case(size, method: str | None, backend: str, lengths: list, device: str = "cuda",
                     dtype: str = "bf16") -> dict:
    """GPU, in-process, this model alone on the device: {length: {"peak_mb", "forward_mb"} or "error: ..."}."""
    import torch

    mb = 1024 * 1024
    results = {}
    model = build(size, method, backend, device=device, dtype=dtype)
    try:
        for length in lengths:
            try:
                x = tokens(size, length, device=device)
                with torch.no_grad():
                    model(x)  # warm-up (FlexAttention compiles here)
                    sync(device)
                    before = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                    model(x)
                    sync(device)
                    peak = torch.cuda.max_memory_allocated()
                results[length] = {"peak_mb": peak / mb, "forward_mb": (peak - before) / mb}
            except Exception as exc:
                results[length] = recover(exc, device)
    finally:
        del model
        gc.collect()
        torch.cuda.empty_cache()
    return results


# ---- fine-tune -------------------------------------------------------------------------------------------
def finetune_fn(size, method: str | None, length: int, layers: int, device: str = "cpu", dtype: str = "fp32"):
    """One LoRA + AdamW training step of a ``layers``-layer GPT2LMHeadModel on ``length`` tokens, as a callable."""
    import torch
    from peft import LoraConfig, get_peft_model

    model = build(size, method, head=True, layers=layers, device=device, dtype=dtype).train()
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"], fan_in_fan_out=True))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = tokens(size, length, seed=2, device=device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=x, labels=x).loss.backward()
        optimizer.step()

    return step


# ---- report ----------------------------------------------------------------------------------------------
def machine(device: str = "cpu") -> str:
    import torch
    import transformers

    if device == "cuda":
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



# ---- one run ---------------------------------------------------------------------------------------------
class Plan(NamedTuple):  # not a dataclass: tests load this file as a module missing from sys.modules
    """The sizes of one run (``--quick``, GPU or CPU defaults): ``size`` is ``build``'s model dict, its ``max_len``
    covering every length measured and the decode prefill + steps; ``bw_lengths`` are the forward+backward ones."""

    size: dict
    lengths: list
    repeats: int
    bw_lengths: list
    decode_context: int
    decode_steps: int
    ft_len: int
    ft_layers: int
    ft_steps: int

    @property
    def longest(self) -> int:
        return max(self.lengths)


def plan_for(args) -> Plan:
    """``--quick``: tiny sizes; cuda: 12-layer lengths 1k-16k; cpu: lengths 1k-4k. ``--lengths``/``--repeats`` win."""
    if args.quick:
        size = dict(heads=4, head_dim=16, vocab=256, trained=64, max_len=256, layers=args.layers)
        lengths = args.lengths or [96, 160]
        plan = Plan(size, lengths, args.repeats or 2, lengths, 96, 3, 96, 1, 2)
    elif args.device == "cuda":
        size = dict(heads=12, head_dim=64, vocab=50257, trained=1024, max_len=16384, layers=args.layers)
        lengths = args.lengths or [1024, 2048, 4096, 8192, 16384]
        bw_lengths = [n for n in lengths if n <= 4096] or lengths[:1]
        plan = Plan(size, lengths, args.repeats or 3, bw_lengths, 4096, 16, 2048, 12, 5)
    else:
        size = dict(heads=12, head_dim=64, vocab=50257, trained=1024, max_len=4096, layers=args.layers)
        lengths = args.lengths or [1024, 2048, 4096]
        plan = Plan(size, lengths, args.repeats or 5, lengths[:2], 2048, 64, 1024, 12, 5)
    size["max_len"] = max([size["max_len"], *lengths, plan.decode_context + plan.decode_steps])
    return plan


def say(text: str) -> None:
    print(text, flush=True)


def method_cells(key: str) -> list[str]:
    """Leading cells of a row keyed ``"method"``."""
    return [key]


def method_backend_cells(key: str) -> list[str]:
    """Leading cells of a row keyed ``"method:backend"``."""
    return key.split(":")


def timed_table(title: str, names: list[str], lengths: list, base_ms: list, cells: dict, label_rows) -> str:
    """``title`` and a table with one column per length: the baseline's row, then one row per ``cells`` key (its
    ``label_rows(key)`` cells, then its cells). Lengths not measured yet (len(base_ms) done) read ``BUDGET_SKIP``."""
    missing = [BUDGET_SKIP] * (len(lengths) - len(base_ms))
    rows = [["unconverted"] + ["-"] * (len(names) - 1) + base_ms + missing]
    rows += [label_rows(k) + cells[k] + missing for k in cells]
    return title + "\n\n" + table(names + [str(n) for n in lengths], rows)


class Run:
    """One benchmark run: the arguments, device / dtype, the time budget's clock, the models under test, and the
    report so far (``sections``: finished tables in order; ``skipped``: what the time budget cut), written to
    ``out`` between the device's markers after every section."""

    def __init__(self, args, plan: Plan, command: str, started: float):
        self.args, self.plan, self.command, self.started = args, plan, command, started
        self.device, self.dtype = args.device, args.dtype
        self.gpu = self.device == "cuda"
        self.out = args.out if args.out is not None else (None if args.quick else DOC)
        self.markers = (GPU_BEGIN, GPU_END) if self.gpu else (BEGIN, END)
        self.eager_skip = f"skipped (eager > {args.eager_max})"
        self.sections: list[str] = []
        self.skipped: list[str] = []
        self.baseline = None  # the unconverted model; None once the memory section released it
        self.models: dict | None = None  # {method: model or "error: ..."}

    # -- budget, models ------------------------------------------------------------------------------------
    def over_budget(self) -> bool:
        return self.args.time_budget is not None and time.time() - self.started > self.args.time_budget

    def eager_ok(self, method: str | None, backend: str, length: int) -> bool:
        """False for eager attention (Shaw, backend eager) beyond ``--eager-max`` tokens (0: no limit)."""
        eager = backend == "eager" or method == "shaw"
        return not (eager and self.args.eager_max and length > self.args.eager_max)

    def fewer_repeats(self) -> int:
        """Repeats of the backward and by-backend tables: 2 fewer (at least 2) on the CPU."""
        return max(2, self.plan.repeats - 2) if not self.gpu else self.plan.repeats

    def build(self, method: str | None, backend: str = "auto"):
        return build(self.plan.size, method, backend=backend, device=self.device, dtype=self.dtype)

    def build_each(self, methods) -> dict:
        """{method: model, or the "error: ..." cell of a build that raised}."""
        built = {}
        for m in methods:
            try:
                built[m] = self.build(m)
            except Exception as exc:
                built[m] = recover(exc, self.device)
        return built

    # -- report --------------------------------------------------------------------------------------------
    def header(self, final: bool) -> str:
        status = "" if final else " (interrupted: sections so far)"
        size, args = self.plan.size, self.args
        header = (
            f"Command: `{self.command.strip()}`  \n"
            f"Date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}, "
            f"{time.time() - self.started:.0f} s{status}  \n"
            f"Machine: {machine(self.device)}  \n"
            f"Model: GPT-2, {size['heads']} heads x {size['head_dim']}, {args.layers} layers (fine-tune: "
            f"{self.plan.ft_layers}), vocab {size['vocab']}, B=1, {args.dtype}, device {self.device}. Cells: median "
            "ratio converted / unconverted (median converted time)."
        )
        if self.skipped:
            header += f"  \nSkipped (time budget {args.time_budget:g} s): {', '.join(self.skipped)}."
        return header

    def report(self, final: bool = False, partial: str | None = None) -> None:
        """Write what is measured so far (after every section, so an interrupted run keeps its tables)."""
        header = self.header(final)
        if final:
            say(header)
        if self.out is not None:
            body = self.sections + ([partial] if partial else [])
            write(self.out, header + "\n\n" + "\n\n".join(body), *self.markers)
            if final:
                say(f"\nwrote {self.out}")

    def publish(self, text: str, done: bool) -> None:
        """A section's table: written as it grows (per length), kept in ``sections`` once complete."""
        if done:
            self.sections.append(text)
            self.report()
            say(text + "\n")
        else:
            self.report(partial=text + "\n\n(section in progress)")

    # -- the run -------------------------------------------------------------------------------------------
    def execute(self) -> int:
        """Baseline and models, then every section not skipped in the device's order; 1 if the baseline fails."""
        say(f"# {self.command.strip()}\n")
        try:
            self.baseline = self.build(None)
        except Exception as exc:  # nothing to compare against: say why in the output and stop
            self.sections.append(f"### Unconverted baseline\n\n{recover(exc, self.device)}")
            self.report(final=True)
            return 1
        self.models = self.build_each(self.args.methods)
        for name in GPU_ORDER if self.gpu else SECTIONS:
            if name not in self.args.skip:
                self.run_section(name)
        self.report(final=True)
        return 0

    def run_section(self, name: str) -> None:
        """One section, unless the budget is spent; a section that raises becomes an error cell under its name."""
        if self.over_budget():
            self.skipped.append(name)
            say(f"skipped {name}: time budget of {self.args.time_budget:g} s used")
            return
        sections = {"forward": self.forward_section, "backward": self.backward_section,
                    "backends": self.backends_section, "decode": self.decode_section,
                    "memory": self.memory_section, "finetune": self.finetune_section}
        t0 = time.time()
        try:
            text = sections[name]()
        except Exception as exc:  # a whole section failing (e.g. building its models): say so, go on
            text = f"### {name}\n\n{recover(exc, self.device)}"
        if text is not None:
            self.publish(text, done=True)
        say(f"({name}: {time.time() - t0:.1f} s)\n")

    # -- timed sections ------------------------------------------------------------------------------------
    def timed_rows(self, title: str, names: list[str], variants: dict, fn, lengths: list, repeats: int,
                   label_rows) -> str:
        """Run ``fn(model, x)`` for every variant against the baseline per length; publish the table per length.
        ``variants``: {"method" or "method:backend": model or error string}; ``label_rows(key)`` -> the row's
        leading cells."""
        cells = {k: [] for k in variants}
        base_ms = []
        for length in lengths:
            if self.over_budget():
                break
            x = tokens(self.plan.size, length, device=self.device)
            runnable = {k: fn(v, x) for k, v in variants.items()
                        if not isinstance(v, str) and self.eager_ok(*(k.split(":") + ["auto"])[:2], length)}
            res = paired(runnable, fn(self.baseline, x), repeats, stop=self.over_budget, device=self.device)
            for k, v in variants.items():
                if isinstance(v, str):
                    cells[k].append(v)
                elif k not in runnable:
                    cells[k].append(self.eager_skip)
                else:
                    cells[k].append(ratio(res[k]))
            base_ms.append(base_median(res))
            del x
            if length != lengths[-1]:
                self.publish(timed_table(title, names, lengths, base_ms, cells, label_rows), done=False)
        if len(base_ms) < len(lengths):
            self.skipped.append(f"{title.lstrip('# ').split(',')[0]} at {', '.join(map(str, lengths[len(base_ms):]))}")
        return timed_table(title, names, lengths, base_ms, cells, label_rows)

    def forward_section(self) -> str:
        title = "### Forward (no grad), backend auto"
        return self.timed_rows(title, ["method"], self.models, forward_fn, self.plan.lengths, self.plan.repeats,
                               method_cells)

    def backward_section(self) -> str:
        title = "### Forward + backward (all weights trainable), backend auto"
        return self.timed_rows(title, ["method"], self.models, backward_fn, self.plan.bw_lengths,
                               self.fewer_repeats(), method_cells)

    def backends_section(self) -> str | None:
        """ALiBi and T5 forward per explicit backend (auto: the forward table); None if neither is measured."""
        if self.baseline is None:  # the GPU memory section released it
            self.baseline = self.build(None)
        backends = ("sdpa", "eager") if self.args.quick else ("sdpa", "flex", "eager")
        variants = {}
        for m in [m for m in ("alibi", "t5") if m in self.args.methods]:
            for b in backends:
                try:
                    variants[f"{m}:{b}"] = self.build(m, backend=b)
                except Exception as exc:
                    variants[f"{m}:{b}"] = recover(exc, self.device)
        if not variants:
            return None
        text = self.timed_rows("### Forward (no grad) by backend", ["method", "backend"], variants, forward_fn,
                               self.plan.lengths, self.fewer_repeats(), method_backend_cells)
        del variants
        release(self.device)
        return text

    def decode_run(self, model) -> DecodeRun:
        plan = self.plan
        return DecodeRun(model, plan.size, plan.decode_context, plan.decode_steps, device=self.device)

    def decode_section(self) -> str:
        context, steps, models = self.plan.decode_context, self.plan.decode_steps, self.models
        runnable = {m: self.decode_run(models[m]) for m in self.args.methods
                    if not isinstance(models[m], str) and self.eager_ok(m, "auto", context)}
        res = paired_decode(runnable, self.decode_run(self.baseline), self.plan.repeats, stop=self.over_budget,
                            device=self.device)
        times = [r[2] for r in res.values() if not isinstance(r, str)]
        base = f"{statistics.median(times):.2f} ms/token" if times else "-"
        rows = [["unconverted", base]]
        for m in self.args.methods:
            r = models[m] if isinstance(models[m], str) else res.get(m, self.eager_skip)
            rows.append([m, r if isinstance(r, str) else f"{r[1]:.2f}x ({r[0]:.2f} ms/token)"])
        return f"### Decode, {steps} steps after a {context}-token prefill, backend auto\n\n" + table(
            ["method", "ms/token ratio"], rows
        )

    # -- memory, fine-tune ---------------------------------------------------------------------------------
    def memory_section(self) -> str:
        """Releases the models first (GPU: one model on the device at a time; CPU: fresh processes anyway)."""
        self.models = self.baseline = None
        release(self.device)
        methods = self.args.methods
        cases = [(None, "auto")] + [(m, "auto") for m in (methods[:1] if self.args.quick else methods)]
        if not self.args.quick:
            cases += [(m, b) for m in ("alibi", "t5") if m in methods for b in ("sdpa", "flex")]
        return self.gpu_memory_table(cases) if self.gpu else self.cpu_memory_table(cases)

    def cpu_memory_table(self, cases: list) -> str:
        """Peak RSS per (method, backend) case at the longest length, one subprocess each; cases[0]: the baseline."""
        long, results = self.plan.longest, {}
        for case in cases:
            if self.over_budget():
                results[case] = BUDGET_SKIP
                continue
            try:
                results[case] = run_memory_case(self.args, case[0], case[1], long)
            except Exception as exc:
                results[case] = recover(exc, self.device)
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

    def gpu_memory_table(self, cases: list) -> str:
        """max_memory_allocated per (method, backend) case at 4096 tokens (if measured) and the longest length."""
        long = self.plan.longest
        mem_lengths = sorted({n for n in (4096, long) if n <= long} or {long})
        results, on = {}, dict(device=self.device, dtype=self.dtype)
        for m, b in cases:
            if self.over_budget():
                results[(m, b)] = {n: BUDGET_SKIP for n in mem_lengths}
                continue
            runnable = [n for n in mem_lengths if self.eager_ok(m, b, n)]
            try:
                r = cuda_memory_case(self.plan.size, m, b, runnable, **on) if runnable else {}
            except Exception as exc:  # the build itself failed
                r = {n: recover(exc, self.device) for n in runnable}
            results[(m, b)] = {n: r.get(n, self.eager_skip) for n in mem_lengths}
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

    def finetune_section(self) -> str:
        """ALiBi vs unconverted LoRA steps, as tokens/s ratios."""
        size, ft_len, ft_layers, ft_steps = self.plan.size, self.plan.ft_len, self.plan.ft_layers, self.plan.ft_steps
        on = dict(device=self.device, dtype=self.dtype)
        try:
            res = paired({"alibi": finetune_fn(size, "alibi", ft_len, ft_layers, **on)},
                         finetune_fn(size, None, ft_len, ft_layers, **on), ft_steps, device=self.device)
            cell = res["alibi"]
        except Exception as exc:
            cell = recover(exc, self.device)
        if isinstance(cell, str):
            rows = [["unconverted", "-", "-"], ["alibi", cell, cell]]
        else:
            ms, r, base = cell
            rows = [["unconverted", f"{ft_len / base * 1000:.0f} tokens/s", "-"],
                    ["alibi", f"{1 / r:.2f}x", f"{base / ms:.2f}x ({ft_len / ms * 1000:.0f} tokens/s)"]]
        release(self.device)
        return (
            f"### Fine-tune, LoRA (r=8, c_attn) + AdamW, {ft_layers}-layer GPT2LMHeadModel, {ft_len} tokens/step, "
            f"backend auto, {ft_steps} steps each\n\n"
            + table(["model", "tokens/s ratio (median of paired steps)", "ratio of median step times"], rows)
        )


def main(argv=None) -> int:
    """Exit code 0; 1 if the unconverted baseline cannot be built (argparse errors: 2)."""
    started = time.time()
    args = parse_args(argv)

    import torch

    import hf_posenc  # noqa: F401

    torch.set_num_threads(args.threads)  # CPU ops only (on cuda: host-side work)
    plan = plan_for(args)
    if args.memory_case:
        method, backend, length = args.memory_case.split(":")
        method = None if method == "none" else method
        print(json.dumps(memory_case(plan.size, method, backend, int(length), device=args.device, dtype=args.dtype)))
        return 0

    command = "python benchmarks/bench_posenc.py " + " ".join(argv if argv is not None else sys.argv[1:])
    return Run(args, plan, command, started).execute()


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
