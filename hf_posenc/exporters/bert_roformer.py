"""BERT + ``rope`` -> RoFormer (``RoFormerForMaskedLM``): BERT's encoder and MLM head with rotary q / k.

RoFormer's modules and weight names are BERT's (``bert.`` -> ``roformer.``), with no position table and no
pooler. Its rotary is fixed: theta 10000, every dim, no scaling, and the *interleaved* convention (pairs (2i,
2i+1) rotate at frequency i), where hf_posenc rotates half against half (pairs (i, i + D/2)). A dot product is
unchanged when q and k are permuted alike, so the query and key rows of each head are reordered: RoFormer's dim
2i is hf_posenc's dim i, dim 2i+1 is dim i + D/2.
"""

from __future__ import annotations

import torch
import transformers
from torch import nn

from .common import load_weights, plain_config, posenc

ROFORMER_THETA = 10000.0


def refusal(model: nn.Module) -> str | None:
    options = posenc(model)["options"]
    if options["theta"] != ROFORMER_THETA:
        return f"theta={options['theta']}: RoFormer's rotary has theta {ROFORMER_THETA:g}"
    if options["fraction"] != 1.0:
        return f"partial rotary (fraction={options['fraction']}): RoFormer rotates every dim"
    if options["scaling"] is not None:
        return f"scaling={options['scaling']!r}: RoFormer's rotary has no scaling"
    if model.config.is_decoder or model.config.add_cross_attention:
        return "a BERT decoder / cross-attention"
    return None


def roformer_config(model: nn.Module) -> transformers.RoFormerConfig:
    source = plain_config(model)
    return transformers.RoFormerConfig(
        vocab_size=source.vocab_size, embedding_size=source.hidden_size, hidden_size=source.hidden_size,
        num_hidden_layers=source.num_hidden_layers, num_attention_heads=source.num_attention_heads,
        intermediate_size=source.intermediate_size, hidden_act=source.hidden_act,
        hidden_dropout_prob=source.hidden_dropout_prob,
        attention_probs_dropout_prob=source.attention_probs_dropout_prob,
        max_position_embeddings=posenc(model)["max_position_embeddings"], type_vocab_size=source.type_vocab_size,
        layer_norm_eps=source.layer_norm_eps, pad_token_id=source.pad_token_id, rotary_value=False,
        tie_word_embeddings=source.tie_word_embeddings, architectures=["RoFormerForMaskedLM"],
    )


def interleaving(head_dim: int) -> torch.Tensor:
    """(D,) source dim of each RoFormer dim: [0, D/2, 1, D/2 + 1, ...]."""
    return torch.arange(head_dim).reshape(2, head_dim // 2).t().reshape(-1)


def permuted_rows(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """A query / key Linear weight (H*D, in) or bias (H*D,), rows reordered within each head."""
    head_dim = tensor.shape[0] // heads
    grouped = tensor.reshape(heads, head_dim, *tensor.shape[1:])
    return grouped[:, interleaving(head_dim)].reshape(tensor.shape)


def roformer_state(model: nn.Module, target: nn.Module, heads: int) -> dict[str, torch.Tensor]:
    source = model.state_dict()
    prefix = model.base_model_prefix + "."
    state = {}
    for name in target.state_dict():
        if name.endswith("embed_positions.weight"):  # RoFormer's own sinusoidal table, as its init built it
            continue
        tensor = source[prefix + name.removeprefix("roformer.") if name.startswith("roformer.") else name]
        if ".attention.self.query." in name or ".attention.self.key." in name:
            tensor = permuted_rows(tensor, heads)
        state[name] = tensor.detach().contiguous()
    state.update({n: t for n, t in target.state_dict().items() if n.endswith("embed_positions.weight")})
    return state


def build(model: nn.Module) -> nn.Module:
    config = roformer_config(model)
    target = transformers.RoFormerForMaskedLM(config).to(model.dtype)
    return load_weights(target, roformer_state(model, target, config.num_attention_heads))
