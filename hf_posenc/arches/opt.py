"""OPT: learned absolute table ``decoder.embed_positions`` (an nn.Embedding that adds its own row offset of 2 and
raises past max_position_embeddings), causal, MHA; queries are scaled before the attention call (``scaling=1``)."""

import torch

from .base import ArchSpec


def opt_table_call(attention_mask: torch.Tensor, cache_length: int = 0,
                   position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """``OPTLearnedPositionalEmbedding.forward``'s parameters -> its 0-based position ids (OPTDecoder passes them;
    without, OPT's own rule: count the attended tokens)."""
    if position_ids is None:
        position_ids = (torch.cumsum(attention_mask, dim=1) * attention_mask - 1).long()[:, cache_length:]
    return position_ids


def opt_position_ids(base_model, args: tuple, kwargs: dict, cache_length) -> torch.Tensor | None:
    """OPT's own rule for the position ids of a forward given none: count the attended tokens of the 2-D mask
    (None without one: key indices, as OPT computes them)."""
    mask = kwargs.get("attention_mask")
    if mask is None or mask.dim() != 2:
        return None
    return opt_table_call(mask, cache_length)


def opt_first_row(config) -> int:
    return 2  # OPTLearnedPositionalEmbedding.offset: it looks up position_ids + 2


OPT = ArchSpec(
    family="opt",
    model_types=("opt",),
    attention_classes=("OPTAttention",),
    position_table="decoder.embed_positions",
    table_call=opt_table_call,
    table_first_row=opt_first_row,
    derive_position_ids=opt_position_ids,
    forward_root="decoder",  # OPTForCausalLM calls model.decoder, not model
    packs_by_position_ids=False,  # OPTDecoder builds its causal mask without position_ids
    head_classes=("OPTForCausalLM", "OPTModel", "OPTForSequenceClassification"),
)
