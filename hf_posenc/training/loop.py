"""The training loop: ``train(config)`` runs one fine-tune from a validated :class:`TrainConfig`.

Order: config checks -> tokenizer and data (checked) -> model, conversion, LoRA (checked) -> Accelerate ->
optional resume -> steps -> final evaluation -> final model. Nothing trains until every check has passed.

One optimizer step = ``grad_accum`` micro-batches of ``batch_size`` blocks on every process; gradients are
synchronised on the last micro-batch only. The batch stream runs across epochs; its position is the count of
micro-batches consumed, saved in each checkpoint.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader

from .._fs import write_text_atomic
from .checkpointing import (
    OutputLock, StopRequest, TrainState, claim_output_dir, final_model_dir, fingerprint, run_identity, save_checkpoint,
)
from .config import ConfigError, TrainConfig
from .data import (
    Blocks, EpochShuffle, check_enough_blocks, check_token_ids, load_corpus, mask_for_mlm, mask_seed,
    pose_position_ids, pose_seed,
)
from .distill import distill_loss, teacher_logits
from .evaluate import perplexity
from .metrics import MetricsLog, resolve_trackers
from .model import inspect_model, is_position_parameter, load_model, load_tokenizer, save_final


@dataclass
class TrainResult:
    output_dir: Path
    step: int
    interrupted: bool = False
    checkpoint: Path | None = None  # the last checkpoint written, if any
    final_perplexity: dict[int, float] = field(default_factory=dict)  # eval length -> held-out perplexity
    losses: list[float] = field(default_factory=list)  # training loss of every step (main process)


def make_accelerator(config: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin

    cpu = config.cpu or not _has_accelerator()  # without cpu=True a multi-process CPU launch stays 1 process
    precision = config.mixed_precision
    if precision == "auto":
        precision = "bf16" if not cpu and torch.cuda.is_bf16_supported() else "no"
    trackers = resolve_trackers(config.report_to)
    # a step is always grad_accum micro-batches, also across epoch ends (the batch stream never ends)
    accumulation = GradientAccumulationPlugin(num_steps=config.grad_accum, sync_with_dataloader=False)
    accelerator = Accelerator(
        cpu=cpu, mixed_precision=precision, log_with=trackers or None, project_dir=config.output_dir,
        dataloader_config=DataLoaderConfiguration(even_batches=True, use_seedable_sampler=False),
        gradient_accumulation_plugin=accumulation,
    )
    if accelerator.gradient_accumulation_steps != config.grad_accum:
        raise ConfigError(
            f"the launch configuration sets gradient accumulation to {accelerator.gradient_accumulation_steps} (e.g. "
            f"DeepSpeed's gradient_accumulation_steps), the recipe to grad_accum={config.grad_accum}; make them equal")
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and str(accelerator.distributed_type) != \
            "DistributedType.FSDP":  # Accelerate 1.x on CPU: MULTI_CPU data parallel, the FSDP plugin unused
        raise ConfigError(
            f"launched with an FSDP configuration, but Accelerate runs {accelerator.distributed_type} here (it does "
            "not shard on CPU); launch with recipes/accelerate/cpu_ddp.yaml on CPU (FSDP2 itself works on CPU: "
            "tests/test_fsdp.py)")
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes != launched:
        raise RuntimeError(
            f"{launched} processes were launched but Accelerate runs {accelerator.num_processes}; on CPU launch with "
            "`accelerate launch --multi_gpu --num_processes N` (or recipes/accelerate/cpu_ddp.yaml) or torchrun")
    return accelerator


def start_trackers(accelerator, config: TrainConfig) -> None:
    """Start the Accelerate trackers (they write under output_dir): only once every check has passed."""
    if accelerator.log_with:
        accelerator.init_trackers("hf_posenc_finetune", config={k: str(v) for k, v in config.to_dict().items()})


def _has_accelerator() -> bool:
    api = getattr(torch, "accelerator", None)  # torch >= 2.6: CUDA, XPU, MPS, ...
    return api.is_available() if api is not None else torch.cuda.is_available()


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Three groups: matrices (weight decay), other weights (none), position tables (none, ``position_lr``)."""
    from .config import optimizer_class

    groups: dict[str, list] = {"decay": [], "no_decay": [], "position": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        kind = "position" if is_position_parameter(name) else "decay" if param.ndim >= 2 else "no_decay"
        groups[kind].append(param)
    param_groups = [
        {"params": groups["decay"], "weight_decay": config.weight_decay},
        {"params": groups["no_decay"], "weight_decay": 0.0},
        {"params": groups["position"], "weight_decay": 0.0, "lr": config.position_lr or config.lr},
    ]
    cls = optimizer_class(config.optimizer)
    extra = dict(config.optimizer_args)
    if "betas" in inspect.signature(cls).parameters:
        extra.setdefault("betas", tuple(config.betas))
    params = [p for g in param_groups for p in g["params"]]
    if cls in FUSED_OPTIMIZERS and not {"fused", "foreach"} & extra.keys() and fusable(params):
        extra["fused"] = True
    return cls([g for g in param_groups if g["params"]], lr=config.lr, **extra)


# torch's fused Adam / AdamW kernel updates each tensor in one pass; on CPU it ran ~4x faster than the default
# per-tensor loop (7.5 vs 28.7 ms per step for 7 M fp32 parameters, one thread; docs/performance.md), the same
# update to rounding. transformers' Trainer defaults to it as well (``adamw_torch_fused``). ``optimizer_args``
# with ``fused`` or ``foreach`` set keeps the user's choice.
FUSED_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW)


def fusable(params: list[torch.Tensor]) -> bool:
    """Every parameter a plain floating tensor on a device the fused kernel has (not a DTensor: FSDP's shards)."""
    return bool(params) and all(
        type(p.data) is torch.Tensor and p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params
    )


def batch_stream(accelerator, loader, sampler: EpochShuffle, start: int) -> Iterator[torch.Tensor]:
    """(B, L) input ids forever, starting after ``start`` micro-batches (this process's count)."""
    epoch, offset = divmod(start, len(loader))
    while True:
        current = accelerator.skip_first_batches(loader, offset) if offset else loader
        current.set_epoch(epoch)  # Accelerate re-sets the sampler's epoch to its own pass count on each iter()
        sampler.set_epoch(epoch)
        for batch in current:
            yield batch["input_ids"]
        epoch, offset = epoch + 1, 0


def _hash(tensors) -> str:
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.detach().to("cpu", torch.float64 if t.is_floating_point() else torch.int64).numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass
class Run:
    """Everything one fine-tune holds, built by :func:`setup` once every check has passed."""

    config: TrainConfig
    accelerator: object
    model: torch.nn.Module  # prepared (DDP / FSDP / ... wrapper)
    unwrapped: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    loader: DataLoader
    sampler: EpochShuffle
    corpus: object  # data.Corpus
    tokenizer: object
    objective: str
    collator: object | None  # DataCollatorForLanguageModeling for MLM
    state: TrainState
    run_info: dict
    log: MetricsLog
    resume: Path | None
    teacher: torch.nn.Module | None = None  # distill, full fine-tuning: the frozen unconverted copy

    @property
    def tokens_per_step(self) -> int:
        c = self.config
        return c.grad_accum * c.batch_size * c.seq_len * self.accelerator.num_processes

    def inputs(self, ids: torch.Tensor, index: int) -> dict[str, torch.Tensor]:
        """Model inputs for micro-batch number ``index`` of this process: (B, L) ids -> ids + labels (+ PoSE's
        (B, L) position ids, a function of (seed, index, rank) like the MLM masks)."""
        if self.objective == "mlm":
            seed = mask_seed(self.config.seed, index, self.accelerator.process_index)
            batch = mask_for_mlm(self.collator, ids.cpu(), seed)
            return {k: v.to(self.accelerator.device) for k, v in batch.items()}
        inputs = {"input_ids": ids, "labels": ids}
        pose = self.config.pose
        if pose is not None:
            seed = pose_seed(self.config.seed, index, self.accelerator.process_index)
            positions = pose_position_ids(ids.shape[0], ids.shape[1], pose.target_length, pose.chunks, seed,
                                          pose.split)
            inputs["position_ids"] = positions.to(ids.device)
            # a mask, so that transformers does not read a skip (ids not +1) as the start of a packed sequence and
            # cut the window into chunks that cannot see each other (it does so when the mask is None)
            inputs["attention_mask"] = torch.ones_like(ids)
        return inputs

    def loss(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss of one micro-batch and its parts (distillation: the LM loss and the KL)."""
        if self.config.distill is None:
            return self.model(**inputs).loss, {}
        # the teacher first: a LoRA teacher runs the student's own modules, and the method's per-forward state
        # (shared terms, positions) must be the student's when gradient checkpointing recomputes in backward
        target = teacher_logits(self.accelerator, self.unwrapped, self.teacher, inputs)
        outputs = self.model(**inputs)
        total, lm, kl = distill_loss(self.config.distill, outputs, target, inputs)
        return total, {"lm_loss": lm.detach().float(), "distill_kl": kl.detach().float()}

    def perplexity(self, length: int) -> float:
        c = self.config
        return perplexity(self.accelerator, self.unwrapped, self.corpus.heldout, length, c.eval_tokens,
                          c.batch_size * c.seq_len, self.objective, self.collator, c.seed)


def setup(config: TrainConfig) -> Run:
    """Checks first (model config, tokenizer, data, LoRA targets, resume folder), then the model and Accelerate."""
    from transformers import DataCollatorForLanguageModeling, get_scheduler, set_seed

    config.validate()
    accelerator = make_accelerator(config)
    set_seed(config.seed)
    plan = inspect_model(config)  # the checkpoint's config: family, objective, method, LoRA targets
    tokenizer = load_tokenizer(config)
    if plan.objective == "mlm" and tokenizer.mask_token is None:
        raise ConfigError(f"the tokenizer of {config.model!r} has no mask token; the MLM objective needs one")
    longest_eval = config.seq_len * max(config.eval_multipliers)
    corpus = load_corpus(config.data, tokenizer, plan.objective, config.seq_len, longest_eval)
    blocks = corpus.blocks(config.seq_len)
    check_enough_blocks(blocks.shape[0], config.batch_size, accelerator.num_processes, config.seq_len)
    run_info = run_identity(config, accelerator.num_processes)  # what this run's checkpoints and metrics carry
    out = Path(config.output_dir)
    resume = claim_output_dir(out, run_info, config.resume_from)  # refuses another run's files

    loaded = load_model(config, plan)
    rows = loaded.model.get_input_embeddings().num_embeddings  # (V, E) token embedding: ids must be < V
    check_token_ids(corpus, tokenizer, loaded.objective, rows, config.model)
    collator = None
    if loaded.objective == "mlm":
        collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=config.mlm_probability)
    sampler = EpochShuffle(blocks.shape[0], config.seed)
    loader = DataLoader(Blocks(blocks), batch_size=config.batch_size, sampler=sampler, drop_last=True,
                        generator=torch.Generator().manual_seed(config.seed))  # own generator: global RNG untouched
    optimizer = make_optimizer(loaded.model, config)
    # a prepared scheduler steps once per process per optimizer step, hence the factor
    scheduler = get_scheduler(config.lr_scheduler, optimizer,
                              num_warmup_steps=config.warmup_steps * accelerator.num_processes,
                              num_training_steps=config.max_steps * accelerator.num_processes)
    model, optimizer, loader, scheduler = accelerator.prepare(loaded.model, optimizer, loader, scheduler)
    teacher = loaded.teacher.to(accelerator.device) if loaded.teacher is not None else None  # not prepared: frozen
    state = TrainState()
    accelerator.register_for_checkpointing(state)
    start_trackers(accelerator, config)  # every check has passed: from here on the run writes
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "train_config.json", json.dumps(config.to_dict(), indent=2) + "\n")
    log = MetricsLog(accelerator, out, write_line=_say(accelerator))
    run = Run(config, accelerator, model, accelerator.unwrap_model(model), optimizer, scheduler, loader, sampler,
              corpus, tokenizer, loaded.objective, collator, state, run_info, log, resume, teacher)
    log.log({
        "event": "start", "model": config.model, "method": config.method, "objective": loaded.objective,
        "run": fingerprint(run_info),  # which run the lines below belong to (claim_output_dir checks it)
        "train": config.train_mode, "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "processes": accelerator.num_processes, "data": corpus.description, "train_tokens": corpus.train.numel(),
        "heldout_tokens": corpus.heldout.numel(), "blocks": blocks.shape[0], "fresh_weights": loaded.fresh,
        "pose": config.to_dict()["pose"], "distill": config.to_dict()["distill"],
    })
    if loaded.fresh:
        log.write_line(f"note: {len(loaded.fresh)} weights are not in the checkpoint; they start from random "
                           f"initialisation and train in full: {', '.join(loaded.fresh)}")
    return run


def train_step(run: Run, stream: Iterator[torch.Tensor]) -> tuple[torch.Tensor, float, dict[str, torch.Tensor]]:
    """One optimizer step over ``grad_accum`` micro-batches. Returns (this process's mean loss, the lr used, the
    mean of the loss's parts: ``lm_loss`` and ``distill_kl`` with distillation, else none)."""
    accelerator, config, model = run.accelerator, run.config, run.model
    step_loss = torch.zeros((), device=accelerator.device)
    step_parts: dict[str, torch.Tensor] = {}
    for _ in range(config.grad_accum):
        inputs = run.inputs(next(stream), run.state.micro_batches)
        with accelerator.accumulate(model):  # no_sync, loss / grad_accum; steps only on the last micro-batch
            loss, parts = run.loss(inputs)
            accelerator.backward(loss)
            if accelerator.sync_gradients and config.max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            lr = run.scheduler.get_last_lr()[0]
            run.optimizer.step()
            run.scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
        step_loss += loss.detach().float() / config.grad_accum
        for key, value in parts.items():
            step_parts[key] = step_parts.get(key, 0) + value / config.grad_accum
        run.state.micro_batches += 1
    if not accelerator.sync_gradients:  # Accelerate's micro-batch count drifted from ours
        raise RuntimeError("gradient accumulation is out of step with Accelerate")
    run.state.step += 1
    run.state.tokens += run.tokens_per_step
    return step_loss, lr, step_parts


def train(config: TrainConfig, callbacks: list[Callable[[TrainState], None]] = ()) -> TrainResult:
    """Run the fine-tune described by ``config``. ``callbacks`` are called after every optimizer step.

    Every process runs this; collectives (loss reduction, evaluation, checkpoints) happen at the same steps.
    The main process (global rank 0, before Accelerate starts) holds ``output_dir``'s lock for the whole run."""
    with OutputLock(config.output_dir, enabled=os.environ.get("RANK", "0") == "0"):
        return _train(config, callbacks)


def _train(config: TrainConfig, callbacks: list[Callable[[TrainState], None]]) -> TrainResult:
    from tqdm.auto import tqdm

    run = setup(config)
    accelerator, state, log = run.accelerator, run.state, run.log
    out = Path(config.output_dir)
    if run.resume is not None:
        accelerator.load_state(str(run.resume))
        log.write_line(f"resumed from {run.resume} at step {state.step}")
    result = TrainResult(out, state.step)
    stream = batch_stream(accelerator, run.loader, run.sampler, state.micro_batches)
    stream, first_batch = _remember_first(stream)
    progress = tqdm(total=config.max_steps, initial=state.step, disable=not accelerator.is_main_process,
                    desc="finetune", dynamic_ncols=True)
    window = {"loss": 0.0, "steps": 0, "seconds": 0.0}
    run.model.train()
    with StopRequest() as stop:
        while state.step < config.max_steps:
            started = time.perf_counter()
            loss, lr, parts = train_step(run, stream)
            result.losses.append(float(accelerator.reduce(loss, "mean")))  # collective: every process
            for key, value in _reduce_parts(accelerator, parts).items():  # collective too (distill only)
                window[key] = window.get(key, 0.0) + value
            window["seconds"] += time.perf_counter() - started
            window["loss"] += result.losses[-1]
            window["steps"] += 1
            progress.update(1)
            if state.step % config.log_every == 0 or state.step == config.max_steps:
                mean = window["loss"] / window["steps"]
                progress.set_postfix(loss=f"{mean:.3f}")
                means = {k: window[k] / window["steps"] for k in parts}  # lm_loss, distill_kl
                log.log({"step": state.step, "loss": mean, **means, "lr": lr, "tokens": state.tokens,
                         "tokens_per_s": window["steps"] * run.tokens_per_step / max(window["seconds"], 1e-9)})
                window = {"loss": 0.0, "steps": 0, "seconds": 0.0}
            if config.eval_every and state.step % config.eval_every == 0 and state.step < config.max_steps:
                log.log({"step": state.step, "eval_ppl": run.perplexity(config.seq_len), "eval_len": config.seq_len})
            for callback in callbacks:
                callback(state)
            stop_now = _any_process(accelerator, stop.requested)
            if (config.save_every and state.step % config.save_every == 0) or stop_now:
                result.checkpoint = save_checkpoint(accelerator, out, state.step, run.run_info, config.keep_checkpoints)
            if stop_now:
                result.interrupted = True
                log.write_line(f"stopped at step {state.step}; continue with --resume_from {result.checkpoint}")
                break
    progress.close()
    result.step = state.step
    if config.rank_report:
        _write_rank_report(accelerator, out, first_batch(), run.unwrapped)
    if not result.interrupted:
        _finish(run, result)
    accelerator.end_training()
    return result


def _finish(run: Run, result: TrainResult) -> None:
    """Held-out perplexity at every eval length, then the final model (LoRA merged unless asked otherwise)."""
    config, accelerator = run.config, run.accelerator
    for multiple in config.eval_multipliers:
        length = config.seq_len * multiple
        result.final_perplexity[length] = run.perplexity(length)
    run.log.log({"step": run.state.step, "final": True,
                 "final_ppl": {str(k): v for k, v in result.final_perplexity.items()}})
    state_dict = accelerator.get_state_dict(run.model) if config.lora is None else None  # collective under FSDP
    if accelerator.is_main_process:
        with final_model_dir(result.output_dir) as tmp:  # saved beside, then renamed in
            save_final(run.unwrapped, run.tokenizer, tmp, config.lora, state_dict)
        run.log.write_line(f"saved the fine-tuned model to {result.output_dir}; load it with "
                           f"hf_posenc.from_pretrained({str(result.output_dir)!r})")
    accelerator.wait_for_everyone()


def _say(accelerator) -> Callable[[str], None]:
    from tqdm.auto import tqdm

    return tqdm.write if accelerator.is_main_process else (lambda *_: None)


def _remember_first(stream: Iterator[torch.Tensor]):
    """Wrap ``stream`` so the hash of its first batch can be read later (for the rank report)."""
    seen: list[str] = []

    def wrapped():
        for ids in stream:
            if not seen:
                seen.append(_hash([ids]))
            yield ids

    return wrapped(), lambda: seen[0] if seen else None


def _reduce_parts(accelerator, parts: dict[str, torch.Tensor]) -> dict[str, float]:
    """The loss parts of one step, averaged over processes (one collective)."""
    if not parts:
        return {}
    keys = sorted(parts)
    values = accelerator.reduce(torch.stack([parts[k] for k in keys]), "mean")
    return dict(zip(keys, values.tolist()))


def _any_process(accelerator, flag: bool) -> bool:
    if accelerator.num_processes == 1:
        return flag
    value = torch.tensor(float(flag), device=accelerator.device)
    return bool(accelerator.reduce(value, "sum") > 0)


def _write_rank_report(accelerator, out: Path, first_batch_hash: str | None, model: torch.nn.Module) -> None:
    trained = [p for _, p in sorted(model.named_parameters()) if p.requires_grad]
    report = {"rank": accelerator.process_index, "world_size": accelerator.num_processes,
              "first_batch": first_batch_hash, "weights": _hash(trained),
              "distributed_type": str(accelerator.distributed_type)}
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / f"rank{accelerator.process_index}.json", json.dumps(report) + "\n")
    accelerator.wait_for_everyone()


__all__ = ["Run", "TrainResult", "batch_stream", "make_accelerator", "make_optimizer", "setup", "train", "train_step"]
