"""The model side of fine-tuning: load, convert, choose what trains (full or LoRA), save the result.

LoRA: PEFT adapters on the attention projections; the position method's own tables (T5 buckets, Shaw tables,
under ``base_model.posenc``) go in ``modules_to_save``, one entry per module that directly owns parameters, so
PEFT wraps exactly the modules that train. Head weights the checkpoint lacked (a BertModel loaded as
BertForMaskedLM) are fresh and train in full, in place.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from torch import nn

import hf_posenc

from ..arches import ArchSpec
from ..convert import METHOD_MODULE
from ..registry import arch_for
from .config import NATIVE, ConfigError, LoraArgs, TrainConfig

ADAPTER_DIR = "adapter"


@dataclass
class LoadedModel:
    model: nn.Module  # a PreTrainedModel, or a PeftModel around one
    objective: str  # "causal" or "mlm"
    family: str  # ArchSpec.family: "gpt2", "bert", "llama", "opt", ...
    fresh: list[str] = field(default_factory=list)  # parameters the checkpoint did not have (newly initialised)
    converted_here: bool = True  # False: the checkpoint was already converted
    teacher: nn.Module | None = None  # distill with full fine-tuning: a frozen copy of the unconverted model


def resolve_source(name_or_path: str) -> str:
    """A named offline source (hf_posenc.sources) -> its local directory; anything else unchanged."""
    from .. import sources

    try:
        return str(sources.resolve_model(name_or_path))
    except (sources.SourceError, ImportError, ValueError) as err:  # pip failed, a missing extra, a text source
        raise ConfigError(f"{name_or_path!r}: {err}") from err


def load_tokenizer(config: TrainConfig):
    location = resolve_source(config.tokenizer or config.model)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(location)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot load a tokenizer from {location!r} (set `tokenizer:` if the model has none): {err}")
    tokenizer.model_max_length = int(1e30)  # packing makes long streams on purpose; silence the length warning
    return tokenizer


def resolve_objective(objective: str, spec: ArchSpec) -> str:
    return ("mlm" if spec.encoder else "causal") if objective == "auto" else objective


@dataclass
class ModelPlan:
    """What :func:`inspect_model` learnt from the checkpoint's config alone (no weights read)."""

    location: str  # local directory or hub name
    model_config: object  # transformers PretrainedConfig
    family: str  # ArchSpec.family
    objective: str  # "causal" or "mlm"
    converted: bool  # the checkpoint already carries a position method (config.posenc)
    native: bool = False  # method "native": train as it is, no conversion


def inspect_model(config: TrainConfig) -> ModelPlan:
    """Every check that needs only the checkpoint's config: loadable, supported family, objective, method vs an
    already converted checkpoint, LoRA target modules. Raises :class:`ConfigError`."""
    location = resolve_source(config.model)
    try:
        model_config = transformers.AutoConfig.from_pretrained(location)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model {config.model!r}: not a local checkpoint, named source or reachable hub model: {err}")
    try:
        spec = arch_for(model_config)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    family = spec.family
    objective = resolve_objective(config.objective, spec)
    if objective == "mlm" and not spec.encoder:
        raise ConfigError(f"objective 'mlm' needs a BERT-style model; {config.model!r} is {family!r}")
    if objective == "causal" and spec.encoder:
        raise ConfigError(f"objective 'causal' on {family!r} (an encoder) is not supported; use 'mlm'")
    stored = getattr(model_config, "posenc", None)
    native = config.method == NATIVE
    if stored is not None and config.method not in (None, NATIVE, stored["method"]):
        raise ConfigError(
            f"{config.model!r} is already converted to {stored['method']!r}; set method: null to keep training it, "
            f"or start from the unconverted checkpoint to use {config.method!r}")
    if stored is None and config.method is None:
        raise ConfigError(f"method is required: {config.model!r} is not converted yet")
    if config.lora is not None:
        check_lora_targets(lora_targets(config.lora, model_config), model_config, family)
    longest = config.seq_len * max(config.eval_multipliers)
    table = spec.table_limit(model_config) if stored is None else None  # tokens a kept learned table covers
    if native and table is not None and longest > table:
        raise ConfigError(
            f"method 'native' keeps {config.model!r}'s learned position table ({table} "
            f"positions), but seq_len x eval_multipliers reaches {longest}; lower them or convert the model")
    if config.pose is not None and objective != "causal":
        raise ConfigError(f"pose: PoSE position skipping is for causal language models; {config.model!r} trains "
                          f"with the {objective!r} objective")
    if config.distill is not None and stored is not None:
        raise ConfigError(
            f"distill: {config.model!r} is already converted to {stored['method']!r}; its checkpoint no longer holds "
            "the original position encoding, so there is no original model to distil from. Start from the "
            "unconverted checkpoint")
    if config.distill is not None and table is not None and config.seq_len > table:
        raise ConfigError(
            f"distill: the teacher is the original {config.model!r}, whose learned position table covers "
            f"{table} positions, but seq_len is {config.seq_len}; lower seq_len to "
            f"<= {table} (PoSE covers the longer distances)")
    return ModelPlan(str(location), model_config, family, objective, converted=stored is not None, native=native)


def load_model(config: TrainConfig, plan: ModelPlan | None = None) -> LoadedModel:
    """Load ``config.model``, convert it to ``config.method`` (unless the checkpoint already is converted), and
    set which parameters train."""
    plan = plan or inspect_model(config)
    teacher = None
    if plan.converted:
        model, fresh = hf_posenc.from_pretrained(plan.location, dtype=torch.float32), []
        _check_head(model)
    else:
        auto = transformers.AutoModelForMaskedLM if plan.objective == "mlm" else transformers.AutoModelForCausalLM
        quiet = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # we report fresh weights ourselves, once
        try:
            model, info = auto.from_pretrained(plan.location, dtype=torch.float32, output_loading_info=True)
        finally:
            transformers.logging.set_verbosity(quiet)
        fresh = sorted(info.get("missing_keys", ()))
        if config.distill is not None:
            teacher = _teacher(config, model, fresh)
        if not plan.native:
            try:  # what needs the model to check (head sizes, its limit): refused like the config's own checks
                hf_posenc.convert(model, config.method, max_position_embeddings=config.max_position_embeddings,
                                  **config.method_options)
            except ValueError as err:
                raise ConfigError(f"method {config.method!r}: {err}") from None
    model.config.use_cache = False
    _check_pose_limit(config, model, plan)
    if not plan.native:
        _check_eval_limit(config, model)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if config.lora is not None:
        model = apply_lora(model, config.lora, plan.family, fresh)
    return LoadedModel(model, plan.objective, plan.family, fresh, converted_here=not plan.converted,
                       teacher=teacher)


def _teacher(config: TrainConfig, model: nn.Module, fresh: list[str]) -> nn.Module | None:
    """The distillation teacher, taken before conversion: a frozen copy for full fine-tuning; with LoRA none (the
    loop runs the student's own base weights with the adapters disabled and the original positions restored)."""
    if fresh:
        raise ConfigError(
            f"distill: {config.model!r} lacks {len(fresh)} weights of its LM head ({', '.join(fresh[:4])}...), which "
            "start from random initialisation: an original model with a random head is no teacher. Drop distill or "
            "start from a checkpoint with its head")
    if config.lora is not None:
        return None
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    teacher.config.use_cache = False
    return teacher


def _check_pose_limit(config: TrainConfig, model: nn.Module, plan: ModelPlan) -> None:
    """PoSE position ids reach ``pose.target_length - 1``: the (new) position limit must cover them; a learned
    table the model keeps (method 'native') cannot go past its rows."""
    if config.pose is None:
        return
    limit = model.config.max_position_embeddings
    table = arch_for(model.config).table_limit(model.config)
    keeps_table = plan.native and not plan.converted and table is not None
    limit = table if keeps_table else limit
    if config.pose.target_length > limit and (keeps_table or not plan.native):
        fix = "lower pose.target_length" if keeps_table else \
            f"set max_position_embeddings: {config.pose.target_length} (or more), or lower pose.target_length"
        raise ConfigError(f"pose.target_length {config.pose.target_length} is past the model's position limit "
                          f"max_position_embeddings={limit}; {fix}")


def _check_eval_limit(config: TrainConfig, model: nn.Module) -> None:
    """The final evaluation runs seq_len x max(eval_multipliers) tokens: refuse it up front where the converted
    model cannot run that far (a method with a position limit such as a learned table's rows, or a family's length
    buffers such as BERT's token_type_ids), not as an error after the last step."""
    spec, limit = arch_for(model.config), model.config.max_position_embeddings
    method = getattr(model.base_model, METHOD_MODULE)
    if method.position_limit is None and spec.extend_limit is None:
        return  # no hard limit: runs past max_position_embeddings (what the conversion is for)
    limit = min(limit, method.position_limit or limit)
    offset = spec.table_offset(model.config) if spec.position_table is not None else 0  # RoBERTa: pad + 1
    longest = config.seq_len * max(config.eval_multipliers)
    if longest > limit - offset:
        why = (f"the {method.name} method embeds positions below {method.position_limit} only"
               if method.position_limit is not None else
               f"the {spec.family} length buffers")
        fix = f"set max_position_embeddings: {longest + offset} (or more), or " if config.method else ""
        raise ConfigError(
            f"seq_len x eval_multipliers reaches {longest} tokens, but the model runs at most {limit - offset} "
            f"(max_position_embeddings={limit}: {why}); {fix}lower seq_len or eval_multipliers")


def _check_head(model: nn.Module) -> None:
    if getattr(model, "get_output_embeddings", lambda: None)() is None:
        raise ConfigError(
            f"{type(model).__name__} has no language-model head; fine-tuning needs a *ForCausalLM / *ForMaskedLM "
            "checkpoint (or an unconverted one, which is loaded with a head)")


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing. Position terms shared across layers within one forward must then
    be built per layer (a term memoised across layers is rebuilt in only some recomputed layers, which
    torch.utils.checkpoint rejects when it depends on trainable parameters: T5's table); each forward's state
    (hf_posenc.forward_state) switches sharing off itself while checkpointing is on."""
    model.activation_checkpointing_enable({"use_reentrant": False})


# ---- LoRA -------------------------------------------------------------------------------------------------


def lora_targets(lora: LoraArgs, model_config) -> list[str]:
    """``lora.target_modules``, else the family's ArchSpec targets, else PEFT's own mapping for the model type."""
    if lora.target_modules:
        return list(lora.target_modules)
    spec = arch_for(model_config)
    if spec.lora_targets is not None:
        return list(spec.lora_targets)
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS

    targets = PEFT_TARGETS.get(model_config.model_type)  # PEFT's table is keyed by model type
    if targets:
        return list(targets)
    raise ConfigError(f"PEFT names no default LoRA targets for this {spec.family!r} model; set lora.target_modules")


def check_lora_targets(targets: list[str], model_config, family: str) -> None:
    """Every target must name a Linear / Conv1D module (as PEFT matches it: the full name or a dotted suffix).
    Checked on a meta-device copy, so nothing is loaded yet."""
    with torch.device("meta"):
        skeleton = transformers.AutoModel.from_config(model_config)
    linear = {name for name, m in skeleton.named_modules() if isinstance(m, (nn.Linear, transformers.Conv1D))}
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in linear)]
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in linear})
        raise ConfigError(
            f"lora.target_modules {missing} match no Linear module of this {family} model; its Linear modules are "
            f"named {leaves}")


def position_modules(model: nn.Module) -> list[str]:
    """Names (from the model root) of the modules under ``base_model.posenc`` that directly own parameters."""
    method = getattr(model.base_model, METHOD_MODULE, None)
    if method is None:
        return []
    root = {id(m): n for n, m in model.named_modules()}
    return sorted(root[id(m)] for m in method.modules() if any(True for _ in m.parameters(recurse=False)))


def apply_lora(model: nn.Module, lora: LoraArgs, family: str, fresh: list[str]) -> nn.Module:
    """``family``: the plan's (ArchSpec.family); targets and layout come from the model's ArchSpec."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora_targets(lora, model.config),
        modules_to_save=position_modules(model) + list(lora.modules_to_save) or None,
        fan_in_fan_out=arch_for(model.config).lora_fan_in_fan_out,  # Conv1D (GPT-2) stores weights transposed
    )
    peft_model = get_peft_model(model, config)
    parameters = dict(peft_model.get_base_model().named_parameters())
    for name in fresh:  # newly initialised head weights: train in full, saved with the base model
        if name in parameters:
            parameters[name].requires_grad_(True)
    return peft_model


def is_position_parameter(name: str) -> bool:
    return f".{METHOD_MODULE}." in f".{name}"


# ---- saving and loading the result -------------------------------------------------------------------------


def save_final(model: nn.Module, tokenizer, out: str | os.PathLike, lora: LoraArgs | None,
               state_dict: dict | None = None) -> Path:
    """Save the trained model to ``out`` so :func:`hf_posenc.from_pretrained` loads it. LoRA: merged by default;
    with ``lora.merge: false`` the adapter (and the trained position tables) go to ``out/adapter`` and the base
    model to ``out`` (load both with :func:`load_finetuned`). Main process only."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if lora is not None:
        if lora.merge:
            model = model.merge_and_unload()
        else:
            model.save_pretrained(out / ADAPTER_DIR)
            model = model.unload()
        state_dict = None
    model.config.use_cache = True  # off while training (no KV cache needed); the saved model generates with it
    model.save_pretrained(out, state_dict=state_dict)
    tokenizer.save_pretrained(out)
    return out


def load_finetuned(out: str | os.PathLike, **kwargs) -> nn.Module:
    """The model :func:`save_final` wrote: ``hf_posenc.from_pretrained(out)``, with the separate LoRA adapter
    applied if there is one."""
    model = hf_posenc.from_pretrained(out, **kwargs)
    adapter = Path(out) / ADAPTER_DIR
    if adapter.is_dir():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model
