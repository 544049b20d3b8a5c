"""Gemma 3 (text): Gemma2's layout (GQA, ``scaling = query_pre_attn_scalar ** -0.5`` passed to the attention
function, sliding windows in the mask transformers builds per layer type, embeddings x sqrt(hidden_size)) with RMS
norms on each head's q and k (before the rotary, as Qwen3) and a rotary per layer type: ``config.rope_parameters``
holds one entry per type (270M: theta 10k on the sliding layers, 1M on the full-attention ones), and the rotary is
called with each layer's type. A rotary method replaces the rotary of the full-attention layers (and starts from
their theta and scaling); the sliding layers keep their own, whose window never reaches past the trained context.
Every other method replaces both. The multimodal ``gemma3`` (Gemma3ForConditionalGeneration) is refused."""

from .base import ArchSpec

MULTIMODAL = (
    "Gemma3ForConditionalGeneration (model_type 'gemma3') has a vision tower hf_posenc does not cover: convert a "
    "text-only Gemma 3 (Gemma3ForCausalLM, model_type 'gemma3_text': gemma-3-270m, gemma-3-1b), or build "
    "Gemma3ForCausalLM(config.text_config) and load the language model's weights into it"
)

GEMMA3 = ArchSpec(
    family="gemma3",
    model_types=("gemma3_text",),
    attention_classes=("Gemma3Attention",),
    attention_kwargs=frozenset({"sliding_window"}),
    rotary="rotary_emb",
    rope_layer_type="full_attention",
    decoder_layers="layers",
    token_embedding_scale=lambda config: config.hidden_size**0.5,  # Gemma3TextScaledWordEmbedding
    head_classes=("Gemma3ForCausalLM", "Gemma3TextModel", "Gemma3TextForSequenceClassification"),
    refused_model_types=(("gemma3", MULTIMODAL),),
)
