"""Gemma2: Llama-style native RoPE and GQA, plus attention logit soft-capping (``softcap``: the eager kernel caps the
content scores, then adds the position bias), sliding windows on alternate layers (in the mask transformers builds
per layer type) and ``scaling = query_pre_attn_scalar ** -0.5`` (passed to the attention function)."""

from .base import ArchSpec

GEMMA2 = ArchSpec(
    family="gemma2",
    model_types=("gemma2",),
    attention_classes=("Gemma2Attention",),
    attention_kwargs=frozenset({"sliding_window", "softcap"}),
    rotary="rotary_emb",
    decoder_layers="layers",
    token_embedding_scale=lambda config: config.hidden_size**0.5,  # Gemma2ScaledWordEmbedding
    head_classes=("Gemma2ForCausalLM", "Gemma2Model", "Gemma2ForSequenceClassification"),
)
