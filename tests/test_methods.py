"""Each method's math against an independent reference (BLOOM's ALiBi, explicit loops, transformers' RoPE)."""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from tiny_models import OLD_LIMIT, tiny_config, tiny_model

import hf_posenc
from hf_posenc.methods import ModelShape, Rope, RopeOptions, Shaw, ShawOptions, T5Bias, T5BiasOptions, alibi_slopes
from hf_posenc.methods.sinusoidal import Sinusoidal, SinusoidalOptions


def shape(**kw) -> ModelShape:
    values = dict(num_heads=4, num_kv_heads=4, head_dim=8, hidden_size=32, num_layers=2, causal=True,
                  original_max_positions=64)
    values.update(kw)
    return ModelShape(**values)


@pytest.mark.parametrize("heads", [1, 2, 5, 6, 8, 9, 12, 16, 20])
def test_alibi_slopes_match_bloom(heads):
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    bloom = build_alibi_tensor(torch.ones(1, 2), heads, torch.float32).reshape(heads, 2)[:, 1]  # slope * 1
    torch.testing.assert_close(alibi_slopes(heads), bloom)


def test_alibi_slopes_start_at_two_to_minus_eight_over_n():
    assert alibi_slopes(8)[0].item() == pytest.approx(2 ** (-8 / 8))
    assert alibi_slopes(16)[-1].item() == pytest.approx(2**-8)


def test_alibi_bias_penalises_distance_linearly():
    model = tiny_model("gpt2")
    hf_posenc.convert(model, "alibi")
    method = model.base_model.posenc
    q_pos, k_pos = torch.arange(3, 6), torch.arange(6)
    bias = method.score_bias(q_pos[None], k_pos[None])  # (P, H, Lq, Lk)
    expected = -alibi_slopes(4)[:, None, None] * (q_pos[:, None] - k_pos[None, :]).abs()
    torch.testing.assert_close(bias, expected[None])


@pytest.mark.parametrize("causal", [True, False])
def test_t5_bias_equals_bucket_lookup(causal):
    from transformers.models.t5.modeling_t5 import T5Attention

    method = T5Bias(T5BiasOptions(num_buckets=16, max_distance=20), shape(causal=causal))
    torch.nn.init.normal_(method.relative_attention_bias.weight)
    q_pos = torch.stack([torch.arange(30, 70), torch.arange(40) * 3])  # P = 2 rows: plain, and with gaps
    k_pos = torch.stack([torch.arange(70), torch.arange(70) * 2])
    bias = method.score_bias(q_pos, k_pos)  # (P, H, Lq, Lk)
    buckets = T5Attention._relative_position_bucket(
        k_pos[:, None, :] - q_pos[:, :, None], bidirectional=not causal, num_buckets=16, max_distance=20
    )
    torch.testing.assert_close(bias, method.relative_attention_bias.weight[buckets].permute(0, 3, 1, 2))


def test_t5_alibi_init_is_alibi_within_exact_buckets():
    method = T5Bias(T5BiasOptions(), shape(causal=True))
    bias = method.score_bias(torch.arange(10)[None], torch.arange(10)[None])[0]
    exact = -alibi_slopes(4)[:, None, None] * (torch.arange(10)[:, None] - torch.arange(10)[None, :])
    tril = torch.ones(10, 10).tril().bool()
    torch.testing.assert_close(bias[:, tril], exact[:, tril])  # distances < 16 have their own bucket


def test_shaw_terms_equal_explicit_loops():
    torch.manual_seed(0)
    r = 3
    method = Shaw(ShawOptions(max_distance=r), shape())
    for p in method.parameters():
        torch.nn.init.normal_(p)
    q = torch.randn(2, 4, 5, 8)
    probs = torch.softmax(torch.randn(2, 4, 5, 9), -1)
    q_pos, k_pos = torch.arange(4, 9)[None], torch.arange(9)[None]
    keys, values = method.layers[1].keys, method.layers[1].values
    key_term = method.key_term(q, None, 1, q_pos, k_pos)
    value_term = method.value_term(probs, 1, q_pos, k_pos)
    for i, qi in enumerate(q_pos[0].tolist()):
        expected_v = torch.zeros(2, 4, 8)
        for j, kj in enumerate(k_pos[0].tolist()):
            a = max(-r, min(r, kj - qi)) + r
            torch.testing.assert_close(key_term[:, :, i, j], q[:, :, i] @ keys[a])
            expected_v += probs[:, :, i, j, None] * values[a]
        torch.testing.assert_close(value_term[:, :, i], expected_v)


def test_sinusoidal_table_is_the_transformer_formula():
    method = Sinusoidal(SinusoidalOptions(scale=1.0), shape(hidden_size=6))
    table = method.embed(torch.arange(5)[None])[0]
    for p in range(5):
        for i in range(3):
            assert table[p, 2 * i].item() == pytest.approx(math.sin(p / 10000 ** (2 * i / 6)), abs=1e-6)
            assert table[p, 2 * i + 1].item() == pytest.approx(math.cos(p / 10000 ** (2 * i / 6)), abs=1e-6)


def test_sinusoidal_default_scale_matches_the_replaced_table():
    model = tiny_model("gpt2")
    old_rms = model.transformer.wpe.weight.pow(2).mean().sqrt().item()
    hf_posenc.convert(model, "sinusoidal")
    table = model.base_model.posenc.embed(torch.arange(4096)[None])
    assert table.pow(2).mean().sqrt().item() == pytest.approx(old_rms, rel=0.02)


@pytest.mark.parametrize(
    "rope_parameters",
    [
        {"rope_type": "default", "rope_theta": 10000.0},
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
        {"rope_type": "dynamic", "rope_theta": 500.0, "factor": 2.0},
        {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64},
    ],
    ids=lambda p: p["rope_type"],
)
def test_rope_rotation_equals_transformers_rotary(rope_parameters):
    """Our RoPE (used on GPT-2 / BERT) rotates exactly like transformers' Llama rotary with the same settings."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    config = tiny_config("llama", rope_parameters=dict(rope_parameters))
    rotary = LlamaRotaryEmbedding(config)
    length = 150  # past the trained 64: dynamic NTK kicks in
    scaling = None if rope_parameters["rope_type"] == "default" else rope_parameters["rope_type"]
    options = RopeOptions(theta=rope_parameters["rope_theta"], scaling=scaling,
                          factor=rope_parameters.get("factor", 1.0), original_max_positions=64)
    ours = Rope(options, shape(num_heads=6, head_dim=8, native_rotary=False))
    q, k = torch.randn(1, 6, length, 8), torch.randn(1, 2, length, 8)
    pos = torch.arange(length)
    cos, sin = rotary(q, pos[None])
    expected_q, expected_k = apply_rotary_pos_emb(q, k, cos, sin)
    got_q, got_k = ours.rotate(q, k, pos[None], pos[None])
    torch.testing.assert_close(got_q, expected_q)
    torch.testing.assert_close(got_k, expected_k)


def test_partial_rope_leaves_the_tail_dims_alone():
    ours = Rope(RopeOptions(theta=10000.0, fraction=0.5, original_max_positions=64), shape())
    q = torch.randn(1, 4, 10, 8)
    rotated, _ = ours.rotate(q, q, torch.arange(10)[None], torch.arange(10)[None])
    assert torch.equal(rotated[..., 4:], q[..., 4:])
    assert not torch.allclose(rotated[..., :4], q[..., :4])


def test_rope_on_llama_with_native_settings_changes_nothing():
    original = tiny_model("llama")
    model = tiny_model("llama")
    hf_posenc.convert(model, "rope")
    x = torch.randint(4, 300, (2, 100))
    torch.testing.assert_close(model(x).logits, original(x).logits, atol=1e-5, rtol=0)


def test_rope_scaling_on_llama_equals_native_scaled_model():
    native = tiny_model("llama", rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                  "original_max_position_embeddings": OLD_LIMIT})
    model = tiny_model("llama")  # same seed, same weights
    hf_posenc.convert(model, "rope", scaling="yarn", factor=4.0)
    assert model.config.rope_parameters["rope_type"] == "yarn"
    x = torch.randint(4, 300, (1, 3 * OLD_LIMIT))
    torch.testing.assert_close(model(x).logits, native(x).logits, atol=1e-5, rtol=0)


def test_rope_theta_defaults_to_the_models_own():
    model = tiny_model("llama", rope_parameters={"rope_type": "default", "rope_theta": 12345.0})
    hf_posenc.convert(model, "rope", scaling="linear", factor=2.0)
    assert model.config.posenc["options"]["theta"] == 12345.0
    gpt2 = hf_posenc.convert(tiny_model("gpt2"), "rope")
    assert gpt2.config.posenc["options"]["theta"] == 10000.0


HEAD_CLASSES = [
    ("gpt2", "GPT2LMHeadModel", "logits"), ("gpt2", "GPT2Model", "last_hidden_state"),
    ("gpt2", "GPT2ForSequenceClassification", "logits"), ("gpt2", "GPT2ForTokenClassification", "logits"),
    ("gpt2", "GPT2DoubleHeadsModel", "logits"), ("bert", "BertModel", "last_hidden_state"),
    ("bert", "BertForMaskedLM", "logits"), ("bert", "BertForSequenceClassification", "logits"),
    ("bert", "BertForTokenClassification", "logits"), ("bert", "BertForQuestionAnswering", "start_logits"),
    ("llama", "LlamaModel", "last_hidden_state"), ("llama", "LlamaForSequenceClassification", "logits"),
]


@pytest.mark.parametrize("family, head, output", HEAD_CLASSES, ids=[h for _, h, _ in HEAD_CLASSES])
def test_every_head_class_converts_and_reloads(family, head, output, tmp_path):
    model = tiny_model(family, head=head)
    hf_posenc.convert(model, "alibi")
    x = torch.randint(4, 300, (1, 2 * OLD_LIMIT + 2))
    expected = model(x)[output]
    model.save_pretrained(tmp_path)
    again = hf_posenc.from_pretrained(tmp_path).eval()
    assert type(again) is type(model)
    assert torch.equal(again(x)[output], expected)


def test_gpt2_cross_attention_is_left_alone():
    model = tiny_model("gpt2", add_cross_attention=True)
    hf_posenc.convert(model, "alibi")
    block = model.transformer.h[0]
    assert block.attn.__dict__.get("_posenc_method") is not None
    assert block.crossattention.__dict__.get("_posenc_method") is None
    enc = torch.randn(1, 7, 32)
    x = torch.randint(4, 300, (1, 2 * OLD_LIMIT))
    assert torch.isfinite(model(x, encoder_hidden_states=enc).logits).all()


def test_converted_model_keeps_pretrained_weights():
    original = tiny_model("gpt2")
    model = hf_posenc.convert(tiny_model("gpt2"), "t5")
    before = {k: v for k, v in original.state_dict().items() if "wpe" not in k}
    after = model.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert not any("wpe" in k for k in after)  # the learned table is gone, not silently kept
    assert isinstance(model, transformers.GPT2LMHeadModel)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_dynamic_yarn_is_the_original_inside_the_trained_context_and_yarn_past_it(family):
    """Dynamic YaRN: s = clip(L / L_train, 1, factor). Inside L_train the unconverted model's logits; at 2 L_train
    the logits of plain YaRN x2 (transformers' own yarn frequencies and attention scale)."""
    x = torch.randint(4, 300, (1, 2 * OLD_LIMIT), generator=torch.Generator().manual_seed(0))
    original = tiny_model(family) if family == "llama" else None
    dynamic = tiny_model(family)
    hf_posenc.convert(dynamic, "rope", scaling="dynamic_yarn", factor=4.0)
    yarn2 = tiny_model(family)
    hf_posenc.convert(yarn2, "rope", scaling="yarn", factor=2.0)
    if original is not None:  # Llama: the native RoPE inside the trained context
        torch.testing.assert_close(dynamic(x[:, :OLD_LIMIT]).logits, original(x[:, :OLD_LIMIT]).logits)
    plain = tiny_model(family)
    hf_posenc.convert(plain, "rope")
    torch.testing.assert_close(dynamic(x[:, :OLD_LIMIT]).logits, plain(x[:, :OLD_LIMIT]).logits)
    torch.testing.assert_close(dynamic(x).logits, yarn2(x).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mscale", [0.0, 0.5])
def test_yarn_mscale_on_llama_equals_native_yarn_with_that_attention_factor(mscale):
    """mscale sets YaRN's cos/sin scale to 0.1 * mscale * ln(factor) + 1: transformers' yarn given that
    ``attention_factor`` (and not its own 0.1 ln(factor) + 1, which the test would catch: logits differ)."""
    factor = 4.0
    native = tiny_model("llama", rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": factor, "original_max_position_embeddings": OLD_LIMIT,
        "attention_factor": 0.1 * mscale * math.log(factor) + 1.0})
    model = hf_posenc.convert(tiny_model("llama"), "rope", scaling="yarn", factor=factor, mscale=mscale)
    yarn = hf_posenc.convert(tiny_model("llama"), "rope", scaling="yarn", factor=factor)
    x = torch.randint(4, 300, (1, 3 * OLD_LIMIT))
    torch.testing.assert_close(model(x).logits, native(x).logits, atol=1e-5, rtol=0)
    assert (model(x).logits - yarn(x).logits).abs().max() > 1e-4  # 10x the tolerance above: the temperature shows


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_dynamic_yarn_mscale_is_yarn_mscale_at_the_inputs_scale(family):
    """Dynamic YaRN x4 with mscale at 2 L_train: YaRN x2 with the same mscale; inside L_train the unscaled rotary
    (mscale has no effect at s = 1)."""
    x = torch.randint(4, 300, (1, 2 * OLD_LIMIT), generator=torch.Generator().manual_seed(0))
    dynamic = hf_posenc.convert(tiny_model(family), "rope", scaling="dynamic_yarn", factor=4.0, mscale=0.0)
    yarn2 = hf_posenc.convert(tiny_model(family), "rope", scaling="yarn", factor=2.0, mscale=0.0)
    default = hf_posenc.convert(tiny_model(family), "rope", scaling="dynamic_yarn", factor=4.0)
    torch.testing.assert_close(dynamic(x).logits, yarn2(x).logits, atol=1e-5, rtol=0)
    assert (dynamic(x).logits - default(x).logits).abs().max() > 1e-4
    torch.testing.assert_close(dynamic(x[:, :OLD_LIMIT]).logits, default(x[:, :OLD_LIMIT]).logits)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_dynamic_yarn_growth_is_yarn_at_the_grown_scale(family):
    """growth 2 at 2 L_train: scale 1 + 2 * (2 - 1) = 3, i.e. YaRN x3 (frequencies and temperature); inside L_train
    still the unscaled rotary; and not what growth 1 (YaRN x2) gives."""
    x = torch.randint(4, 300, (1, 2 * OLD_LIMIT), generator=torch.Generator().manual_seed(0))
    grown = hf_posenc.convert(tiny_model(family), "rope", scaling="dynamic_yarn", factor=4.0, growth=2.0)
    yarn3 = hf_posenc.convert(tiny_model(family), "rope", scaling="yarn", factor=3.0)
    default = hf_posenc.convert(tiny_model(family), "rope", scaling="dynamic_yarn", factor=4.0)
    torch.testing.assert_close(grown(x).logits, yarn3(x).logits, atol=1e-5, rtol=0)
    assert (grown(x).logits - default(x).logits).abs().max() > 1e-4
    torch.testing.assert_close(grown(x[:, :OLD_LIMIT]).logits, default(x[:, :OLD_LIMIT]).logits)


@pytest.mark.parametrize("length, expected", [(64, 1.0), (80, 1.5), (96, 2.0), (160, 4.0), (640, 4.0)])
def test_dynamic_yarn_scale_grows_by_growth_and_stops_at_factor(length, expected):
    """s = clip(1 + growth * (L / L_train - 1), 1, factor) for the shape's 64 trained positions, growth 2, x4;
    the traced (export) path computes the same scale from tensors."""
    method = Rope(RopeOptions(scaling="dynamic_yarn", factor=4.0, growth=2.0).resolve(shape()), shape())
    assert method.dynamic_scale(length) == pytest.approx(expected)
    assert method.dynamic_scale(torch.tensor([float(length)])).item() == pytest.approx(expected)


def test_traced_dynamic_yarn_follows_growth():
    method = Rope(RopeOptions(scaling="dynamic_yarn", factor=4.0, growth=1.5, mscale=0.3).resolve(shape()), shape())
    k_pos = torch.arange(2 * 64)[None]  # 2 L_train: scale 1 + 1.5 * 1 = 2.5
    eager, traced = method._row_frequencies(k_pos, None), method._traced_dynamic_yarn(k_pos, None)
    torch.testing.assert_close(traced[0], eager[0])
    torch.testing.assert_close(traced[1].float(), eager[1].float())
    assert eager[1].item() == pytest.approx(0.1 * 0.3 * math.log(2.5) + 1.0)


def test_traced_dynamic_yarn_follows_mscale():
    """The export path of dynamic YaRN (tensor ops of the length) gives eager's frequencies and cos/sin scale."""
    method = Rope(RopeOptions(scaling="dynamic_yarn", factor=4.0, mscale=0.3).resolve(shape()), shape())
    k_pos = torch.arange(3 * 64)[None]  # scale 3 of the shape's 64 trained positions
    eager, traced = method._row_frequencies(k_pos, None), method._traced_dynamic_yarn(k_pos, None)
    torch.testing.assert_close(traced[0], eager[0])
    torch.testing.assert_close(traced[1].float(), eager[1].float())
    assert eager[1].item() == pytest.approx(0.1 * 0.3 * math.log(3.0) + 1.0)
