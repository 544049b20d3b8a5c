"""Positions come from the caller: every method × family honours explicit ``position_ids`` (gaps, offsets, packed
rows restarting at 0), with and without a cache (dynamic and static), and cached keys keep the positions they were
written with.

Gapped ids go with an all-ones ``attention_mask``: without one transformers reads a position that does not follow
its predecessor as the start of a packed sequence (block-diagonal mask), which is what the packing test relies on.
"""

from __future__ import annotations

import pytest
import torch
from test_matrix import CAUSAL, METHOD_CASES, TOL, converted, ids
from tiny_models import CACHE_ARG, FAMILIES, OLD_LIMIT, cache_of, tiny_config, tiny_model
from transformers import StaticCache

import hf_posenc
from hf_posenc.forward_state import ForwardState
from hf_posenc.registry import arch_for

POSITIONAL = [c for c in METHOD_CASES if c != "nope"]  # nope has no position term to honour
cases = pytest.mark.parametrize("case", list(METHOD_CASES))
positional = pytest.mark.parametrize("case", POSITIONAL)
causal = pytest.mark.parametrize("family", CAUSAL)


def gapped(length: int, gap: int = 500, at: int | None = None) -> torch.Tensor:
    """(1, length) position ids 0, 1, ... with a jump of ``gap`` after ``at`` tokens (PoSE-style skip)."""
    at = length // 2 if at is None else at
    positions = torch.arange(length)
    positions[at:] += gap
    return positions[None]


def forward(model, x, position_ids=None, **kwargs):
    mask = torch.ones_like(x)
    return model(x, attention_mask=mask, position_ids=position_ids, **kwargs)


@positional
@pytest.mark.parametrize("family", FAMILIES)
def test_explicit_position_ids_change_the_output(family, case):
    """Today's bug: ALiBi / T5 / Shaw / RoPE-on-GPT-2 gave bit-identical logits for arange and 2 * arange."""
    model = converted(family, case)
    x = ids(1, 40)
    first = arch_for(model.config).table_offset(model.config)  # the id of the first token (RoBERTa: pad + 1)
    plain = forward(model, x).logits
    doubled = forward(model, x, position_ids=first + 2 * torch.arange(40)[None]).logits
    assert (plain - doubled).abs().max() > 1e-5  # identical computations differ by 0 exactly


@pytest.mark.parametrize("case", ["alibi", "t5", "shaw", "rope", "rope-partial", "rope-linear", "rope-yarn", "xpos",
                                  "transformer_xl"])
@pytest.mark.parametrize("family", FAMILIES)
def test_relative_methods_ignore_a_common_offset(family, case):
    model = converted(family, case)
    x = ids(2, 40)
    plain = forward(model, x).logits
    shifted = forward(model, x, position_ids=torch.arange(40)[None] + 1000).logits
    torch.testing.assert_close(shifted, plain, atol=TOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_alibi_at_doubled_positions_equals_doubled_slopes(family):
    """An independent reference from the given distances: -s |2i - 2j| = -(2 s) |i - j|."""
    x = ids(1, 40)
    doubled_positions = converted(family, "alibi")
    steeper = tiny_model(family)
    hf_posenc.convert(steeper, "alibi", slope_scale=2.0)
    reference = forward(steeper, x).logits
    torch.testing.assert_close(forward(doubled_positions, x, 2 * torch.arange(40)[None]).logits, reference,
                               atol=TOL, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_rope_at_explicit_positions_matches_transformers_rotary(family):
    """RoPE on GPT-2 (rotated in attention) and on Llama (the native rotary) agree with transformers' own
    ``apply_rotary_pos_emb`` of q / k at the given positions: checked through the attention probabilities."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = converted(family, "rope")
    method = model.base_model.posenc
    positions = gapped(12, gap=100)
    q = torch.randn(1, 4, 12, 8)
    k = torch.randn(1, 4, 12, 8)
    if method.rotate_in_attention:
        q_pos, k_pos = ForwardState(method, queries=positions).positions(12, 12, q.device)
        ours = method.rotate(q, k, q_pos, k_pos)
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 8, 2).float() / 8))
        freqs = positions[..., None].float() * inv_freq
        emb = torch.cat([freqs, freqs], -1)
        reference = apply_rotary_pos_emb(q, k, emb.cos(), emb.sin())
        torch.testing.assert_close(ours[0], reference[0])
        torch.testing.assert_close(ours[1], reference[1])
    else:  # the native rotary gets the ids from the model itself
        x = ids(1, 12)
        assert (forward(model, x, positions).logits - forward(model, x).logits).abs().max() > 1e-5


@cases
@causal
def test_packed_rows_equal_separate_sequences(family, case):
    """Two sequences in one row, positions restarting at 0 (without a mask or cache transformers builds the
    block-diagonal mask)."""
    if not arch_for(tiny_config(family)).packs_by_position_ids:
        pytest.skip(f"{family}'s own mask does not separate packed sequences (ArchSpec.packs_by_position_ids)")
    model = converted(family, case)
    a, b = ids(1, 23, seed=1), ids(1, 17, seed=2)
    packed = torch.cat([a, b], dim=1)
    position_ids = torch.cat([torch.arange(23), torch.arange(17)])[None]
    logits = model(packed, position_ids=position_ids, use_cache=False).logits
    torch.testing.assert_close(logits[:, :23], model(a).logits, atol=TOL, rtol=0)
    torch.testing.assert_close(logits[:, 23:], model(b).logits, atol=TOL, rtol=0)


def decode(model, x, position_ids, prefill: int, cache=None):
    """Prefill ``prefill`` tokens, then one token at a time; returns the logits of every position."""
    mask = torch.ones_like(x)
    kwargs = {} if cache is None else {CACHE_ARG: cache}
    out = model(x[:, :prefill], attention_mask=mask[:, :prefill], position_ids=position_ids[:, :prefill],
                use_cache=True, **kwargs)
    steps, cache = [out.logits], cache_of(out)
    for t in range(prefill, x.shape[1]):
        out = model(x[:, t : t + 1], attention_mask=mask[:, : t + 1], position_ids=position_ids[:, t : t + 1],
                    use_cache=True, **{CACHE_ARG: cache})
        steps.append(out.logits)
        cache = cache_of(out)
    return torch.cat(steps, dim=1)


# dynamic scalings derive their frequencies from the longest position of the input: past the trained context a
# full forward's early tokens are scored at the full input's scale, a decode step's at its prefix's (test_matrix);
# LongRoPE's switch from short to long factors at the trained context likewise
DYNAMIC = ("rope-dynamic", "rope-dynamic_yarn", "rope-longrope", "rope-longrope_start")


def dynamic_case_length(case: str) -> int:
    return OLD_LIMIT - 8 if case in DYNAMIC else 40


@cases
@causal
def test_cache_equals_full_forward_with_gapped_ids(family, case):
    model = converted(family, case)
    length = dynamic_case_length(case)
    x = ids(2, length)
    positions = gapped(length, gap=3 if case in DYNAMIC else 300, at=length - 12)
    full = forward(model, x, positions).logits
    torch.testing.assert_close(decode(model, x, positions, prefill=length - 8), full, atol=TOL, rtol=0)


def static_cache(model, capacity: int = 80) -> StaticCache:
    return StaticCache(config=model.config, max_cache_len=capacity)


@pytest.mark.parametrize("gap", [0, 200])
@cases
@causal
def test_static_cache_equals_full_forward(family, case, gap):
    """A static cache's key length is its capacity, not the number of real keys (issue: 0.3-0.6 off before);
    with plain and with gapped ids."""
    model = converted(family, case)
    length = dynamic_case_length(case)
    x = ids(2, length)
    positions = gapped(length, gap=min(gap, 3) if case in DYNAMIC else gap, at=length - 10)
    full = forward(model, x, positions).logits
    cached = decode(model, x, positions, prefill=length - 6, cache=static_cache(model))
    torch.testing.assert_close(cached, full, atol=TOL, rtol=0)


@cases
@causal
def test_static_cache_prefill_sees_no_future_tokens(family, case):
    """Changing tokens 40-49 must not change the logits at 0-39 (they leaked through the capacity slots)."""
    model = converted(family, case)
    x = ids(1, 50)
    y = x.clone()
    y[:, 40:] = ids(1, 10, seed=5)
    first = model(x, **{CACHE_ARG: static_cache(model)}, use_cache=True).logits
    second = model(y, **{CACHE_ARG: static_cache(model)}, use_cache=True).logits
    torch.testing.assert_close(first[:, :40], second[:, :40], atol=TOL, rtol=0)


@pytest.mark.parametrize("case", ["alibi", "t5", "shaw", "rope", "sinusoidal", "learned", "xpos", "transformer_xl",
                                  "fire"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_static_generate_matches_dynamic_generate(family, case):
    model = converted(family, case)
    prompt = ids(1, OLD_LIMIT + 6)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    dynamic = model.generate(prompt, **kwargs)
    static = model.generate(prompt, cache_implementation="static", **kwargs)
    assert torch.equal(static, dynamic)


def test_cached_keys_keep_the_positions_they_were_written_with():
    """A cache extended by a forward with new ids keeps the old keys' ids: the cache holds them."""
    model = converted("gpt2", "alibi")
    x = ids(1, 20)
    out = model(x, position_ids=torch.arange(20)[None] * 3, use_cache=True)
    stored = hf_posenc.positions.record_of(cache_of(out)).positions
    assert torch.equal(stored, torch.arange(20)[None] * 3)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("case", ["alibi", "t5", "rope"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_set_attn_implementation_keeps_the_method(family, case, implementation):
    """transformers' error for output_attentions advises set_attn_implementation("eager"); it used to drop the
    position method silently (logits off by up to 5e-2). It now selects our kernel of that name."""
    model = converted(family, case)
    x = ids(1, OLD_LIMIT + 9)
    before = model(x).logits
    model.set_attn_implementation(implementation)
    torch.testing.assert_close(model(x).logits, before, atol=TOL, rtol=0)
    assert hf_posenc.get_backend(model) == implementation
    assert model.config._attn_implementation == hf_posenc.ATTN_IMPLEMENTATION


def test_an_implementation_that_cannot_run_the_method_is_refused():
    model = converted("gpt2", "alibi")
    model.config._attn_implementation = "flash_attention_2"  # what set_attn_implementation writes, where available
    with pytest.raises(ValueError, match="set_backend"):
        model(ids(1, 8))


def random_cases(n: int, seed: int = 0):
    """n draws of (family, case, length, left pad, position-id offset, cache kind), reproducible."""
    rng = torch.Generator().manual_seed(seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=rng))]

    for _ in range(n):
        case = pick([c for c in METHOD_CASES if c not in DYNAMIC])
        yield (pick(CAUSAL), case, int(torch.randint(10, 2 * OLD_LIMIT, (1,), generator=rng)),
               pick([0, 0, 3, 7]), pick([0, 0, 5, 300]), pick(["dynamic", "static"]))


@pytest.mark.parametrize("family, case, length, pad, offset, cache_kind", list(random_cases(30)))
def test_random_decode_equals_the_full_forward(family, case, length, pad, offset, cache_kind):
    """Property check over method x family x length x left padding x position ids x cache type: every decode step
    of a padded batch equals the full no-cache forward at the same positions."""
    model = converted(family, case)
    x = ids(2, length, seed=length)
    mask = torch.ones_like(x)
    mask[1, :pad] = 0
    positions = (mask.cumsum(-1) - 1).clamp_min(0) + offset
    full = model(x, attention_mask=mask, position_ids=positions, use_cache=False).logits
    prefill = max(1, length - 4)
    cache = {CACHE_ARG: static_cache(model, capacity=length + 3)} if cache_kind == "static" else {}
    out = model(x[:, :prefill], attention_mask=mask[:, :prefill], position_ids=positions[:, :prefill],
                use_cache=True, **cache)
    steps = [out.logits]
    for t in range(prefill, length):
        out = model(x[:, t : t + 1], attention_mask=mask[:, : t + 1], position_ids=positions[:, t : t + 1],
                    use_cache=True, **{CACHE_ARG: cache_of(out)})
        steps.append(out.logits)
    real = mask.bool()
    torch.testing.assert_close(torch.cat(steps, 1)[real], full[real], atol=TOL, rtol=0)


@causal
def test_reading_the_returned_cache_logs_no_deprecation(family, monkeypatch):
    """The positions hook reads the cache a forward returns through the field the output declares; touching the
    old ``past_key_values`` name on 5.24 logs a deprecation on every user's first forward."""
    from transformers.utils import generic

    logged = []
    monkeypatch.setattr(generic.logger, "warning_once", lambda msg, *a, **k: logged.append(msg))
    model = converted(family, "alibi")
    model(ids(1, 8), use_cache=True)
    model(ids(1, 8), use_cache=False)  # training: the output has no cache
    assert not [m for m in logged if "deprecated" in m], logged
