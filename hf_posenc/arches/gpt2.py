"""GPT-2: learned absolute table ``wpe`` (raises IndexError past n_positions), causal, MHA."""

from .base import ArchSpec

GPT2 = ArchSpec(
    family="gpt2",
    model_types=("gpt2",),
    attention_classes=("GPT2Attention",),
    position_table="wpe",
    is_cross_attention=lambda module: module.is_cross_attention,
    example_classes=("GPT2LMHeadModel", "GPT2Model", "GPT2ForSequenceClassification"),
)
