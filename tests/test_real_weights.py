"""Every conversion on real weights (``-m slow``): Gemma 3 270M (``hf-posenc fetch gemma3-270m``: a trained model's
sharp attention, tied head, 262k vocabulary and sliding-window layers, which tiny random models hide) and SmolLM2-135M
(``hf-posenc fetch smollm2-135m``: Llama-style, trained to 8k).

    HF_POSENC_CACHE=~/.cache/hf_posenc OMP_NUM_THREADS=2 python -m pytest -m slow -s tests/test_real_weights.py

(-s prints the measured numbers; docs/extrapolation.md, "Gemma 3 270M", quotes them.) Inside the trained context the
methods that keep the model's rotary there are the original model; past it (positions to 40k, reached cheaply with a
jump in the position ids, PoSE-style: 256 tokens at 0.., 256 more at 1.25x the trained context: 40,000.. on Gemma 3,
10,240.. on SmolLM2) the other methods run with finite logits. Held-out text: The Tempest (tests/data).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import hf_posenc
from hf_posenc import sources

pytestmark = pytest.mark.slow
TEXT = Path(__file__).parent / "data" / "tempest.txt"
INSIDE = 1024  # tokens: inside the trained context, twice the sliding window so it bites
NEW_TOKENS = 64
JUMP = {"gemma3-270m": 40_000, "smollm2-135m": 10_240}  # past the trained 32,768 / 8,192
TRAINED = {"gemma3-270m": 32_768, "smollm2-135m": 8_192}
SAME = 1e-3  # max |logit difference| (fp32; logits span ~ +-30)


@pytest.fixture(scope="module", params=list(TRAINED))
def checkpoint(request):
    """(name, path, held-out ids); fetched into $HF_POSENC_CACHE (or ~/.cache/hf_posenc) unless already there."""
    import transformers

    path = sources.fetch(request.param)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    ids = tokenizer(TEXT.read_text(encoding="utf-8")[5000:], return_tensors="pt").input_ids
    return request.param, path, ids


def load(path: Path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def original(checkpoint):
    _, path, ids = checkpoint
    model = load(path)
    with torch.no_grad():
        logits = model(ids[:, :INSIDE]).logits
        generated = model.generate(ids[:, :INSIDE // 4], max_new_tokens=NEW_TOKENS, do_sample=False,
                                   min_new_tokens=NEW_TOKENS)
    return logits, generated


def test_the_checkpoint_is_what_it_says(checkpoint, original):
    name, path, ids = checkpoint
    model = load(path)
    config = model.config
    logits, _ = original
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:INSIDE])
    print(f"\n{name}, perplexity of {INSIDE} held-out Tempest tokens: {loss.exp():.2f}")
    assert loss.exp() < 60  # a trained model (broken dequantisation or rotary: hundreds to thousands)
    if name == "smollm2-135m":
        assert (config.model_type, config.num_hidden_layers, config.max_position_embeddings) == ("llama", 30, 8192)
        return
    assert (config.model_type, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.head_dim, config.sliding_window, config.max_position_embeddings) == (
        "gemma3_text", 18, 4, 1, 256, 512, 32768)
    assert config.layer_types.count("full_attention") == 3
    assert {kind: p["rope_theta"] for kind, p in config.rope_parameters.items()} == {
        "sliding_attention": 10_000.0, "full_attention": 1_000_000.0}


KEEPERS = {  # conversions that are the original model inside the trained context
    "rope": ("rope", {}),
    "dynamic_yarn": ("rope", {"scaling": "dynamic_yarn", "factor": 4.0}),
    "dynamic": ("rope", {"scaling": "dynamic", "factor": 4.0}),
    "self_extend-dynamic": ("self_extend", {"group": 4, "dynamic": True}),
}


@pytest.mark.parametrize("name", list(KEEPERS))
def test_inside_the_trained_context_the_conversion_is_the_original(name, checkpoint, original):
    model_name, path, ids = checkpoint
    method, options = KEEPERS[name]
    model = hf_posenc.convert(load(path), method, **options)
    logits, generated = original
    with torch.no_grad():
        difference = (model(ids[:, :INSIDE]).logits - logits).abs().max().item()
        again = model.generate(ids[:, :INSIDE // 4], max_new_tokens=NEW_TOKENS, do_sample=False,
                               min_new_tokens=NEW_TOKENS)
    same_tokens = int((again == generated).all(dim=0).sum()) - INSIDE // 4
    print(f"\n{model_name} {name}: max |logit difference| {difference:.2e} over {INSIDE} tokens; greedy {same_tokens}/{NEW_TOKENS} "
          "tokens identical")
    assert difference < SAME
    assert torch.equal(again, generated)


PAST = {  # "original": the unconverted model at the same positions, for reference
    "original": (None, {}),
    "alibi": ("alibi", {}),
    "t5": ("t5", {}),
    "self_extend": ("self_extend", {"group": 4}),
    "dynamic_yarn": ("rope", {"scaling": "dynamic_yarn", "factor": 4.0}),
}


@pytest.mark.parametrize("name", list(PAST))
def test_past_the_trained_context_the_conversion_runs_with_finite_logits(name, checkpoint):
    model_name, path, ids = checkpoint
    method, options = PAST[name]
    model = load(path)
    if method is not None:
        model = hf_posenc.convert(model, method, max_position_embeddings=4 * TRAINED[model_name], **options)
    x = ids[:, :512]
    jump = JUMP[model_name]
    positions = torch.cat([torch.arange(256), torch.arange(jump, jump + 256)])[None]  # keys up to `jump` apart
    with torch.no_grad():
        logits = model(x, position_ids=positions).logits
    loss = torch.nn.functional.cross_entropy(logits[0, 256:-1], x[0, 257:])
    print(f"\n{model_name} {name}: positions to {jump + 255}: finite {bool(torch.isfinite(logits).all())}, perplexity of the "
          f"256 tokens after the jump {loss.exp():.1f}")
    assert torch.isfinite(logits).all()


def test_native_export_round_trip_in_a_fresh_interpreter(checkpoint, original, tmp_path):
    """RoPE at the model's own parameters exported natively (Gemma 3's own class, no hf_posenc) and loaded by a
    fresh interpreter gives the original logits."""
    import subprocess
    import sys

    name, path, ids = checkpoint
    model = hf_posenc.convert(load(path), "rope")
    hf_posenc.export(model, tmp_path / "export", format="native")
    torch.save(ids[:, :256], tmp_path / "ids.pt")
    script = ("import sys, torch, transformers; m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1]);"
              "x = torch.load(sys.argv[2]); torch.save(m(x).logits.detach(), sys.argv[3]);"
              "assert 'hf_posenc' not in sys.modules")
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path / "export"), str(tmp_path / "ids.pt"),
                          str(tmp_path / "out.pt")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    logits, _ = original
    difference = (torch.load(tmp_path / "out.pt") - logits[:, :256]).abs().max().item()
    print(f"\n{name} native export, fresh interpreter: max |logit difference| {difference:.2e} over 256 tokens")
    assert difference < SAME
