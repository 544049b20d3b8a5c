"""Seam tests: each transformers internal hf_posenc relies on, checked directly. When one fails after a
transformers upgrade, its message names the internal that moved and what hf_posenc uses it for."""

from __future__ import annotations

import inspect

import pytest
import torch
import transformers
from tiny_models import CACHE_ARG, OLD_LIMIT, cache_of, tiny_model

import hf_posenc
from hf_posenc import _seams
from hf_posenc.backends import masks
from hf_posenc.attention import ATTN_IMPLEMENTATION


def moved(internal: str, use: str) -> str:
    return f"transformers {transformers.__version__}: internal `{internal}` moved or changed; hf_posenc uses it {use}"


def test_transformers_is_in_the_tested_range():
    major = int(transformers.__version__.split(".")[0])
    assert major == 5, "hf_posenc is tested with transformers>=5,<6 (pyproject pins it)"


def test_attention_and_mask_registries_know_us():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert ALL_ATTENTION_FUNCTIONS[ATTN_IMPLEMENTATION] is hf_posenc.attention.posenc_attention_forward, moved(
        "AttentionInterface.register", "to install the hf_posenc attention function"
    )
    assert ATTN_IMPLEMENTATION in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, moved(
        "AttentionMaskInterface._global_mapping", "so the padding mask reaches the attention function"
    )


@pytest.mark.parametrize("family", ["gpt2", "bert", "llama"])
def test_attention_function_receives_padding_mask_and_cached_keys(family, monkeypatch):
    model = hf_posenc.convert(tiny_model(family), "alibi")
    seen = []
    original = masks.biased_mask

    def spy(method, attention_mask, q_pos, k_pos, causal, dtype, **kwargs):
        seen.append((attention_mask, q_pos.numel(), k_pos.numel()))
        return original(method, attention_mask, q_pos, k_pos, causal, dtype, **kwargs)

    monkeypatch.setattr(masks, "biased_mask", spy)
    x = torch.randint(4, 300, (2, 10))
    mask = torch.ones_like(x)
    mask[1, -3:] = 0
    model(x, attention_mask=mask)
    assert seen and seen[0][0] is not None and seen[0][0].dtype == torch.bool, moved(
        "sdpa_mask via AttentionMaskInterface", "to get a boolean padding mask (B, 1, Lq, Lk)"
    )
    assert tuple(seen[0][0].shape[-2:]) == (10, 10)
    if family != "bert":
        seen.clear()
        out = model(x[:, :6], use_cache=True)
        model(x[:, 6:7], **{CACHE_ARG: cache_of(out)})
        assert seen[-1][1:] == (1, 7), moved("attention_interface(key=...)", "expecting keys that include the cache")


def test_output_collector_reports_requested_attentions(monkeypatch):
    model = hf_posenc.convert(tiny_model("gpt2"), "alibi")
    flags = []
    monkeypatch.setattr(
        hf_posenc.attention, "attention_weights_requested",
        lambda: flags.append(_seams.attention_weights_requested()) or flags[-1],
    )
    model(torch.randint(4, 300, (1, 5)), output_attentions=True)
    assert flags and all(flags), moved(
        "utils.output_capturing._active_collector", "to switch to eager attention when output_attentions=True"
    )
    flags.clear()
    model(torch.randint(4, 300, (1, 5)))
    assert flags and not any(flags)


def test_gpt2_position_table_is_wpe_and_stops_at_n_positions():
    model = tiny_model("gpt2")
    assert isinstance(model.transformer.wpe, torch.nn.Embedding), moved("GPT2Model.wpe", "as the table to replace")
    with pytest.raises(IndexError):
        model(torch.randint(4, 300, (1, OLD_LIMIT + 1)))
    assert model.config.n_positions == model.config.max_position_embeddings, moved(
        "GPT2Config.attribute_map['max_position_embeddings']", "to raise n_positions"
    )


def test_bert_embeddings_layout():
    embeddings = tiny_model("bert").bert.embeddings
    assert isinstance(embeddings.position_embeddings, torch.nn.Embedding), moved(
        "BertEmbeddings.position_embeddings", "as the table to replace"
    )
    for name in ("position_ids", "token_type_ids"):
        assert getattr(embeddings, name).shape[-1] == OLD_LIMIT, moved(
            f"BertEmbeddings.{name} buffer", "(extended to the new limit)"
        )


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_llama_style_rotary_is_applied_before_the_cache_update(family):
    model = tiny_model(family)
    attention = type(model.model.layers[0].self_attn)
    source = inspect.getsource(attention.forward)
    assert "position_embeddings" in source and source.index("apply_rotary_pos_emb") < source.index(".update("), moved(
        f"{attention.__name__}.forward", "assuming RoPE is applied to keys before they enter the cache"
    )
    rotary = model.model.rotary_emb
    cos, sin = rotary(torch.zeros(1), torch.arange(5)[None])
    assert cos.shape == (1, 5, model.model.layers[0].self_attn.head_dim), moved(f"{type(rotary).__name__}.forward", "(x, position_ids)")
    assert "rope_theta" in model.config.rope_parameters, moved("config.rope_parameters", "to read / set RoPE")


def test_rope_init_functions_and_t5_buckets_exist():
    assert {"linear", "dynamic", "yarn"} <= set(_seams.ROPE_INIT_FUNCTIONS), moved("ROPE_INIT_FUNCTIONS", "for scaling")
    buckets = _seams.t5_relative_position_bucket(torch.arange(-3, 4), bidirectional=True, num_buckets=8,
                                                  max_distance=16)
    assert buckets.tolist() == [2, 2, 1, 0, 5, 6, 6], moved("T5Attention._relative_position_bucket", "for T5 bias")


def test_sdpa_forward_signature():
    params = inspect.signature(_seams.sdpa_attention_forward).parameters
    assert {"is_causal", "scaling", "dropout"} <= set(params), moved("sdpa_attention_forward", "as the SDPA backend")


def test_extra_config_field_survives_save_and_load(tmp_path):
    model = tiny_model("gpt2")
    model.config.posenc = {"method": "alibi", "options": {}}
    model.config.save_pretrained(tmp_path)
    assert transformers.AutoConfig.from_pretrained(tmp_path).posenc == {"method": "alibi", "options": {}}, moved(
        "PretrainedConfig extra attributes", "to store the method in config.json"
    )


def test_decoder_layers_receive_position_ids():
    """Llama-style absolute embeddings (sinusoidal) are added before layer 0 from its position_ids kwarg."""
    model = tiny_model("llama")
    seen = {}
    model.model.layers[0].register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    model(torch.randint(4, 300, (1, 5)))
    assert seen.get("position_ids") is not None, moved("LlamaDecoderLayer(position_ids=...)", "for sinusoidal")


def test_load_report_is_one_warning_on_its_logger(tmp_path):
    """hf_posenc.from_pretrained holds back this report (it lists the replaced position tables) and warns about the
    keys left. If the logger or marker moves, the report shows in full (noise, nothing hidden)."""
    import logging

    tiny_model("gpt2").save_pretrained(tmp_path)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger(_seams.LOAD_REPORT_LOGGER)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_warning()
    logger.addHandler(handler)
    try:
        transformers.GPT2ForSequenceClassification.from_pretrained(tmp_path)  # no `score` in the checkpoint
    finally:
        logger.removeHandler(handler)
        transformers.logging.set_verbosity(verbosity)
    reports = [r.getMessage() for r in records if _seams.LOAD_REPORT_MARKER in r.getMessage()]
    assert len(reports) == 1 and "score.weight" in reports[0], moved(
        "from_pretrained's load report", "to hold it back while loading a converted checkpoint"
    )


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_attention_writes_new_keys_through_the_cache_instances_update(family):
    """hf_posenc.key_cache shadows ``cache.update`` on the instance and reads / replaces ``cache.layers[i].keys``."""
    model = tiny_model(family)
    cache, written = transformers.DynamicCache(config=model.config), []
    cache.update = lambda k, v, layer_idx, *a, **kw: (written.append(k.shape), type(cache).update(
        cache, k, v, layer_idx, *a, **kw))[1]
    model(torch.randint(4, 300, (1, 5)), use_cache=True, **{CACHE_ARG: cache})
    layers = model.config.num_hidden_layers
    assert len(written) == layers and written[0][-2] == 5, moved(
        "Cache.update called on the cache instance by the attention module", "to store RoPE keys rotated"
    )
    keys = _seams.layer_keys(_seams.cache_layers(cache)[0])
    assert keys is not None and tuple(keys.shape[-2:]) == (5, written[0][-1]), moved(
        "DynamicLayer.keys (B, Hkv, n, D)", "to rotate the keys of a cache a forward created"
    )


def test_lm_eval_hflm_reads_rank_and_world_size_from_its_private_fields():
    """lm-eval internal: ``HFPosencLM._join_data_parallel`` sets HFLM's ``_rank`` / ``_world_size`` (lm-eval 0.4.x
    sets them from Accelerate only with more than one GPU); its ``rank`` / ``world_size`` must read them."""
    from lm_eval.models.huggingface import HFLM

    lm = HFLM.__new__(HFLM)  # no model: only the two properties are under test
    lm._rank, lm._world_size = 3, 4
    assert (lm.rank, lm.world_size) == (3, 4)


@pytest.mark.parametrize("rope_parameters", [
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    {"rope_type": "linear", "factor": 4.0}, {"rope_type": "dynamic", "factor": 4.0},
], ids=lambda p: p["rope_type"])
def test_rope_init_functions_read_the_throwaway_config_as_a_models_rotary_does(rope_parameters):
    """hf_posenc computes a scaled checkpoint's frequencies from a throwaway config (_seams.rope_init_config): they
    must be the ones the model's own rotary module holds, its cos/sin scale included."""
    model = tiny_model("llama", rope_parameters={"rope_theta": 1e4, **rope_parameters})
    rotary, config = model.model.rotary_emb, model.config
    throwaway = _seams.rope_init_config(config.rope_parameters, config.head_dim, config.num_attention_heads,
                                        config.max_position_embeddings)
    inv_freq, scale = _seams.rope_frequencies(throwaway)
    use = "for a checkpoint's own scaled RoPE (methods/rope.py)"
    assert torch.equal(inv_freq, rotary.inv_freq.float()), moved("ROPE_INIT_FUNCTIONS' config fields", use)
    assert scale == rotary.attention_scaling, moved("ROPE_INIT_FUNCTIONS' attention factor", use)


def test_cache_keyword_is_the_one_a_models_forward_takes():
    """_seams.CACHE_KEYWORD (token_nll's chunked prefill passes its cache by it): a cache passed by that name is
    filled; transformers renamed ``past_key_values`` to ``cache`` in 5.24."""
    import transformers

    from hf_posenc._seams import CACHE_KEYWORD

    model = tiny_model("llama").eval()
    cache = transformers.DynamicCache(config=model.config)
    model.base_model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True, **{CACHE_KEYWORD: cache})
    assert cache.get_seq_length() == 3
