"""Llama-style (Llama, Mistral, Qwen2) + ``rope`` -> the family's own model with ``rope_parameters``.

``longrope`` (start_tokens 0) exports as transformers' ``rope_type: "longrope"``: the same full forwards; transformers
rotates keys before its cache, so a generation that crosses the trained context keeps the short factors on the keys
cached before the crossing, where hf_posenc re-rotates them (docs/export.md).

A converted Llama-style model with full rotary and a static transformers scaling (none, linear, yarn) already runs
the family's own rotary class, re-configured (see ``convert._native_rotary``): the export is the same weights under a config whose
``rope_parameters`` are :meth:`Rope.native_rope_parameters` (``max_position_embeddings``: see
:func:`.common.rope_limit`).
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from ..methods.rope import CHECKPOINT_BY_LENGTH, IN_PLACE_SCALINGS, NATIVE_SCALINGS
from .common import load_weights, plain_config, position_method, posenc, rope_limit, rope_parameters


def refusal(model: nn.Module) -> str | None:
    """None when the converted model runs the family's own rotary module (re-configured), else why not: every
    conversion that rotates in hf_posenc's attention instead (``rotate_in_attention``) is refused here."""
    return _options_refusal(posenc(model)["options"]) or _checkpoint_refusal(position_method(model))


def _options_refusal(options: dict) -> str | None:
    if options["fraction"] != 1.0:
        return (f"partial rotary (fraction={options['fraction']}): transformers' Llama-style attention rotates "
                "every dim of the head")
    if options["scaling"] not in NATIVE_SCALINGS:
        return f"scaling={options['scaling']!r} has no transformers rope_type (it is rotated by hf_posenc itself)"
    if options["scaling"] == "longrope":
        return _longrope_refusal(options)
    if options["scaling"] not in IN_PLACE_SCALINGS:
        return (f"scaling={options['scaling']!r} follows each input's length in hf_posenc (per row, no history); "
                "transformers' dynamic rotary keeps the longest length it has seen and rotates cached keys once, "
                "so a native export would differ past the trained context")
    return None


def _longrope_refusal(options: dict) -> str | None:
    """transformers' longrope picks short_factor or long_factor per call from max(position_ids) + 1, with no history:
    a full forward is hf_posenc's (rows of one length); LongRoPE's unscaled start tokens it has no field for."""
    if options.get("start_tokens"):
        return (f"start_tokens={options['start_tokens']}: transformers' longrope has no unscaled start tokens "
                "(convert with start_tokens=0 to export natively)")
    return None


def _checkpoint_refusal(method) -> str | None:
    """The checkpoint's own rotary (kept by the conversion) with what the options add to it; then anything else
    hf_posenc rotates itself, but for longrope (its own or the checkpoint's: transformers' equals it, see above)."""
    kind, scaling = method.checkpoint_kind, method.options.scaling
    if kind is not None and scaling is not None:
        return (f"scaling={scaling!r} on top of the checkpoint's own {kind!r} rotary has no transformers rope_type "
                "(no rope_type composes two scalings; hf_posenc rotates it itself)")
    if kind in CHECKPOINT_BY_LENGTH and kind != "longrope":
        return (f"the checkpoint's own {kind!r} rotary follows each input's length in hf_posenc (per row, no "
                "history); transformers' keeps state between calls and rotates cached keys once, so a native "
                "export would differ past the trained context")
    if method.rotate_in_attention and "longrope" not in (kind, scaling):
        return "hf_posenc rotates this model's queries and keys itself, not with the family's own rotary module"
    return None


def build(model: nn.Module) -> nn.Module:
    return build_with_rope(model, lambda own: rope_parameters(model))


def build_with_rope(model: nn.Module, rope_of: Callable[[dict], dict]) -> nn.Module:
    """The same weights in the family's own class under the plain config, with ``rope_parameters`` =
    ``rope_of(the plain config's own)`` and the export's limit (:func:`.common.rope_limit`)."""
    config = plain_config(model)
    config.rope_parameters = rope_of(config.rope_parameters)
    config.max_position_embeddings = rope_limit(model)
    config = type(config).from_dict(config.to_dict())  # validated as a fresh load would
    return load_weights(type(model)(config), dict(model.state_dict()))
