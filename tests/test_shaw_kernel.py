"""The ``shaw-banded`` kernel computes what the eager kernel computes for Shaw, and ``auto`` picks it only where it
expresses the call. Tables are random (zero tables would hide a dropped term), with large edge rows a^K_{+-R} /
a^V_{+-R}: the far keys' constant key term and value term then move the output by far more than the tolerance."""

from __future__ import annotations

import types

import pytest
import torch
from tiny_models import CACHE_ARG, VOCAB, cache_of, tiny_model

import hf_posenc
from hf_posenc.backends.masks import keep_mask
from hf_posenc.backends import dispatch
from hf_posenc.backends.eager import eager_attention
from hf_posenc.backends.shaw_banded import shaw_banded_attention
from hf_posenc.methods import ModelShape, PositionTerm, Shaw, ShawOptions

TOL = 1e-5
REACH = 4
LONG = dispatch.SHAW_BANDED_MIN_QUERIES + 44  # the model tests: long enough for auto to pick the kernel


def random_tables(method: Shaw, edge_scale: float = 3.0) -> None:
    """Normal tables, the edge rows (distances -R and +R: every far key's) scaled up."""
    torch.manual_seed(1)
    for table in method.parameters():
        with torch.no_grad():
            table.normal_()
            table[0] *= edge_scale
            table[-1] *= edge_scale


def shaw_method(heads: int, kv_heads: int, dim: int, causal: bool, reach: int = REACH) -> Shaw:
    shape = ModelShape(num_heads=heads, num_kv_heads=kv_heads, head_dim=dim, hidden_size=heads * dim,
                       num_layers=2, causal=causal, original_max_positions=64)
    method = Shaw(ShawOptions(max_distance=reach), shape)
    random_tables(method)
    return method


def eager_reference(method, q, k, v, scaling: float, causal: bool) -> torch.Tensor:
    """The eager kernel, queries the last Lq keys (causal: a bottom-right mask), layer 1's tables."""
    q_len, k_len = q.shape[2], k.shape[2]
    k_pos = torch.arange(k_len)[None]
    mask = None
    if causal:
        keep = (torch.arange(k_len)[None, :] <= torch.arange(k_len - q_len, k_len)[:, None])[None, None]
        mask = keep_mask(keep, q_len, k_len, causal, q.dtype, q.device)
    module = types.SimpleNamespace(layer_idx=1, training=False, num_key_value_groups=q.shape[1] // k.shape[1])
    return eager_attention(module, method, q, k, v, mask, 0.0, scaling, k_pos[:, -q_len:], k_pos)[0]


def kernel(method, q, k, v, scaling: float, causal: bool) -> torch.Tensor:
    a_k, a_v = method.relative_tables(1)
    return shaw_banded_attention(q, k, v, a_k, a_v, method.content_reach(), scaling, causal)


def qkv(q_len: int, k_len: int, heads: int = 4, kv_heads: int = 4, dim: int = 8, batch: int = 2):
    g = torch.Generator().manual_seed(q_len * 1000 + k_len)
    return (torch.randn(batch, heads, q_len, dim, generator=g), torch.randn(batch, kv_heads, k_len, dim, generator=g),
            torch.randn(batch, kv_heads, k_len, dim, generator=g))


# (Lq, Lk): shorter than R, at R and the far part's first keys (R + 1, R + 2), 2R + 1 (encoders: the far right
# starts), several times R and flash's blocks; decode steps and continuations (queries after cached keys)
LENGTHS = [(3, 3), (REACH, REACH), (REACH + 1, REACH + 1), (REACH + 2, REACH + 2), (2 * REACH + 1, 2 * REACH + 1),
           (2 * REACH + 2, 2 * REACH + 2), (67, 67), (300, 300), (1, 3), (1, REACH + 1), (1, REACH + 2), (1, 90),
           (5, 7), (7, 40), (64, 300)]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "encoder"])
@pytest.mark.parametrize("q_len, k_len", LENGTHS)
def test_kernel_matches_eager(q_len, k_len, causal):
    method = shaw_method(4, 4, 8, causal)
    q, k, v = qkv(q_len, k_len)
    expected = eager_reference(method, q, k, v, 0.3, causal)
    torch.testing.assert_close(kernel(method, q, k, v, 0.3, causal), expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "encoder"])
@pytest.mark.parametrize("q_len, k_len", [(40, 40), (1, 40), (9, 40)])
def test_kernel_matches_eager_with_grouped_kv_heads(q_len, k_len, causal):
    method = shaw_method(6, 2, 8, causal)
    q, k, v = qkv(q_len, k_len, heads=6, kv_heads=2)
    expected = eager_reference(method, q, k, v, 0.35, causal)
    torch.testing.assert_close(kernel(method, q, k, v, 0.35, causal), expected, atol=TOL, rtol=0)


def test_kernel_keeps_the_input_dtype():
    method = shaw_method(4, 4, 8, True)
    q, k, v = (x.bfloat16() for x in qkv(40, 40))
    out = kernel(method, q, k, v, 0.3, True)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), eager_reference(method, *(x.float() for x in (q, k, v)), 0.3, True),
                               atol=3e-2, rtol=0)


def test_mismatched_tables_are_refused():
    method = shaw_method(4, 4, 8, True)
    q, k, v = qkv(8, 8)
    a_k, a_v = method.relative_tables(1)
    with pytest.raises(ValueError, match="reach 3"):
        shaw_banded_attention(q, k, v, a_k, a_v, 3, 0.3, True)


def test_clipped_content_form_needs_a_content_term():
    with pytest.raises(ValueError, match="content_form"):
        PositionTerm(content_form="clipped")
    with pytest.raises(ValueError, match="content_form"):
        PositionTerm(content=True, content_form="banded")


# ---- whole converted models -----------------------------------------------------------------------------------
def ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def converted_shaw(family: str, **options):
    model = hf_posenc.convert(tiny_model(family), "shaw", **options)
    random_tables(model.base_model.posenc)  # every layer's tables
    return model


def logits_and_kernels(model, backend: str, *args, **kwargs):
    seen, original = [], dispatch.choose_kernel

    def spy(*a, **k):
        seen.append(original(*a, **k))
        return seen[-1]

    hf_posenc.set_backend(model, backend)
    dispatch.choose_kernel = spy
    try:
        with torch.no_grad():
            out = model(*args, **kwargs)
    finally:
        dispatch.choose_kernel = original
    return out, set(seen)


@pytest.mark.parametrize("family, reach", [("gpt2", 8), ("gpt2", 16), ("bert", 8), ("llama", 8)])
def test_model_logits_match_eager(family, reach):
    """GPT-2 (causal), BERT (encoder: far keys on both sides), Llama (rotary q / k, grouped KV heads)."""
    model = converted_shaw(family, max_distance=reach)
    x = ids(2, LONG)
    expected, kernels = logits_and_kernels(model, "eager", x)
    assert kernels == {"eager"}
    out, kernels = logits_and_kernels(model, "auto", x)
    assert kernels == {"shaw-banded"}
    torch.testing.assert_close(out.logits, expected.logits, atol=TOL, rtol=0)


def test_model_prefill_then_decode_matches_a_full_eager_forward():
    model = converted_shaw("gpt2", max_distance=8)
    full = ids(1, LONG + 3, seed=2)
    expected, _ = logits_and_kernels(model, "eager", full)
    out, kernels = logits_and_kernels(model, "auto", full[:, :LONG], use_cache=True)
    assert kernels == {"shaw-banded"}
    steps, cache = [out.logits], cache_of(out)
    for i in range(LONG, LONG + 3):  # decode steps: eager's (1, H, 1, Lk) row
        out, kernels = logits_and_kernels(model, "auto", full[:, i : i + 1], **{CACHE_ARG: cache}, use_cache=True)
        assert kernels == {"eager"}
        steps.append(out.logits)
        cache = cache_of(out)
    torch.testing.assert_close(torch.cat(steps, dim=1), expected.logits, atol=TOL, rtol=0)


# ---- auto's rule 1a ---------------------------------------------------------------------------------------------
def test_auto_gives_shaw_the_banded_kernel_only_where_it_expresses_the_call():
    method = converted_shaw("gpt2").base_model.posenc
    n = dispatch.SHAW_BANDED_MIN_QUERIES
    q = torch.randn(1, 4, n, 8)

    def choose(q, k=None, backend="auto", mask=None, causal=True, dropout=0.0, weights=False, plain=True):
        k = q if k is None else k
        return dispatch.choose_kernel(backend, method, q, k, k, mask, causal, dropout, weights, plain)

    with torch.no_grad():
        assert choose(q) == "shaw-banded"
        assert choose(q, causal=False) == "shaw-banded"
        assert choose(torch.randn(1, 4, n - 1, 8)) == "eager"  # short
        assert choose(torch.randn(1, 4, 1, 8), torch.randn(1, 4, n, 8)) == "eager"  # a decode step
        assert choose(q, torch.randn(1, 4, n + 5, 8)) == "eager"  # maskless 1 < Lq < Lk: is_causal's convention
        assert choose(q, mask=torch.ones(1, 1, n, n, dtype=torch.bool)) == "eager"  # a padding mask
        assert choose(q, dropout=0.1) == "eager"
        assert choose(q, weights=True) == "eager"
        assert choose(q, plain=False) == "eager"  # gapped / packed / static-cache positions
        for backend in ("sdpa", "flex", "eager"):
            assert choose(q, backend=backend) == "eager"
        meta = torch.empty(1, 4, n, 8, device="meta")
        assert choose(meta) == "eager"  # CPU only (its far part is the CPU flash kernel)
    assert choose(q) == "eager"  # autograd: the tables are trainable
    xl = hf_posenc.convert(tiny_model("gpt2"), "transformer_xl").base_model.posenc
    with torch.no_grad():
        assert dispatch.choose_kernel("auto", xl, q, q, q, None, True, 0.0, False) == "eager"  # not clipped
