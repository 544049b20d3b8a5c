"""``hf-posenc``: lm-eval's HF model for hf_posenc checkpoints, and :func:`evaluate` for a model in memory.

    --model hf-posenc --model_args pretrained=<converted dir>,max_length=8192
    --model hf-posenc --model_args pretrained=<plain checkpoint>,posenc=alibi[,<method option>=<value>...]

``max_length`` is honoured as given (lm-eval's ``hf`` model would cap it at the config's position limit only
when unset). A model that still has a learned absolute position table refuses a ``max_length`` past it, and
any model refuses a bundled-task input longer than ``max_length``, each with a message saying what to pass.

Data parallel: lm-eval's own path (one ``Accelerator``, each process scoring every N-th doc, rank 0 gathering the
metrics and writing the results), launched by ``accelerate launch --multi_gpu --num_processes N`` or ``torchrun
--nproc_per_node N``, also on machines without GPUs (gloo), which ``HFLM`` alone runs as N full copies.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils_hf import get_dtype
from lm_eval.utils import simple_parse_args_string
from torch import nn

import hf_posenc
from hf_posenc.registry import arch_for, method_class

from .tasks import TASKS_DIR
from .tasks.common import DEFAULT_LENGTHS, LENGTH_KEY, register_tokenizer

MODEL_NAME = "hf-posenc"


class EvalInputError(ValueError):
    """A model argument that cannot work (missing path, length past a learned position table, ...)."""


@register_model(MODEL_NAME)
class HFPosencLM(HFLM):
    """lm-eval's ``HFLM`` that loads converted checkpoints with ``hf_posenc.from_pretrained`` and converts plain
    ones on load when ``posenc=<method>`` is given; the method's options are taken from the other model args
    (``max_position_embeddings`` included). Everything else is ``HFLM``'s (``peft`` is applied after the
    conversion, so adapters trained on a converted model load)."""

    def __init__(self, pretrained, posenc: str | None = None, max_position_embeddings: int | None = None,
                 **kwargs: Any) -> None:
        if kwargs.get("max_length") is not None:  # lm-eval passes what it could not parse as a number as a str
            kwargs["max_length"] = whole_tokens("max_length", kwargs["max_length"])
        options = {}
        if posenc is not None:
            fields = method_class(posenc).Options.__dataclass_fields__
            options = {key: kwargs.pop(key) for key in list(kwargs) if key in fields}
        elif max_position_embeddings is not None:
            raise EvalInputError("max_position_embeddings is an option of posenc=<method>; give posenc as well")
        self._posenc = (posenc, options, max_position_embeddings)
        if isinstance(pretrained, (str, os.PathLike)):
            pretrained = resolve_pretrained(str(pretrained))
            prepare_cpu_launch()
        try:
            super().__init__(pretrained=pretrained, **kwargs)
        except OSError as err:
            if isinstance(pretrained, str) and not Path(pretrained).exists():
                raise EvalInputError(
                    f"cannot load {pretrained!r}: it is not a local directory and the model hub gave: {err}"
                ) from err
            raise
        if isinstance(pretrained, str):
            self._join_data_parallel()
        limit = learned_position_limit(self.model)
        if limit is not None and self.max_length > limit:
            raise EvalInputError(
                f"{self._name()} has learned absolute positions for {limit} tokens, so max_length={self.max_length} "
                f"would index past its position table. Convert it: add posenc=alibi (or another method) to "
                f"--model_args, or save a converted copy with `hf-posenc convert`; or lower max_length to {limit}."
            )

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "HFPosencLM":
        refuse_flags_in_model_args(simple_parse_args_string(arg_string), additional_config)
        return super().create_from_arg_string(arg_string, additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> "HFPosencLM":
        refuse_flags_in_model_args(arg_dict, additional_config)
        return super().create_from_arg_obj(arg_dict, additional_config)

    # -- loading -------------------------------------------------------------------------------------------
    def _create_model(self, pretrained: str, *, peft: str | None = None, dtype="auto", revision="main",
                      **kwargs: Any) -> None:
        method, options, new_limit = self._posenc
        if getattr(self.config, "posenc", None) is not None:
            if method is not None:
                raise EvalInputError(
                    f"{pretrained} is already converted to {self.config.posenc['method']!r}; drop posenc= from "
                    "--model_args (converting twice would stack two position methods)"
                )
            unsupported = [k for k in ("delta", "autogptq", "gptqmodel", "gguf_file", "tp_plan") if kwargs.get(k)]
            if unsupported or kwargs.get("parallelize"):
                raise EvalInputError(f"{unsupported or ['parallelize']} not supported for converted checkpoints")
            self._model = hf_posenc.from_pretrained(pretrained, dtype=get_dtype(dtype), revision=revision)
            self._model.to(self.device)  # HFLM places only the models it loads itself under `accelerate launch`
        else:
            super()._create_model(pretrained, dtype=dtype, revision=revision, **kwargs)
            if method is not None:
                hf_posenc.convert(self._model, method, max_position_embeddings=new_limit, **options)
        if peft:
            from peft import PeftModel

            self._model = PeftModel.from_pretrained(self._model, peft, revision=revision)

    def _join_data_parallel(self) -> None:
        """Take rank and world size from Accelerate where HFLM does not (it does only when it counts more than one
        GPU), and refuse a launch whose processes would each score every request."""
        launched = launched_processes()
        if launched == 1:
            return
        accelerator = getattr(self, "accelerator", None)
        joined = accelerator.num_processes if accelerator is not None else 1
        if joined != launched:
            raise EvalInputError(
                f"{launched} processes were launched but Accelerate joined {joined} into a process group, so every "
                f"process would score every request; {LAUNCH_HINT}"
            )
        if self._world_size == 1:
            self._rank, self._world_size = accelerator.process_index, joined

    # -- requests ------------------------------------------------------------------------------------------
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        self._check_fits(requests)
        return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)

    def generate_until(self, requests, disable_tqdm: bool = False):
        self._check_fits(requests)
        return super().generate_until(requests, disable_tqdm=disable_tqdm)

    def _check_fits(self, requests: Sequence) -> None:
        """Bundled-task docs carry their length (RULER's carry ``max_length``); an input past ``max_length``
        would be split (perplexity) or left-truncated (generation) silently."""
        need, task = 0, None
        for request in requests:
            doc = request.doc if isinstance(request.doc, dict) else {}
            length = doc.get(LENGTH_KEY, doc.get("max_length"))
            if isinstance(length, int) and length > need:
                need, task = length, request.task_name
        if need > self.max_length:
            limit = learned_position_limit(self.model)
            hint = (f"; {self._name()} has learned positions for {limit} tokens, so also convert it (posenc=alibi)"
                    if limit is not None and need > limit else "")
            raise EvalInputError(
                f"{task} asks for {need}-token inputs but max_length is {self.max_length}: add "
                f"max_length={need} to --model_args{hint}"
            )

    # -- reporting -----------------------------------------------------------------------------------------
    def get_model_info(self) -> dict:
        """HFLM's info (no hub look-up for local or in-memory models) plus ``posenc`` and ``trained_length``."""
        if isinstance(self.pretrained, str) and not Path(self.pretrained).exists():
            info = super().get_model_info()
        else:
            info = {"model_num_parameters": sum(p.numel() for p in self._model.parameters()),
                    "model_dtype": str(self._model.dtype), "model_revision": self.revision, "model_sha": ""}
        posenc = getattr(self.model.config, "posenc", None)
        info["posenc"] = posenc
        info["trained_length"] = (posenc or {}).get("original_max_position_embeddings") or getattr(
            self.model.config, "max_position_embeddings", None)
        return info

    def _name(self) -> str:
        return self.pretrained if isinstance(self.pretrained, str) else type(self.model).__name__


def resolve_pretrained(pretrained: str) -> str:
    """A local path, an ``hf_posenc.sources`` model name (fetched into the cache), or else a hub id."""
    if Path(pretrained).expanduser().exists():
        return str(Path(pretrained).expanduser())
    try:
        from hf_posenc import sources
    except ImportError:
        sources = None
    if sources is not None and pretrained in getattr(sources, "available", dict)():
        return str(sources.resolve_model(pretrained))
    if pretrained.startswith((os.sep, ".", "~")) or pretrained.count("/") > 1:
        raise EvalInputError(f"model path {pretrained!r} does not exist")
    return pretrained


def whole_tokens(name: str, value: Any) -> int:
    """A model arg that counts tokens (``max_length``): a positive whole number, as lm-eval parsed it."""
    whole = ((isinstance(value, int) and not isinstance(value, bool))
             or (isinstance(value, float) and value.is_integer()))
    if not whole or value < 1:
        raise EvalInputError(f"{name}={value} in --model_args must be a positive whole number of tokens, "
                             f"e.g. {name}=8192")
    return int(value)


def refuse_flags_in_model_args(model_args: dict, flags: dict | None) -> None:
    """lm-eval passes its own flags (--batch_size, --max_batch_size, --device) to the model too: the same key in
    --model_args would be given twice (a raw TypeError)."""
    twice = sorted(key for key, value in (flags or {}).items() if value is not None and key in model_args)
    if twice:
        raise EvalInputError(f"{', '.join(twice)} in --model_args: lm-eval passes its own flag for "
                             f"{'them' if len(twice) > 1 else 'it'} to the model as well; give "
                             f"{' '.join(f'--{key} ...' for key in twice)} instead")


def learned_position_limit(model: nn.Module) -> int | None:
    """Tokens the model's learned absolute position table covers if it still has one (unconverted GPT-2, BERT,
    OPT, RoBERTa: ``ArchSpec.table_limit``)."""
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hf_posenc.is_converted(model):
        return None
    try:
        return arch_for(model.config).table_limit(model.config)
    except ValueError:
        return None


# --- data parallel -----------------------------------------------------------------------------------------
WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")  # Accelerate reads these
LAUNCH_HINT = ("launch N data-parallel processes with `accelerate launch --multi_gpu --num_processes N -m "
               "hf_posenc.cli eval ...` (without GPUs it runs on CPU, gloo) or `torchrun --nproc_per_node N -m "
               "hf_posenc.cli eval ...`")


def launched_processes() -> int:
    """How many processes the launcher (torchrun, ``accelerate launch``, mpirun) started; 1 outside a launch."""
    for name in WORLD_SIZE_VARS:
        if os.environ.get(name):
            return int(os.environ[name])
    return 1


def prepare_cpu_launch() -> None:
    """Before HFLM creates its ``Accelerator``: without GPUs, Accelerate joins torchrun's (or ``accelerate launch
    --multi_gpu``'s) processes into a gloo group only when told the run is on CPU, as ``accelerate launch --cpu``
    tells it; do so. Refuse ``accelerate launch --cpu --num_processes N``, which starts a single process."""
    if launched_processes() > 1:
        if not torch.accelerator.is_available():
            os.environ["ACCELERATE_USE_CPU"] = "true"
    elif os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") and os.environ.get("MASTER_ADDR"):
        raise EvalInputError(
            "`accelerate launch --cpu --num_processes N` started one process (Accelerate starts several CPU processes "
            f"only through mpirun, --mpirun_hostfile); {LAUNCH_HINT}; or, for one process, run without "
            "--num_processes (or unset MASTER_ADDR)"
        )


# --- Python API --------------------------------------------------------------------------------------------
def evaluate(model, tokenizer, tasks: Iterable[str] = ("posenc_ppl",), lengths: Iterable[int] = DEFAULT_LENGTHS,
             *, max_length: int | None = None, name: str | None = None, metadata: dict | None = None,
             output_path: str | os.PathLike | None = None, batch_size: int = 1, **kwargs: Any) -> dict:
    """Run lm-eval on a model already in memory (converted or not) and return lm-eval's results dict.

    ``lengths`` become metadata ``max_seq_lengths``; ``max_length`` defaults to the longest length;
    ``metadata`` adds task options (``text_file``, ``num_tokens``, ``depths``, ...); ``name`` labels the model in
    the results (and plots); ``output_path`` also writes the results JSON as ``hf-posenc eval`` does; ``kwargs``
    go to ``lm_eval.simple_evaluate``. Results: ``results["results"][task]["<length>,none"]``.
    """
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.tasks import TaskManager

    lengths, tasks = sorted(int(n) for n in lengths), list(tasks)
    lm = HFPosencLM(pretrained=model, tokenizer=tokenizer, max_length=max_length or max(lengths),
                    batch_size=batch_size)
    task_metadata = {"max_seq_lengths": lengths, "tokenizer": register_tokenizer(tokenizer),
                     "max_length": lm.max_length, **(metadata or {})}
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=not set(tasks) <= bundled_task_names(),
                          metadata=task_metadata)
    name = name or getattr(model.config, "_name_or_path", "") or type(model).__name__
    tracker = EvaluationTracker(output_path=str(output_path)) if output_path else None
    kwargs.setdefault("log_samples", False)
    results = simple_evaluate(model=lm, model_args={"pretrained": name}, tasks=tasks, task_manager=manager,
                              evaluation_tracker=tracker, **kwargs)
    if tracker is not None and results is not None:  # None on all but the first process of a launch
        tracker.save_results_aggregated(results=results, samples=None)
    return results


def bundled_task_names() -> set[str]:
    """Names (tasks and the ``posenc`` tag) defined by the YAMLs in TASKS_DIR."""
    from lm_eval.tasks import TaskManager

    return set(TaskManager(include_path=str(TASKS_DIR), include_defaults=False).all_tasks)
