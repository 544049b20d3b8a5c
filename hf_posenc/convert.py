"""``convert(model, method, **options)`` swaps a model's position method in place; ``from_pretrained(path)``
rebuilds a saved converted model. Everything that can fail is checked before the model is touched."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import threading
from contextlib import contextmanager
from typing import Any

import torch
import transformers
from torch import nn
from transformers import PreTrainedModel

from . import _seams, hub_code, restore
from .arches.base import (ArchSpec, EmbedBeforeFirstLayer, IdentityRotary, LayerTypeRotary, MethodPositions,
                          ZeroPositions, rms, set_submodule)
from .attention import register
from .method_ref import MethodRef, attach_method
from .hooks import ATTN_IMPLEMENTATION, METHOD_MODULE, ForwardHooks
from .backends import check_backend
from .config import MAX_POSITIONS, PosEncConfig, is_converted
from .methods.base import ModelShape, PositionMethod
from .registry import arch_for, method_class


def trained_context(config) -> int:
    """The context a checkpoint runs at, which a conversion takes as its trained context (the old limit, what
    scalings and extensions are relative to): ``max_position_embeddings``. For a checkpoint with its own scaled
    rotary (Llama 3.1: 131072) that is the scaled context; the context before its scaling
    (``rope_parameters["original_max_position_embeddings"]``, 8192) stays with that rotary."""
    return int(config.max_position_embeddings)


def model_shape(spec: ArchSpec, model: PreTrainedModel, rotates: bool = False) -> ModelShape:
    """``rotates``: the method rotates q / k (on a per-layer-type rotary it then leaves some layers to it)."""
    config, base = model.config, model.base_model
    table = base.get_submodule(spec.position_table) if spec.position_table else None
    embeddings = model.get_input_embeddings().weight
    rope_parameters = spec.rope_parameters(config)
    return ModelShape(
        num_heads=config.num_attention_heads,
        num_kv_heads=spec.num_kv_heads(config),
        head_dim=spec.head_dim(config),
        hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers,
        causal=spec.is_causal(config),
        original_max_positions=trained_context(config),
        native_rotary=spec.rotary is not None,
        native_rope_theta=rope_parameters.get("rope_theta") if spec.rotary else None,
        native_rope_parameters=copy.deepcopy(rope_parameters) if spec.rotary else None,
        own_rotary_layers=spec.own_rotary_layers(config) if rotates else frozenset(),
        replaced_position_rms=_rms(table.weight) if isinstance(table, nn.Embedding) else None,
        token_embedding_rms=_scaled(_rms(embeddings), spec.token_embedding_scale(config)),
        weights_known=not embeddings.is_meta,
    )


def _position_table(spec: ArchSpec, model) -> torch.Tensor | None:
    """(old_limit, E): the learned absolute table conversion removes, from the row of position 0 on (OPT and RoBERTa
    keep rows before it), or None where the family has none."""
    table = model.base_model.get_submodule(spec.position_table) if spec.position_table else None
    if not isinstance(table, nn.Embedding):
        return None
    return table.weight.detach()[spec.first_table_row(model.config):]


def _scaled(value: float | None, scale: float) -> float | None:
    return None if value is None else value * scale


def _rms(weight: torch.Tensor) -> float | None:
    return None if weight.is_meta else rms(weight)  # a model built on the meta device has no values yet


def convert(model: PreTrainedModel, method: str | PosEncConfig, /, max_position_embeddings: int | None = None,
            backend: str | None = None, **options: Any) -> PreTrainedModel:
    """Replace ``model``'s position encoding by ``method`` in place and return the model.

    ``options`` are the method's own (see ``docs/methods.md``); ``max_position_embeddings`` is the new limit
    written to the config (default 16x the old one, at least 8192, at most 2**26); ``backend`` the attention
    backend ('auto', 'sdpa', 'flex', 'eager'; see ``docs/performance.md``; switch later with ``set_backend``). The
    pretrained weights are kept; the old position table is removed. On any error the model is left unchanged.
    The model gets its own copy of its config (other models built from the same config object stay as they are).
    A model on the meta device converts too; defaults that measure the weights (sinusoidal ``scale``) must then
    be given. Convert the model itself, before PEFT wraps it or ``torch.compile`` compiles it.
    """
    register()
    posenc = _posenc_config(method, options, max_position_embeddings, backend)
    _check_convertible(model)
    spec = arch_for(model.config)
    base = model.base_model
    attention = spec.attention_modules(base)
    if not attention:
        raise RuntimeError(
            f"found no {spec.attention_classes} modules in {type(model).__name__}: the transformers internals "
            f"hf_posenc relies on for {spec.family!r} have moved (transformers {transformers.__version__})"
        )
    shape = model_shape(spec, model, rotates=method_class(posenc.method).term.rotation)
    if posenc.original_max_position_embeddings is not None:  # rebuilt: its config holds the conversion's rotary;
        shape = dataclasses.replace(shape, native_rope_parameters=None)  # the checkpoint's is in the options
    default_limit = min(max(16 * shape.original_max_positions, 8192), MAX_POSITIONS)  # a reload checks the cap
    new_limit = posenc.max_position_embeddings or default_limit
    if new_limit < shape.original_max_positions:
        raise ValueError(
            f"max_position_embeddings={new_limit} is below the model's current limit {shape.original_max_positions}"
        )
    shape = dataclasses.replace(shape, max_positions=new_limit)
    options_obj = posenc.method_options()
    options_obj.validate(shape)
    options_obj = options_obj.resolve(shape)
    reference = next(model.parameters())
    position_method = method_class(posenc.method)(options_obj, shape).to(reference.device)
    position_method.backend = posenc.backend  # read by the attention function on every call
    position_method.to(reference.dtype)
    position_method.inherit_positions(_position_table(spec, model))  # fills the method's own tables only
    native_rotary = _native_rotary(spec, model, position_method, shape) if spec.rotary else None

    if spec.extend_limit is not None:  # the first change: it allocates, and leaves the model as it was if that fails
        try:
            spec.extend_limit(base, new_limit)
        except (RuntimeError, MemoryError) as err:
            raise ValueError(
                f"max_position_embeddings={new_limit}: cannot allocate {spec.family}'s length buffers for it ({err}); "
                "pass a smaller max_position_embeddings"
            ) from err

    # ---- nothing above changed the model (but for longer buffers); nothing below can fail on user input ----
    _own_config(model)  # the caller's config object may be shared with other models: they stay unconverted
    restore.stash(model, spec, posenc)  # what is replaced below, for hf_posenc.original_positions
    base.add_module(METHOD_MODULE, position_method)
    for module in attention:
        attach_method(module, MethodRef(base, METHOD_MODULE))
    _disable_native_positions(spec, model, position_method, native_rotary, reference.dtype)
    model.config.max_position_embeddings = new_limit
    posenc.options = options_obj.to_dict()
    posenc.original_max_position_embeddings = shape.original_max_positions
    posenc.max_position_embeddings = new_limit
    model.config.posenc = posenc.to_dict()
    hub_code.mark_converted(model.config)  # same config class for everything else; saves a checkpoint that
    # plain transformers loads only correctly (trust_remote_code) or not at all (see hub_code)
    # each forward builds its own state (positions, memo) and passes it to every attention call
    root = base.get_submodule(spec.forward_root) if spec.forward_root else base  # runs in every forward
    ForwardHooks(base, spec.table_offset(model.config), spec.derive_position_ids,
                 length_buffers=spec.extend_limit is not None).install(root)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return model


def _posenc_config(method: str | PosEncConfig, options: dict, max_position_embeddings: int | None,
                   backend: str | None) -> PosEncConfig:
    """The validated PosEncConfig of a convert call (a copy of one given)."""
    if isinstance(method, PosEncConfig):
        if options or max_position_embeddings is not None:
            raise TypeError("pass options either inside the PosEncConfig or as keyword arguments, not both")
        posenc = PosEncConfig.from_dict(method.to_dict())
        if backend is not None:
            posenc.backend = check_backend(backend)
        return posenc
    return PosEncConfig(method, options, max_position_embeddings, backend="auto" if backend is None else backend)


def _check_convertible(model) -> None:
    """A plain, unconverted transformers model without adapters; the error names the fix."""
    if not isinstance(model, PreTrainedModel):
        raise TypeError(_not_a_transformers_model(model))
    if getattr(model, "peft_config", None) is not None:  # PEFT injected adapter layers (get_peft_model, add_adapter)
        raise ValueError(
            f"this {type(model).__name__} has PEFT adapters in it: convert the base model first, then add the "
            "adapters (model = hf_posenc.convert(model, ...); model = get_peft_model(model, lora_config))"
        )
    if is_converted(model):
        raise ValueError(
            f"this model is already converted to {model.config.posenc['method']!r}; converting twice would stack "
            "two position methods. Load the original checkpoint again and convert that."
        )


def _not_a_transformers_model(model) -> str:
    message = f"convert expects a transformers PreTrainedModel, got {type(model).__name__}"
    modules = model.modules() if isinstance(model, nn.Module) else ()
    inner = next((m for m in modules if isinstance(m, PreTrainedModel)), None)
    if inner is None:
        return message
    return (
        f"{message} wrapping a {type(inner).__name__} (PEFT, torch.compile, DDP, ...): convert the base model "
        "first, then wrap or compile it (model = hf_posenc.convert(model, ...); then get_peft_model(model, ...) "
        "or torch.compile(model))"
    )


def _own_config(model: PreTrainedModel) -> None:
    """Give ``model`` (and every submodule that holds it, e.g. attention reads ``self.config._attn_implementation``)
    a copy of its config, sub-configs included: models built from one config object share it."""
    memo: dict[int, Any] = {}
    copy.deepcopy(model.config, memo)  # memo: id(original object) -> its copy
    for module in model.modules():
        for name, value in list(vars(module).items()):
            if isinstance(value, transformers.PretrainedConfig) and id(value) in memo:
                setattr(module, name, memo[id(value)])


def _native_rotary(spec: ArchSpec, model, method: PositionMethod, shape: ModelShape) -> nn.Module:
    """The rotary module that replaces a Llama-style model's native one."""
    old = model.base_model.get_submodule(spec.rotary)
    if method.rotates and not method.rotate_in_attention:
        # re-configure the model's own rotary class; it reads the *trained* context as max_position_embeddings
        config = copy.deepcopy(model.config)
        config.rope_parameters = _rope_parameters(spec, model.config, method)
        config.max_position_embeddings = method.options.original_max_positions
        device = next((b.device for b in old.buffers()), None)
        return type(old)(config).to(device)
    if method.rotates and spec.rope_layer_type is not None:  # the other layer types keep their own rotary
        kept = frozenset(model.config.layer_types) - {spec.rope_layer_type}
        return LayerTypeRotary(old, kept, shape.head_dim)
    return IdentityRotary(shape.head_dim)


def _rope_parameters(spec: ArchSpec, config, method: PositionMethod) -> dict:
    """``config.rope_parameters`` for a method the native rotary computes: its own, in the place of
    ``rope_layer_type``'s on a per-layer-type rotary (the other types' entries kept)."""
    if spec.rope_layer_type is None:
        return method.native_rope_parameters()
    return {**copy.deepcopy(config.rope_parameters), spec.rope_layer_type: method.native_rope_parameters()}


def _disable_native_positions(spec: ArchSpec, model, method: PositionMethod, rotary, dtype) -> None:
    """The stand-ins reach the method through base_model.posenc at each call (a PEFT copy that replaces it is used)."""
    base = model.base_model
    if spec.position_table:
        call, offset = spec.table_call, spec.table_offset(model.config)  # how the family calls its table
        table = (MethodPositions(MethodRef(base, METHOD_MODULE), dtype, call, offset) if method.embeds
                 else ZeroPositions(model.config.hidden_size, dtype, call, offset))
        set_submodule(base, spec.position_table, table.to(next(model.parameters()).device))
    if rotary is not None:
        set_submodule(base, spec.rotary, rotary)
        if method.rotates and not method.rotate_in_attention:
            model.config.rope_parameters = _rope_parameters(spec, model.config, method)
    if method.embeds and not spec.position_table:
        first_layer = base.get_submodule(spec.decoder_layers)[0]
        first_layer.register_forward_pre_hook(EmbedBeforeFirstLayer(MethodRef(base, METHOD_MODULE)),
                                              with_kwargs=True)


# ---------------------------------------------------------------------------------------------------------
def from_pretrained(path: str | os.PathLike, *, model_class: type[PreTrainedModel] | None = None,
                    posenc_options: dict[str, Any] | None = None, **kwargs: Any) -> PreTrainedModel:
    """Load a model saved after :func:`convert` (``save_pretrained``), with the same weights and logits.

    ``model_class``: the transformers class to build (default: the saved ``config.architectures``), e.g.
    ``GPT2Model`` for the base model of a ``GPT2LMHeadModel`` checkpoint.
    ``posenc_options``: method options that replace the saved ones for this load (``{"mscale": 0.5}``, a RoPE
    scaling ``factor``); one that changes the shape of the method's saved tables is refused.
    ``kwargs`` go to transformers' ``from_pretrained`` (``dtype``, ``device_map``, ``output_loading_info``, ...);
    those that are config attributes (``num_labels=5``) go to the config, as transformers does. Weights missing
    from the checkpoint (or unexpected, or mismatched) are warned about, as transformers does, except the ones
    conversion explains: the removed position table and the method's own tables.
    """
    output_loading_info = kwargs.pop("output_loading_info", False)
    hub_kwargs = {k: kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only") if k in kwargs}
    config = kwargs.pop("config", None)  # copied: the caller's config object is left as it is
    config = hub_code.plain_config(config) if config is not None else hub_code.read_config(path, **hub_kwargs)
    stored = getattr(config, "posenc", None)
    if stored is None:
        raise ValueError(
            f"{path} is not an hf_posenc checkpoint (its config has no 'posenc' entry). Load it with transformers' "
            "from_pretrained and call hf_posenc.convert(model, method)."
        )
    posenc = PosEncConfig.from_dict(stored, saved=True)
    if posenc_options:
        posenc = _with_options(posenc, posenc_options)
    arch_for(config)
    model_class = model_class or _model_class(config)
    _apply_config_overrides(config, kwargs)
    # build the unconverted model (old limit, old position table) from the saved weights, then convert it
    config.max_position_embeddings = posenc.original_max_position_embeddings
    del config.posenc
    with _held_load_report():
        model, info = model_class.from_pretrained(path, config=config, output_loading_info=True, **kwargs)
    before = set(model.state_dict())
    convert(model, posenc)
    after = set(model.state_dict())
    new_keys = [k for k in model.state_dict() if k not in before]
    if new_keys:
        _load_tensors(model, path, new_keys, hub_kwargs)
    # conversion removed the old table (missing from the checkpoint) and added the method's (unexpected to it)
    info = _unexplained_keys(info, explained=before ^ after, prefix=model.base_model_prefix + ".")
    _warn_about_keys(model, path, info)
    return (model, info) if output_loading_info else model


def _with_options(posenc: PosEncConfig, options: dict[str, Any]) -> PosEncConfig:
    """The saved config with ``options`` replacing its method options (validated as convert validates them)."""
    try:
        return PosEncConfig(**{**posenc.to_dict(), "options": {**posenc.options, **options}})
    except (TypeError, ValueError) as err:
        raise ValueError(f"posenc_options: {err}") from None


# transformers' from_pretrained arguments that are also config attributes: they stay from_pretrained's
_LOADING_ARGUMENTS = ("dtype", "torch_dtype", "quantization_config", "attn_implementation")


def _apply_config_overrides(config, kwargs: dict) -> None:
    """Move the kwargs that are config attributes (``num_labels=5``) onto ``config`` (our own copy), as transformers'
    from_pretrained does when it reads the config itself."""
    limit_keys = ("posenc", "max_position_embeddings", hub_code.limit_key(type(config)))
    for key in [k for k in kwargs if hasattr(config, k) and k not in _LOADING_ARGUMENTS]:
        if key in limit_keys:
            raise ValueError(
                f"{key}= cannot be overridden when loading a converted checkpoint: its position limit is "
                "config.posenc['max_position_embeddings']. Load the original model and convert it with "
                "max_position_embeddings=... instead"
            )
        setattr(config, key, kwargs.pop(key))


@contextmanager
def _held_load_report():
    """Hold back transformers' weight-loading report of this thread while the unconverted model loads: it lists the
    position table conversion removes as missing and the method's tables as unexpected. :func:`_warn_about_keys`
    reports the rest. If loading fails (e.g. mismatched sizes), the report is shown as it was."""
    logger, held, thread = logging.getLogger(_seams.LOAD_REPORT_LOGGER), [], threading.get_ident()

    def hold(record: logging.LogRecord) -> bool:
        if record.thread == thread and _seams.LOAD_REPORT_MARKER in record.getMessage():
            held.append(record)
            return False
        return True

    logger.addFilter(hold)
    try:
        yield
    except BaseException:  # loading failed (mismatched sizes): the report says why
        logger.removeFilter(hold)
        for record in held:
            logger.handle(record)
        raise
    finally:
        logger.removeFilter(hold)


def _unexplained_keys(info: dict, explained: set[str], prefix: str) -> dict:
    """transformers' loading info without the keys conversion explains (named with or without the base model's
    ``prefix``: a head checkpoint may be loaded as its base model, and the reverse)."""

    def unexplained(key: str) -> bool:
        return not {key, key.removeprefix(prefix), prefix + key} & explained

    out = dict(info)
    for name in ("missing_keys", "unexpected_keys"):
        out[name] = type(info[name])(k for k in info[name] if unexplained(k))
    # (key, shape in the checkpoint, shape in the model)
    out["mismatched_keys"] = type(info["mismatched_keys"])(m for m in info["mismatched_keys"] if unexplained(m[0]))
    return out


def _warn_about_keys(model, path, info: dict) -> None:
    problems = {name: sorted(info[name]) for name in ("missing_keys", "unexpected_keys")}
    problems["mismatched_keys"] = sorted(f"{key} (checkpoint {list(saved)}, model {list(built)})"
                                         for key, saved, built in info["mismatched_keys"])
    problems = {name: keys for name, keys in problems.items() if keys}
    if problems:  # where transformers' own report goes: its verbosity settings apply
        listed = "; ".join(f"{name.replace('_', ' ')}: {', '.join(keys)}" for name, keys in problems.items())
        logging.getLogger(_seams.LOAD_REPORT_LOGGER).warning(
            f"loading {type(model).__name__} from {path}: {listed}. Missing or mismatched weights are newly "
            "initialised (random): train them, or check that the checkpoint matches the model class"
        )


def _model_class(config) -> type[PreTrainedModel]:
    names = getattr(config, "architectures", None) or []
    for name in names:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    raise ValueError(f"config.architectures={names} names no transformers class; cannot rebuild the model")


def _load_tensors(model: nn.Module, path, keys: list[str], hub_kwargs: dict) -> None:
    """Copy the converted model's new parameters (T5 / Shaw tables) from the saved safetensors files."""
    from safetensors import safe_open
    from transformers.utils import cached_file

    def resolve(name):
        return cached_file(path, name, _raise_exceptions_for_missing_entries=False, **hub_kwargs)

    index = resolve("model.safetensors.index.json")
    if index:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]  # tensor name -> shard file
    else:
        single = resolve("model.safetensors")
        weight_map = {}
        if single:
            with safe_open(single, framework="pt") as f:
                weight_map = dict.fromkeys(f.keys(), "model.safetensors")
    prefix = f"{model.base_model_prefix}."

    def saved_name(key):  # also a head model's checkpoint loaded as its base model (GPT2Model), and the reverse
        return next((n for n in (key, prefix + key, key.removeprefix(prefix)) if n in weight_map), None)

    names = {key: saved_name(key) for key in keys}
    missing = [k for k, name in names.items() if name is None]
    state = {}
    for key, name in names.items():
        if name is not None:
            with safe_open(resolve(weight_map[name]), framework="pt") as f:
                state[key] = f.get_tensor(name)
    if missing:
        raise ValueError(f"{path} lacks the position-method weights {missing}; was it saved after convert()?")
    reference = dict(model.state_dict())
    wrong = {k: (tuple(t.shape), tuple(reference[k].shape)) for k, t in state.items() if t.shape != reference[k].shape}
    if wrong:
        raise ValueError(f"{path}: the saved position-method weights do not fit the method's options (saved, "
                         f"expected shapes: {wrong}); load it with the options it was saved with")
    with torch.no_grad():
        for key, tensor in state.items():
            reference[key].copy_(tensor)


hub_code.register_loading(from_pretrained=from_pretrained, convert=convert)
