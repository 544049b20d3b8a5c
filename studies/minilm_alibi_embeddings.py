"""all-MiniLM-L6-v2 -> ALiBi: convert the sentence-embedding model (BERT, 512 learned positions) to ALiBi, fine-tune
the converted copy briefly to reproduce the original's sentence embeddings on inputs of at most 512 tokens, and
embed held-out passages of 2048 and 4096 tokens, which the original cannot take. The zero-training baseline the
fine-tuned student must beat past the limit: the original's learned table copied out to the longest length
(``learned``, ``extend="copy"``, Longformer's extension), no fine-tune.

    python studies/minilm_alibi_embeddings.py --out runs/study_minilm --plot docs/plots/minilm_alibi.png
    python studies/minilm_alibi_embeddings.py --out /tmp/s --quick --model DIR    # tiny settings (tests)

Teacher: the original BertModel (eval, frozen). Student: a copy converted with ``hf_posenc.convert(.., "alibi")``
(symmetric bias -m_h |i - j|: the model is an encoder). A sentence embedding is what sentence-transformers computes
for this model: the attention-mask mean of ``last_hidden_state``, L2-normalised. The loss is
(1 - cos) of the sentence embeddings plus ``token_weight`` x the mean (1 - cos) of the token states, on random
spans of the Shakespeare training split; held out: Hamlet, Macbeth, The Tempest.

Every stage writes its result under --out and is skipped when the result is there (re-run to resume). Results
land in <out>/results.json and <out>/table.md (and, with --plot, a PNG).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class Settings:
    lengths: tuple[int, ...] = (32, 128, 256, 512)  # eval lengths within the original limit (incl. [CLS]/[SEP])
    eval_passages: int = 64  # held-out passages per length (non-overlapping)
    long_lengths: tuple[int, ...] = (2048, 4096)  # past the limit: the student alone
    long_passages: tuple[int, ...] = (32, 24)  # passages per long length (all of them fit in the held-out split)
    steps: int = 400
    lr: float = 2e-4  # 1e-4 and 3e-4 were on par after 60 steps (held-out cos ~0.88-0.92)
    warmup: float = 0.1  # fraction of the steps; then cosine to 0
    tokens_per_step: int = 2048  # batch = tokens_per_step // length sequences (one length per step, no padding)
    max_batch: int = 64
    min_len: int = 16
    curriculum: float = 0.5  # the longest training length ramps from 128 to the limit over this fraction of steps
    token_weight: float = 1.0  # weight of the per-token cosine loss
    freeze_word_embeddings: bool = True  # 30522 x 384: half the weights, and position-free; kept as they are
    slope_scale: float = 1.0  # ALiBi's slope_scale option: < 1 makes every head less local
    seed: int = 0


QUICK = Settings(lengths=(8, 16, 32, 64), eval_passages=16, long_lengths=(256,), long_passages=(8,), steps=40,
                 lr=1e-3, tokens_per_step=512, min_len=8)


# --- embeddings ----------------------------------------------------------------------------------------------


def sentence_embeddings(model, input_ids, attention_mask=None, grad: bool = False):
    """(B, L) ids -> ((B, E) L2-normalised masked mean of the last hidden state, (B, L, E) token states)."""
    import torch

    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    with torch.set_grad_enabled(grad):
        states = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, E)
        mask = attention_mask.unsqueeze(-1).to(states.dtype)  # (B, L, 1)
        mean = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # sentence-transformers' Pooling
        return torch.nn.functional.normalize(mean, p=2, dim=1), states  # its Normalize


def embed(model, ids, batch_size: int = 8):
    """(N, L) ids -> (N, E) normalised embeddings, no grad, in batches."""
    import torch

    return torch.cat([sentence_embeddings(model, ids[i: i + batch_size])[0] for i in range(0, len(ids), batch_size)])


def wrap(content, cls: int, sep: int):
    """(N, n) content ids -> (N, n + 2): [CLS] content [SEP], as the tokenizer builds a single sentence."""
    import torch

    n = len(content)
    return torch.cat([torch.full((n, 1), cls), content, torch.full((n, 1), sep)], dim=1)


def passages(tokens, length: int, count: int, cls: int, sep: int):
    """``count`` non-overlapping, evenly spaced held-out passages of exactly ``length`` tokens: (N, length)."""
    import torch

    span = length - 2
    count = min(count, len(tokens) // span)
    stride = len(tokens) // count
    return wrap(torch.stack([tokens[i * stride: i * stride + span] for i in range(count)]), cls, sep)


def cosine_stats(a, b) -> dict:
    """Row-wise cosine of normalised (N, E) pairs, and top-1 retrieval: row i of ``a`` finds row i of ``b``."""
    import torch

    cos = (a * b).sum(-1)  # (N,)
    top1 = (a @ b.T).argmax(-1) == torch.arange(len(a))
    return {"mean": round(cos.mean().item(), 4), "min": round(cos.min().item(), 4),
            "p5": round(torch.quantile(cos, 0.05).item(), 4), "top1": round(top1.float().mean().item(), 4),
            "n": len(a)}


# --- stages --------------------------------------------------------------------------------------------------


def load(model_dir: Path):
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    tokenizer.model_max_length = 10**9  # we tokenise whole plays, then cut windows ourselves
    teacher = transformers.BertModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return tokenizer, teacher


def converted(teacher, slope_scale: float = 1.0):
    import hf_posenc

    student = hf_posenc.convert(copy.deepcopy(teacher), "alibi", slope_scale=slope_scale)  # table removed
    for p in student.parameters():
        p.requires_grad_(True)  # the teacher's copy came frozen
    # eval() throughout: no dropout, so student and teacher see the same function of the input
    return student.eval()


def learned_copy(teacher, rows: int):
    """The original with its learned table copied out to ``rows`` positions: no training."""
    import hf_posenc

    return hf_posenc.convert(copy.deepcopy(teacher), "learned", extend="copy", max_position_embeddings=rows).eval()


def special_ids(tokenizer) -> tuple[int, int]:
    cls = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    sep = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    return cls, sep


def train(settings: Settings, teacher, student, tokens, limit: int, cls: int, sep: int, out: Path) -> dict:
    """Distil teacher -> student on random training spans; one length per step. Returns a summary."""
    import torch

    torch.manual_seed(settings.seed)
    rng = random.Random(settings.seed)
    if settings.freeze_word_embeddings:
        student.embeddings.word_embeddings.weight.requires_grad_(False)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.01)
    warmup = max(1, int(settings.warmup * settings.steps))

    def lr_factor(step):  # linear warm-up, then cosine to 0
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, settings.steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    log, started = [], time.perf_counter()
    for step in range(settings.steps):
        ramp = min(1.0, step / max(1, settings.curriculum * settings.steps)) if settings.curriculum else 1.0
        longest = int(min(limit, 128) + ramp * (limit - min(limit, 128)))
        length = rng.randint(settings.min_len, longest)
        batch = max(1, min(settings.max_batch, settings.tokens_per_step // length))
        starts = torch.randint(0, len(tokens) - length, (batch,))
        ids = wrap(torch.stack([tokens[s: s + length - 2] for s in starts.tolist()]), cls, sep)  # (B, length)
        target, target_states = sentence_embeddings(teacher, ids)
        emb, states = sentence_embeddings(student, ids, grad=True)
        sentence_loss = 1 - (emb * target).sum(-1).mean()
        token_loss = 1 - torch.nn.functional.cosine_similarity(states, target_states, dim=-1).mean()
        loss = sentence_loss + settings.token_weight * token_loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        if step % 10 == 0 or step == settings.steps - 1:
            row = {"step": step, "length": length, "batch": batch, "loss": round(loss.item(), 4),
                   "cos": round(1 - sentence_loss.item(), 4), "seconds": round(time.perf_counter() - started, 1)}
            log.append(row)
            print(row, flush=True)
    seconds = round(time.perf_counter() - started, 1)
    (out / "train_log.json").write_text(json.dumps(log, indent=1))
    return {"steps": settings.steps, "seconds": seconds, "trainable_params": sum(p.numel() for p in params),
            "first_cos": log[0]["cos"], "last_cos": log[-1]["cos"]}


def short_eval(teacher, student, tokens, lengths, count, cls, sep) -> dict:
    """Student vs teacher on held-out passages within the limit: {length: cosine_stats}."""
    results = {}
    for n in lengths:
        ids = passages(tokens, n, count, cls, sep)
        results[str(n)] = cosine_stats(embed(student, ids), embed(teacher, ids))
    return results


def long_eval(settings: Settings, teacher, students: dict, tokens, limit: int, cls, sep) -> dict:
    """Past the limit. Reference: the teacher's 'chunk mean' (normalised mean of its embeddings of the fewest
    equal pieces of <= limit tokens). Queries: each student on the whole passage, the fine-tuned student's own
    chunk mean, and the teacher truncated to its first ``limit`` tokens (what sentence-transformers does)."""
    import torch
    import torch.nn.functional as F

    results = {}
    for n, count in zip(settings.long_lengths, settings.long_passages):
        ids = passages(tokens, n, count, cls, sep)  # (N, n)
        content = ids[:, 1:-1]
        pieces = math.ceil(content.shape[1] / (limit - 2))
        chunks = [wrap(part, cls, sep) for part in content.tensor_split(pieces, dim=1)]  # pieces x (N, <= limit)

        def chunk_mean(model):
            return F.normalize(torch.stack([embed(model, c) for c in chunks]).mean(0), dim=-1)  # (N, E)

        key = chunk_mean(teacher)
        row = {"pieces": pieces}
        for name, student in students.items():
            started = time.perf_counter()
            row[f"{name} (whole)"] = cosine_stats(embed(student, ids, batch_size=1), key)
            row[f"{name} (whole)"]["seconds_per_passage"] = round((time.perf_counter() - started) / len(ids), 2)
        if "fine-tuned" in students:
            row["fine-tuned (own chunk mean)"] = cosine_stats(chunk_mean(students["fine-tuned"]), key)
            row["original (first 512 only)"] = cosine_stats(embed(teacher, ids[:, :limit]), key)
        results[str(n)] = row
    return results


def original_error(teacher, limit: int, cls: int, sep: int) -> str:
    """The original on one input past its limit: the error it raises."""
    import torch

    try:
        sentence_embeddings(teacher, wrap(torch.full((1, 2 * limit), cls), cls, sep))
    except Exception as error:  # noqa: BLE001 - we record whatever it raises
        return f"{type(error).__name__}: {error}"[:300]
    return "no error"


def run(settings: Settings, out: Path, model_dir: Path | None) -> dict:
    import torch

    import hf_posenc
    from hf_posenc import sources

    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = Path(model_dir or sources.fetch("minilm-l6-v2"))
    splits = sources.text_splits("shakespeare")
    tokenizer, teacher = load(model_dir)
    limit = teacher.config.max_position_embeddings  # 512
    cls, sep = special_ids(tokenizer)

    def ids_of(path):
        return torch.tensor(tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"])

    heldout = ids_of(splits["heldout"])
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    results.update({"settings": asdict(settings), "model": str(model_dir), "limit": limit,
                    "heldout_tokens": len(heldout)})

    def fresh_student():  # converted, not fine-tuned
        return converted(teacher, settings.slope_scale)

    def save():
        results_file.write_text(json.dumps(results, indent=1))

    results["original_past_limit"] = original_error(teacher, limit, cls, sep)
    student_dir = out / "student"
    if "converted" not in results:
        print("== converted, no fine-tune", flush=True)
        started = time.perf_counter()
        results["converted"] = short_eval(teacher, fresh_student(), heldout, settings.lengths,
                                          settings.eval_passages, cls, sep)
        results["converted_eval_seconds"] = round(time.perf_counter() - started, 1)
        save()
    if not (student_dir / "config.json").is_file():
        print(f"== fine-tuning ({settings.steps} steps)", flush=True)
        student = fresh_student()
        results["train"] = train(settings, teacher, student, ids_of(splits["train"]), limit, cls, sep, out)
        student.save_pretrained(student_dir)
        tokenizer.save_pretrained(student_dir)
        results.pop("finetuned", None), results.pop("long", None)  # a new student: evaluate it again
        save()
    student = hf_posenc.from_pretrained(student_dir, dtype=torch.float32).eval()
    if "finetuned" not in results:
        print("== fine-tuned", flush=True)
        results["finetuned"] = short_eval(teacher, student, heldout, settings.lengths, settings.eval_passages,
                                          cls, sep)
        save()
    if "long" not in results:
        print(f"== past the limit: {settings.long_lengths}", flush=True)
        started = time.perf_counter()
        results["long"] = long_eval(settings, teacher, {"converted": fresh_student(), "fine-tuned": student},
                                    heldout, limit, cls, sep)
        results["long_eval_seconds"] = round(time.perf_counter() - started, 1)
        save()
    if "long_learned" not in results:
        print("== past the limit: learned table copied, no fine-tune", flush=True)
        baseline = {"learned copy, no fine-tune": learned_copy(teacher, max(settings.long_lengths))}
        results["long_learned"] = long_eval(settings, teacher, baseline, heldout, limit, cls, sep)
        save()
    (out / "table.md").write_text(table(results))
    return results


# --- report --------------------------------------------------------------------------------------------------


def table(results: dict) -> str:
    def cells(s):
        return f"{s['mean']:.4f} | {s['p5']:.4f} | {s['min']:.4f} | {s['top1']:.2f} ({s['n']})"

    rows = ["Within the limit: cosine(student, original) on held-out passages; top-1: the student's embedding "
            "retrieves the original's embedding of the same passage among n.", "",
            "| student | length | mean cos | 5th pct | min | top-1 (n) |", "|---|---:|---:|---:|---:|---:|"]
    for name, key in (("converted, no fine-tune", "converted"), ("fine-tuned", "finetuned")):
        for n, s in results.get(key, {}).items():
            rows.append(f"| {name} | {n} | {cells(s)} |")
    rows += ["", "Past the limit: cosine to the original's chunk mean (normalised mean of its embeddings of the "
             "passage's pieces of <= 512 tokens); top-1: retrieves its own passage's chunk mean among n.", "",
             "| query | length | pieces | mean cos | 5th pct | min | top-1 (n) |", "|---|---:|---:|---:|---:|---:|---:|"]
    long_rows = [*results.get("long", {}).items(), *results.get("long_learned", {}).items()]
    for n, row in long_rows:
        for name, s in row.items():
            if name != "pieces":
                rows.append(f"| {name} | {n} | {row['pieces']} | {cells(s)} |")
    return "\n".join(rows) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, key in (("converted, no fine-tune", "converted"), ("fine-tuned", "finetuned")):
        xs = [int(n) for n in results[key]]
        ax.plot(xs, [results[key][str(n)]["mean"] for n in xs], marker="o", label=f"{name} vs original")
    long = results.get("long", {})
    xs = [int(n) for n in long]
    for name, marker in (("converted (whole)", "x"), ("fine-tuned (whole)", "s"),
                         ("fine-tuned (own chunk mean)", "^"), ("original (first 512 only)", "v")):
        ax.plot(xs, [long[str(n)][name]["mean"] for n in xs], marker=marker, linestyle="--",
                label=f"{name} vs original's chunk mean")
    ax.axvline(results["limit"], color="gray", linestyle=":", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("input length (tokens)")
    ax.set_ylabel("mean cosine similarity (held out)")
    ax.set_title("all-MiniLM-L6-v2 -> ALiBi; dotted: the original's limit")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true", help="tiny settings (tests)")
    parser.add_argument("--model", default=None, help="a BertModel + tokenizer directory (default: all-MiniLM-L6-v2)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--slope-scale", type=float, default=None, help="ALiBi slope_scale (default 1)")
    parser.add_argument("--plot", default=None, help="write the cosine-vs-length PNG here")
    args = parser.parse_args(argv)
    overrides = {"steps": args.steps, "lr": args.lr, "slope_scale": args.slope_scale}
    settings = dataclasses.replace(QUICK if args.quick else Settings(),
                                   **{k: v for k, v in overrides.items() if v is not None})
    results = run(settings, Path(args.out), args.model)
    print(table(results))
    if args.plot:
        plot(results, Path(args.plot))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
