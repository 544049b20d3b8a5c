"""GPT-2: learned absolute table ``wpe`` (raises IndexError past n_positions), causal, MHA, Conv1D projections."""

from .base import ArchSpec

GPT2 = ArchSpec(
    family="gpt2",
    model_types=("gpt2",),
    attention_classes=("GPT2Attention",),
    attention_kwargs=frozenset({"use_cache"}),
    position_table="wpe",
    is_cross_attention=lambda module: module.is_cross_attention,
    lora_fan_in_fan_out=True,
    head_classes=("GPT2LMHeadModel", "GPT2Model", "GPT2ForSequenceClassification"),
)
