"""Qwen3: Llama-style (native RoPE before the cache update, GQA) with RMS norms on each head's q and k, applied
before the rotary (so they see unrotated q / k under every method); optional sliding windows per layer."""

from .base import ArchSpec

QWEN3 = ArchSpec(
    family="qwen3",
    model_types=("qwen3",),
    attention_classes=("Qwen3Attention",),
    attention_kwargs=frozenset({"use_cache", "sliding_window"}),
    rotary="rotary_emb",
    decoder_layers="layers",
    head_classes=("Qwen3ForCausalLM", "Qwen3Model", "Qwen3ForSequenceClassification"),
)
