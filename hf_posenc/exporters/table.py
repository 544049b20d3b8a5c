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

from . import gpt2_neox, llama_rope, bert_roformer


@dataclass(frozen=True)
class NativeMapping:
    family: str
    method: str
    target: str  # what the export is, in words (for errors, the README and docs/export.md)
    head_classes: tuple[str, ...] | None  # source classes it covers; None = every class of the family
    refusal: Callable[[nn.Module], str | None]
    build: Callable[[nn.Module], nn.Module]


NATIVE: dict[tuple[str, str], NativeMapping] = {
    ("llama", "rope"): NativeMapping(
        "llama", "rope", "the family's own config with rope_parameters", None, llama_rope.refusal, llama_rope.build),
    ("gpt2", "rope"): NativeMapping(
        "gpt2", "rope", "GPT-NeoX (GPTNeoXForCausalLM, use_parallel_residual=False)", ("GPT2LMHeadModel",),
        gpt2_neox.refusal, gpt2_neox.build),
    ("bert", "rope"): NativeMapping(
        "bert", "rope", "RoFormer (RoFormerForMaskedLM)", ("BertForMaskedLM",), bert_roformer.refusal,
        bert_roformer.build),
}

NOT_NATIVE: dict[tuple[str, str], str] = {
    ("gpt2", "alibi"): (
        "no exact native target: transformers' MPT has no biases at all (bias-free linears, LayerNorms without "
        "bias, exact-erf GELU where GPT-2 has the tanh one), so GPT-2's query, MLP and final LayerNorm biases cannot "
        "be expressed (the final one adds W_emb @ beta to the logits, and MPT's lm_head has no bias); BLOOM puts a "
        "LayerNorm on the word embeddings, which GPT-2 has not and which is not an identity"
    ),
}


def native_pairs() -> str:
    """The natively exportable pairs, in words (for error messages)."""
    return "; ".join(f"{m.family} + {m.method} -> {m.target}" for m in NATIVE.values())
