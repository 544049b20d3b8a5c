"""What a fit needs before its first forward: the model's rotary facts, the seeds, the objective's inputs, the run's
identity and its history (or a refusal), and the processes it runs on."""

from __future__ import annotations

import contextlib
import time

import torch
from tqdm.auto import tqdm

from .._seams import rope_frequencies, rope_init_config
from ..convert import model_shape
from ..registry import arch_for
from . import search
from .objective import build_objective, candidate_model
from .run import (EVALUATIONS, FitSettings, Search, best, digest, factor_options, read_history, run_search, start_file,
                  write_results)


def process_state():
    """Accelerate's state of this process; on CPU only with cpu=True (else a multi-process CPU launch stays one
    process, as in the training loop)."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.accelerator.is_available())


def distributed():
    """(rank, world size, gather): ``gather({index: result})`` merges every rank's dict (one process: as is)."""
    state = process_state()
    if state.num_processes == 1:
        return 0, 1, lambda mine: mine

    from accelerate.utils import gather_object

    def gather(mine: dict) -> dict:
        merged = {}
        for part in gather_object([mine]):
            merged.update(part)
        return merged

    return state.process_index, state.num_processes, gather


def rotary_facts(model) -> dict:
    """{"pairs", "trained", "theta", "head_dim", "num_heads"} of a model whose family applies RoPE itself."""
    shape = model_shape(arch_for(model.config), model)
    if not shape.native_rotary:
        raise ValueError(f"fit searches the factors of the model's own RoPE; {model.config.model_type} has none "
                         "(fit a Llama-style model: Llama, Mistral, Qwen2/3, Gemma2)")
    return {"pairs": shape.head_dim // 2, "trained": shape.original_max_positions, "head_dim": shape.head_dim,
            "theta": float(shape.native_rope_theta or 10000.0), "num_heads": shape.num_heads}


def yarn_factors(facts: dict, scale: float) -> list[float]:
    """w_i / YaRN's frequency i at scale ``scale`` (transformers' yarn): YaRN as per-pair factors."""
    config = rope_init_config({"rope_type": "yarn", "rope_theta": facts["theta"], "factor": scale,
                               "original_max_position_embeddings": facts["trained"]},
                              facts["head_dim"], facts["num_heads"], facts["trained"])
    yarn, _ = rope_frequencies(config)
    unscaled = 1.0 / facts["theta"] ** (torch.arange(0, facts["head_dim"], 2).float() / facts["head_dim"])
    return (unscaled / yarn).tolist()


def prepare(settings: FitSettings, original, tokenizer, rank: int, world: int) -> Search:
    """The search state before its history is read; refuses bad input before anything is written."""
    facts = rotary_facts(original)
    if settings.target_length <= facts["trained"]:
        raise ValueError(f"--target-length {settings.target_length} is within the model's trained context "
                         f"({facts['trained']}); give a longer one")
    scale = settings.target_length / facts["trained"]
    start = search.seeds(facts["pairs"], scale, yarn_factors(facts, scale))
    candidate_model(original, factor_options(start["pi"], scale, facts["trained"], settings))  # options valid?
    objective = build_objective(settings.data, tokenizer, settings.target_length, settings.windows,
                                settings.passkey_samples, settings.last_tokens, settings.needle_weight)
    extra = {"trained_length": facts["trained"], "model_config": digest(original.config.to_dict()),
             "calibration": digest(objective.windows.tolist()), "passkey": digest([d["ids"] for d in objective.docs])}
    settings = FitSettings(**{**settings.__dict__, "extra": extra})
    return Search(settings, original, objective, scale, facts["trained"], start, [], rank, world)


def load_history(state: Search) -> None:
    """The records of this identity (refused for another), the file rewritten whole by rank 0."""
    path = state.settings.out / EVALUATIONS
    state.records = read_history(path, state.settings.identity())
    if state.rank == 0:
        start_file(path, state.settings.identity(), state.records)


def check_out(out) -> None:
    """OUT is new, empty, or a fit's own (it holds evaluations.jsonl); nothing is written."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / EVALUATIONS).is_file():
        raise ValueError(f"--out {out} holds files that are not a fit's ({EVALUATIONS} missing); choose another")


@contextlib.contextmanager
def only_run(out, rank: int):
    """Rank 0 holds ``OUT/.fit.lock`` for the whole run: a second fit on the same OUT is refused, not interleaved."""
    if rank != 0:
        yield
        return
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".fit.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"another fit is running on {out}; wait for it, or choose another --out") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def fit(settings: FitSettings, original, tokenizer, progress_bar: bool = True) -> dict:
    """Run (or resume) the fit; returns the best record. ``original``: the unconverted model, on its device."""
    began = time.perf_counter()
    rank, world, gather = distributed()
    check_out(settings.out)
    state = prepare(settings, original, tokenizer, rank, world)
    if settings.budget < state.objective.forwards:
        raise ValueError(f"--budget {settings.budget} is less than one candidate's {state.objective.forwards} "
                         "forward passes")
    with only_run(settings.out, rank):
        load_history(state)
        progress = tqdm(total=settings.budget, initial=min(state.spent, settings.budget), unit="forward",
                        desc="fit", disable=rank != 0 or not progress_bar)
        with progress:
            run_search(state, progress, gather)
        if rank == 0:
            write_results(state, time.perf_counter() - began)
    return best(state.records)
