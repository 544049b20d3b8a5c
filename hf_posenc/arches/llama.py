"""Llama-style decoders (Llama, Mistral, Qwen2): native RoPE applied before the cache update, GQA."""

from .base import ArchSpec

LLAMA = ArchSpec(
    family="llama",
    model_types=("llama", "mistral", "qwen2"),
    attention_classes=("LlamaAttention", "MistralAttention", "Qwen2Attention"),
    attention_kwargs=frozenset({"use_cache", "sliding_window"}),  # sliding_window: Mistral, Qwen2
    rotary="rotary_emb",
    decoder_layers="layers",
    head_classes=("LlamaForCausalLM", "LlamaModel", "LlamaForSequenceClassification"),
)
