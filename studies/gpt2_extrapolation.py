"""GPT-2 extrapolation study: pretrain a small GPT-2 (learned positions) on Shakespeare at a short length,
retrofit it with every position method, fine-tune each briefly at the same length, and score held-out
perplexity at 1x ... 16x that length (the shape of the ALiBi paper's table, at our scale). One more row needs
no training: the pretrained model's own learned table copied out to the longest length (``learned``,
``extend="copy"``, as Longformer extended RoBERTa), the zero-training baseline.

    python studies/gpt2_extrapolation.py --out runs/study_gpt2            # the full study (~45 min, 2 cores)
    python studies/gpt2_extrapolation.py --out /tmp/s --quick             # tiny settings, a minute (tests)

Every stage writes its result under --out and is skipped when the result is there (re-run to resume). The
results land in <out>/results.json and <out>/table.md (and, with --plot, a PNG).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

METHODS = ("alibi", "rope", "t5", "shaw", "sinusoidal", "nope", "learned", "xpos", "transformer_xl", "fire")
ZERO_TRAINING = "learned (copy, no fine-tune)"  # the baseline every retrofit row must beat (Longformer's copy)


@dataclass
class Settings:
    seq_len: int = 128  # training length L; evaluated at L x MULTIPLES
    multiples: tuple[int, ...] = (1, 2, 4, 8, 16)
    vocab: int = 4096  # a BPE trained on the training split (the 50k GPT-2 vocabulary costs 5x the compute)
    layers: int = 4
    heads: int = 6
    width: int = 192
    pretrain_steps: int = 500
    pretrain_lr: float = 1e-3
    retrofit_steps: int = 120
    retrofit_lr: float = 3e-4
    batch_size: int = 8
    eval_tokens: int = 16384  # held-out tokens per length (whole windows)
    train_tokens: int | None = None  # cap on training tokens (None = the whole split)


QUICK = Settings(seq_len=32, multiples=(1, 2, 4), vocab=512, layers=2, heads=4, width=32, pretrain_steps=4,
                 retrofit_steps=2, batch_size=4, eval_tokens=256, train_tokens=20000)


def train_tokenizer(train_file: Path, vocab: int, out: Path):
    """Byte-level BPE on the training split, saved as a transformers tokenizer directory."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(train_file)], trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                                eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(out)
    return fast


def initial_model(settings: Settings, tokenizer, out: Path) -> None:
    """A randomly initialised GPT2LMHeadModel with learned positions for exactly seq_len tokens."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=len(tokenizer), n_positions=settings.seq_len, n_layer=settings.layers, n_head=settings.heads,
        n_embd=settings.width, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    transformers.GPT2LMHeadModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)


def finetune(settings: Settings, model: Path, method: str, steps: int, lr: float, text: dict, out: Path) -> dict:
    """One run of the fine-tune recipe's library; returns its metrics summary (skipped if already done)."""
    from hf_posenc.training import load_config, read_metrics, train

    summary = out / "summary.json"
    if summary.is_file():
        return json.loads(summary.read_text())
    config = load_config(overrides={
        "model": str(model), "method": method, "data": text, "seq_len": settings.seq_len,
        "batch_size": settings.batch_size, "max_steps": steps, "lr": lr, "warmup_steps": max(1, steps // 10),
        "lr_scheduler": "cosine", "weight_decay": 0.01, "eval_every": 0, "save_every": max(1, steps // 3),
        "keep_checkpoints": 1, "eval_multipliers": [1], "eval_tokens": settings.eval_tokens, "log_every": 25,
        "output_dir": str(out),
    })
    started = time.perf_counter()
    result = train(config)
    if result.interrupted:
        raise KeyboardInterrupt(f"{out} stopped at step {result.step}; re-run to resume")
    losses = [row["loss"] for row in read_metrics(out) if "loss" in row]
    info = {"method": method, "steps": result.step, "seconds": round(time.perf_counter() - started, 1),
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}
    summary.write_text(json.dumps(info, indent=1))
    return info


def zero_training_baseline(pretrained: Path, out: Path, rows: int) -> None:
    """The pretrained model with its learned table copied out to ``rows`` positions, saved as it is (no training)."""
    import transformers

    import hf_posenc

    if (out / "config.json").is_file():
        return
    model = transformers.AutoModelForCausalLM.from_pretrained(pretrained)
    hf_posenc.convert(model, "learned", extend="copy", max_position_embeddings=rows)
    model.save_pretrained(out)
    transformers.AutoTokenizer.from_pretrained(pretrained).save_pretrained(out)


def heldout_perplexity(model_dir: Path, lengths: list[int], heldout: Path, tokens: int, native: bool) -> dict:
    """posenc_ppl (lm-eval) at each length; a native GPT-2 only at lengths its table covers."""
    import torch
    import transformers

    import hf_posenc
    from hf_posenc.integrations.lm_eval_model import evaluate

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    if native:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        lengths = [n for n in lengths if n <= model.config.n_positions]
    else:
        model = hf_posenc.from_pretrained(model_dir, dtype=torch.float32)
    results = evaluate(model.eval(), tokenizer, tasks=["posenc_ppl"], lengths=lengths, name=model_dir.name,
                       metadata={"text_file": str(heldout), "num_tokens": tokens})["results"]["posenc_ppl"]
    return {str(n): results[f"{n},none"] for n in lengths}


def run(settings: Settings, out: Path, methods: tuple[str, ...]) -> dict:
    from hf_posenc import sources

    out.mkdir(parents=True, exist_ok=True)
    splits = sources.text_splits("shakespeare")
    text = {"files": [str(splits["train"])], "heldout_files": [str(splits["heldout"])],
            "max_train_tokens": settings.train_tokens}
    init, pretrained = out / "init", out / "pretrained"
    if not (init / "config.json").is_file():
        print("== tokenizer + initial model", flush=True)
        initial_model(settings, train_tokenizer(splits["train"], settings.vocab, out / "tokenizer"), init)
    print("== pretraining (learned positions)", flush=True)
    runs = {"native (pretrained)": finetune(settings, init, "native", settings.pretrain_steps,
                                            settings.pretrain_lr, text, pretrained)}
    print("== same steps again, native (a fair baseline for the retrofits)", flush=True)
    runs["native (continued)"] = finetune(settings, pretrained, "native", settings.retrofit_steps,
                                          settings.retrofit_lr, text, out / "native-continued")
    for method in methods:
        print(f"== retrofit: {method}", flush=True)
        runs[method] = finetune(settings, pretrained, method, settings.retrofit_steps, settings.retrofit_lr, text,
                                out / f"retrofit-{method}")
    lengths = [settings.seq_len * m for m in settings.multiples]
    print(f"== {ZERO_TRAINING}", flush=True)
    zero_training_baseline(pretrained, out / "learned-zero-training", max(lengths))
    runs[ZERO_TRAINING] = {"method": "learned", "steps": 0, "seconds": 0}
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    results.setdefault("perplexity", {})
    folders = {"native (pretrained)": pretrained, "native (continued)": out / "native-continued",
               ZERO_TRAINING: out / "learned-zero-training", **{m: out / f"retrofit-{m}" for m in methods}}
    for name, folder in folders.items():
        if name in results["perplexity"]:
            continue
        print(f"== evaluating {name} at {lengths}", flush=True)
        started = time.perf_counter()
        results["perplexity"][name] = heldout_perplexity(folder, lengths, splits["heldout"], settings.eval_tokens,
                                                         native=name.startswith("native"))
        runs[name]["eval_seconds"] = round(time.perf_counter() - started, 1)
        results.update({"settings": asdict(settings), "lengths": lengths, "runs": runs})
        results_file.write_text(json.dumps(results, indent=1))
    (out / "table.md").write_text(table(results))
    return results


def table(results: dict) -> str:
    lengths = results["lengths"]
    head = "| model | steps | wall (s) | " + " | ".join(str(n) for n in lengths) + " |"
    rows = [head, "|---|---:|---:|" + "---:|" * len(lengths)]
    for name, scores in results["perplexity"].items():
        run = results["runs"].get(name, {})
        cells = [f"{scores[str(n)]:.2f}" if str(n) in scores and math.isfinite(scores[str(n)]) else "—"
                 for n in lengths]
        rows.append(f"| {name} | {run.get('steps', '')} | {run.get('seconds', '')} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, scores in results["perplexity"].items():
        xs = [n for n in results["lengths"] if str(n) in scores]
        ax.plot(xs, [scores[str(n)] for n in xs], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.axvline(results["settings"]["seq_len"], color="gray", linestyle=":", linewidth=1)
    ax.set_xlabel("evaluation length (tokens)")
    ax.set_ylabel("held-out perplexity (log)")
    ax.set_title("GPT-2 retrofits, fine-tuned at the dotted length")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true", help="tiny settings (tests)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--plot", default=None, help="write the perplexity-vs-length PNG here")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else Settings()
    results = run(settings, Path(args.out), tuple(m for m in args.methods.split(",") if m))
    print(table(results))
    if args.plot:
        plot(results, Path(args.plot))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
