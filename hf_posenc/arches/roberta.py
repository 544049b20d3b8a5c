"""RoBERTa: BERT's layout with the learned table offset by the padding index: the first token sits at row
``padding_idx + 1`` (position ids are counted from the non-pad tokens), so ``max_position_embeddings - padding_idx - 1``
tokens fit. Bidirectional (causal only as a decoder)."""

from .base import ArchSpec
from .bert import extend_bert_buffers


def roberta_offset(config) -> int:
    return config.pad_token_id + 1


ROBERTA = ArchSpec(
    family="roberta",
    model_types=("roberta",),
    attention_classes=("RobertaSelfAttention",),
    attention_kwargs=frozenset({"encoder_hidden_states"}),
    encoder=True,
    position_table="embeddings.position_embeddings",
    table_offset=roberta_offset,
    extend_limit=extend_bert_buffers,  # the same position_ids / token_type_ids buffers as BERT
    head_classes=("RobertaForMaskedLM", "RobertaModel", "RobertaForSequenceClassification"),
)
