"""What every export reads from a converted model, and how a target model gets its weights."""

from __future__ import annotations

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


def rope_parameters(model: nn.Module) -> dict:
    """transformers' ``rope_parameters`` for the converted model's rope options, in the form a fresh load reads
    without warnings: ``partial_rotary_factor`` always written (GPT-NeoX's default is 0.25), the trained context
    only where the rope_type reads it (yarn; dynamic NTK reads ``max_position_embeddings``)."""
    params = dict(position_method(model).native_rope_parameters())
    params["partial_rotary_factor"] = float(posenc(model)["options"]["fraction"])
    if params["rope_type"] != "yarn":
        params.pop("original_max_position_embeddings", None)
    return params


def rope_limit(model: nn.Module) -> int:
    """``max_position_embeddings`` of a rope export, as transformers reads it per rope_type: dynamic NTK takes it as
    the trained context (as hf_posenc's own rotary did); yarn checks it against factor x trained context (and warns
    otherwise); the others ignore it, and get the converted model's limit."""
    entry = posenc(model)
    options, trained = entry["options"], entry["original_max_position_embeddings"]
    if options["scaling"] == "dynamic":
        return trained
    if options["scaling"] == "yarn" and float(options["factor"] * trained).is_integer():
        return int(options["factor"] * trained)
    return entry["max_position_embeddings"]
