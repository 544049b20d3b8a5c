"""The inputs of the export-time self-check: positions past every threshold of the converted model.

A converted model computes something new past each of its thresholds (:func:`.common.thresholds`: the old limit,
a rope scaling's trained context, FIRE's threshold, a clip distance), so a probe that stops short of one checks
nothing there (a 24-token probe passed a native export that differed by 9 in the logits at 48 tokens). The probe
reaches ``end - 1``, at least MARGIN past the largest threshold (within the model's limit):

- where the export takes ``position_ids`` (Llama-style and GPT-NeoX exports, the ONNX graph of most families), 24
  tokens at positions 0..11 and end - 12..end - 1: both the positions and the distances pass every threshold, at
  the cost of 24 tokens whatever the thresholds (a 128k-context model included);
- otherwise (BLOOM, RoFormer, the ONNX graph of OPT / RoBERTa), ``end`` consecutive tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from .common import posenc, thresholds

PROBE_TOKENS = 24  # tokens of a probe with position ids
MARGIN = 8  # positions past the largest threshold


def probe_end(model: nn.Module) -> int:
    """One past the probe's last position: MARGIN past every threshold, at most the converted model's limit."""
    limit = posenc(model)["max_position_embeddings"]
    return min(limit, max(PROBE_TOKENS, max(thresholds(model).values()) + MARGIN))


def probe_positions(model: nn.Module, takes_position_ids: bool) -> torch.Tensor:
    """(L,) long: the probe's positions (see the module doc)."""
    end = probe_end(model)
    if not takes_position_ids or end <= PROBE_TOKENS:
        return torch.arange(end)
    head = PROBE_TOKENS // 2
    return torch.cat([torch.arange(head), torch.arange(end - (PROBE_TOKENS - head), end)])


def probe_inputs(model: nn.Module, takes_position_ids: bool) -> dict[str, torch.Tensor]:
    """The probe as model keyword arguments, batch 1, on the model's device: ``input_ids``, ``attention_mask``
    and, where the export takes them, ``position_ids``."""
    positions = probe_positions(model, takes_position_ids)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, model.config.vocab_size, (1, positions.numel()), generator=generator)
    device = next(model.parameters()).device
    inputs = {"input_ids": input_ids.to(device), "attention_mask": torch.ones_like(input_ids, device=device)}
    if takes_position_ids:
        inputs["position_ids"] = positions[None].to(device)
    return inputs
