"""Every conversion on real weights (``-m slow``): Gemma 3 270M (``hf-posenc fetch gemma3-270m``: a trained model's
sharp attention, tied head, 262k vocabulary and sliding-window layers, which tiny random models hide) and SmolLM2-135M
(``hf-posenc fetch smollm2-135m``: Llama-style, trained to 8k).

    HF_POSENC_CACHE=~/.cache/hf_posenc OMP_NUM_THREADS=2 python -m pytest -m slow -s tests/test_real_weights.py

(-s prints the measured numbers; docs/extrapolation.md, "Gemma 3 270M", quotes them.) Inside the trained context the
methods that keep the model's rotary there are the original model; past it (positions to 40k, reached cheaply with a
jump in the position ids, PoSE-style: 256 tokens at 0.., 256 more at 1.25x the trained context: 40,000.. on Gemma 3,
10,240.. on SmolLM2) the other methods run with finite logits. Held-out text: The Tempest (tests/data).

The encoder counterpart (``-k encoder``): all-MiniLM-L6-v2 (``hf-posenc fetch minilm-l6-v2``: BertModel, 512 learned
absolute positions, no rotary). Inside 512 the conversions that keep its table are the original; save -> reload is
exact; past 512 (a 2048-token passage) the other methods run with finite hidden states; no BERT conversion of a
BertModel exports natively (a clear refusal), the ONNX export matches in a fresh interpreter.
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
SAME = 1e-3  # max |logit difference| (fp32; logits span ~ +-30); MiniLM: max |hidden state difference|


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


# --- all-MiniLM-L6-v2: an encoder (BertModel, 512 learned absolute positions, no rotary) -------------------------

ENCODER = "minilm-l6-v2"
ENCODER_TRAINED = 512
LONG = 4 * ENCODER_TRAINED  # tokens of the passage past the trained context
STORM = "A ship is caught in a violent storm at sea."  # what The Tempest's first scene is about
UNRELATED = "How to configure a database connection in a web framework."


@pytest.fixture(scope="module")
def encoder():
    """(path, tokenizer, held-out Tempest ids without special tokens (N,)); fetched like ``checkpoint``."""
    import transformers

    path = sources.fetch(ENCODER)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    text = TEXT.read_text(encoding="utf-8")[5000:]
    body = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    return path, tokenizer, body


def load_encoder(path: Path):
    import transformers

    return transformers.AutoModel.from_pretrained(path, dtype=torch.float32).eval()


def passage(tokenizer, body: torch.Tensor) -> torch.Tensor:
    """[CLS] body [SEP] as (1, len(body) + 2) ids."""
    return torch.cat([torch.tensor([tokenizer.cls_token_id]), body, torch.tensor([tokenizer.sep_token_id])])[None]


def hidden_states(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).last_hidden_state  # (1, T, 384)


def embedding(states: torch.Tensor) -> torch.Tensor:
    """The checkpoint's sentence embedding (its modules.json: mean pooling, then L2 normalisation), (384,);
    one unpadded row, so the mask-weighted mean is the plain mean."""
    return torch.nn.functional.normalize(states[0].mean(0), dim=0)


@pytest.fixture(scope="module")
def encoder_original(encoder):
    """The original's hidden states of a 512-token passage, and its embeddings of the four 512-token quarters of
    the long passage (mean, renormalised) and of an unrelated 512-token passage of the play, as references."""
    path, tokenizer, body = encoder
    model = load_encoder(path)
    inside = hidden_states(model, passage(tokenizer, body[:ENCODER_TRAINED - 2]))
    quarter = ENCODER_TRAINED - 2  # body tokens per quarter; the long passage holds their 4 x 510 and 6 more
    quarters = [embedding(hidden_states(model, passage(tokenizer, body[q * quarter:(q + 1) * quarter])))
                for q in range(4)]
    chunk_mean = torch.nn.functional.normalize(torch.stack(quarters).mean(0), dim=0)
    unrelated = embedding(hidden_states(model, passage(tokenizer, body[10_000:10_000 + quarter])))
    return inside, chunk_mean, unrelated


def test_encoder_checkpoint_is_what_it_says(encoder, encoder_original):
    import transformers

    path, tokenizer, _ = encoder
    model = load_encoder(path)
    config = model.config
    assert type(model) is transformers.BertModel
    assert (config.model_type, config.num_hidden_layers, config.num_attention_heads, config.hidden_size,
            config.max_position_embeddings, config.position_embedding_type) == ("bert", 6, 12, 384, 512, "absolute")
    inside, _, _ = encoder_original
    assert inside.shape == (1, ENCODER_TRAINED, 384) and torch.isfinite(inside).all()
    text = TEXT.read_text(encoding="utf-8")
    scene = text[text.index("ACT 1"):][:1200]  # Act 1 scene 1: the storm at sea (~330 tokens)
    scene_embedding = embedding(hidden_states(model, tokenizer(scene, return_tensors="pt").input_ids))
    storm, unrelated = (float(embedding(hidden_states(model, tokenizer(q, return_tensors="pt").input_ids))
                              @ scene_embedding) for q in (STORM, UNRELATED))
    print(f"\n{ENCODER}: cosine of The Tempest's storm scene to {STORM!r} {storm:.3f}, to {UNRELATED!r} "
          f"{unrelated:.3f}")
    assert storm - unrelated > 0.2  # trained: ~0.4 apart; random weights embed everything alike (0.92-0.95 both)


ENCODER_KEEPERS = {  # conversions that keep the model's own position table inside the trained 512
    "learned": ("learned", {}),  # rows past 512 repeat the table (Longformer's copy)
    "learned-zeros": ("learned", {"extend": "zeros"}),
}


@pytest.mark.parametrize("name", list(ENCODER_KEEPERS))
def test_encoder_inside_the_trained_context_the_conversion_is_the_original(name, encoder, encoder_original):
    path, tokenizer, body = encoder
    method, options = ENCODER_KEEPERS[name]
    model = hf_posenc.convert(load_encoder(path), method, **options)
    inside, _, _ = encoder_original
    states = hidden_states(model, passage(tokenizer, body[:ENCODER_TRAINED - 2]))
    difference = (states - inside).abs().max().item()
    cosine = float(embedding(states) @ embedding(inside))
    print(f"\n{ENCODER} {name}: max |hidden state difference| {difference:.2e} over {ENCODER_TRAINED} tokens; "
          f"embedding cosine to the original {cosine:.6f}")
    assert difference < SAME


def test_encoder_original_positions_of_an_alibi_conversion_is_the_original(encoder, encoder_original):
    """ALiBi changes the model inside 512 (no fine-tune); ``hf_posenc.original_positions`` gives it back."""
    path, tokenizer, body = encoder
    model = hf_posenc.convert(load_encoder(path), "alibi")
    inside, _, _ = encoder_original
    x = passage(tokenizer, body[:ENCODER_TRAINED - 2])
    with hf_posenc.original_positions(model):
        restored = (hidden_states(model, x) - inside).abs().max().item()
    converted = hidden_states(model, x)
    changed = (converted - inside).abs().max().item()
    cosine = float(embedding(converted) @ embedding(inside))
    print(f"\n{ENCODER} alibi over {ENCODER_TRAINED} tokens: max |hidden state difference| {changed:.2f} (embedding "
          f"cosine {cosine:.3f}); inside original_positions {restored:.2e}")
    assert restored < SAME < changed


def test_encoder_save_and_reload_gives_identical_hidden_states(encoder, tmp_path):
    path, tokenizer, body = encoder
    model = hf_posenc.convert(load_encoder(path), "alibi", max_position_embeddings=LONG)
    model.save_pretrained(tmp_path / "alibi")
    reloaded = hf_posenc.from_pretrained(tmp_path / "alibi", dtype=torch.float32).eval()
    x = passage(tokenizer, body[:LONG - 2])
    before, after = hidden_states(model, x), hidden_states(reloaded, x)
    print(f"\n{ENCODER} alibi, save -> hf_posenc.from_pretrained: max |hidden state difference| "
          f"{(after - before).abs().max().item():.2e} over {LONG} tokens")
    assert type(reloaded) is type(model) and hf_posenc.is_converted(reloaded)
    assert torch.equal(after, before)


ENCODER_PAST = {
    "alibi": ("alibi", {}),
    "t5": ("t5", {}),
    "sinusoidal": ("sinusoidal", {}),
    "rope": ("rope", {}),
    "learned": ("learned", {}),  # rows past 512 repeat the table (Longformer's copy)
    "nope": ("nope", {}),  # a bag of tokens: what the others should beat
}


@pytest.mark.parametrize("name", list(ENCODER_PAST))
def test_encoder_past_the_trained_context_the_conversion_runs_with_finite_hidden_states(name, encoder,
                                                                                         encoder_original):
    path, tokenizer, body = encoder
    method, options = ENCODER_PAST[name]
    model = hf_posenc.convert(load_encoder(path), method, max_position_embeddings=LONG, **options)
    states = hidden_states(model, passage(tokenizer, body[:LONG - 2]))
    _, chunk_mean, unrelated = encoder_original
    cosine = float(embedding(states) @ chunk_mean)
    print(f"\n{ENCODER} {name}: {LONG} tokens, finite {bool(torch.isfinite(states).all())}; embedding cosine to the "
          f"mean of the original's embeddings of its four 512-token quarters {cosine:.3f} (the original's embedding "
          f"of an unrelated 512-token passage of the play: {float(unrelated @ chunk_mean):.3f})")
    assert states.shape == (1, LONG, 384)
    assert torch.isfinite(states).all()


@pytest.mark.parametrize("method", ["learned", "rope"])
def test_encoder_native_export_is_refused_with_a_clear_error(method, encoder, tmp_path):
    """No BERT conversion of a BertModel exports natively (``bert + rope -> RoFormer`` needs BertForMaskedLM, which
    this checkpoint lacks): one line naming the pair and ONNX, nothing written, the model unchanged."""
    path, tokenizer, body = encoder
    model = hf_posenc.convert(load_encoder(path), method)
    x = passage(tokenizer, body[:ENCODER_TRAINED - 2])
    before = hidden_states(model, x)
    with pytest.raises(ValueError) as refused:
        hf_posenc.export(model, tmp_path / "export", format="native")
    message = str(refused.value)
    print(f"\n{ENCODER} {method}, native export refused: {message[:120]}...")
    assert message.startswith(f"no exact native export for bert + {method}: ") and "\n" not in message
    assert "format='onnx'" in message
    assert not (tmp_path / "export").exists() and list(tmp_path.iterdir()) == []
    assert torch.equal(hidden_states(model, x), before)


def test_encoder_onnx_export_round_trip_in_a_fresh_interpreter(encoder, encoder_original, tmp_path):
    """``learned`` (the table kept) exported to ONNX and run by onnxruntime in a fresh interpreter (no torch, no
    hf_posenc) gives the original's hidden states."""
    import subprocess
    import sys

    import numpy

    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    path, tokenizer, body = encoder
    hf_posenc.export(hf_posenc.convert(load_encoder(path), "learned"), tmp_path / "export", format="onnx")
    numpy.save(tmp_path / "ids.npy", passage(tokenizer, body[:ENCODER_TRAINED - 2]).numpy())
    script = ("import sys, numpy as np, onnxruntime as ort; s = ort.InferenceSession(sys.argv[1] + '/model.onnx');"
              "x = np.load(sys.argv[2]); feed = {'input_ids': x, 'attention_mask': np.ones_like(x),"
              "'position_ids': np.arange(x.shape[1])[None]};"
              "np.save(sys.argv[3], s.run(None, {i.name: feed[i.name] for i in s.get_inputs()})[0]);"
              "assert 'hf_posenc' not in sys.modules and 'torch' not in sys.modules")
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path / "export"), str(tmp_path / "ids.npy"),
                          str(tmp_path / "out.npy")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    inside, _, _ = encoder_original
    difference = (torch.from_numpy(numpy.load(tmp_path / "out.npy")) - inside).abs().max().item()
    print(f"\n{ENCODER} learned ONNX export, fresh interpreter (onnxruntime): max |hidden state difference| "
          f"{difference:.2e} over {ENCODER_TRAINED} tokens")
    assert difference < SAME
