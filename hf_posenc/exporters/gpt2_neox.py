"""GPT-2 + ``rope`` -> GPT-NeoX (``GPTNeoXForCausalLM``): the same block with a sequential residual.

GPT-NeoX with ``use_parallel_residual=False`` computes GPT-2's block (x + attn(ln_1 x), then + mlp(ln_2 x)), with
biases everywhere, the same activation, 1/sqrt(D) attention scaling and transformers' rotate-half rotary on the
first ``partial_rotary_factor`` of each head, which is hf_posenc's rotary on GPT-2. Re-layout: GPT-2's Conv1D
weights are (in, out), NeoX's Linear (out, in); GPT-2's fused qkv is [q | k | v] (each H x D), NeoX's is per head
[q_h | k_h | v_h].

Dynamic scalings are not exact: transformers' dynamic NTK keeps its largest frequencies between calls and NeoX
rotates keys before the cache, while hf_posenc's follow each input's length (keys re-rotated each step).
"""

from __future__ import annotations

import torch
import transformers
from torch import nn

from ..methods.rope import rotary_dim
from .common import load_weights, plain_config, posenc, rope_limit, rope_parameters

STATIC_SCALINGS = (None, "linear", "yarn")  # frequencies that do not depend on the input


def refusal(model: nn.Module) -> str | None:
    config, options = model.config, posenc(model)["options"]
    if options["scaling"] not in STATIC_SCALINGS:
        return (f"scaling={options['scaling']!r} follows the input length; GPT-NeoX's dynamic rotary keeps state "
                "between calls and rotates cached keys once, so generation would differ")
    head_dim = config.n_embd // config.n_head
    if int(head_dim * options["fraction"]) != rotary_dim(head_dim, options["fraction"]):
        return (f"fraction={options['fraction']} gives an odd number of rotary dims of {head_dim}; GPT-NeoX would "
                "rotate one dim more than hf_posenc")
    if not config.scale_attn_weights or config.scale_attn_by_inverse_layer_idx:
        return "GPT-2 attention scaling other than 1/sqrt(head_dim) (scale_attn_weights / scale_attn_by_inverse_layer_idx)"
    if config.add_cross_attention:
        return "GPT-2 with cross-attention"
    return None


def neox_config(model: nn.Module) -> transformers.GPTNeoXConfig:
    source = plain_config(model)
    return transformers.GPTNeoXConfig(
        vocab_size=source.vocab_size, hidden_size=source.n_embd, num_hidden_layers=source.n_layer,
        num_attention_heads=source.n_head, intermediate_size=source.n_inner or 4 * source.n_embd,
        hidden_act=source.activation_function, max_position_embeddings=rope_limit(model),
        layer_norm_eps=source.layer_norm_epsilon, use_parallel_residual=False, attention_bias=True,
        rope_parameters=rope_parameters(model),
        attention_dropout=source.attn_pdrop, hidden_dropout=source.resid_pdrop,
        tie_word_embeddings=source.tie_word_embeddings, bos_token_id=source.bos_token_id,
        eos_token_id=source.eos_token_id, pad_token_id=source.pad_token_id, architectures=["GPTNeoXForCausalLM"],
    )


def fused_qkv(weight: torch.Tensor, bias: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GPT-2 c_attn (in, 3E) / (3E,) -> NeoX query_key_value (3E, in) / (3E,), rows grouped per head."""
    in_dim = weight.shape[0]
    weight = weight.t().reshape(3, heads, -1, in_dim).transpose(0, 1).reshape(-1, in_dim)
    bias = bias.reshape(3, heads, -1).transpose(0, 1).reshape(-1)
    return weight.contiguous(), bias.contiguous()


def block_tensors(block: nn.Module, heads: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """One GPT-2 block's (weight, bias) per role, re-laid out as (out, in) Linears (Conv1D stores (in, out)), the
    fused qkv grouped per head: what GPT-NeoX and BLOOM both read."""
    qkv_weight, qkv_bias = fused_qkv(block.attn.c_attn.weight, block.attn.c_attn.bias, heads)
    return {
        "ln_1": (block.ln_1.weight, block.ln_1.bias), "ln_2": (block.ln_2.weight, block.ln_2.bias),
        "qkv": (qkv_weight, qkv_bias), "attn_out": (block.attn.c_proj.weight.t(), block.attn.c_proj.bias),
        "fc": (block.mlp.c_fc.weight.t(), block.mlp.c_fc.bias),
        "proj": (block.mlp.c_proj.weight.t(), block.mlp.c_proj.bias),
    }


def blocks_state(model: nn.Module, heads: int, prefix: str, names: dict[str, str]) -> dict[str, torch.Tensor]:
    """Every block's tensors under ``prefix.<i>.<names[role]>.weight / .bias``."""
    state = {}
    for i, block in enumerate(model.base_model.h):
        for role, (weight, bias) in block_tensors(block, heads).items():
            state[f"{prefix}.{i}.{names[role]}.weight"] = weight
            state[f"{prefix}.{i}.{names[role]}.bias"] = bias
    return state


NEOX_NAMES = {"ln_1": "input_layernorm", "ln_2": "post_attention_layernorm", "qkv": "attention.query_key_value",
              "attn_out": "attention.dense", "fc": "mlp.dense_h_to_4h", "proj": "mlp.dense_4h_to_h"}


def neox_state(model: nn.Module, heads: int) -> dict[str, torch.Tensor]:
    gpt2 = model.base_model
    state = {"gpt_neox.embed_in.weight": gpt2.wte.weight, "lm_head.weight": model.lm_head.weight,
             "gpt_neox.final_layer_norm.weight": gpt2.ln_f.weight, "gpt_neox.final_layer_norm.bias": gpt2.ln_f.bias,
             **blocks_state(model, heads, "gpt_neox.layers", NEOX_NAMES)}
    return {name: tensor.detach().contiguous() for name, tensor in state.items()}


def build(model: nn.Module) -> nn.Module:
    config = neox_config(model)
    target = transformers.GPTNeoXForCausalLM(config).to(model.dtype)
    return load_weights(target, neox_state(model, config.num_attention_heads))
