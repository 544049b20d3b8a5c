"""Keys stored rotated (hf_posenc.key_cache): a decode step of RoPE on GPT-2 rotates only its own key, the cache
holds each key rotated at the position it was written with, and the result equals the full forward (the
cache == full-forward checks for every method x family live in test_positions.py; these check that the fast path
is the one taken, and what it refuses)."""

from __future__ import annotations

import pytest
import torch
from test_matrix import converted, ids
from tiny_models import CACHE_ARG, cache_of
from transformers import DynamicCache, StaticCache

import hf_posenc
from hf_posenc import key_cache, positions


def count_rotated_keys(model, monkeypatch) -> list[int]:
    """Spy on the method's key rotation: the number of key positions each call rotates."""
    method = model.base_model.posenc
    seen, original = [], method.rotate_keys

    def spy(k, k_pos, memo=None):
        seen.append(k.shape[-2])
        return original(k, k_pos, memo)

    monkeypatch.setattr(method, "rotate_keys", spy)
    return seen


@pytest.mark.parametrize("cache_kind", ["created by the forward", "dynamic", "static"])
def test_a_decode_step_rotates_only_its_own_key(cache_kind, monkeypatch):
    model = converted("gpt2", "rope")
    x = ids(1, 30)
    given = {"created by the forward": {}, "dynamic": {CACHE_ARG: DynamicCache(config=model.config)},
             "static": {CACHE_ARG: StaticCache(config=model.config, max_cache_len=40)}}[cache_kind]
    full = model(x).logits
    out = model(x[:, :20], use_cache=True, **given)
    seen = count_rotated_keys(model, monkeypatch)
    steps = [out.logits]
    for t in range(20, 30):
        out = model(x[:, t : t + 1], use_cache=True, **{CACHE_ARG: cache_of(out)})
        steps.append(out.logits)
    assert seen == [1] * 10 * model.config.n_layer  # one new key per layer and step, never the past
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=0)


def test_cached_keys_are_rotated_at_their_written_positions():
    model = converted("gpt2", "rope")
    x, positions = ids(1, 12), torch.arange(12)[None] * 7 + 3
    plain = model(x, use_cache=True, position_ids=torch.arange(12)[None])
    gapped = model(x, use_cache=True, position_ids=positions)
    method = model.base_model.posenc
    first_plain, first_gapped = cache_of(plain).layers[0].keys, cache_of(gapped).layers[0].keys  # same inputs
    # rotations compose: a key rotated at p, rotated on by (q - p), is the key rotated at q
    turned = method.rotate_keys(first_plain, positions - torch.arange(12)[None])
    torch.testing.assert_close(turned, first_gapped, atol=1e-5, rtol=0)
    assert not torch.allclose(first_plain, first_gapped, atol=1e-3)


@pytest.mark.parametrize("case", ["rope-dynamic", "rope-dynamic_yarn"])
def test_dynamic_scalings_re_rotate_the_cache(case, monkeypatch):
    """Their frequencies follow the longest position: a key rotated when written would be stale later."""
    model = converted("gpt2", case)
    assert not model.base_model.posenc.caches_rotated_keys
    out = model(ids(1, 20), use_cache=True)
    seen = count_rotated_keys(model, monkeypatch)
    model(ids(1, 1), use_cache=True, **{CACHE_ARG: cache_of(out)})
    assert seen == [21] * model.config.n_layer


def test_llama_native_rope_needs_no_key_cache():
    assert not converted("llama", "rope").base_model.posenc.caches_rotated_keys  # rotated before the cache
    assert converted("llama", "rope-partial").base_model.posenc.caches_rotated_keys  # we rotate it


def test_a_cache_of_rotated_keys_refuses_a_forward_of_the_original_model():
    model = converted("gpt2", "rope")
    out = model(ids(1, 10), use_cache=True)
    with hf_posenc.original_positions(model), pytest.raises(ValueError, match="rotated"):
        model(ids(1, 1), use_cache=True, **{CACHE_ARG: cache_of(out)})


def test_a_cache_filled_elsewhere_is_rotated_in_attention(monkeypatch):
    """Keys this module did not store rotated (here: the original model's cache) keep the old path: correct."""
    model = converted("gpt2", "rope")
    with hf_posenc.original_positions(model):
        out = model(ids(1, 10), use_cache=True)
    record = positions.record_of(cache_of(out))
    assert record is None or not record.rotated
    seen = count_rotated_keys(model, monkeypatch)
    model(ids(1, 1), use_cache=True, **{CACHE_ARG: cache_of(out)})
    assert seen == [11] * model.config.n_layer
