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
from .common import rope_parameters
from .llama_rope import build_with_rope, refusal  # noqa: F401 - refusal: the same conditions (full rotary, static scaling)


def build(model: nn.Module) -> nn.Module:
    layer_type = arch_for(model.config).rope_layer_type  # the full-attention entry; the sliding one stays
    return build_with_rope(model, lambda own: {**own, layer_type: rope_parameters(model)})
