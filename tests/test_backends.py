"""Attention backends: every backend computes what ``sdpa`` computes, ``auto`` follows its documented rules, the
choice is validated and saved, and FlexAttention does not recompile per decode step."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_models import OLD_LIMIT, VOCAB, tiny_model

import hf_posenc
from hf_posenc.backends import dispatch, flex
from hf_posenc.backends import sdpa as kernels
from hf_posenc.methods.alibi import alibi_slopes

TOL = 1e-4
LONG = 600  # >= dispatch.BLOCKED_MIN_QUERIES: the auto backend's query-block kernels run


def converted(family: str, method: str, backend: str = "auto", **options):
    model = hf_posenc.convert(tiny_model(family), method, backend=backend, **options)
    if method == "t5":  # random tables, so the bias matters
        torch.manual_seed(1)
        torch.nn.init.normal_(model.base_model.posenc.relative_attention_bias.weight, std=0.5)
    return model


def ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def left_padded(length: int, pad: int):
    x = ids(2, length)
    mask = torch.ones_like(x)
    mask[1, :pad] = 0
    x[1, :pad] = 0
    return x, mask


@pytest.fixture
def kernels_seen(monkeypatch):
    seen = []
    original = dispatch.choose_kernel

    def spy(*args, **kwargs):
        seen.append(original(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(dispatch, "choose_kernel", spy)
    return seen


def logits_with(model, backend: str, *args, **kwargs) -> torch.Tensor:
    hf_posenc.set_backend(model, backend)
    with torch.no_grad():
        return model(*args, **kwargs).logits


# ---- configuration ---------------------------------------------------------------------------------------
def test_unknown_backend_is_rejected_with_the_list():
    model = tiny_model("gpt2")
    with pytest.raises(ValueError, match="known backends: auto, sdpa, flex, eager"):
        hf_posenc.convert(model, "alibi", backend="flash")
    assert not hf_posenc.is_converted(model)
    with pytest.raises(ValueError, match="known backends"):
        hf_posenc.PosEncConfig("alibi", backend="xformers")
    hf_posenc.convert(model, "alibi")
    with pytest.raises(ValueError, match="known backends"):
        hf_posenc.set_backend(model, "Flex")
    with pytest.raises(ValueError, match="converted by hf_posenc"):
        hf_posenc.set_backend(tiny_model("gpt2"), "sdpa")


def test_backend_defaults_to_auto_and_old_configs_load():
    model = hf_posenc.convert(tiny_model("gpt2"), "alibi")
    assert model.config.posenc["backend"] == "auto" == hf_posenc.get_backend(model)
    stored = dict(model.config.posenc)
    del stored["backend"]  # written before backends existed
    assert hf_posenc.PosEncConfig.from_dict(stored).backend == "auto"


def test_backend_survives_save_and_reload(tmp_path):
    model = converted("gpt2", "t5", backend="eager")
    x = ids(1, 40)
    before = logits_with(model, "eager", x)
    model.save_pretrained(tmp_path / "a")
    reloaded = hf_posenc.from_pretrained(tmp_path / "a")
    assert hf_posenc.get_backend(reloaded) == "eager"
    assert reloaded.base_model.posenc.backend == "eager"
    hf_posenc.set_backend(reloaded, "sdpa")
    reloaded.save_pretrained(tmp_path / "b")
    again = hf_posenc.from_pretrained(tmp_path / "b")
    assert again.base_model.posenc.backend == "sdpa" == again.config.posenc["backend"]
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, before, atol=TOL, rtol=0)


def test_convert_accepts_a_backend_with_a_config():
    config = hf_posenc.PosEncConfig("alibi", backend="eager")
    model = hf_posenc.convert(tiny_model("gpt2"), config)
    assert model.base_model.posenc.backend == "eager"
    model = hf_posenc.convert(tiny_model("gpt2"), config, backend="sdpa")
    assert model.base_model.posenc.backend == "sdpa"


# ---- same numbers on every backend -------------------------------------------------------------------------
METHODS = ["alibi", "t5", "rope", "nope"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_auto_and_eager_match_sdpa_long_padded_and_cached(family, method, kernels_seen):
    model = converted(family, method)
    x = ids(1, LONG)
    reference = logits_with(model, "sdpa", x)
    for backend in ("auto", "eager"):
        torch.testing.assert_close(logits_with(model, backend, x), reference, atol=TOL, rtol=0)

    padded, mask = left_padded(LONG, 9)
    reference = logits_with(model, "sdpa", padded, attention_mask=mask)
    for backend in ("auto", "eager"):
        out = logits_with(model, backend, padded, attention_mask=mask)
        torch.testing.assert_close(out[0], reference[0], atol=TOL, rtol=0)
        torch.testing.assert_close(out[1, 9:], reference[1, 9:], atol=TOL, rtol=0)

    # KV cache: a long prefill, a long continuation (queries after cached keys), then decode steps
    full = ids(1, LONG + 520 + 3, seed=2)
    reference = logits_with(model, "sdpa", full)
    hf_posenc.set_backend(model, "auto")
    kernels_seen.clear()
    with torch.no_grad():
        out = model(full[:, :LONG], use_cache=True)
        steps, cache = [out.logits], out.cache
        for a, b in ((LONG, LONG + 520), (LONG + 520, LONG + 521), (LONG + 521, LONG + 522), (LONG + 522, None)):
            out = model(full[:, a:b], cache=cache, use_cache=True)
            steps.append(out.logits)
            cache = out.cache
    torch.testing.assert_close(torch.cat(steps, dim=1), reference, atol=TOL, rtol=0)
    if method in ("alibi", "t5"):  # the long calls used the query-block kernels, the decode steps the bias row
        long_kernel = "sdpa-windowed" if method == "alibi" else "sdpa-banded"
        assert long_kernel in kernels_seen and "sdpa" in kernels_seen


@pytest.mark.parametrize("method", ["alibi", "t5"])
def test_auto_gradients_match_sdpa(method):
    model = converted("gpt2", method).train()  # tiny models have dropout 0.1: the rules pick a kernel with dropout
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    x = ids(1, LONG)
    grads = {}
    for backend in ("sdpa", "auto"):
        hf_posenc.set_backend(model, backend)
        model.zero_grad()
        model(x, labels=x).loss.backward()
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads["sdpa"].keys() == grads["auto"].keys()
    for name, grad in grads["sdpa"].items():
        torch.testing.assert_close(grads["auto"][name], grad, atol=1e-4, rtol=1e-3, msg=name)


def test_long_alibi_builds_no_length_squared_bias(monkeypatch):
    model = converted("gpt2", "alibi")
    monkeypatch.setattr(hf_posenc.attention, "biased_mask", lambda *a: pytest.fail("built an (H, L, L) bias"))
    with torch.no_grad():
        model(ids(1, LONG))


# ---- the windowed and blocked kernels on their own ---------------------------------------------------------
def alibi_reference(query, key, value, slopes, scaling):
    q_len, k_len = query.shape[2], key.shape[2]
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    k_pos = torch.arange(k_len)
    distance = (k_pos[-q_len:, None] - k_pos[None, :]).float()
    bias = (-slopes[:, None, None] * distance).masked_fill(distance < 0, float("-inf"))
    return F.scaled_dot_product_attention(query, key, value, attn_mask=bias[None], scale=scaling).transpose(1, 2)


@pytest.mark.parametrize("batch,heads,kv_heads,q_len,k_len", [(1, 12, 12, 1100, 1100), (2, 8, 2, 700, 900)])
def test_windowed_alibi_is_exact_where_it_truncates(batch, heads, kv_heads, q_len, k_len):
    torch.manual_seed(0)
    dim = 32
    layout = lambda n, h: torch.randn(batch, n, h, dim).transpose(1, 2).detach()  # noqa: E731 (B, H, L, D) views
    query = layout(q_len, heads).requires_grad_()
    key, value = layout(k_len, kv_heads).requires_grad_(), layout(k_len, kv_heads).requires_grad_()
    slopes, scaling = alibi_slopes(heads), dim**-0.5
    windows = kernels.alibi_windows(query, key, slopes, scaling, k_len)
    assert min(windows) < k_len // 4 and max(windows) == k_len  # some heads truncate, some see everything

    out = kernels.alibi_windowed_attention(query, key, value, slopes, scaling)
    reference = alibi_reference(query, key, value, slopes, scaling)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out * weights).sum(), (query, key, value))
    expected = torch.autograd.grad((reference * weights).sum(), (query, key, value))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_blocked_kernel_matches_a_full_bias_with_padding_and_cache():
    torch.manual_seed(0)
    heads, dim, q_len, k_len = 4, 16, 300, 340
    query = torch.randn(2, heads, q_len, dim)
    key, value = torch.randn(2, heads, k_len, dim), torch.randn(2, heads, k_len, dim)
    method = converted("gpt2", "t5").base_model.posenc
    k_pos = torch.arange(k_len)
    keep = torch.ones(2, 1, q_len, k_len, dtype=torch.bool).tril(diagonal=k_len - q_len)
    keep[1, :, :, :7] = False  # left padding of row 1
    template = kernels.causal_template(method, k_pos, 64, torch.float32)
    out = kernels.blocked_attention(query, key, value, template, keep, 0.25, 0.0, False)
    bias = method.score_bias(k_pos[-q_len:], k_pos).float()
    expected = F.scaled_dot_product_attention(query, key, value, attn_mask=bias.masked_fill(~keep, float("-inf")),
                                              scale=0.25).transpose(1, 2)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


# ---- auto: the documented rules ------------------------------------------------------------------------------
def kernels_for(model, *args, **kwargs) -> set[str]:
    seen = []
    original = dispatch.choose_kernel

    def spy(*a, **k):
        seen.append(original(*a, **k))
        return seen[-1]

    dispatch.choose_kernel = spy
    try:
        model(*args, **kwargs)
    finally:
        dispatch.choose_kernel = original
    return set(seen)


def test_auto_rules():
    short, long = ids(1, 40), ids(1, LONG)
    padded, mask = left_padded(LONG, 5)
    alibi, t5 = converted("gpt2", "alibi"), converted("gpt2", "t5")
    with torch.no_grad():
        assert kernels_for(alibi, long, output_attentions=True) == {"eager"}  # 1. weights requested
        assert kernels_for(converted("gpt2", "shaw"), long) == {"eager"}  # 1. Shaw needs the probabilities
        assert kernels_for(converted("gpt2", "rope"), long) == {"sdpa"}  # 2. no bias: native kernel
        assert kernels_for(alibi, long) == {"sdpa-windowed"}  # 3a
        assert kernels_for(alibi, padded, attention_mask=mask) == {"sdpa-blocked"}  # 3c: padding
        assert kernels_for(t5, long) == {"sdpa-banded"}  # 3b
        assert kernels_for(t5, padded, attention_mask=mask) == {"sdpa-blocked"}  # 3c: padding
        assert kernels_for(alibi, short) == {"sdpa"}  # 4. short
        assert kernels_for(converted("bert", "alibi"), long) == {"sdpa"}  # 4. encoder
        out = alibi(long, use_cache=True)
        assert kernels_for(alibi, ids(1, 1), cache=out.cache) == {"sdpa"}  # 4. decode step
    assert kernels_for(t5, long) == {"sdpa-blocked"}  # 3c: T5 with autograd
    alibi.train()  # dropout 0.1 in the tiny config: the windowed backward has none
    assert kernels_for(alibi, long) == {"sdpa-blocked"}  # 3c
    for module in alibi.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    assert kernels_for(alibi, long) == {"sdpa-windowed"}  # 3a with autograd


def test_explicit_backends_are_obeyed():
    long = ids(1, LONG)
    with torch.no_grad():
        for backend in ("sdpa", "eager"):
            assert kernels_for(converted("gpt2", "alibi", backend=backend), long) == {backend}
        assert kernels_for(converted("gpt2", "shaw", backend="sdpa"), long) == {"eager"}  # needs probabilities


def test_flex_rules_without_compiling():
    method = converted("gpt2", "alibi").base_model.posenc
    q = torch.randn(1, 4, 8, 8)
    choose = lambda q, grad=False, mask=None, dropout=0.0: dispatch.choose_kernel(  # noqa: E731
        "flex", method, q.requires_grad_(grad), q, q, mask, True, dropout, False)
    assert choose(q) == "flex"
    assert choose(torch.randn(1, 4, 1, 8)) == "sdpa"  # a decode step: the bias row, nothing to compile
    assert choose(torch.randn(1, 4, 8, 8), grad=True) == "sdpa"  # no CPU backward
    assert choose(q, dropout=0.1) == "sdpa"
    assert choose(q, mask=torch.zeros(1, 1, 8, 8)) == "sdpa"  # an additive float mask
    shaw = converted("gpt2", "shaw").base_model.posenc
    assert dispatch.choose_kernel("flex", shaw, q, q, q, None, True, 0.0, False) == "eager"
    assert flex.method_kind(converted("gpt2", "rope").base_model.posenc) == "none"  # mask only, no score_mod


# ---- FlexAttention ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_flex_matches_sdpa_plain_padded_and_cached(method):
    model = converted("gpt2", method)
    x = ids(1, OLD_LIMIT + 70)
    torch.testing.assert_close(logits_with(model, "flex", x), logits_with(model, "sdpa", x), atol=TOL, rtol=0)
    padded, mask = left_padded(OLD_LIMIT + 70, 6)
    out = logits_with(model, "flex", padded, attention_mask=mask)
    reference = logits_with(model, "sdpa", padded, attention_mask=mask)
    torch.testing.assert_close(out[0], reference[0], atol=TOL, rtol=0)
    torch.testing.assert_close(out[1, 6:], reference[1, 6:], atol=TOL, rtol=0)
    full = ids(1, OLD_LIMIT + 90, seed=3)
    reference = logits_with(model, "sdpa", full)
    hf_posenc.set_backend(model, "flex")
    with torch.no_grad():
        out = model(full[:, :-30], use_cache=True)
        chunk = model(full[:, -30:-2], cache=out.cache, use_cache=True)  # queries after cached keys
        step = model(full[:, -2:-1], cache=chunk.cache, use_cache=True)
        last = model(full[:, -1:], cache=step.cache, use_cache=True)
    got = torch.cat([out.logits, chunk.logits, step.logits, last.logits], dim=1)
    torch.testing.assert_close(got, reference, atol=TOL, rtol=0)


@pytest.mark.parametrize("method", ["alibi", "t5"])
def test_flex_compiles_once_not_per_length_or_decode_step(method):
    from torch._dynamo.utils import counters

    model = converted("gpt2", method, backend="flex")
    graphs = lambda: counters["stats"]["unique_graphs"]  # noqa: E731
    with torch.no_grad():
        for length in (200, 260):  # compile, then PyTorch's one recompile that makes the lengths dynamic
            model(ids(1, length))
        compiled = graphs()
        out = model(ids(1, 330), use_cache=True)  # a new length: no recompile
        cache, token = out.cache, ids(1, 1)
        for _ in range(12):  # decode steps: the bias row through SDPA, never a compile
            cache = model(token, cache=cache, use_cache=True).cache
        model(ids(1, 390))
    assert graphs() == compiled


# ---- the benchmark script -------------------------------------------------------------------------------------
def test_benchmark_quick_mode_prints_and_writes_ratios(tmp_path):
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_posenc.py"
    out = tmp_path / "performance.md"
    out.write_text("# Performance\n\nProse kept.\n")
    run = subprocess.run(
        [sys.executable, str(script), "--quick", "--methods", "alibi", "rope", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    text = out.read_text()
    assert "Prose kept." in text and "<!-- bench:cpu:begin -->" in text
    for heading in ("Forward (no grad)", "Forward + backward", "Decode", "Peak memory", "Fine-tune"):
        assert heading in text and heading in run.stdout
    assert "| alibi |" in text and "x (" in text
