"""BERT: learned absolute ``embeddings.position_embeddings``, bidirectional (causal only as a decoder)."""

import torch

from .base import ArchSpec


def extend_bert_buffers(base_model, max_positions: int) -> None:
    """BertEmbeddings slices ``position_ids`` and gathers ``token_type_ids`` from buffers of the old length.
    Both are allocated before either is registered: if that fails, the model is unchanged."""
    embeddings = base_model.embeddings
    device = embeddings.position_ids.device
    position_ids = torch.arange(max_positions, device=device).expand((1, -1))
    token_type_ids = torch.zeros_like(position_ids)
    embeddings.register_buffer("position_ids", position_ids, persistent=False)
    embeddings.register_buffer("token_type_ids", token_type_ids, persistent=False)


BERT = ArchSpec(
    family="bert",
    model_types=("bert",),
    attention_classes=("BertSelfAttention",),
    attention_kwargs=frozenset({"encoder_hidden_states"}),
    encoder=True,
    position_table="embeddings.position_embeddings",
    extend_limit=extend_bert_buffers,
    head_classes=("BertForMaskedLM", "BertModel", "BertForSequenceClassification"),
)
