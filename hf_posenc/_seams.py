"""Every transformers internal hf_posenc relies on, imported in one place.

If transformers moves one of these, the import here fails with a message naming the internal, and
``tests/test_seams.py`` says which behaviour broke. Tested range: transformers >=5,<6.
"""

from __future__ import annotations

import importlib
import inspect


def _internal(module: str, name: str):
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:  # pragma: no cover - only on an unsupported transformers
        import transformers

        raise ImportError(
            f"hf_posenc needs the transformers internal `{module}.{name}`, which transformers "
            f"{transformers.__version__} does not have. hf_posenc is tested with transformers>=5,<6."
        ) from err


AttentionInterface = _internal("transformers.modeling_utils", "AttentionInterface")
AttentionMaskInterface = _internal("transformers.masking_utils", "AttentionMaskInterface")
sdpa_mask = _internal("transformers.masking_utils", "sdpa_mask")
sdpa_attention_forward = _internal("transformers.integrations.sdpa_attention", "sdpa_attention_forward")
repeat_kv = _internal("transformers.integrations.sdpa_attention", "repeat_kv")
ROPE_INIT_FUNCTIONS = _internal("transformers.modeling_rope_utils", "ROPE_INIT_FUNCTIONS")
_T5Attention = _internal("transformers.models.t5.modeling_t5", "T5Attention")
# the model-level keyword arguments every layer threads through to the attention function
TransformersKwargs = _internal("transformers.utils.generic", "TransformersKwargs")
_active_collector = _internal("transformers.utils.output_capturing", "_active_collector")
EncoderDecoderCache = _internal("transformers.cache_utils", "EncoderDecoderCache")
StaticLayer = _internal("transformers.cache_utils", "StaticLayer")
# a model's forward takes its KV cache as ``cache=`` from transformers 5.24 (``past_key_values=`` before; 5.24 still
# takes the old name with a deprecation warning, removed in 5.40)
CACHE_KEYWORD = "cache" if "cache" in inspect.signature(
    _internal("transformers.models.llama.modeling_llama", "LlamaModel").forward).parameters else "past_key_values"
# from_pretrained logs its missing / unexpected / mismatched keys as one warning, on this logger, with this marker
LOAD_REPORT_LOGGER = "transformers.modeling_utils"
LOAD_REPORT_MARKER = "LOAD REPORT"


def t5_relative_position_bucket(relative_position, bidirectional: bool, num_buckets: int, max_distance: int):
    """transformers' T5 bucketing of ``relative_position = key_pos - query_pos`` (any shape, long)."""
    return _T5Attention._relative_position_bucket(
        relative_position, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
    )


def attention_weights_requested() -> bool:
    """True inside a forward called with ``output_attentions=True`` (transformers' output collector)."""
    collected = _active_collector.get()
    return collected is not None and "attentions" in collected


# KV caches (hf_posenc.key_cache): attention modules write their new keys with ``cache.update(keys, values,
# layer_idx, ...)`` (looked up on the instance) just before the attention function; ``cache.layers`` holds one
# layer cache per decoder layer, whose ``keys`` (B, Hkv, n, D) a dynamic layer replaces on each write.
def cache_layers(cache) -> list:
    return list(cache.layers)


def layer_keys(layer) -> "torch.Tensor | None":
    """The (B, Hkv, n, D) keys a layer cache holds; None when it holds none."""
    keys = layer.keys if layer.is_initialized else None
    return keys if keys is not None and keys.dim() == 4 and keys.shape[-2] > 0 else None


def set_layer_keys(layer, keys) -> None:
    layer.keys = keys


def static_capacity(cache) -> int | None:
    """The slot count of a cache whose every layer is a plain static layer (the i-th key written goes to slot i,
    ``get_seq_length()`` is a tensor: the count written); None for any other cache (dynamic, sliding)."""
    layers = list(cache.layers)
    if not layers or not all(isinstance(layer, StaticLayer) and not layer.is_sliding for layer in layers):
        return None
    return layers[0].max_cache_len


# transformers' RoPE init functions (``ROPE_INIT_FUNCTIONS[rope_type](config, device, seq_len=...)``) read
# ``config.rope_parameters`` (rope_theta, factor, original_max_position_embeddings, ...), ``head_dim`` (else
# hidden_size // num_attention_heads) and, for the dynamic types, ``max_position_embeddings`` as the trained context;
# they return (inverse frequencies (head_dim * partial_rotary_factor / 2,), cos/sin scale)
def rope_init_config(rope_parameters: dict, head_dim: int, num_heads: int, max_positions: int):
    """A throwaway config in the form those functions read (its own copy of ``rope_parameters``)."""
    import copy

    from transformers import PretrainedConfig

    config = PretrainedConfig(hidden_size=head_dim * num_heads, num_attention_heads=num_heads, head_dim=head_dim,
                              max_position_embeddings=max_positions)
    config.rope_parameters = copy.deepcopy(rope_parameters)
    return config


def rope_frequencies(config, device=None, seq_len: int | None = None) -> tuple["torch.Tensor", float]:
    """(fp32 inverse frequencies, cos/sin scale) of ``config`` (from :func:`rope_init_config`) for inputs whose longest
    position is ``seq_len`` - 1 (None: as the model's rotary module is built)."""
    rope_type = config.rope_parameters["rope_type"]
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[rope_type](config, device, seq_len=seq_len)
    return inv_freq.float(), float(attention_factor)
