"""SmolLM2-135M past its context: training-free RoPE scaling vs brief fine-tunes vs ALiBi / T5 retrofits.

    python studies/smollm2_long_context.py --out runs/study_smollm2 [--budget-s 480] [--backend flex]
    python studies/smollm2_long_context.py --out runs/study_smollm2 --report-only --plot docs/plots/smollm2_long_context.png

SmolLM2-135M (Llama-style, native RoPE theta 1e5, trained to 8k; ``hf-posenc fetch smollm2-135m``) is scored on
held-out Shakespeare (``hf-posenc fetch shakespeare``: Hamlet, Macbeth, The Tempest) at 1k ... 32k tokens:

* perplexity over non-overlapping windows scored from scratch, and the perplexity of each window's last
  ``last_tokens`` tokens (the tokens that see the most context: where a model past its range breaks first);
* passkey retrieval (the ``posenc_passkey`` prompts, repeated-sentence filler): a hit is a greedy continuation
  that reproduces the key, checked in one forward by teacher forcing (argmax at every answer position).

Variants, in the order they run (a time budget skips the tail, recorded as skipped): the original; RoPE scaling
x``factor`` training-free (YaRN, dynamic NTK, linear = position interpolation); ALiBi and T5 retrofits after a
full fine-tune at ``ft_len`` tokens; the original and YaRN / linear after the same fine-tune. Dynamic NTK is not
fine-tuned: at ``ft_len`` <= the trained context it *is* the original, so its fine-tune is the original's.
Fine-tunes use the recipe library (``hf_posenc.training``) on the Shakespeare training split. lm-eval is not
needed (the GPU machine this ran on has none); the passkey prompts come from ``passkey_text``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from hf_posenc.integrations.long_context import passkey_accuracy, passkey_docs, window_scores


@dataclass(frozen=True)
class Settings:
    lengths: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384, 32768)
    eval_tokens: int = 65536  # held-out tokens per length (whole windows, at least one)
    last_tokens: int = 1024
    factor: float = 4.0  # RoPE scaling factor: 8k trained context -> 32k
    ft_len: int = 2048
    ft_batch: int = 8
    ft_steps: int = 150
    lr_rope: float = 5e-5  # fine-tunes that keep rotary positions
    lr_retrofit: float = 3e-4  # ALiBi / T5: attention must re-learn where to look
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    passkey_samples: int = 2  # per (length, depth)


QUICK = Settings(lengths=(64, 256, 512), eval_tokens=512, last_tokens=16, factor=4.0, ft_len=64, ft_batch=2,
                 ft_steps=2, lr_rope=1e-4, lr_retrofit=1e-3, depths=(0.0, 1.0), passkey_samples=1)


@dataclass(frozen=True)
class Variant:
    name: str
    method: str  # "native" (the checkpoint's own RoPE) or an hf_posenc method
    options: dict
    finetune: bool

    @property
    def slug(self) -> str:
        return "".join(c if c.isalnum() else "_" for c in self.name).strip("_")


def variants(settings: Settings) -> list[Variant]:
    """Every variant, in priority order (a time budget skips from the end)."""
    x = f"x{settings.factor:g}"
    scaled = lambda kind: {"scaling": kind, "factor": settings.factor}  # noqa: E731
    return [
        Variant("original", "native", {}, False),
        Variant(f"YaRN {x}", "rope", scaled("yarn"), False),
        Variant(f"dynamic NTK {x}", "rope", scaled("dynamic"), False),
        Variant(f"linear (PI) {x}", "rope", scaled("linear"), False),
        Variant("ALiBi, fine-tuned", "alibi", {}, True),
        Variant("T5 bias, fine-tuned", "t5", {}, True),
        Variant("original, fine-tuned", "native", {}, True),
        Variant(f"YaRN {x}, fine-tuned", "rope", scaled("yarn"), True),
        Variant(f"linear (PI) {x}, fine-tuned", "rope", scaled("linear"), True),
    ]


# --- scoring: hf_posenc.integrations.long_context ----------------------------------------------------------


def perplexities(model, heldout: torch.Tensor, settings: Settings) -> dict[str, dict[str, float]]:
    """{length: {"ppl": all targets, "last": the last ``last_tokens`` targets of each window, "windows": n}}."""
    return {str(n): window_scores(model, heldout, n, settings.eval_tokens, settings.last_tokens)
            for n in settings.lengths}


def passkey_prompts(tokenizer, settings: Settings) -> list[dict]:
    return passkey_docs(tokenizer, settings.lengths, settings.depths, settings.passkey_samples)


# --- models --------------------------------------------------------------------------------------------------


def finetune(variant: Variant, base: str, text: dict, settings: Settings, out: Path) -> dict:
    """Full fine-tune with the recipe library (skipped if ``out`` holds a finished run)."""
    from hf_posenc.training import load_config, train

    summary = out / "summary.json"
    if summary.is_file():
        return json.loads(summary.read_text())
    retrofit = variant.method in ("alibi", "t5")
    config = load_config(overrides={
        "model": base, "method": variant.method, "method_options": variant.options,
        "data": {"files": [str(text["train"])], "heldout_files": [str(text["heldout"])]},
        "seq_len": settings.ft_len, "batch_size": settings.ft_batch, "max_steps": settings.ft_steps,
        "lr": settings.lr_retrofit if retrofit else settings.lr_rope, "warmup_steps": max(1, settings.ft_steps // 10),
        "lr_scheduler": "cosine", "weight_decay": 0.0, "eval_every": 0, "save_every": 0, "eval_multipliers": [1],
        "eval_tokens": 4 * settings.ft_len, "log_every": 10, "report_to": ["none"], "output_dir": str(out),
    })
    started = time.perf_counter()
    result = train(config)
    if result.interrupted:
        raise KeyboardInterrupt(f"{out} stopped at step {result.step}")
    info = {"steps": result.step, "seconds": round(time.perf_counter() - started, 1), "lr": config.lr,
            "tokens_per_step": settings.ft_len * settings.ft_batch,
            "first_loss": result.losses[0] if result.losses else None,
            "last_loss": sum(result.losses[-10:]) / len(result.losses[-10:]) if result.losses else None}
    summary.write_text(json.dumps(info, indent=1))
    return info


def load(variant: Variant, base: str, finetuned: Path | None, backend: str, device: torch.device):
    """The variant's model in eval mode on ``device`` (fp32 weights; scoring runs under bf16 autocast on GPU)."""
    import transformers

    import hf_posenc

    if finetuned is not None:
        from hf_posenc.training import load_finetuned

        model = (load_finetuned(finetuned, dtype=torch.float32) if variant.method != "native"
                 else transformers.AutoModelForCausalLM.from_pretrained(finetuned, dtype=torch.float32))
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        if variant.method != "native":
            hf_posenc.convert(model, variant.method, **variant.options)
    if hf_posenc.is_converted(model):
        hf_posenc.set_backend(model, backend)
    return model.to(device).eval()


# --- the run -------------------------------------------------------------------------------------------------


def run(settings: Settings, base: str, text: dict, out: Path, work: Path, budget_s: float | None, backend: str,
        only: set[str] | None) -> dict:
    import transformers

    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    results.update(settings=dataclasses.asdict(settings), machine=machine(), backend=backend)
    results.setdefault("variants", {})
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    heldout = torch.tensor(tokenizer(Path(text["heldout"]).read_text())["input_ids"])
    docs = passkey_prompts(tokenizer, settings)
    cost = {"eval": None, "step": None}  # seconds per evaluation / per fine-tune step, once measured

    def save():
        results["seconds"] = round(time.perf_counter() - started, 1)
        path.write_text(json.dumps(results, indent=1))

    for variant in variants(settings):
        done = results["variants"].get(variant.name, {})
        if (only and variant.slug not in only) or "ppl" in done:
            continue
        left = budget_s - (time.perf_counter() - started) if budget_s else math.inf
        need = (cost["eval"] or 0) + (settings.ft_steps * (cost["step"] or 0.4) if variant.finetune else 0)
        if need > left:
            results["variants"][variant.name] = {"skipped": f"time budget: ~{need:.0f} s needed, {left:.0f} s left"}
            save()
            continue
        entry = {"method": variant.method, "options": variant.options, "finetune": variant.finetune}
        print(f"== {variant.name}", flush=True)
        try:
            finetuned = None
            if variant.finetune:
                finetuned = work / variant.slug
                entry["finetune_run"] = finetune(variant, base, text, settings, finetuned)
                cost["step"] = entry["finetune_run"]["seconds"] / max(1, entry["finetune_run"]["steps"])
            t0 = time.perf_counter()
            model = load(variant, base, finetuned, backend, device)
            entry["ppl"] = perplexities(model, heldout, settings)
            entry["passkey"] = passkey_accuracy(model, docs)
            entry["eval_seconds"] = round(time.perf_counter() - t0, 1)
            cost["eval"] = max(cost["eval"] or 0, entry["eval_seconds"])
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
        except Exception as error:  # one failing variant must not lose the others (GPU time is not re-runnable)
            entry["error"] = f"{type(error).__name__}: {error}"[:500]
            print(f"   failed: {entry['error']}", flush=True)
        results["variants"][variant.name] = entry
        save()
        print(f"   {json.dumps({k: entry.get(k) for k in ('ppl', 'passkey', 'eval_seconds')})[:400]}", flush=True)
    save()
    return results


def machine() -> str:
    import platform

    import transformers

    if torch.cuda.is_available():
        where = f"{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}, bf16 autocast"
    else:
        where = f"{platform.processor() or platform.machine()} CPU x{torch.get_num_threads()} threads, fp32"
    return f"{where}, torch {torch.__version__}, transformers {transformers.__version__}"


# --- report --------------------------------------------------------------------------------------------------


def table(results: dict, metric: str) -> str:
    """Markdown: one row per variant, one column per length; metric 'ppl', 'last' or 'passkey'."""
    lengths = [str(n) for n in results["settings"]["lengths"]]
    rows = ["| model | fine-tune steps | fine-tune s | " + " | ".join(lengths) + " |",
            "|---|---:|---:|" + "---:|" * len(lengths)]
    for name, entry in results["variants"].items():
        run_info = entry.get("finetune_run") or {}
        if "ppl" not in entry:
            why = entry.get("skipped") or entry.get("error") or "not run"
            rows.append(f"| {name} | | | {why} |" + " |" * (len(lengths) - 1))
            continue
        if metric == "passkey":
            cells = [f"{entry['passkey'].get(n, float('nan')):.2f}" for n in lengths]
        else:
            cells = [f"{entry['ppl'][n][metric]:.2f}" if metric in entry["ppl"].get(n, {}) else "—" for n in lengths]
        rows.append(f"| {name} | {run_info.get('steps', 0)} | {run_info.get('seconds', '')} | " + " | ".join(cells)
                    + " |")
    return "\n".join(rows)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, entry in results["variants"].items():
        if "ppl" not in entry:
            continue
        lengths = [int(n) for n, v in entry["ppl"].items() if "last" in v]
        style = "-" if entry.get("finetune") else "--"
        axes[0].plot(lengths, [entry["ppl"][str(n)]["last"] for n in lengths], style, marker="o", label=name)
        keys = [str(n) for n in results["settings"]["lengths"] if str(n) in entry["passkey"]]
        axes[1].plot([int(k) for k in keys], [entry["passkey"][k] for k in keys], style, marker="o", label=name)
    axes[0].set(xscale="log", yscale="log", xlabel="sequence length (tokens)",
                ylabel=f"perplexity of the last {results['settings']['last_tokens']} tokens",
                title="SmolLM2-135M, held-out Shakespeare")
    axes[1].set(xscale="log", xlabel="sequence length (tokens)", ylabel="passkey accuracy", ylim=(-0.05, 1.05),
                title="passkey retrieval")
    for ax in axes:
        ax.axvline(8192, color="grey", lw=0.8, ls=":")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def write_report(results: dict, out: Path, plot_path: Path | None) -> None:
    text = "\n\n".join(f"### {title}\n\n{table(results, metric)}" for metric, title in (
        ("ppl", "Perplexity, all tokens of each window"),
        ("last", f"Perplexity, last {results['settings']['last_tokens']} tokens of each window"),
        ("passkey", "Passkey accuracy"),
    ))
    (out / "table.md").write_text(text + "\n")
    print(text)
    if plot_path is not None:
        plot(results, plot_path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="results.json, table.md")
    parser.add_argument("--work", type=Path, default=None, help="fine-tuned models (default: OUT/finetune)")
    parser.add_argument("--model", default="smollm2-135m", help="source name or transformers directory")
    parser.add_argument("--text", default="shakespeare", help="source name of a corpus with train/held-out splits")
    parser.add_argument("--quick", action="store_true", help="tiny settings (tests)")
    parser.add_argument("--budget-s", type=float, default=None, help="skip the remaining variants past this")
    parser.add_argument("--backend", default="auto", help="attention backend of converted models when scoring")
    parser.add_argument("--only", default=None, help="comma-separated variant slugs (e.g. ALiBi__fine_tuned)")
    parser.add_argument("--ft-steps", type=int, default=None)
    parser.add_argument("--report-only", action="store_true", help="re-write table.md / the plot from results.json")
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else Settings()
    if args.ft_steps is not None:
        settings = dataclasses.replace(settings, ft_steps=args.ft_steps)
    if not args.report_only:
        from hf_posenc import sources

        base = str(sources.resolve_model(args.model))
        text = sources.text_splits(args.text)
        only = set(args.only.split(",")) if args.only else None
        run(settings, base, text, args.out, args.work or args.out / "finetune", args.budget_s, args.backend, only)
    write_report(json.loads((args.out / "results.json").read_text()), args.out, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
