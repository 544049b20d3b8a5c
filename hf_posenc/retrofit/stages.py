"""Resumable stages: each result is keyed by everything that produced it and skipped when found (the fetched model,
the fine-tune, each model's scores), behind a lock when two runs may produce it at once."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from .. import __version__ as version
from .. import sources, training  # their functions are looked up when called (tests replace training.train)
from ..training.model import inspect_model
from .plan import Plan


def train_identity(train) -> dict:
    """What the fine-tuned model depends on: the config without where it goes and how often it reports."""
    values = train.to_dict()
    for key in ("output_dir", "resume_from", "log_every", "save_every", "keep_checkpoints", "report_to",
                "eval_every", "rank_report"):
        values.pop(key, None)
    return values


def stage_key(identity: Any) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:12]


def fetch_model(plan: Plan, margin: float | None = None) -> str:
    """Materialise a named source (cached), check the model's config and that the disk has ``margin`` x the
    model's size free for checkpoints and the final model (default 3 with LoRA; 8 for a full fine-tune, whose
    checkpoints hold the weights and AdamW's two moments, two of them while the newest is written). Returns the
    model's location."""
    margin = margin if margin is not None else (3.0 if plan.train.lora is not None else 8.0)
    location = Path(sources.resolve_model(plan.train.model))
    if inspect_model(plan.train).objective != "causal":  # also: loadable, supported family, LoRA targets exist
        raise ValueError(
            "retrofit scores causal language models (perplexity, passkey); for BERT use "
            "`hf-posenc finetune --config recipes/configs/bert_alibi_mlm.yaml`"
        )
    size = sum(f.stat().st_size for f in location.glob("*.safetensors")) if location.is_dir() else 0
    plan.out.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(plan.out).free
    if size and free < margin * size:
        raise ValueError(
            f"not enough disk: {free / 2**30:.1f} GiB free under {plan.out}, the fine-tune needs about "
            f"{margin * size / 2**30:.1f} GiB (checkpoints + final model); free space or pass --out elsewhere"
        )
    plan.model_location = str(location)
    return str(location)


def finetune(plan: Plan) -> Path:
    """Run (or resume, or skip) the fine-tune; returns the final model directory."""
    out = plan.finetune_dir
    if (out / "config.json").is_file() and _finished(out):
        print(f"      found the fine-tuned model in {out}; skipping")
        return out
    checkpoints = training.list_checkpoints(out)
    if checkpoints:
        plan.train.resume_from = str(checkpoints[-1])
        print(f"      resuming from {checkpoints[-1]}")
    result = training.train(plan.train)
    if result.interrupted:
        raise KeyboardInterrupt(f"fine-tune stopped at step {result.step}; re-run the same command to resume")
    return out


def _finished(out: Path) -> bool:
    return (out / training.METRICS_FILE).is_file() and any(row.get("final") for row in training.read_metrics(out))


def finetune_summary(plan: Plan) -> dict:
    """Training tokens and wall time of the fine-tune, from its metrics (summed over resumed sessions)."""
    per_step = plan.train.batch_size * plan.train.grad_accum * plan.train.seq_len
    steps, seconds = 0, 0.0
    for row in training.read_metrics(plan.finetune_dir):  # step lines: tokens/s over the steps since the previous line
        if row.get("tokens_per_s") and row.get("step", 0) > steps:
            seconds += (row["step"] - steps) * per_step / row["tokens_per_s"]
            steps = row["step"]
    return {"steps": steps, "tokens": steps * per_step, "seconds": seconds or None}


def cached(plan: Plan, label: str, identity: Any, compute: Callable[[], Any], shared: bool) -> Any:
    """``compute()``, cached under everything that produced it: ``eval/<label>-<key>.json`` (and the source cache
    when ``shared``: the same model and settings give the same scores in any run)."""
    key = stage_key({**identity, "hf_posenc": version})
    places = [plan.out / "eval" / f"{label}-{key}.json"]
    if shared:
        places.append(sources.cache_root() / "scores" / f"{key}.json")
    with held_lock(places[-1]):  # two runs scoring the same model wait for each other instead of both working
        for place in places:
            if place.is_file():
                print(f"      found {place}; skipping")
                scores = json.loads(place.read_text())["scores"]
                if place != places[0]:  # found in the source cache: this run's folder gets its copy
                    write_json(places[0], {"label": label, "identity": identity, "scores": scores})
                return scores
        scores = compute()
        for place in places:
            write_json(place, {"label": label, "identity": identity, "scores": scores})
    return scores


@contextlib.contextmanager
def held_lock(path: Path):
    """An exclusive lock on ``<path>.lock`` (POSIX ``flock``; released when the process ends, however it ends)."""
    import fcntl  # POSIX only: imported here so that the package still imports where there is none

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)
