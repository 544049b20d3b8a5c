"""One test matrix: every position method (and RoPE scaling variant) x every architecture family.

Behaviour, not implementation: cached decode == full forward, padding changes nothing, save -> reload is
exact, inputs past the old position limit work, output_attentions goes through the same math.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from tiny_models import CACHE_ARG, FAMILIES, OLD_LIMIT, VOCAB, cache_of, is_encoder, tiny_model

import hf_posenc
from hf_posenc.methods.base import Memo

METHOD_CASES = {
    "alibi": {},
    "rope": {},
    "rope-partial": {"fraction": 0.5},
    "rope-linear": {"scaling": "linear", "factor": 4.0},
    "rope-dynamic": {"scaling": "dynamic", "factor": 4.0},
    "rope-yarn": {"scaling": "yarn", "factor": 4.0},
    "rope-dynamic_yarn": {"scaling": "dynamic_yarn", "factor": 4.0},
    # LongRoPE (the tiny models rotate 4 pairs of dims per head): short_factor inside the trained context, long past it
    "rope-longrope": {"scaling": "longrope", "factor": 4.0, "long_factor": [1.0, 1.5, 3.0, 6.0],
                      "short_factor": [1.0, 1.0, 1.2, 1.5]},
    "rope-longrope_start": {"scaling": "longrope", "factor": 4.0, "long_factor": [1.0, 1.5, 3.0, 6.0],
                            "start_tokens": 4},
    "t5": {},
    "shaw": {"max_distance": 8},
    "sinusoidal": {},
    "nope": {},
    "learned": {},
    "learned-interpolate": {"extend": "interpolate"},
    "xpos": {},
    "transformer_xl": {},
    "fire": {},
    "self_extend": {"window": 12, "group": 3},
    "rerope": {"window": 12},
    "rerope-leaky": {"window": 12, "leaky": 3.0},
    "self_extend-logn": {"window": 12, "group": 3, "logn": True},
}
CAUSAL = [f for f in FAMILIES if not is_encoder(f)]
ENCODERS = [f for f in FAMILIES if is_encoder(f)]
LEARNED = ("t5", "shaw", "learned", "learned-interpolate", "transformer_xl", "fire")
TOL = 1e-4


def converted(family: str, case: str, **model_kwargs):
    model = tiny_model(family, **model_kwargs)
    hf_posenc.convert(model, case.split("-")[0], **METHOD_CASES[case])
    if case in LEARNED:  # tables start at zero / ALiBi-like; randomise so the tests see them act
        torch.manual_seed(1)
        for p in model.base_model.posenc.parameters():
            torch.nn.init.normal_(p, std=0.5)
    return model


def ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def left_pad(x: torch.Tensor, row: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shift ``x[row]`` right by ``pad`` tokens (dropping its tail) behind pad id 0; returns (ids, mask)."""
    padded = x.clone()
    padded[row, :pad] = 0
    padded[row, pad:] = x[row, : x.shape[1] - pad]
    mask = torch.ones_like(padded)
    mask[row, :pad] = 0
    return padded, mask


def decode_length(case: str) -> int:
    # dynamic NTK re-derives its frequencies from the current length, so past the trained context a cache built at
    # shorter lengths legitimately differs from one full forward (as in transformers' own dynamic RoPE); so does
    # dynamic YaRN's scale (a family with q/k norms, Qwen3, has scores large enough to show it)
    return OLD_LIMIT - 8 if case in ("rope-dynamic", "rope-dynamic_yarn") else 2 * OLD_LIMIT + 6


all_pairs = pytest.mark.parametrize("family", FAMILIES)
causal_pairs = pytest.mark.parametrize("family", CAUSAL)
cases = pytest.mark.parametrize("case", list(METHOD_CASES))


@cases
@causal_pairs
def test_cached_decode_equals_full_forward(family, case):
    model = converted(family, case)
    x = ids(2, decode_length(case))
    full = model(x).logits
    prefill = len(x[0]) - 5
    out = model(x[:, :prefill], use_cache=True)
    steps = [out.logits]
    cache = cache_of(out)
    for t in range(prefill, x.shape[1]):  # one token at a time
        out = model(x[:, t : t + 1], **{CACHE_ARG: cache}, use_cache=True)
        cache = cache_of(out)
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=TOL, rtol=0)


@cases
@causal_pairs
def test_greedy_generate_identical_with_and_without_cache(family, case):
    model = converted(family, case)
    prompt = ids(1, OLD_LIMIT - 10 if case == "rope-dynamic" else OLD_LIMIT + 10)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    cached = model.generate(prompt, use_cache=True, **kwargs)
    uncached = model.generate(prompt, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


@cases
@causal_pairs
def test_left_padding_changes_nothing(family, case):
    model = converted(family, case)
    x = ids(2, OLD_LIMIT + 12)
    pad = 7
    padded, mask = left_pad(x, row=1, pad=pad)
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)  # what generate() passes for left-padded rows
    logits = model(padded, attention_mask=mask, position_ids=position_ids).logits
    alone = model(x[1:, : x.shape[1] - pad]).logits
    torch.testing.assert_close(logits[1, pad:], alone[0], atol=TOL, rtol=0)
    torch.testing.assert_close(logits[0], model(x[:1]).logits[0], atol=TOL, rtol=0)


@cases
@causal_pairs
def test_left_padded_generate_matches_unpadded(family, case):
    model = converted(family, case)
    x = ids(2, OLD_LIMIT + 4)
    pad = 5
    padded, mask = left_pad(x, row=1, pad=pad)
    # min_new_tokens: a row that draws the eos token alone stops early, and in the batch goes on with padding
    kwargs = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    batch = model.generate(padded, attention_mask=mask, **kwargs)
    alone = model.generate(x[1:, :-pad], **kwargs)
    assert torch.equal(batch[1, pad:], alone[0])


@cases
@pytest.mark.parametrize("family", ENCODERS)
def test_encoder_right_padding_changes_nothing(family, case):
    model = converted(family, case)
    x = ids(2, 2 * OLD_LIMIT + 3)
    real = x.shape[1] - 9
    mask = torch.ones_like(x)
    mask[1, real:] = 0
    logits = model(x, attention_mask=mask).logits
    alone = model(x[1:, :real]).logits
    torch.testing.assert_close(logits[1, :real], alone[0], atol=TOL, rtol=0)


@cases
@all_pairs
def test_accepts_inputs_beyond_twice_the_old_limit(family, case):
    model = converted(family, case)
    length = 2 * OLD_LIMIT + 1
    logits = model(ids(1, length)).logits
    assert logits.shape == (1, length, VOCAB)
    assert torch.isfinite(logits).all()
    assert model.config.max_position_embeddings >= 2 * OLD_LIMIT


@cases
@all_pairs
def test_save_and_reload_gives_identical_logits(family, case, tmp_path):
    model = converted(family, case)
    x = ids(2, OLD_LIMIT + 20)
    before = model(x).logits
    model.save_pretrained(tmp_path)

    saved = json.loads((tmp_path / "config.json").read_text())["posenc"]
    assert saved["method"] == case.split("-")[0]
    assert saved["format_version"] == hf_posenc.FORMAT_VERSION
    assert saved["original_max_position_embeddings"] == OLD_LIMIT
    for key, value in METHOD_CASES[case].items():
        assert saved["options"][key] == value
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        saved_keys = set(f.keys())
    new_params = {k for k, _ in model.named_parameters() if ".posenc." in f".{k}"}
    assert new_params <= saved_keys
    assert bool(new_params) == (case in LEARNED)

    reloaded = hf_posenc.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model)
    assert torch.equal(reloaded(x).logits, before)


@cases
@all_pairs
def test_output_attentions_uses_the_same_attention(family, case):
    model = converted(family, case)
    x = ids(1, OLD_LIMIT + 3)
    plain = model(x).logits
    out = model(x, output_attentions=True)
    torch.testing.assert_close(out.logits, plain, atol=TOL, rtol=0)
    heads = model.config.num_attention_heads
    assert len(out.attentions) == model.config.num_hidden_layers
    probs = out.attentions[0]
    assert probs.shape == (1, heads, x.shape[1], x.shape[1])
    torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)))
    if family in CAUSAL:  # nothing attends to the future
        assert probs.triu(diagonal=1).abs().max() == 0


@pytest.mark.parametrize("case", ["alibi", "t5", "shaw", "rope"])
def test_attention_probabilities_include_the_position_method(case):
    x = ids(1, 40)
    nope = tiny_model("gpt2")
    hf_posenc.convert(nope, "nope")
    base = nope(x, output_attentions=True).attentions[0]
    probs = converted("gpt2", case)(x, output_attentions=True).attentions[0]
    assert (probs - base).abs().max() > 1e-3


@pytest.mark.parametrize("case", ["alibi", "t5", "rope", "shaw"])
@pytest.mark.parametrize("family", ["gpt2", "bert", "llama"])
def test_position_terms_built_once_per_forward(family, case, monkeypatch):
    """ALiBi/T5 biases, rotary tables and Shaw's distance index are shared across layers, not rebuilt."""
    model = converted(family, case)
    method = model.base_model.posenc
    builder = {"alibi": "score_bias", "t5": "score_bias", "rope": "cos_sin", "shaw": "distance_index"}[case]
    if family == "llama" and case == "rope":
        pytest.skip("native rotary: transformers computes cos/sin once in LlamaModel.forward")
    calls = []
    if builder == "cos_sin" or builder == "distance_index":
        original = Memo.get

        def counting_get(memo, key, build):
            def counted():
                calls.append(key)
                return build()

            return original(memo, key, counted)

        monkeypatch.setattr(Memo, "get", counting_get)
    else:
        original = getattr(method, builder)
        monkeypatch.setattr(method, builder, lambda *a: calls.append(1) or original(*a))
    model(ids(2, 30))
    assert model.config.num_hidden_layers > 1
    builds = [c for c in calls if not (isinstance(c, tuple) and c[0] in ("positions", "plain_positions"))]
    assert len(builds) == 1
    model(ids(2, 31))  # the memo is per forward: a new forward rebuilds once
    builds = [c for c in calls if not (isinstance(c, tuple) and c[0] in ("positions", "plain_positions"))]
    assert len(builds) == 2
