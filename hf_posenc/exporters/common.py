"""What every export reads from a converted model, and how a target model gets its weights."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from .. import hub_code
from ..convert import METHOD_MODULE
from ..registry import arch_for


def posenc(model: nn.Module) -> dict:
    """The converted model's ``config.posenc`` (method, resolved options, limits)."""
    return model.config.posenc


def family(model: nn.Module) -> str:
    return arch_for(model.config).family


def position_method(model: nn.Module):
    return getattr(model.base_model, METHOD_MODULE)


def plain_config(model: nn.Module):
    """A copy of a converted model's config as the family's own class, without ``posenc`` (and without Auto-loading
    leftovers); its position limit is the new one."""
    config = hub_code.plain_config(model.config)
    del config.posenc
    return config


def load_weights(target: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Copy ``state`` into ``target``: every tensor the target has must be given, with its shape (strict)."""
    missing, unexpected = target.load_state_dict(state, strict=False)
    tied = {name for name, _ in target.named_parameters(remove_duplicate=False)} - set(target.state_dict())
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(  # a bug in a mapping, not bad input
            f"export to {type(target).__name__}: missing weights {missing}, unexpected weights {unexpected}"
        )
    if getattr(target.config, "tie_word_embeddings", False):
        target.tie_weights()
    return target.eval()


# the rope_types whose transformers init reads ``rope_parameters["original_max_position_embeddings"]`` as the trained
# context (a fresh load fills a missing one with ``max_position_embeddings``: wrong frequencies, no error)
READS_TRAINED_CONTEXT = ("yarn", "llama3", "longrope")


def rope_parameters(model: nn.Module) -> dict:
    """transformers' ``rope_parameters`` for the converted model's rope options, in the form a fresh load reads
    without warnings: ``partial_rotary_factor`` always written (GPT-NeoX's default is 0.25), the trained context
    only where the rope_type reads it (:data:`READS_TRAINED_CONTEXT`; dynamic NTK reads ``max_position_embeddings``)."""
    params = dict(position_method(model).native_rope_parameters())
    params["partial_rotary_factor"] = float(posenc(model)["options"]["fraction"])
    if params["rope_type"] not in READS_TRAINED_CONTEXT:
        params.pop("original_max_position_embeddings", None)
    return params


def rope_limit(model: nn.Module) -> int:
    """``max_position_embeddings`` of a rope export, as transformers reads it per rope_type: dynamic NTK takes it as
    the trained context (hf_posenc's ``original_max_positions``, which may differ from the model's old limit);
    yarn checks it against factor x trained context (and warns otherwise); the others ignore it, and get the
    converted model's limit."""
    entry = posenc(model)
    options = entry["options"]
    trained = options["original_max_positions"]  # the context the scaling is relative to (not the old limit)
    if options["scaling"] == "dynamic":
        return trained
    if options["scaling"] == "yarn" and float(options["factor"] * trained).is_integer():
        return int(options["factor"] * trained)
    return entry["max_position_embeddings"]


def _option(name: str) -> Callable[[nn.Module], float | None]:
    return lambda model: posenc(model)["options"].get(name)


def _checkpoint_context(model: nn.Module) -> float | None:
    """The trained context of a checkpoint's own scaled rotary (``checkpoint_rope``), where it names one."""
    return (posenc(model)["options"].get("checkpoint_rope") or {}).get("original_max_position_embeddings")


def _fire_threshold(model: nn.Module) -> float:
    """FIRE's threshold |L| as it is now (learnable: not the option's initial value)."""
    return abs(float(position_method(model).threshold.detach()))


# the positions (or distances) past which each method computes something it does not compute below them; every
# method also has the model's old limit. The export's self-check runs past all of them (probe.py). self_extend and
# rerope (their window) are not exported at all
METHOD_THRESHOLDS: dict[str, dict[str, Callable[[nn.Module], float | None]]] = {
    "rope": {"original_max_positions": _option("original_max_positions"),
             "the checkpoint rotary's original_max_position_embeddings": _checkpoint_context},
    "t5": {"max_distance": _option("max_distance")},
    "shaw": {"max_distance": _option("max_distance")},
    "fire": {"threshold": _fire_threshold},
}


def thresholds(model: nn.Module) -> dict[str, int]:
    """Name -> the position (or distance) where the converted model's position function changes regime: the
    model's old limit, and each of its method's (:data:`METHOD_THRESHOLDS`)."""
    entry = posenc(model)
    found = {"the model's old limit": int(entry["original_max_position_embeddings"])}
    for name, read in METHOD_THRESHOLDS.get(entry["method"], {}).items():
        value = read(model)
        if value is not None:
            found[name] = math.ceil(value)
    return found
