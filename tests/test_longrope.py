"""RoPE scaling ``longrope`` (Ding et al. 2024): per-frequency factors (short_factor within the trained context,
long_factor past it, per row), LongRoPE's attention factor, unscaled start tokens; equal to transformers' own
``rope_type: "longrope"`` Llama both ways (converted = transformers' model; exported = loaded by plain transformers).
The method x family matrix (tests/test_matrix.py, rows ``rope-longrope*``) covers caches, padding, save / reload."""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from tiny_models import OLD_LIMIT, tiny_config

import hf_posenc
from hf_posenc.methods.base import Memo

LONG = [1.0, 1.5, 3.0, 6.0]  # the tiny Llama rotates 4 pairs of dims per head (head_dim 8)
SHORT = [1.0, 1.0, 1.2, 1.5]
LENGTHS = (20, OLD_LIMIT, OLD_LIMIT + 1, 2 * OLD_LIMIT + 5)  # inside, at, just past and far past the trained context


def llama(rope: dict | None = None, seed: int = 0) -> transformers.LlamaForCausalLM:
    """A tiny random Llama (sharp attention: positions matter), optionally with ``rope`` as its rope_parameters."""
    values = {**tiny_config("llama").to_dict(), "initializer_range": 0.3}
    if rope is not None:
        values["rope_parameters"] = {"rope_theta": 10000.0, **rope}
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**values)).eval()


def transformers_longrope(**fields) -> transformers.LlamaForCausalLM:
    """transformers' own longrope Llama with the weights of ``llama()``."""
    rope = {"rope_type": "longrope", "long_factor": LONG, "short_factor": SHORT, "factor": 4.0,
            "original_max_position_embeddings": OLD_LIMIT, **fields}
    model = llama(rope)
    model.load_state_dict(llama().state_dict())
    return model


def ids(length: int, batch: int = 2) -> torch.Tensor:
    return torch.randint(3, 300, (batch, length), generator=torch.Generator().manual_seed(length))


def logits(model, x, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(x, **kwargs).logits


def longrope(model=None, **options):
    options = {"scaling": "longrope", "factor": 4.0, "long_factor": LONG, "short_factor": SHORT, **options}
    return hf_posenc.convert(model if model is not None else llama(), "rope", **options)


@pytest.mark.parametrize("attention_factor", [None, 1.3])
def test_equals_transformers_longrope_inside_and_past_the_trained_context(attention_factor):
    fields = {} if attention_factor is None else {"attention_factor": attention_factor}
    ours, theirs = longrope(attention_factor=attention_factor), transformers_longrope(**fields)
    for n in LENGTHS:
        torch.testing.assert_close(logits(ours, ids(n)), logits(theirs, ids(n)), atol=1e-5, rtol=0)


def test_the_default_attention_factor_is_longropes():
    """sqrt(1 + ln s / ln L_train), on cos and sin alike: every logit scaled by its square."""
    method = longrope().base_model.posenc
    cos, _ = method.cos_sin(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long), torch.float32)
    assert cos.flatten()[0].item() == pytest.approx(math.sqrt(1 + math.log(4.0) / math.log(OLD_LIMIT)))


def test_exported_natively_loads_in_plain_transformers_with_the_same_logits(tmp_path):
    model = longrope()
    hf_posenc.export(model, tmp_path / "out", format="native")
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(plain) is transformers.LlamaForCausalLM and plain.config.rope_parameters["rope_type"] == "longrope"
    for n in LENGTHS:
        torch.testing.assert_close(logits(plain, ids(n)), logits(model, ids(n)), atol=1e-5, rtol=0)


def test_a_transformers_longrope_checkpoint_round_trips_through_conversion_and_export(tmp_path):
    """The other way: transformers' longrope model, converted ("rope" keeps its rotary) and exported, is itself."""
    theirs = transformers_longrope()
    hf_posenc.export(hf_posenc.convert(transformers_longrope(), "rope"), tmp_path / "out", format="native")
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    for n in LENGTHS:
        torch.testing.assert_close(logits(plain, ids(n)), logits(theirs, ids(n)), atol=1e-5, rtol=0)


def test_each_row_takes_short_or_long_factors_by_its_own_length():
    """A left-padded row whose positions stay within the trained context uses short_factor beside a long row."""
    model = longrope()
    x = ids(OLD_LIMIT + 20)
    pad = 30  # row 1: positions 0..53, within the trained context
    padded = x.clone()
    padded[1, :pad] = 0
    padded[1, pad:] = x[1, : x.shape[1] - pad]
    mask = torch.ones_like(x)
    mask[1, :pad] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    both = logits(model, padded, attention_mask=mask, position_ids=position_ids)
    torch.testing.assert_close(both[1, pad:], logits(model, x[1:, : x.shape[1] - pad])[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(both[0], logits(model, x[:1])[0], atol=1e-5, rtol=0)
    short_row = logits(transformers_longrope(), x[1:, : x.shape[1] - pad])[0]  # transformers: short at 54 tokens
    torch.testing.assert_close(both[1, pad:], short_row, atol=1e-5, rtol=0)


def test_start_tokens_keep_the_unscaled_frequencies():
    """Positions below n-hat turn at theta^(-2i/d) (times the attention factor), the others at long_factor's."""
    method = longrope(start_tokens=6, attention_factor=1.0).base_model.posenc
    positions = torch.arange(2 * OLD_LIMIT)[None]
    cos, _ = method.cos_sin(positions, positions, torch.float32, Memo())
    unscaled = 1.0 / 10000.0 ** (torch.arange(0, 8, 2).float() / 8)
    angles = positions[0, :, None].float() * torch.cat([unscaled / torch.tensor(LONG)] * 2)  # (L, rot_dim)
    angles[:6] = positions[0, :6, None].float() * torch.cat([unscaled] * 2)
    torch.testing.assert_close(cos[0, 0], angles.cos(), atol=1e-5, rtol=0)


def test_start_tokens_covering_the_input_give_the_original_model_past_the_trained_context():
    original, x = llama(), ids(2 * OLD_LIMIT)
    model = longrope(llama(), start_tokens=4 * OLD_LIMIT, attention_factor=1.0)
    torch.testing.assert_close(logits(model, x), logits(original, x), atol=1e-5, rtol=0)
    assert (logits(longrope(llama(), attention_factor=1.0), x) - logits(original, x)).abs().max() > 1e-3


def test_start_tokens_are_refused_by_native_export_with_the_reason(tmp_path):
    """(``format="auto"`` exports them as ONNX: tests/test_export.py, case llama-longrope-start.)"""
    with pytest.raises(ValueError, match="unscaled start tokens"):
        hf_posenc.export(longrope(start_tokens=4), tmp_path / "out", format="native")
    assert not (tmp_path / "out").exists()


BAD = [
    ({"long_factor": LONG[:3]}, "has 3 factors; the model rotates 4 pairs"),
    ({"short_factor": [1.0, 0.0, 1.0, 1.0]}, "'short_factor' must be a number >= 1e-09"),
    ({"long_factor": None}, "needs option 'long_factor'"),
    ({"long_factor": "1,2,3,4"}, "must be a list of numbers"),
    ({"start_tokens": -1}, "'start_tokens' must be an integer >= 0"),
    ({"attention_factor": 0.0}, "'attention_factor' must be a number"),
    ({"scaling": "yarn"}, "are LongRoPE's: give scaling='longrope'"),
    ({"factor": 1.0}, "must be > 1 with scaling='longrope'"),
]


@pytest.mark.parametrize("options, message", BAD, ids=[m.split(":")[0][:30] for _, m in BAD])
def test_bad_factors_are_refused_and_the_model_is_unchanged(options, message):
    model, x = llama(), ids(20)
    before = logits(model, x)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        longrope(model, **options)
    assert "posenc" not in model.config.to_dict()
    torch.testing.assert_close(logits(model, x), before, atol=0, rtol=0)
