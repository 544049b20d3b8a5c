"""RoBERTa: BERT's layout with the learned table offset by the padding index: the first token sits at row
``padding_idx + 1`` (position ids are counted from the non-pad tokens), so ``max_position_embeddings - padding_idx - 1``
tokens fit. Bidirectional (causal only as a decoder)."""

from .base import ArchSpec
from .bert import extend_bert_buffers


def roberta_offset(config) -> int:
    return config.pad_token_id + 1


def roberta_position_ids(base_model, args: tuple, kwargs: dict, cache_length):
    """RoBERTa's own rule, from its embeddings module: non-pad tokens count from padding_idx + 1, pads sit at
    padding_idx (None for ``inputs_embeds``: key indices from padding_idx + 1, which the offset makes 0..L-1)."""
    input_ids = kwargs.get("input_ids", args[0] if args else None)  # RobertaModel(input_ids, ...)
    if input_ids is None:
        return None
    embeddings = base_model.embeddings
    return embeddings.create_position_ids_from_input_ids(input_ids, embeddings.padding_idx, cache_length)


ROBERTA = ArchSpec(
    family="roberta",
    model_types=("roberta",),
    attention_classes=("RobertaSelfAttention",),
    attention_kwargs=frozenset({"encoder_hidden_states"}),
    encoder=True,
    position_table="embeddings.position_embeddings",
    table_offset=roberta_offset,
    derive_position_ids=roberta_position_ids,
    extend_limit=extend_bert_buffers,  # the same position_ids / token_type_ids buffers as BERT
    head_classes=("RobertaForMaskedLM", "RobertaModel", "RobertaForSequenceClassification"),
)
