"""GPT-2 + ``alibi`` -> BLOOM (``BloomForCausalLM``): the same pre-LayerNorm block with ALiBi, once BLOOM's extra
LayerNorm on the word embeddings is made to change nothing downstream.

BLOOM computes GPT-2's block (x + attn(ln_1 x), then + mlp(ln_2 x); biases everywhere; tanh GELU; 4E MLP; 1/sqrt(D)
scaling) with the paper's ALiBi slopes added as slope * key_position, which under softmax equals -slope * (q - k)
for causal attention. What GPT-2 lacks is ``word_embeddings_layernorm``. :func:`identity_embedding_layernorm`
rescales each embedding row so that this LayerNorm returns the row minus its mean; the mean is invisible
downstream, because every reader of the residual stream (each block's ln_1 / ln_2 and ln_f) is a LayerNorm, which
subtracts it. The output head keeps GPT-2's own embedding matrix (untied). Fused qkv: BLOOM groups rows per head
[q_h | k_h | v_h], as GPT-NeoX does.
"""

from __future__ import annotations

import math

import torch
import transformers
from torch import nn

from .common import load_weights, plain_config, position_method, posenc
from .gpt2_neox import blocks_state

TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")  # BloomGelu is the tanh approximation


def refusal(model: nn.Module) -> str | None:
    config = model.config
    if posenc(model)["options"].get("slope_scale", 1.0) != 1.0:
        return "slope_scale != 1: BLOOM's ALiBi slopes are the paper's"
    ours = position_method(model).slopes().float().cpu()
    bloom = transformers.models.bloom.modeling_bloom._get_alibi_slopes(config.n_head, torch.device("cpu")).float()
    if not torch.allclose(ours, bloom, rtol=1e-6, atol=0):
        return f"hf_posenc's ALiBi slopes for {config.n_head} heads differ from BLOOM's"
    if config.activation_function not in TANH_GELUS:
        return f"activation_function={config.activation_function!r}: BLOOM's MLP is the tanh GELU"
    if config.n_inner not in (None, 4 * config.n_embd):
        return f"n_inner={config.n_inner}: BLOOM's MLP is 4 x hidden_size wide"
    if not config.scale_attn_weights or config.scale_attn_by_inverse_layer_idx or config.reorder_and_upcast_attn:
        return "GPT-2 attention scaling other than 1/sqrt(head_dim)"
    if config.add_cross_attention:
        return "GPT-2 with cross-attention"
    return None


def identity_embedding_layernorm(embeddings: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(table (V, E), LayerNorm weight (E,)) such that LayerNorm(table[t]) = embeddings[t] - mean(embeddings[t]).

    Row t scaled by k_t = sqrt(eps / (G^2 - v_t)) (v_t its variance, G^2 > max v) has variance k_t^2 v_t, and a
    LayerNorm of weight G maps it to (e_t - m_t) G k_t / sqrt(k_t^2 v_t + eps) = e_t - m_t."""
    rows = embeddings.detach().double()
    variance = rows.var(dim=-1, unbiased=False)  # (V,)
    gain = math.sqrt(2.0 * float(variance.max())) or 1.0
    scale = torch.sqrt(eps / (gain**2 - variance))
    table = (rows * scale[:, None]).to(embeddings.dtype)
    return table, torch.full((rows.shape[-1],), gain, dtype=embeddings.dtype)


def bloom_config(model: nn.Module) -> transformers.BloomConfig:
    source = plain_config(model)
    return transformers.BloomConfig(
        vocab_size=source.vocab_size, hidden_size=source.n_embd, n_layer=source.n_layer, n_head=source.n_head,
        layer_norm_epsilon=source.layer_norm_epsilon, apply_residual_connection_post_layernorm=False,
        hidden_dropout=source.resid_pdrop, attention_dropout=source.attn_pdrop, pretraining_tp=1,
        slow_but_exact=False, tie_word_embeddings=False, bos_token_id=source.bos_token_id,
        eos_token_id=source.eos_token_id, pad_token_id=source.pad_token_id, architectures=["BloomForCausalLM"],
    )


BLOOM_NAMES = {"ln_1": "input_layernorm", "ln_2": "post_attention_layernorm",
               "qkv": "self_attention.query_key_value", "attn_out": "self_attention.dense", "fc": "mlp.dense_h_to_4h",
               "proj": "mlp.dense_4h_to_h"}


def bloom_state(model: nn.Module, heads: int) -> dict[str, torch.Tensor]:
    gpt2 = model.base_model
    table, gain = identity_embedding_layernorm(gpt2.wte.weight, model.config.layer_norm_epsilon)
    state = {"transformer.word_embeddings.weight": table, "transformer.word_embeddings_layernorm.weight": gain,
             "transformer.word_embeddings_layernorm.bias": torch.zeros_like(gain),
             "transformer.ln_f.weight": gpt2.ln_f.weight, "transformer.ln_f.bias": gpt2.ln_f.bias,
             "lm_head.weight": model.lm_head.weight, **blocks_state(model, heads, "transformer.h", BLOOM_NAMES)}
    return {name: tensor.detach().contiguous() for name, tensor in state.items()}


def build(model: nn.Module) -> nn.Module:
    config = bloom_config(model)
    target = transformers.BloomForCausalLM(config).to(model.dtype)
    return load_weights(target, bloom_state(model, config.n_head))
