"""Which (family, method) pairs have an exact native transformers equivalent, declared as data.

Each :class:`NativeMapping` names the target architecture and two functions of its own file: ``refusal(model)``
(None when this converted model maps exactly, else the reason it does not: an option the target cannot express)
and ``build(model)`` (the target model, in memory, with the converted model's weights re-laid out). Pairs without
a row export to ONNX; :data:`NOT_NATIVE` says why the pairs one might expect here are not exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from . import bert_roformer, gemma3_rope, gpt2_bloom, gpt2_neox, llama_rope


@dataclass(frozen=True)
class NativeMapping:
    family: str
    method: str
    target: str  # what the export is, in words (for errors, the README and docs/export.md)
    head_classes: tuple[str, ...] | None  # source classes it covers; None = every class of the family
    refusal: Callable[[nn.Module], str | None]
    build: Callable[[nn.Module], nn.Module]
    # the target's forward takes position_ids (the self-check then probes far positions with 24 tokens, probe.py)
    takes_position_ids: bool


NATIVE: dict[tuple[str, str], NativeMapping] = {
    ("llama", "rope"): NativeMapping(
        "llama", "rope", "the family's own config with rope_parameters", None, llama_rope.refusal, llama_rope.build,
        takes_position_ids=True),
    ("gemma3", "rope"): NativeMapping(
        "gemma3", "rope", "Gemma 3's own config, rope_parameters of its full-attention layers", None,
        gemma3_rope.refusal, gemma3_rope.build, takes_position_ids=True),
    ("gpt2", "rope"): NativeMapping(
        "gpt2", "rope", "GPT-NeoX (GPTNeoXForCausalLM, use_parallel_residual=False)", ("GPT2LMHeadModel",),
        gpt2_neox.refusal, gpt2_neox.build, takes_position_ids=True),
    ("gpt2", "alibi"): NativeMapping(
        "gpt2", "alibi", "BLOOM (BloomForCausalLM; embedding LayerNorm made an identity up to the mean)",
        ("GPT2LMHeadModel",), gpt2_bloom.refusal, gpt2_bloom.build, takes_position_ids=False),  # from the mask
    ("bert", "rope"): NativeMapping(
        "bert", "rope", "RoFormer (RoFormerForMaskedLM)", ("BertForMaskedLM",), bert_roformer.refusal,
        bert_roformer.build, takes_position_ids=False),  # positions are key indices
}

NOT_NATIVE: dict[tuple[str, str], str] = {}  # pairs one might expect natively that have no exact target


def native_pairs() -> str:
    """The natively exportable pairs, in words (for error messages)."""
    return "; ".join(f"{m.family} + {m.method} -> {m.target}" for m in NATIVE.values())
