"""Gemma 3 + ``rope`` -> Gemma 3's own model with ``rope_parameters`` per layer type.

A converted Gemma 3 with full rotary and a static transformers scaling (none, linear, yarn) runs Gemma 3's own
rotary class, re-configured on its full-attention layers only (the sliding layers keep theirs: see
``convert._native_rotary``): the export is the same weights under a config whose ``full_attention`` entry is
:meth:`Rope.native_rope_parameters` and whose ``sliding_attention`` entry is the checkpoint's own. When it is exact
is Llama-style's rule (:mod:`.llama_rope`).
"""

from __future__ import annotations

from torch import nn

from ..registry import arch_for
from .common import load_weights, plain_config, rope_limit, rope_parameters
from .llama_rope import refusal  # noqa: F401 - the same conditions: full rotary, a static transformers scaling


def build(model: nn.Module) -> nn.Module:
    config = plain_config(model)
    config.rope_parameters = {**config.rope_parameters, arch_for(config).rope_layer_type: rope_parameters(model)}
    config.max_position_embeddings = rope_limit(model)
    config = type(config).from_dict(config.to_dict())  # validated as a fresh load would
    return load_weights(type(model)(config), dict(model.state_dict()))
