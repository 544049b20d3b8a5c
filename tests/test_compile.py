"""Compiled static-cache generation: after the first compiled decode step no step compiles again, and the tokens
equal uncompiled generation. Positions of a static cache are fixed-shape tensors (SlotPositions), and the
per-forward checks that read values (shared rows, plain positions, T5's distance range) are skipped while
torch.compile traces, so a decode step is one graph (backend "eager": dynamo's tracing and guards, no codegen)."""

from __future__ import annotations

import pytest
import torch
from test_matrix import converted, ids
from torch._dynamo.utils import counters
from transformers import CompileConfig


def compile_config() -> CompileConfig:
    config = CompileConfig(backend="eager", fullgraph=False, mode=None)
    config._compile_all_devices = True  # generate compiles on CUDA only unless told (transformers' own switch)
    return config


@pytest.mark.parametrize("family, case", [("gpt2", "rope"), ("gpt2", "alibi"), ("gpt2", "t5"),
                                          ("llama", "rope-partial")])
def test_static_generate_compiles_once(family, case):
    model = converted(family, case)
    prompt = ids(1, 20)
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, cache_implementation="static")
    expected = model.generate(prompt, **kwargs)
    torch._dynamo.reset()
    counters.clear()
    first = model.generate(prompt, compile_config=compile_config(), **kwargs)
    assert counters["frames"]["total"] == 1, dict(counters["graph_break"])  # one frame, compiled once
    assert not counters["graph_break"]
    counters.clear()
    second = model.generate(prompt, compile_config=compile_config(), **kwargs)
    assert counters["frames"]["total"] == 0  # warm: nothing compiles
    assert torch.equal(first, expected) and torch.equal(second, expected)


@pytest.mark.parametrize("family, case", [("gpt2", "alibi"), ("llama", "rope-partial")])
def test_static_generate_at_batch_two_never_recompiles(family, case):
    """The cache's stored positions keep one row per batch row from the prefill on (a compiled step cannot share
    rows), so the second decode step sees the shapes the first compiled."""
    model = converted(family, case)
    prompt = ids(2, 12)  # equal position rows: an eager prefill could share them as one
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, cache_implementation="static")
    expected = model.generate(prompt, **kwargs)
    config = compile_config()
    config.fullgraph = True
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = model.generate(prompt, compile_config=config, **kwargs)
    assert counters["stats"]["unique_graphs"] == 1
    assert torch.equal(compiled, expected)


@pytest.mark.parametrize("case, length", [("learned", 20), ("rope-dynamic_yarn", 150)])
def test_a_forward_that_read_values_compiles_as_one_graph_and_equals_eager(case, length):
    """Data-dependent guards torch.compile(fullgraph=True) failed on: the learned table's range checks
    (``int(position_ids.min())``: skipped while compiling, eager keeps them) and Dynamic YaRN's per-row lengths as
    Python numbers (its traced form, as for ONNX; 150 tokens: past the trained context, the scale follows it)."""
    model = converted("gpt2", case)
    x = ids(2, length)
    with torch.no_grad():
        expected = model(x).logits
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="eager", fullgraph=True)(x).logits
    torch.testing.assert_close(compiled, expected, atol=1e-5, rtol=0)
