"""What a conversion keeps from a checkpoint's config, and what it refuses (issue 27, item 1; docs/guarantees.md,
"What is kept from a checkpoint's config, and what is refused").

A checkpoint whose RoPE is already scaled (``rope_parameters`` with rope_type llama3, linear, yarn, dynamic,
longrope) is the rotary ``rope`` starts from: with no scaling it is the unconverted model, Dynamic YaRN is too inside
the trained context, a scaling goes on top of it, and Self-Extend / ReRoPE rotate with its frequencies and cos/sin
scale. What cannot be expressed is refused before the model changes. Then every config field of the Llama-style
families that shapes positions or attention (head_dim, theta, partial rotary, per-layer rope entries, sliding windows,
Gemma2's soft-caps and query scalar) is kept by every method that keeps the model's rotary."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from tiny_models import OLD_LIMIT, lm_head, tiny_config

import hf_posenc
from hf_posenc.methods.base import ModelShape
from hf_posenc.methods.self_extend import ReRope, SelfExtend

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2")
TRAINED_BEFORE = 16  # the scaled checkpoints' original_max_position_embeddings (pretraining before their scaling)
SCALED = {  # rope_type -> rope_parameters (theta 1e4 added); the tiny models have head_dim 8: 4 frequencies
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": TRAINED_BEFORE},
    "linear": {"rope_type": "linear", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": TRAINED_BEFORE},  # c = 1.139
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
    "longrope": {"rope_type": "longrope", "short_factor": [1.0, 1.5, 2.0, 3.0], "long_factor": [1.0, 2.0, 4.0, 8.0],
                 "original_max_position_embeddings": TRAINED_BEFORE},
}
STATIC = ("llama3", "linear", "yarn")
INSIDE = 40  # tokens: inside the trained context (OLD_LIMIT), past the scaled checkpoints' TRAINED_BEFORE


def checkpoint(family: str, rope: dict | None = None, seed: int = 0, **fields) -> transformers.PreTrainedModel:
    """A tiny random checkpoint of ``family`` with ``rope`` as its rope_parameters and ``fields`` in its config, built
    as a fresh load builds it (the config validated and standardised by its class). Wider init: positions matter."""
    base = tiny_config(family)
    values = {**base.to_dict(), "initializer_range": 0.2, **fields}
    if "layer_types" not in fields:
        values.pop("layer_types", None)  # derived again from the sliding-window fields
    if rope is not None:
        values["rope_parameters"] = {"rope_theta": 10000.0, **copy.deepcopy(rope)}
    torch.manual_seed(seed)
    return getattr(transformers, lm_head(family))(type(base)(**values)).eval()


def ids(length: int, batch: int = 2) -> torch.Tensor:
    return torch.randint(3, 300, (batch, length), generator=torch.Generator().manual_seed(length))


def logits(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


def length_for(rope_type: str) -> int:
    return 3 * OLD_LIMIT // 2 if rope_type == "dynamic" else INSIDE  # dynamic NTK only scales past the limit


# ---- a scaled checkpoint is the rotary a conversion starts from --------------------------------------------------
@pytest.mark.parametrize("rope_type", list(SCALED))
@pytest.mark.parametrize("family", FAMILIES)
def test_rope_without_scaling_is_the_unconverted_scaled_checkpoint(family, rope_type):
    x = ids(length_for(rope_type))
    original = logits(checkpoint(family, SCALED[rope_type]), x)
    unscaled = logits(checkpoint(family), x)  # the same weights with the rotary at theta alone
    assert (original - unscaled).abs().max() > 1e-2, "the checkpoint's scaling must change its logits"
    model = hf_posenc.convert(checkpoint(family, SCALED[rope_type]), "rope")
    torch.testing.assert_close(logits(model, x), original, atol=1e-5, rtol=0)


@pytest.mark.parametrize("rope_type", STATIC)
@pytest.mark.parametrize("family", FAMILIES)
def test_dynamic_yarn_is_the_scaled_checkpoint_inside_the_trained_context_and_yarn_on_top_past_it(family, rope_type):
    x, past = ids(INSIDE), ids(2 * OLD_LIMIT)
    model = hf_posenc.convert(checkpoint(family, SCALED[rope_type]), "rope", scaling="dynamic_yarn", factor=4.0)
    torch.testing.assert_close(logits(model, x), logits(checkpoint(family, SCALED[rope_type]), x), atol=1e-5, rtol=0)
    at_twice = hf_posenc.convert(checkpoint(family, SCALED[rope_type]), "rope", scaling="yarn", factor=2.0)
    torch.testing.assert_close(logits(model, past), logits(at_twice, past), atol=1e-4, rtol=0)  # s = L / L_train = 2


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_linear_on_top_of_a_linear_checkpoint_multiplies_the_factors(family):
    x = ids(INSIDE)
    model = hf_posenc.convert(checkpoint(family, SCALED["linear"]), "rope", scaling="linear", factor=2.0)
    eight = checkpoint(family, {**SCALED["linear"], "factor": 8.0})
    torch.testing.assert_close(logits(model, x), logits(eight, x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("rope_type, options", [("llama3", {}), ("yarn", {"scaling": "yarn", "factor": 2.0}),
                                                ("longrope", {}), (None, {"scaling": "yarn", "factor": 2.0})])
def test_a_converted_checkpoint_saved_and_reloaded_keeps_its_rotary(rope_type, options, tmp_path):
    """The checkpoint's rotary travels with the options; the saved config's rope_parameters are the conversion's
    (an unscaled checkpoint + yarn saves rope_type yarn), never read as the checkpoint's on reload."""
    model = hf_posenc.convert(checkpoint("llama", SCALED[rope_type] if rope_type else None), "rope", **options)
    model.save_pretrained(tmp_path)
    x = ids(INSIDE)
    torch.testing.assert_close(logits(hf_posenc.from_pretrained(tmp_path), x), logits(model, x), atol=1e-5, rtol=0)


# ---- Self-Extend and ReRoPE keep the checkpoint's rotary, cos/sin scale included ------------------------------------
@pytest.mark.parametrize("rope_type", STATIC)
@pytest.mark.parametrize("method, options", [("self_extend", {"window": OLD_LIMIT - 1, "group": 4}),
                                             ("rerope", {"window": OLD_LIMIT - 1}),
                                             ("self_extend", {"window": 8, "group": 4, "dynamic": True}),
                                             ("rerope", {"window": 8, "leaky": 2.0, "dynamic": True})])
def test_self_extend_and_rerope_keep_a_scaled_checkpoints_rotary(rope_type, method, options):
    """Every pair near (or, dynamic, the input inside the trained context): the unconverted scaled checkpoint."""
    x = ids(INSIDE)
    model = hf_posenc.convert(checkpoint("llama", SCALED[rope_type]), method, **options)
    torch.testing.assert_close(logits(model, x), logits(checkpoint("llama", SCALED[rope_type]), x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("rope_type, scaling", [("yarn", {}), (None, {"scaling": "yarn", "factor": 4.0})],
                         ids=["yarn-checkpoint", "yarn-scaling"])
@pytest.mark.parametrize("method, options", [("self_extend", {"window": 12, "group": 3}), ("rerope", {"window": 12})])
def test_decode_with_a_cos_sin_scale_equals_the_full_forward(method, options, rope_type, scaling):
    """YaRN (a checkpoint's or a scaling's) scales cos and sin by c > 1: a far score is c^2 q R(a) . k R(g), also
    where the decode kernel rotates the query alone (Self-Extend's groups) or leaves the keys at position 0 (ReRoPE)."""
    rope = SCALED[rope_type] if rope_type else None
    model = hf_posenc.convert(checkpoint("llama", rope), method, **options, **scaling)
    x = ids(OLD_LIMIT, batch=1)
    with torch.no_grad():
        full = model(x).logits[:, -3:]
        out = model(x[:, :-3], use_cache=True)
        steps = [model(x[:, n: n + 1], cache=out.cache, use_cache=True).logits for n in range(OLD_LIMIT - 3, OLD_LIMIT)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=0)


@pytest.mark.parametrize("cls, options", [(ReRope, {"window": 5, "scaling": "yarn", "factor": 4.0}),
                                          (ReRope, {"window": 5, "checkpoint_rope": SCALED["yarn"]}),
                                          (SelfExtend, {"window": 5, "group": 3, "scaling": "yarn", "factor": 4.0})],
                         ids=["rerope-scaling", "rerope-checkpoint", "self_extend-scaling"])
def test_far_rotations_carry_the_cos_sin_scale(cls, options):
    """q_far . k_far is the RoPE score of the far positions, each side scaled by YaRN's c > 1 (a scaling's or a
    checkpoint's): ReRoPE's keys at position 0 are c k, not k."""
    shape = ModelShape(num_heads=2, num_kv_heads=2, head_dim=8, hidden_size=16, num_layers=1, causal=True,
                       original_max_positions=64, max_positions=256, native_rotary=True, native_rope_theta=1e4)
    method = cls(cls.Options(**options).resolve(shape), shape)
    assert float(method.cos_sin(torch.zeros(1, 1), torch.zeros(1, 1), torch.float32)[0].max()) > 1.1
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 30, 8)
    k_pos = torch.arange(30)[None]
    q_pos = k_pos[:, -4:]
    q_far, k_far = method.rotate_far(q, k, q_pos, k_pos)
    q_at, k_at = method.far_positions(q_pos, k_pos)
    expected = method.rotate_queries(q, q_at, k_pos) @ method.rotate_keys(k, k_at).transpose(-1, -2)
    torch.testing.assert_close(q_far @ k_far.transpose(-1, -2), expected, atol=1e-5, rtol=0)


# ---- refused before the model changes ----------------------------------------------------------------------------
REFUSED = [
    ("longrope", "rope", {"scaling": "yarn", "factor": 2.0}, "already scales with the input length"),
    ("dynamic", "rope", {"scaling": "linear", "factor": 2.0}, "already scales with the input length"),
    ("llama3", "rope", {"fraction": 0.5}, "fraction"),
    ("llama3", "rope", {"theta": 500000.0}, "theta 10000"),
    ("llama3", "rope", {"checkpoint_rope": {"factor": 2.0}}, "checkpoint_rope"),
    ("llama3", "rope", {"checkpoint_rope": {"rope_type": "no_such_type"}}, "not one hf_posenc keeps"),
    ("dynamic", "self_extend", {}, "follows the input length"),
    ("longrope", "rerope", {}, "follows the input length"),
]


@pytest.mark.parametrize("rope_type, method, options, message", REFUSED,
                         ids=[f"{r}-{m}-{'-'.join(o)}" for r, m, o, _ in REFUSED])
def test_what_cannot_start_from_the_checkpoints_rotary_is_refused_and_the_model_is_unchanged(rope_type, method,
                                                                                            options, message):
    model = checkpoint("llama", SCALED[rope_type])
    x = ids(INSIDE)
    before, config = logits(model, x), model.config.to_dict()
    with pytest.raises(ValueError, match=message) as refused:
        hf_posenc.convert(model, method, **options)
    assert "checkpoint_rope={'rope_type': 'default'}" in str(refused.value) or "checkpoint_rope" in message
    assert model.config.to_dict() == config
    torch.testing.assert_close(logits(model, x), before, atol=0, rtol=0)


def test_per_layer_rope_parameters_without_a_top_level_rotary_are_refused():
    model = checkpoint("llama")
    model.config.rope_parameters = {"full_attention": {"rope_type": "default", "rope_theta": 1e4}}
    with pytest.raises(ValueError, match="per layer type only"):
        hf_posenc.convert(model, "rope")
    assert "posenc" not in model.config.to_dict()


def test_dropping_the_checkpoints_scaling_is_explicit():
    """checkpoint_rope={'rope_type': 'default'}: the unscaled rotary at the checkpoint's theta, on purpose."""
    x = ids(INSIDE)
    model = hf_posenc.convert(checkpoint("llama", SCALED["llama3"]), "rope", checkpoint_rope={"rope_type": "default"})
    torch.testing.assert_close(logits(model, x), logits(checkpoint("llama"), x), atol=1e-5, rtol=0)
    assert model.config.posenc["options"]["checkpoint_rope"] is None


# ---- the sweep: every field that shapes positions or attention, per family ----------------------------------------
GEMMA3 = {"layer_types": ["sliding_attention", "full_attention"]}  # kept: 2 layers would both be sliding by default


def gemma3_rope(sliding: dict | None, full: dict | None) -> dict:
    """The tiny Gemma 3's fields with these rope_parameters per layer type (None: its own)."""
    own = tiny_config("gemma3").rope_parameters
    return {**GEMMA3, "rope_parameters": {"sliding_attention": sliding or own["sliding_attention"],
                                          "full_attention": full or own["full_attention"]}}


SLIDING = {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}
FIELDS = [  # (family, field name, config fields, whether the same weights without it give other logits)
    ("llama", "head_dim", {"head_dim": 16}, False),
    ("llama", "rope_theta", {"rope_parameters": {"rope_type": "default", "rope_theta": 37.0}}, True),
    ("llama", "partial_rotary_factor (the family rotates every dim)",
     {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}}, False),
    ("mistral", "sliding_window", {"sliding_window": 8}, True),
    ("mistral", "head_dim", {"head_dim": 16}, False),
    ("mistral", "per-layer rope entries beside the top level", {
        "layer_types": ["sliding_attention", "full_attention"], "rope_parameters": {
            "rope_type": "default", "rope_theta": 1e4,
            "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}}, False),
    ("qwen2", "sliding_window per layer", SLIDING, True),
    ("qwen3", "head_dim", {"head_dim": 16}, False),
    ("qwen3", "sliding_window per layer", SLIDING, True),
    ("gemma2", "query_pre_attn_scalar", {"query_pre_attn_scalar": 7}, True),
    ("gemma2", "attn_logit_softcapping", {"attn_logit_softcapping": 0.5}, True),
    ("gemma2", "final_logit_softcapping", {"final_logit_softcapping": 0.5}, True),
    ("gemma2", "sliding_window", {"sliding_window": 4}, True),
    ("gemma2", "head_dim", {"head_dim": 16, "query_pre_attn_scalar": 16}, False),
    ("gemma3", "sliding_window", {**GEMMA3, "sliding_window": 4}, True),
    ("gemma3", "query_pre_attn_scalar", {**GEMMA3, "query_pre_attn_scalar": 7}, True),
    ("gemma3", "final_logit_softcapping", {**GEMMA3, "final_logit_softcapping": 0.5}, True),
    ("gemma3", "rope_theta of the sliding layers", gemma3_rope({"rope_type": "default", "rope_theta": 37.0}, None),
     True),
    ("gemma3", "rope_theta of the full layers", gemma3_rope(None, {"rope_type": "default", "rope_theta": 37.0}), True),
    ("gemma3", "a linear scaling on the full layers (Gemma 3 4B+)",
     gemma3_rope(None, {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4}), True),
]
KEEPERS = [("rope", {}), ("rope", {"scaling": "dynamic_yarn", "factor": 4.0}),
           ("self_extend", {"window": 8, "group": 4, "dynamic": True}), ("rerope", {"window": OLD_LIMIT - 1})]


@pytest.mark.parametrize("method, options", KEEPERS, ids=["rope", "dynamic_yarn", "self_extend", "rerope"])
@pytest.mark.parametrize("family, name, fields, matters", FIELDS, ids=[f"{f}-{n}" for f, n, _, _ in FIELDS])
def test_every_field_that_shapes_positions_or_attention_is_kept(family, name, fields, matters, method, options):
    """Inside the trained context these methods are the model's own rotary: the unconverted model's logits."""
    x = ids(INSIDE)
    original = logits(checkpoint(family, **fields), x)
    if matters:  # the field bites on this input, so keeping it is tested
        assert (original - logits(checkpoint(family), x)).abs().max() > 1e-3, name
    model = hf_posenc.convert(checkpoint(family, **fields), method, **options)
    torch.testing.assert_close(logits(model, x), original, atol=1e-5, rtol=0)


# ---- issue 27, item 10: what a dynamic method's cache equals (docs/methods.md, docs/guarantees.md) ---------------
DYNAMIC = [("rope", {"scaling": "dynamic_yarn", "factor": 4.0}, None),
           ("rope", {"scaling": "dynamic_yarn", "factor": 4.0}, SCALED["llama3"]),
           ("rope", {"scaling": "dynamic", "factor": 4.0}, None),
           ("self_extend", {"window": 12, "group": 3, "dynamic": True}, None)]


@pytest.mark.parametrize("method, options, rope", DYNAMIC, ids=["dynamic_yarn", "dynamic_yarn-llama3", "dynamic",
                                                                "self_extend"])
def test_dynamic_decode_is_exact_inside_the_trained_context_only(method, options, rope):
    """Token by token: each step is the full forward of its prefix while that fits the trained context; past it the
    cached tokens' deeper states keep the scale they were written at, so a step is neither the forward of its prefix
    nor the same row of the whole input's forward (the wider init makes positions matter enough to see it)."""
    model = hf_posenc.convert(checkpoint("llama", rope), method, **options)
    x = ids(OLD_LIMIT + 4, batch=1)
    with torch.no_grad():
        whole = model(x).logits
        cache = model(x[:, : OLD_LIMIT - 3], use_cache=True).cache
        steps = {n: model(x[:, n: n + 1], cache=cache, use_cache=True).logits[:, -1]
                 for n in range(OLD_LIMIT - 3, OLD_LIMIT + 4)}
        prefix = {n: model(x[:, : n + 1]).logits[:, -1] for n in steps}
    for n in range(OLD_LIMIT - 3, OLD_LIMIT):  # positions 0..n: inside the trained context
        torch.testing.assert_close(steps[n], prefix[n], atol=1e-4, rtol=0)
    past = range(OLD_LIMIT, OLD_LIMIT + 4)
    assert max(float((steps[n] - prefix[n]).abs().max()) for n in past) > 1e-3
    assert max(float((steps[n] - whole[:, n]).abs().max()) for n in past) > 1e-3
