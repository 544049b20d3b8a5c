"""learned, xpos, transformer_xl and fire against their formulas, and the declared method contract: the kernel
registry matches kernels to what a method declares, the registry and the test matrix agree, and docs/methods.md's
option tables are the options dataclasses' help texts. (The behaviour matrix runs them in tests/test_matrix.py,
tests/test_positions.py and tests/test_bad_input.py.)"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from test_matrix import METHOD_CASES, TOL, converted, ids
from tiny_models import FAMILIES, OLD_LIMIT, tiny_config, tiny_model

import hf_posenc
from hf_posenc.backends import dispatch
from hf_posenc.methods import Fire, FireOptions, ModelShape, PositionTerm, TransformerXL, TransformerXLOptions
from hf_posenc.methods.alibi import alibi_slopes
from hf_posenc.methods.option_docs import documented, render
from hf_posenc.methods.rope import rotate_half
from hf_posenc.registry import METHODS, arch_for

ROOT = Path(__file__).resolve().parents[1]


def shape(**overrides) -> ModelShape:
    values = dict(num_heads=4, num_kv_heads=4, head_dim=8, hidden_size=32, num_layers=2, causal=True,
                  original_max_positions=64)
    return ModelShape(**{**values, **overrides})


# ---- the contract ------------------------------------------------------------------------------------------
def test_the_registry_and_the_test_matrix_agree():
    assert {case.split("-")[0] for case in METHOD_CASES} == set(hf_posenc.available_methods())


def test_docs_option_tables_are_the_help_texts():
    text = (ROOT / "docs" / "methods.md").read_text(encoding="utf-8")
    assert sorted(documented(text)) == sorted(METHODS), "every method has one options table in docs/methods.md"
    assert render(text, METHODS) == text, "regenerate: python -m hf_posenc.methods.option_docs docs/methods.md"


def test_every_method_declares_its_term_and_nothing_probes_for_attributes():
    for cls in METHODS.values():
        assert isinstance(cls.term, PositionTerm)
    for folder in ("methods", "backends"):
        for path in (ROOT / "hf_posenc" / folder).glob("*.py"):
            assert "hasattr(" not in path.read_text(encoding="utf-8"), f"{path}: declare a capability instead"
    with pytest.raises(ValueError, match="bias_form"):
        PositionTerm(bias="positions", bias_form="linear")


@pytest.mark.parametrize("name, expected", [
    ("alibi", {"eager", "sdpa", "sdpa-blocked", "sdpa-windowed", "flex"}),
    ("t5", {"eager", "sdpa", "sdpa-blocked", "sdpa-banded", "flex"}),
    ("fire", {"eager", "sdpa"}),  # depends on the query position: no distance template
    ("shaw", {"eager", "shaw-banded"}),  # a clipped content term
    ("transformer_xl", {"eager"}),
    ("xpos", {"eager", "sdpa", "flex"}),
    ("learned", {"eager", "sdpa", "flex"}),
])
def test_kernels_run_what_the_method_declares(name, expected):
    assert {k for k, kernel in dispatch.KERNELS.items() if kernel.runs(METHODS[name].term)} == expected


@pytest.mark.parametrize("name, kernel", [("fire", "sdpa"), ("transformer_xl", "eager"), ("xpos", "sdpa"),
                                          ("learned", "sdpa"), ("t5", "sdpa-banded")])
def test_auto_picks_a_kernel_the_method_can_run(name, kernel):
    method = converted("gpt2", name).base_model.posenc
    q = torch.randn(1, 4, dispatch.BLOCKED_MIN_QUERIES, 8, requires_grad=True)  # long, with autograd
    assert dispatch.choose_kernel("auto", method, q, q, q, None, True, 0.0, False) == kernel


def test_a_new_kernel_is_one_registry_entry(monkeypatch):
    """A kernel registered by name runs for the methods whose term it can run."""
    calls = []
    model = converted("gpt2", "fire")
    x = ids(1, 20)
    reference = model(x).logits
    sdpa = dispatch.KERNELS["sdpa"]
    monkeypatch.setitem(dispatch.KERNELS, "sdpa", dispatch.Kernel(
        "sdpa", sdpa.runs, lambda call: calls.append(call.method.name) or sdpa.run(call)))
    torch.testing.assert_close(model(x).logits, reference)
    assert calls == ["fire"] * model.config.num_hidden_layers


# ---- learned ------------------------------------------------------------------------------------------------
TABLE_FAMILIES = [f for f in FAMILIES if arch_for(tiny_config(f)).position_table is not None]  # learned tables


@pytest.mark.parametrize("extend", ["copy", "zeros"])
@pytest.mark.parametrize("family", TABLE_FAMILIES)
def test_learned_inside_the_old_limit_is_the_unconverted_model(family, extend):
    config = tiny_config(family)
    x = ids(2, arch_for(config).table_limit(config))  # every token the table covers (RoBERTa: fewer than its rows)
    original = tiny_model(family)(x).logits
    model = hf_posenc.convert(tiny_model(family), "learned", extend=extend)
    torch.testing.assert_close(model(x).logits, original, atol=TOL, rtol=0)


@pytest.mark.parametrize("extend", ["copy", "interpolate", "zeros"])
def test_learned_extension_rows(extend):
    old = tiny_model("gpt2").transformer.wpe.weight.detach()
    model = hf_posenc.convert(tiny_model("gpt2"), "learned", extend=extend, max_position_embeddings=3 * OLD_LIMIT)
    table = model.base_model.posenc.table.weight.detach()
    assert table.shape == (3 * OLD_LIMIT, old.shape[1])
    if extend == "copy":  # Longformer: the old table repeated
        torch.testing.assert_close(table, old.repeat(3, 1))
    elif extend == "zeros":
        torch.testing.assert_close(table[:OLD_LIMIT], old)
        assert table[OLD_LIMIT:].abs().max() == 0
    else:  # resampled: the ends are kept, row p lies on the segment around p (N_old - 1) / (N - 1)
        torch.testing.assert_close(table[0], old[0])
        torch.testing.assert_close(table[-1], old[-1])
        p = 100
        where = p * (OLD_LIMIT - 1) / (3 * OLD_LIMIT - 1)
        low, frac = int(where), where - int(where)
        torch.testing.assert_close(table[p], old[low] * (1 - frac) + old[low + 1] * frac)


def test_learned_on_llama_starts_as_nope_and_refuses_positions_past_its_table():
    x = ids(1, 30)
    nope = hf_posenc.convert(tiny_model("llama"), "nope")
    model = hf_posenc.convert(tiny_model("llama"), "learned", max_position_embeddings=100)
    torch.testing.assert_close(model(x).logits, nope(x).logits, atol=TOL, rtol=0)
    with pytest.raises(ValueError, match="past the learned table's 100 rows.*max_position_embeddings"):
        model(ids(1, 101))


# ---- xpos ---------------------------------------------------------------------------------------------------
def xpos_reference(q, k, q_pos, k_pos, theta=10000.0, base=512.0, gamma=0.4):
    """The paper's formula with no centre: q R(n) zeta^(n/B), k R(m) zeta^(-m/B) (small positions)."""
    dim = q.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2).float() / dim)
    zeta = (torch.arange(0, dim, 2).float() / dim + gamma) / (1 + gamma)

    def one(x, pos, sign):
        angles = pos[..., None].float() * inv_freq
        emb = torch.cat([angles, angles], -1)
        scale = zeta ** (sign * pos[..., None].float() / base)
        scale = torch.cat([scale, scale], -1)
        return (x * emb.cos() + rotate_half(x) * emb.sin()) * scale

    return one(q, q_pos, 1), one(k, k_pos, -1)


def test_xpos_scores_equal_the_formula():
    model = converted("gpt2", "xpos")
    method = model.base_model.posenc
    q, k = torch.randn(1, 4, 6, 8), torch.randn(1, 4, 9, 8)
    q_pos, k_pos = torch.arange(3, 9)[None] * 5, torch.arange(9)[None] * 5
    ours = method.rotate(q, k, q_pos, k_pos)
    reference = xpos_reference(q, k, q_pos, k_pos)
    torch.testing.assert_close(ours[0] @ ours[1].transpose(-1, -2), reference[0] @ reference[1].transpose(-1, -2))


def test_xpos_on_llama_does_not_reuse_the_native_rotary():
    """Reusing Llama's rotary would drop the scale: xPos must differ from RoPE, and rotate in attention."""
    x = ids(1, 40)
    rope, xpos = converted("llama", "rope"), hf_posenc.convert(tiny_model("llama"), "xpos", scale_base=8.0)
    assert xpos.base_model.posenc.rotate_in_attention
    assert type(xpos.base_model.rotary_emb).__name__ == "IdentityRotary"
    assert (rope(x).logits - xpos(x).logits).abs().max() > 1e-4
    huge = hf_posenc.convert(tiny_model("llama"), "xpos", scale_base=1e9)  # no decay: RoPE exactly
    torch.testing.assert_close(huge(x).logits, rope(x).logits, atol=TOL, rtol=0)


# ---- transformer_xl -----------------------------------------------------------------------------------------
def test_transformer_xl_starts_as_nope():
    x = ids(1, 30)
    for family in ("gpt2", "llama"):
        nope = hf_posenc.convert(tiny_model(family), "nope")
        txl = hf_posenc.convert(tiny_model(family), "transformer_xl")
        torch.testing.assert_close(txl(x).logits, nope(x).logits, atol=TOL, rtol=0)


def test_transformer_xl_trains_from_its_zero_start():
    model = hf_posenc.convert(tiny_model("gpt2"), "transformer_xl")
    x = ids(2, 40)
    model(x, labels=x).loss.backward()
    method = model.base_model.posenc
    assert all(p.weight.grad.abs().max() > 0 for p in method.projections)
    assert method.u.grad.abs().max() > 0
    assert method.v.grad.abs().max() == 0  # d/dv = W_R R, zero until W_R moves
    with torch.no_grad():
        for p in method.projections:
            p.weight.add_(0.01)
    model.zero_grad()
    model(x, labels=x).loss.backward()
    assert method.v.grad.abs().max() > 0


@pytest.mark.parametrize("name, options", [("learned", {}), ("fire", {}), ("transformer_xl", {"init_std": 0.1})])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_every_parameter_of_the_method_gets_a_gradient(family, name, options):
    """(FIRE's threshold L has a gradient from the queries below it: 40 tokens, L = the old limit 64.)"""
    model = hf_posenc.convert(tiny_model(family), name, **options)
    x = ids(2, 40)
    model(x, labels=x).loss.backward()
    for key, p in model.base_model.posenc.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, key


def test_transformer_xl_terms_equal_the_paper():
    torch.manual_seed(0)
    method = TransformerXL(TransformerXLOptions(init_std=0.3), shape())
    q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 9, 8)
    q_pos, k_pos = torch.arange(4, 9)[None], torch.arange(9)[None]
    term = method.key_term(q, k, 1, q_pos, k_pos)
    w = method.projections[1].weight
    for i, qi in enumerate(q_pos[0].tolist()):
        for j, kj in enumerate(k_pos[0].tolist()):
            d = float(qi - kj)
            freqs = 10000.0 ** -(torch.arange(0, 32, 2).float() / 32)
            r = torch.cat([torch.sin(d * freqs), torch.cos(d * freqs)])  # (hidden,)
            wr = (w @ r).view(4, 8)  # (H, D)
            expected = (q[:, :, i] * wr).sum(-1) + (k[:, :, j] * method.u).sum(-1) + (method.v * wr).sum(-1)
            torch.testing.assert_close(term[:, :, i, j], expected, atol=1e-5, rtol=1e-5)


# ---- fire ---------------------------------------------------------------------------------------------------
def fire_alibi_error(threshold: int, width: int = 32, heads: int = 4) -> tuple[float, float]:
    """(max |FIRE - ALiBi| over distances 0..threshold, as a fraction of the steepest head's ALiBi at the
    threshold; the same at distances 0..16)."""
    method = Fire(FireOptions(width=width, threshold=float(threshold)), shape(num_heads=heads,
                                                                             original_max_positions=threshold))
    q_pos = torch.tensor([[threshold]])
    k_pos = torch.arange(threshold + 1)[None]
    with torch.no_grad():
        bias = method.score_bias(q_pos, k_pos)[0, :, 0]  # (H, L + 1), distances L .. 0
    slopes = alibi_slopes(heads)
    alibi = -slopes[:, None] * (q_pos[0] - k_pos[0]).float()
    error = (bias - alibi).abs()
    scale = float(slopes.max()) * threshold
    return float(error.max()) / scale, float(error[:, -17:].max()) / float(slopes.max())


def test_fire_alibi_init_equals_alibi_at_the_knots_and_is_close_between():
    method = Fire(FireOptions(threshold=64.0), shape())
    knots = torch.arange(32) / 32
    distances = (torch.exp(knots * math.log(0.1 * 64 + 1)) - 1) / 0.1
    with torch.no_grad():
        values = method.mlp(knots[:, None])  # (W, H)
    torch.testing.assert_close(values, -alibi_slopes(4)[None] * distances[:, None], atol=1e-4, rtol=1e-4)
    for threshold in (64, 1024):  # measured values: docs/methods.md
        far, near = fire_alibi_error(threshold)
        assert far < 0.01 and near < 0.1


def test_fire_zeros_is_nope_and_the_bias_depends_on_the_query_position():
    x = ids(1, 30)
    nope = hf_posenc.convert(tiny_model("gpt2"), "nope")
    fire = hf_posenc.convert(tiny_model("gpt2"), "fire", init="zeros")
    torch.testing.assert_close(fire(x).logits, nope(x).logits, atol=TOL, rtol=0)
    method = converted("gpt2", "fire").base_model.posenc
    k_pos = torch.arange(300)[None]
    bias = method.score_bias(k_pos[:, [100, 299]], k_pos)[0]  # queries at 100 and 299
    assert (bias[:, 0, 90] - bias[:, 1, 289]).abs().max() > 1e-4  # same distance 10, another query position


def test_measured_fire_alibi_error_is_what_the_docs_say():
    text = (ROOT / "docs" / "methods.md").read_text(encoding="utf-8")
    for threshold in (64, 1024):
        far, near = fire_alibi_error(threshold)
        line = f"threshold {threshold}: {far:.2%} of the steepest head's bias at the threshold, {near:.2f} slopes"
        assert line in " ".join(text.split()), line
    assert re.search("FIREINIT", text) is None


def test_learned_refuses_positions_before_its_first_row():
    model = hf_posenc.convert(tiny_model("gpt2"), "learned")
    with pytest.raises(ValueError, match="before the learned table's first row"):
        model(ids(1, 8), position_ids=torch.arange(8)[None] - 1)
