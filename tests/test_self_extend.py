"""Self-Extend and ReRoPE (issue 26): the two-pass kernel equals the definition computed pair by pair, the model is
the unconverted one where every distance is inside the window, the CPU flash fast path equals the general kernel,
and bad options are refused before the model changes. (The method x family matrix, cache == full forward, padding,
position ids, save / reload, past the old limit, runs them as rows of tests/test_matrix.py.)"""

from __future__ import annotations

import math
import types

import pytest
import torch
from test_matrix import converted, ids
from tiny_models import OLD_LIMIT, tiny_model

import hf_posenc
from hf_posenc.backends import dispatch, two_pass
from hf_posenc.forward_state import ForwardState
from hf_posenc.methods.base import ModelShape
from hf_posenc.methods.self_extend import ReRope, ReRopeOptions, SelfExtend, SelfExtendOptions, default_group

THETA, HEADS, DIM = 10000.0, 2, 8


def shape(causal: bool = True) -> ModelShape:
    return ModelShape(num_heads=HEADS, num_kv_heads=HEADS, head_dim=DIM, hidden_size=HEADS * DIM, num_layers=1,
                      causal=causal, original_max_positions=64, max_positions=256)


def rotated(x: torch.Tensor, position: float) -> torch.Tensor:
    """One (D,) vector rotated at one position, rotate-half RoPE written out from its definition."""
    half = DIM // 2
    freq = THETA ** (-torch.arange(half, dtype=torch.float64) * 2 / DIM)
    angle = position * freq
    a, b = x[:half].double(), x[half:].double()
    return torch.cat([a * angle.cos() - b * angle.sin(), b * angle.cos() + a * angle.sin()])


def far_pair(name: str, options, i: float, j: float, sign: int) -> tuple[float, float]:
    """The positions of a far pair from the papers' definitions."""
    w = options.window
    if name == "self_extend":
        g = options.group
        return i // g + sign * (w - w // g), j // g
    if options.leaky is None:
        return sign * w, 0.0
    k = options.leaky
    return i / k + sign * (w - w / k), j / k


def reference(name, options, q, k, v, q_pos, k_pos, causal: bool) -> torch.Tensor:
    """(H, Lq, D) attention computed pair by pair."""
    out = torch.zeros(q.shape[0], q.shape[1], DIM, dtype=torch.float64)
    for h in range(q.shape[0]):
        for a, i in enumerate(q_pos.tolist()):
            scores = []
            for b, j in enumerate(k_pos.tolist()):
                d = i - j
                if causal and d < 0:
                    scores.append(float("-inf"))
                    continue
                pi, pj = (i, j) if abs(d) < options.window else far_pair(name, options, i, j, 1 if d > 0 else -1)
                scores.append(float(rotated(q[h, a], pi) @ rotated(k[h, b], pj)) * DIM ** -0.5 * logn(options, i))
            weights = torch.softmax(torch.tensor(scores, dtype=torch.float64), dim=0)
            out[h, a] = weights @ v[h].double()
    return out


def logn(options, i: float) -> float:
    """Log-n attention's factor of the query at position i (1 without ``logn``)."""
    return max(1.0, math.log(i + 1) / math.log(options.original_max_positions)) if options.logn else 1.0


CASES = [
    ("self_extend", SelfExtend, SelfExtendOptions(theta=THETA, window=5, group=3)),
    ("rerope", ReRope, ReRopeOptions(theta=THETA, window=5)),
    ("rerope", ReRope, ReRopeOptions(theta=THETA, window=5, leaky=2.5)),
    ("self_extend", SelfExtend, SelfExtendOptions(theta=THETA, window=5, group=3, logn=True)),
]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("name, cls, options", CASES, ids=["self_extend", "rerope", "rerope-leaky", "self_extend-logn"])
def test_the_kernel_equals_the_definition_pair_by_pair(name, cls, options, causal):
    """Gapped, shifted positions (as after a cache or with PoSE ids), 7 queries against 19 keys, the last queries
    past the trained context (64, where log-n attention starts)."""
    method = cls(options.resolve(shape(causal)), shape(causal))
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, n, DIM) for n in (7, 19, 19))
    k_pos = torch.cat([torch.arange(0, 24, 2), torch.arange(30, 37)])[None] + 40  # (1, 19), positions 40 ... 76
    q_pos = k_pos[:, -7:]
    module = types.SimpleNamespace(num_key_value_groups=1, training=False, layer_idx=0)
    mask = (k_pos[:, None, :] <= q_pos[:, :, None])[:, None] if causal else None  # as transformers passes it
    scales = method.query_scales(q_pos)
    scaled = q if scales is None else q * scales  # as the attention forward hands every kernel its query
    call = dispatch.KernelCall(module, method, scaled, k, v, mask, 0.0, DIM ** -0.5, causal, q_pos, k_pos,
                               ForwardState(method))
    out, _ = two_pass.two_pass_attention(call)  # (1, Lq, H, D)
    expected = reference(name, method.options, q[0], k[0], v[0], q_pos[0], k_pos[0], causal)
    torch.testing.assert_close(out[0].transpose(0, 1).double(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "gemma3"])
@pytest.mark.parametrize("method, options", [("self_extend", {"group": 4}), ("rerope", {}),
                                             ("rerope", {"leaky": 2.0}), ("self_extend", {"group": 4, "logn": True})])
def test_inside_the_window_the_model_is_the_original(family, method, options):
    """Every distance below W: the unconverted model's logits (its own RoPE, theta and all)."""
    original = tiny_model(family).eval()
    model = hf_posenc.convert(tiny_model(family).eval(), method, window=OLD_LIMIT - 1, **options)
    x = ids(2, OLD_LIMIT - 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, original(x).logits, atol=1e-5, rtol=0)


def test_log_n_leaves_gemma3_sliding_layers_alone():
    """Gemma 3's sliding layers keep their own rotary and see at most their window of keys: log-n scales only the
    full-attention layer's queries (layer 0 slides, layer 1 is full)."""
    x = ids(1, 3 * OLD_LIMIT)
    with torch.no_grad():
        plain, logn = (hf_posenc.convert(tiny_model("gemma3").eval(), "self_extend", window=12, group=3, logn=flag)
                       (x, output_hidden_states=True).hidden_states for flag in (False, True))
    assert torch.equal(plain[1], logn[1])  # after the sliding layer
    assert not torch.allclose(plain[2], logn[2], atol=1e-3)  # after the full one


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("case", ["self_extend", "rerope", "rerope-leaky"])
def test_the_flash_fast_path_equals_the_general_kernel(family, case, kernels_seen):
    model = converted(family, case).eval()
    x = ids(1, 5 * OLD_LIMIT)
    with torch.no_grad():
        fast = model(x).logits
        assert "two-pass-flash" in kernels_seen
        hf_posenc.set_backend(model, "eager")
        kernels_seen.clear()
        general = model(x).logits
        assert set(kernels_seen) == {"two-pass"}
    torch.testing.assert_close(fast, general, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", ["self_extend", "rerope", "rerope-leaky"])
def test_decode_steps_take_the_decode_kernel_and_equal_the_full_forward(case, kernels_seen):
    model = converted("llama", case).eval()
    x = ids(1, 3 * OLD_LIMIT)
    with torch.no_grad():
        full = model(x).logits[:, -3:]
        out = model(x[:, :-3], use_cache=True)
        kernels_seen.clear()
        steps = [model(x[:, n : n + 1], cache=out.cache, use_cache=True).logits for n in range(x.shape[1] - 3,
                                                                                                  x.shape[1])]
    assert set(kernels_seen) == {"two-pass-decode"}
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method, options", [("self_extend", {"group": 3}), ("rerope", {"leaky": 3.0})])
def test_dynamic_is_the_original_inside_the_trained_context_and_extends_past_it(method, options, kernels_seen):
    """``dynamic=True``: every pair at the model's own positions while the input fits the trained context (whatever
    the window), the far positions once it does not; each decode step up to the trained length equals the full
    forward of the same prefix (past it the cached tokens' deeper states were computed without far positions:
    docs/guarantees.md, test_checkpoint_config.py::test_dynamic_decode_is_exact_inside_the_trained_context_only)."""
    original = tiny_model("llama").eval()
    model = hf_posenc.convert(tiny_model("llama").eval(), method, window=12, dynamic=True, **options)
    always = hf_posenc.convert(tiny_model("llama").eval(), method, window=12, **options)
    inside, past = ids(2, OLD_LIMIT), ids(2, 2 * OLD_LIMIT)
    with torch.no_grad():
        torch.testing.assert_close(model(inside).logits, original(inside).logits, atol=1e-5, rtol=0)
        assert not any(k.startswith("two-pass") for k in kernels_seen)  # the ordinary kernels run it
        torch.testing.assert_close(model(past).logits, always(past).logits, atol=1e-5, rtol=0)
        out = model(past[:, : OLD_LIMIT - 2], use_cache=True)
        for n in range(OLD_LIMIT - 2, OLD_LIMIT):  # each step as the full forward of the same prefix
            step = model(past[:, n : n + 1], cache=out.cache, use_cache=True).logits[:, -1]
            torch.testing.assert_close(step, model(past[:, : n + 1]).logits[:, -1], atol=1e-4, rtol=0)


def test_default_window_and_group_follow_the_papers_rule():
    """W = L_train / 2; the smallest G with W + (N - W) / G <= (2/3) L_train (SmolLM2: 8k trained, 32k wanted)."""
    assert default_group(2048, 32768, 8192) == 9
    assert 2048 + (32768 - 2048) / 9 <= 2 / 3 * 8192 + 1e-9 < 2048 + (32768 - 2048) / 8
    model = hf_posenc.convert(tiny_model("llama"), "self_extend", max_position_embeddings=4 * OLD_LIMIT)
    options = model.config.posenc["options"]
    assert options["window"] == OLD_LIMIT // 2
    assert options["window"] + (4 * OLD_LIMIT - options["window"]) / options["group"] <= 2 / 3 * OLD_LIMIT + 1e-9


@pytest.mark.parametrize("method, options, message", [
    ("self_extend", {"window": OLD_LIMIT}, "window"),
    ("self_extend", {"window": 8, "group": 0}, "group"),
    ("rerope", {"window": 2 * OLD_LIMIT}, "window"),
    ("rerope", {"leaky": 1.0}, "leaky"),
    ("self_extend", {"logn": 1}, "logn"),
    ("self_extend", {"scaling": "dynamic", "factor": 2.0}, "scaling"),
])
def test_bad_options_are_refused_before_the_model_changes(method, options, message):
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        hf_posenc.convert(model, method, **options)
    assert not hf_posenc.is_converted(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("method", ["self_extend", "rerope"])
def test_export_is_refused_naming_why_and_writes_nothing(method, tmp_path):
    model = hf_posenc.convert(tiny_model("llama"), method, window=12)
    with pytest.raises(ValueError, match="far positions"):
        hf_posenc.export(model, tmp_path / "out", format="auto")
    assert list(tmp_path.iterdir()) == []
