"""Attention backends: every backend computes what ``sdpa`` computes, ``auto`` follows its documented rules, the
choice is validated and saved, and FlexAttention does not recompile per decode step."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_models import CACHE_ARG, OLD_LIMIT, VOCAB, cache_of, tiny_model

import hf_posenc
from hf_posenc.attention import method_of
from hf_posenc.backends import dispatch, flex, masks
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
        steps, cache = [out.logits], cache_of(out)
        for a, b in ((LONG, LONG + 520), (LONG + 520, LONG + 521), (LONG + 521, LONG + 522), (LONG + 522, None)):
            out = model(full[:, a:b], **{CACHE_ARG: cache}, use_cache=True)
            steps.append(out.logits)
            cache = cache_of(out)
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


@pytest.mark.parametrize("method", ["alibi", "t5", "rope"])
def test_every_backend_runs_under_bf16_autocast(method):
    """Under autocast Llama's q / k come out of the rotary multiply in fp32 and v in bf16; the kernels called
    directly (CPU flash, FlexAttention, eager) must see one dtype. bf16 logits stay close to the fp32 ones."""
    model = converted("llama", method)
    x = ids(1, LONG + 100)
    with torch.no_grad():
        reference = model(x).logits
        for backend in ("auto", "sdpa", "eager", *(["flex"] if method == "t5" else [])):
            hf_posenc.set_backend(model, backend)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(x).logits.float()
            torch.testing.assert_close(logits, reference, atol=0.05, rtol=0, msg=backend)


def test_long_alibi_builds_no_length_squared_bias(monkeypatch):
    model = converted("gpt2", "alibi")
    monkeypatch.setattr(masks, "biased_mask", lambda *a, **k: pytest.fail("built an (H, L, L) bias"))
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
    bias = method.score_bias(k_pos[None, -q_len:], k_pos[None])[0].float()
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
        assert kernels_for(converted("gpt2", "shaw"), long) == {"shaw-banded"}  # 1a. Shaw's clipped terms
        assert kernels_for(converted("gpt2", "shaw"), short) == {"eager"}  # 1b. short
        assert kernels_for(converted("gpt2", "transformer_xl"), long) == {"eager"}  # 1b. needs the probabilities
        assert kernels_for(converted("gpt2", "rope"), long) == {"sdpa"}  # 2. no bias: native kernel
        assert kernels_for(alibi, long) == {"sdpa-windowed"}  # 3a
        assert kernels_for(alibi, padded, attention_mask=mask) == {"sdpa-blocked"}  # 3c: padding
        assert kernels_for(t5, long) == {"sdpa-banded"}  # 3b
        assert kernels_for(t5, padded, attention_mask=mask) == {"sdpa-blocked"}  # 3c: padding
        assert kernels_for(alibi, short) == {"sdpa"}  # 4. short
        assert kernels_for(converted("bert", "alibi"), long) == {"sdpa"}  # 4. encoder
        out = alibi(long, use_cache=True)
        assert kernels_for(alibi, ids(1, 1), **{CACHE_ARG: cache_of(out)}) == {"sdpa"}  # 4. decode step
    assert kernels_for(t5, long) == {"sdpa-banded"}  # 3b: T5 with autograd
    alibi.train()  # dropout 0.1 in the tiny config: the windowed backward has none
    assert kernels_for(alibi, long) == {"sdpa-blocked"}  # 3c
    assert kernels_for(t5.train(), long) == {"sdpa-blocked"}  # 3c: nor the banded one
    for module in alibi.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    assert kernels_for(alibi, long) == {"sdpa-windowed"}  # 3a with autograd


def test_auto_keeps_the_windowed_kernel_on_cpu():
    """3a is CPU-only: off the CPU (here the meta device, which has shapes but no data) ALiBi takes 3c."""
    method = method_of(hf_posenc.convert(tiny_model("gpt2"), "alibi").transformer.h[0].attn)
    q = torch.empty(1, 4, LONG, 8, device="meta")
    choose = lambda q: dispatch.choose_kernel("auto", method, q, q, q, None, True, 0.0, False)  # noqa: E731
    assert choose(q) == "sdpa-blocked"
    assert choose(torch.empty(1, 4, LONG, 8)) == "sdpa-windowed"


def test_explicit_backends_are_obeyed():
    long = ids(1, LONG)
    with torch.no_grad():
        for backend in ("sdpa", "eager"):
            assert kernels_for(converted("gpt2", "alibi", backend=backend), long) == {backend}
        assert kernels_for(converted("gpt2", "shaw", backend="sdpa"), long) == {"eager"}  # needs probabilities


def test_flex_rules_without_compiling():
    method = converted("gpt2", "alibi").base_model.posenc
    n = flex.CPU_MIN_QUERIES
    q = torch.randn(1, 4, n, 8)
    choose = lambda q, grad=False, mask=None, dropout=0.0: dispatch.choose_kernel(  # noqa: E731
        "flex", method, q.requires_grad_(grad), q, q, mask, True, dropout, False)
    assert choose(q) == "flex"
    assert choose(torch.randn(1, 4, 1, 8)) == "sdpa"  # a decode step: the bias row, nothing to compile
    assert choose(torch.randn(1, 4, 8, 8)) == "sdpa"  # shorter than one block on CPU (compiled CPU flex: NaN)
    assert choose(torch.randn(1, 4, n, 8), grad=True) == "sdpa"  # no CPU backward
    assert choose(q, dropout=0.1) == "sdpa"
    assert choose(q, mask=torch.zeros(1, 1, n, n)) == "sdpa"  # an additive float mask
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
        chunk = model(full[:, -30:-2], **{CACHE_ARG: cache_of(out)}, use_cache=True)  # queries after cached keys
        step = model(full[:, -2:-1], **{CACHE_ARG: cache_of(chunk)}, use_cache=True)
        last = model(full[:, -1:], **{CACHE_ARG: cache_of(step)}, use_cache=True)
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
        cache, token = cache_of(out), ids(1, 1)
        for _ in range(12):  # decode steps: the bias row through SDPA, never a compile
            cache = cache_of(model(token, **{CACHE_ARG: cache}, use_cache=True))
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


def _bench_module():
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_posenc.py"
    spec = importlib.util.spec_from_file_location("bench_posenc_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_device_and_dtype_arguments(capsys):
    bench = _bench_module()
    args = bench.parse_args([])
    assert (args.device, args.dtype, args.layers, args.eager_max, args.time_budget) == ("cpu", "fp32", 1, 0, None)
    args = bench.parse_args(["--device", "cuda", "--time-budget", "80"], cuda_available=True)
    assert (args.device, args.dtype, args.layers, args.eager_max, args.time_budget) == ("cuda", "bf16", 12, 4096, 80)
    assert bench.parse_args(["--device", "cuda", "--dtype", "fp32"], cuda_available=True).dtype == "fp32"
    assert bench.parse_args(["--dtype", "bf16"]).dtype == "bf16"
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cuda"], cuda_available=False)
    assert "torch.cuda.is_available() is False" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "tpu"])


def test_benchmark_failing_case_writes_an_error_cell():
    bench = _bench_module()

    def boom():
        raise ValueError("shape | mismatch\nsecond line")

    res = bench.paired({"bad": boom, "ok": lambda: None}, lambda: None, repeats=2)
    assert res["bad"] == "error: ValueError: shape / mismatch"
    assert bench.ratio(res["bad"]) == res["bad"] and bench.ratio(res["ok"]).endswith("ms)")
    assert bench.failure(RuntimeError("x" * 500)).endswith("...") and len(bench.failure(RuntimeError("x" * 500))) < 120
    assert bench.base_median({"bad": res["bad"]}) == "-"


def test_benchmark_gpu_block_keeps_the_cpu_block(tmp_path):
    bench = _bench_module()
    doc = tmp_path / "performance.md"
    doc.write_text(
        f"# P\n\n{bench.BEGIN}\ncpu table\n{bench.END}\n\n## GPU results\n\n{bench.GPU_BEGIN}\n{bench.GPU_END}\n"
    )
    bench.write(doc, "gpu table", bench.GPU_BEGIN, bench.GPU_END)
    text = doc.read_text()
    assert "cpu table" in text and f"{bench.GPU_BEGIN}\ngpu table\n{bench.GPU_END}" in text
    fresh = tmp_path / "bench_gpu.md"  # --out to a new file
    bench.write(fresh, "gpu table", bench.GPU_BEGIN, bench.GPU_END)
    assert "gpu table" in fresh.read_text() and bench.BEGIN not in fresh.read_text()


def test_benchmark_time_budget_skips_and_still_writes(tmp_path):
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_posenc.py"
    out = tmp_path / "performance.md"
    run = subprocess.run(
        [sys.executable, str(script), "--quick", "--methods", "alibi", "--time-budget", "0", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    text = out.read_text()
    assert "Skipped (time budget 0 s): forward, backward, backends, decode, memory, finetune." in text
    assert "### Forward" not in text and "Machine:" in text


FAKE_CUDA = """
import importlib.util, sys, types
import torch
spec = importlib.util.spec_from_file_location("bench", sys.argv[1])
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
torch.cuda.is_available = lambda: True
for name in ("synchronize", "reset_peak_memory_stats", "empty_cache"):
    setattr(torch.cuda, name, lambda *a: None)
torch.cuda.memory_allocated = lambda *a: 100 * 2**20
torch.cuda.max_memory_allocated = lambda *a: 150 * 2**20
torch.cuda.get_device_name = lambda *a: "Fake GPU"
torch.cuda.current_device = lambda: 0
torch.cuda.get_device_properties = lambda i: types.SimpleNamespace(total_memory=80 * 2**30)
real_build, real_tokens = bench.build, bench.tokens

def on_cpu(fn):
    def wrapped(*a, **k):
        if k.get("backend") == "eager":
            raise RuntimeError("CUDA out of memory | fake")
        return fn(*a, **{**k, "device": "cpu"})
    return wrapped

bench.build, bench.tokens = on_cpu(real_build), on_cpu(real_tokens)
sys.exit(bench.main(sys.argv[2:]))
"""


def test_benchmark_cuda_path_with_a_faked_gpu(tmp_path):
    """The --device cuda control flow (section order, in-process GPU memory table, error cells, gpu markers) on a
    CPU-only torch: torch.cuda is faked, the models stay on the CPU."""
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_posenc.py"
    out = tmp_path / "bench_gpu.md"
    run = subprocess.run(
        [sys.executable, "-c", FAKE_CUDA, str(script), "--quick", "--device", "cuda", "--methods", "alibi",
         "--skip", "backward", "decode", "finetune", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    text = out.read_text()
    assert "<!-- bench:gpu:begin -->" in text and "<!-- bench:cpu:begin -->" not in text
    assert "Machine: Fake GPU (80 GiB)" in text and "bf16, device cuda" in text
    assert text.index("### Forward (no grad), backend auto") < text.index("### Peak GPU memory") < text.index(
        "### Forward (no grad) by backend")
    assert "| alibi | auto | 150 MB (+0.0 %) | 50 MB (+0 MB) |" in text
    assert "| alibi | eager | error: RuntimeError: CUDA out of memory / fake |" in text


def test_flex_on_cpu_never_returns_nan(monkeypatch):
    """Issue: backend="flex" on CPU gave NaN for some short inputs (an upstream compiled-flex issue). Calls shorter
    than a block take SDPA; a non-finite flex output is recomputed by SDPA, with a warning."""
    model = converted("gpt2", "alibi")
    short = ids(1, 24)
    q = torch.randn(1, 4, 24, 8)
    assert not flex.supports(model.base_model.posenc, q, q, None, 0.0, False)  # below one block on CPU
    x = ids(1, OLD_LIMIT + 70)
    reference = logits_with(model, "sdpa", x)
    real = flex.compiled_flex_attention("alibi")
    monkeypatch.setitem(flex._compiled, "alibi", lambda *a: real(*a) * float("nan"))
    monkeypatch.setattr(flex, "_warned_non_finite", False)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        out = logits_with(model, "flex", x)
    torch.testing.assert_close(out, reference, atol=TOL, rtol=0)
    assert torch.isfinite(logits_with(model, "flex", short)).all()
