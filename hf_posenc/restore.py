"""Run a converted model with its original position encoding again, for a while: the teacher of self-distillation
without a second copy of the weights.

    with hf_posenc.original_positions(model):         # also a PeftModel (with model.disable_adapter(): ...)
        original_logits = model(input_ids).logits      # what the unconverted model gives
    converted_logits = model(input_ids).logits         # back to the converted model

:func:`hf_posenc.convert` stashes, before it swaps anything, what it is about to replace (:func:`stash`): the
learned position table (GPT-2 ``wpe``, BERT ``embeddings.position_embeddings``) or the native rotary module
(Llama ``rotary_emb``), and the config values it rewrites (``max_position_embeddings``, ``rope_parameters``,
``_attn_implementation``). The stash lives in the base model's ``__dict__``: the modules in it are not registered
submodules, so they are not saved, not trained and not moved by ``model.to()``; :func:`original_positions` moves
them to the model's current device (and dtype, if the model's dtype changed since) when it puts them back.
Inside the context the attention runs the original implementation (sdpa), which ignores the method; a Llama-style
model's absolute-method embedding hook (sinusoidal) is skipped. Everything is put back on exit, also on an
exception.

A model rebuilt by :func:`hf_posenc.from_pretrained` has no original to go back to (its saved checkpoint holds
no old table and the converted rope parameters): :func:`original_positions` refuses it.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from .arches.base import EmbedBeforeFirstLayer
from .config import is_converted

STASH = "_posenc_original"  # key in the base model's __dict__
ACTIVE = "_posenc_original_active"  # set in the base model's __dict__ while original_positions() is in force
_MISSING = object()  # a config attribute the model did not have


@dataclass
class Original:
    """What :func:`hf_posenc.convert` replaced. ``modules``: submodule path (under the base model) -> the
    original module, unregistered."""

    modules: dict[str, nn.Module] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)  # config attribute -> its original value
    dtype: torch.dtype | None = None  # the model's floating dtype the modules last matched
    rebuilt: bool = False  # built by from_pretrained from a converted checkpoint: no genuine original

    def __deepcopy__(self, memo):  # copy.deepcopy(model) copies the original modules with it
        return Original({k: copy.deepcopy(m, memo) for k, m in self.modules.items()},
                        {k: _copy(v, memo) for k, v in self.config.items()}, self.dtype, self.rebuilt)


def stash(model: nn.Module, spec, posenc) -> None:
    """Called by :func:`hf_posenc.convert` before it replaces anything: keep the native position modules and the
    config values conversion rewrites. ``spec``: the family's ArchSpec; ``posenc``: the PosEncConfig being
    applied (one that already knows the original limit comes from a saved converted checkpoint)."""
    base, config = model.base_model, model.config
    original = Original(rebuilt=getattr(posenc, "original_max_position_embeddings", None) is not None)
    for path in (spec.position_table, spec.rotary):
        if path:
            original.modules[path] = base.get_submodule(path)
    for name in ("max_position_embeddings", "rope_parameters"):
        original.config[name] = _copy(getattr(config, name, _MISSING))
    original.config["_attn_implementation"] = config._attn_implementation
    original.dtype = _floating_dtype(model)
    base.__dict__[STASH] = original


def in_force(base: nn.Module) -> bool:
    """True inside :func:`original_positions` of the model whose base model is ``base``."""
    return bool(base.__dict__.get(ACTIVE))


def stashed(model: nn.Module) -> Original | None:
    target = _pretrained(model)
    return target.base_model.__dict__.get(STASH)


@contextmanager
def original_positions(model: nn.Module) -> Iterator[nn.Module]:
    """Inside: ``model`` (converted by :func:`hf_posenc.convert`, or a PeftModel around one) computes what it
    computed before conversion; on exit (also on an exception) it is the converted model again. A model that was
    never converted is left as it is. Forward passes only: do not save, convert or train the model inside."""
    target = _pretrained(model)
    if not is_converted(target):
        yield model
        return
    original = stashed(target)
    if original is None:
        raise ValueError(f"{type(target).__name__} was converted without a record of its original position "
                         "encoding; convert the unconverted model with this hf_posenc")
    if original.rebuilt:
        raise ValueError(
            f"{type(target).__name__} was loaded from a converted checkpoint (hf_posenc.from_pretrained), which "
            "does not hold the original position encoding; load the unconverted checkpoint and convert it to have "
            "both")
    base, config = target.base_model, target.config
    _follow(original, target)
    replaced = {path: base.get_submodule(path) for path in original.modules}
    current = {name: getattr(config, name, _MISSING) for name in original.config}
    skipped = _skip_embed_hooks(base)
    base.__dict__[ACTIVE] = True  # the converted model's hooks leave the original's attn_implementation alone
    try:
        for path, module in original.modules.items():
            module.train(replaced[path].training)
            _set_submodule(base, path, module)
        for name, value in original.config.items():
            _set_config(config, name, _copy(value))
        yield model
    finally:
        base.__dict__.pop(ACTIVE, None)
        for path, module in replaced.items():
            _set_submodule(base, path, module)
        for name, value in current.items():
            _set_config(config, name, value)
        for hooks, key, hook in skipped:
            hooks[key] = hook


def _copy(value: Any, memo: dict | None = None) -> Any:
    return value if value is _MISSING else copy.deepcopy(value, memo)


def _pretrained(model: nn.Module) -> nn.Module:
    """The transformers model inside a PeftModel (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _floating_dtype(model: nn.Module) -> torch.dtype | None:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def _follow(original: Original, model: nn.Module) -> None:
    """Move the stashed modules to where the model is now: its device, and its dtype if ``model.to(dtype)`` changed
    it since (as that call would have cast them, buffers included, had they been registered)."""
    reference = model.get_input_embeddings().weight
    dtype = _floating_dtype(model)
    for module in original.modules.values():
        module.to(reference.device)
        if dtype is not None and dtype != original.dtype:
            module.to(dtype)
    original.dtype = dtype


def _skip_embed_hooks(base: nn.Module) -> list[tuple[dict, int, Any]]:
    """Swap the embedding hooks convert adds to a Llama-style model's first layer (absolute methods) for no-ops;
    returns what to put back. The hook dicts keep their keys and order."""
    skipped = []
    for module in base.modules():
        for key, hook in list(module._forward_pre_hooks.items()):
            if isinstance(hook, EmbedBeforeFirstLayer):
                skipped.append((module._forward_pre_hooks, key, hook))
                module._forward_pre_hooks[key] = _no_hook
    return skipped


def _no_hook(module, args, kwargs=None):
    return None


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _set_config(config, name: str, value: Any) -> None:
    if value is _MISSING:
        if name in config.__dict__:
            delattr(config, name)
    else:
        setattr(config, name, value)


__all__ = ["Original", "original_positions", "stash", "stashed"]
