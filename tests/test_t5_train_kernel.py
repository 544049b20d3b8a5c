"""The trainable banded T5 kernel (``sdpa-banded`` with autograd): outputs and gradients (q, k, v, the bucket
table) equal a full-bias SDPA reference, alone and inside converted models, and ``auto`` picks it for training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_model

import hf_posenc
from hf_posenc.backends import dispatch
from hf_posenc.backends import sdpa as kernels
from hf_posenc.methods.base import ModelShape
from hf_posenc.methods.t5_bias import T5Bias, T5BiasOptions

SCALING = 0.3


def t5_method(heads: int, max_distance: int = 128, num_buckets: int | None = None, dtype=torch.float64) -> T5Bias:
    """T5 with a random table; short reaches get 8 buckets (T5's bucketing needs max_distance > num_buckets / 2)."""
    num_buckets = num_buckets or (32 if max_distance >= 64 else 8)
    shape = ModelShape(num_heads=heads, num_kv_heads=heads, head_dim=8, hidden_size=8 * heads, num_layers=1,
                       causal=True, original_max_positions=64)
    method = T5Bias(T5BiasOptions(num_buckets=num_buckets, max_distance=max_distance), shape)
    torch.manual_seed(1)
    torch.nn.init.normal_(method.relative_attention_bias.weight, std=1.0)  # random table: every bucket matters
    return method.to(dtype)


def reference(method, query, key, value):
    """Full (H, Lq, Lk) bias + causal mask through SDPA's math path; queries are the last Lq keys."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    q_len, k_len = query.shape[2], key.shape[2]
    k_pos = torch.arange(k_len)
    bias = method.score_bias(k_pos[None, -q_len:], k_pos[None])[0].to(query.dtype)  # (H, Lq, Lk)
    keep = torch.ones(q_len, k_len, dtype=torch.bool).tril(k_len - q_len)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias.masked_fill(~keep, float("-inf")),
                                         scale=SCALING)
    return out.transpose(1, 2)  # (B, Lq, H, D)


def outputs_and_grads(attention, method, query, key, value, grad_out):
    leaves = [x.detach().clone().requires_grad_() for x in (query, key, value)]
    table = method.relative_attention_bias.weight
    table.grad = None
    out = attention(method, *leaves)
    out.backward(grad_out)
    return {"out": out.detach(), "dq": leaves[0].grad, "dk": leaves[1].grad, "dv": leaves[2].grad,
            "dtable": table.grad.clone()}


def inputs(batch, heads, kv_heads, q_len, k_len, dim=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda h, n: torch.randn(batch, h, n, dim, generator=g, dtype=dtype)  # noqa: E731
    return make(heads, q_len), make(kv_heads, k_len), make(kv_heads, k_len), make(q_len, heads)  # grad (B, Lq, H, D)


# (batch, heads, kv_heads, q_len, k_len, rows, max_distance): R = max_distance, C = rows
CASES = {
    "shorter than a block and the band": (1, 2, 2, 10, 10, 64, 128),
    "one block plus one row": (1, 2, 2, 65, 65, 64, 16),
    "block boundary - 1": (1, 2, 2, 127, 127, 64, 16),
    "block boundary": (1, 2, 2, 128, 128, 64, 16),
    "several blocks, reach not a multiple of C": (2, 4, 4, 300, 300, 64, 40),
    "default reach, several blocks": (1, 2, 2, 400, 400, 64, 128),
    "GQA": (2, 6, 2, 200, 200, 32, 24),
    "cached keys, offset <= R": (1, 2, 2, 150, 180, 64, 40),
    "cached keys, offset > R": (1, 3, 3, 90, 300, 32, 40),
    "cached keys beyond every query's band": (1, 2, 1, 5, 260, 64, 16),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_kernel_matches_the_full_bias_reference(case):
    batch, heads, kv_heads, q_len, k_len, rows, reach = CASES[case]
    method = t5_method(heads, max_distance=reach)
    query, key, value, grad_out = inputs(batch, heads, kv_heads, q_len, k_len)
    layout = kernels.band_layout(q_len, k_len, rows, min(reach, k_len))
    if q_len + (k_len - q_len) > reach:  # the far keys are really exercised
        assert layout.far
    expected = outputs_and_grads(reference, method, query, key, value, grad_out)
    got = outputs_and_grads(
        lambda m, q, k, v: kernels.t5_banded_train_attention(m, q, k, v, SCALING, rows=rows), method, query, key,
        value, grad_out,
    )
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-10, rtol=1e-10, msg=name)


def test_fp32_kernel_is_close_to_the_reference():
    method = t5_method(4, max_distance=40, dtype=torch.float32)
    query, key, value, grad_out = inputs(1, 4, 4, 300, 300, dtype=torch.float32)
    expected = outputs_and_grads(reference, method, query, key, value, grad_out)
    got = outputs_and_grads(lambda m, q, k, v: kernels.t5_banded_train_attention(m, q, k, v, SCALING), method,
                            query, key, value, grad_out)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-4, msg=name)


def test_far_constant_gets_the_gradient_of_the_far_keys():
    """Only the far keys carry the last bucket here (the band is shorter than the distance where it starts): its
    table row's gradient is then exactly the far constant's."""
    method = t5_method(2, max_distance=16, num_buckets=8)
    last_from = int((method.bucket(-torch.arange(64)) == 7).nonzero()[0])  # distance where the last bucket starts
    query, key, value, grad_out = inputs(1, 2, 2, 100, 100)
    got = outputs_and_grads(lambda m, q, k, v: kernels.t5_banded_train_attention(m, q, k, v, SCALING, rows=16),
                            method, query, key, value, grad_out)
    expected = outputs_and_grads(reference, method, query, key, value, grad_out)
    assert last_from <= 16 and expected["dtable"][7].abs().min() > 1e-3
    torch.testing.assert_close(got["dtable"][7], expected["dtable"][7], atol=1e-10, rtol=1e-10)


def test_gradcheck_in_double():
    """torch.autograd.gradcheck of the autograd function itself, band bias and far constant as inputs."""
    torch.manual_seed(0)
    q_len, k_len, rows, reach = 13, 17, 4, 6
    layout = kernels.band_layout(q_len, k_len, rows, reach)
    assert len(layout.far) == 1 and layout.q_pad and layout.k_pad
    query, key, value, _ = inputs(1, 2, 2, q_len, k_len, dim=4)
    method = t5_method(2, max_distance=reach, num_buckets=8)
    band, far = kernels.t5_band_bias(method, rows, reach, torch.float64, query.device)
    band, far = band.detach().requires_grad_(), (far.detach() + 1.0).requires_grad_()  # the far keys matter

    def attention(q, k, v, band, far):
        return kernels._BandedT5.apply(q, k, v, band, far, SCALING, layout)

    args = [x.requires_grad_() for x in (query, key, value)] + [band, far]
    assert torch.autograd.gradcheck(attention, args, eps=1e-6, atol=1e-7)


# ---- inside converted models ------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "llama"])  # Llama: GQA (6 query heads, 2 key/value heads)
def test_training_a_converted_model_matches_sdpa(family, kernels_seen):
    """fp64 model, all weights trainable: every gradient (the T5 table included) equals the sdpa backend's."""
    model = hf_posenc.convert(tiny_model(family), "t5", max_distance=40).double().eval()  # eval: no dropout
    torch.manual_seed(1)
    torch.nn.init.normal_(model.base_model.posenc.relative_attention_bias.weight, std=0.5)
    x = torch.randint(4, 300, (1, dispatch.BLOCKED_MIN_QUERIES + 37), generator=torch.Generator().manual_seed(0))
    grads = {}
    for backend in ("sdpa", "auto"):
        hf_posenc.set_backend(model, backend)
        model.zero_grad()
        kernels_seen.clear()
        model(x, labels=x).loss.backward()
        seen = list(kernels_seen)
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        assert set(seen) == ({"sdpa-banded"} if backend == "auto" else {"sdpa"})
    assert any("relative_attention_bias" in name for name in grads["auto"])
    assert grads["sdpa"].keys() == grads["auto"].keys()
    for name, grad in grads["sdpa"].items():
        torch.testing.assert_close(grads["auto"][name], grad, atol=1e-9, rtol=1e-7, msg=name)


def test_auto_training_rules():
    method = t5_method(4, dtype=torch.float32)
    q = torch.randn(1, 4, dispatch.BLOCKED_MIN_QUERIES, 8, requires_grad=True)
    choose = lambda q, dropout=0.0, mask=None: dispatch.choose_kernel(  # noqa: E731
        "auto", method, q, q, q, mask, True, dropout, False)
    assert choose(q) == "sdpa-banded"  # 3b with autograd
    assert choose(q, dropout=0.1) == "sdpa-blocked"  # 3c: dropout
    assert choose(q.detach().bfloat16().requires_grad_()) == "sdpa-blocked"  # 3c: bf16 training
    mask = torch.ones(1, 1, q.shape[2], q.shape[2], dtype=torch.bool)
    assert choose(q, mask=mask) == "sdpa-blocked"  # 3c: padding
    with torch.no_grad():  # inference: rule 3b picks the banded kernel, which has no dropout: handed to sdpa
        assert dispatch._backend_kernel("auto", method, q, q, q, None, True, 0.1, False, True) == "sdpa-banded"
        assert choose(q, dropout=0.1) == "sdpa"
