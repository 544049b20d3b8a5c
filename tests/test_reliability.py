"""Loading and converting never hide a problem, never change what the caller did not hand over, and work wherever
a transformers model is built (meta device, another default dtype); wrapped models are refused with the fix."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from test_bad_input import assert_unchanged, snapshot
from tiny_models import OLD_LIMIT, VOCAB, tiny_config, tiny_model

import hf_posenc
from hf_posenc import _seams


def ids(length: int) -> torch.Tensor:
    return torch.randint(4, VOCAB, (1, length), generator=torch.Generator().manual_seed(0))


def saved(tmp_path, family="gpt2", method="t5"):
    model = hf_posenc.convert(tiny_model(family), method)
    model.save_pretrained(tmp_path)
    return model


@pytest.fixture
def load_report():
    """The messages logged where transformers reports missing / unexpected weights, at its default verbosity
    (the tests run with TRANSFORMERS_VERBOSITY=error)."""
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger(_seams.LOAD_REPORT_LOGGER)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_warning()
    logger.addHandler(handler)
    yield messages
    logger.removeHandler(handler)
    transformers.logging.set_verbosity(verbosity)


# ---- issue 14.4: a weight missing from the checkpoint is reported, the expected ones are not --------------------
def test_a_truly_missing_weight_is_warned_about_and_listed(tmp_path, load_report):
    model = saved(tmp_path, "llama", "t5")
    weights = tmp_path / "model.safetensors"
    state = load_file(weights)
    del state["model.layers.0.mlp.up_proj.weight"]
    save_file(state, weights, metadata={"format": "pt"})
    loaded = hf_posenc.from_pretrained(tmp_path)
    assert len(load_report) == 1, load_report  # one warning, without the expected keys
    assert "missing keys: model.layers.0.mlp.up_proj.weight. " in load_report[0]
    assert "newly initialised" in load_report[0] and "posenc" not in load_report[0]
    _, info = hf_posenc.from_pretrained(tmp_path, output_loading_info=True)
    assert set(info["missing_keys"]) == {"model.layers.0.mlp.up_proj.weight"}
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    # everything else, the method's table included, is as saved
    assert torch.equal(loaded.model.posenc.relative_attention_bias.weight,
                       model.model.posenc.relative_attention_bias.weight)


def test_mismatched_weights_are_warned_about_or_raise_with_the_report_shown(tmp_path, load_report):
    saved(tmp_path, "gpt2", "t5")
    weights = tmp_path / "model.safetensors"
    state = load_file(weights)
    state["transformer.h.0.mlp.c_fc.weight"] = torch.zeros(32, 100)
    save_file(state, weights, metadata={"format": "pt"})
    hf_posenc.from_pretrained(tmp_path, ignore_mismatched_sizes=True)
    assert len(load_report) == 1
    assert "mismatched keys: transformer.h.0.mlp.c_fc.weight (checkpoint [32, 100], model [32, 128])" in load_report[0]
    # without ignore_mismatched_sizes transformers raises after its report: that report is not held back
    load_report.clear()
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        hf_posenc.from_pretrained(tmp_path)
    assert len(load_report) == 1 and _seams.LOAD_REPORT_MARKER in load_report[0] and "c_fc.weight" in load_report[0]


@pytest.mark.parametrize("family,method,head",
                         [("gpt2", "t5", None), ("bert", "shaw", None), ("gpt2", "alibi", "GPT2Model")])
def test_the_replaced_table_and_the_method_tables_are_not_reported(tmp_path, family, method, head, load_report):
    saved(tmp_path, family, method)
    model_class = getattr(transformers, head) if head else None
    _, info = hf_posenc.from_pretrained(tmp_path, model_class=model_class, output_loading_info=True)
    assert not load_report
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


# ---- issue 14.9: output_loading_info returns (model, loading_info), on every load path ----------------------------
@pytest.mark.parametrize("loader", ["hf_posenc", "auto"])
def test_output_loading_info_returns_the_model_and_the_info(tmp_path, loader):
    model = saved(tmp_path, "gpt2", "t5")
    if loader == "hf_posenc":
        out = hf_posenc.from_pretrained(tmp_path, output_loading_info=True)
    else:
        out = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True,
                                                                output_loading_info=True)
    loaded, info = out
    assert {"missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"} <= set(info)
    x = ids(OLD_LIMIT + 20)
    assert torch.equal(loaded(x).logits, model(x).logits)


# ---- issue 14.10: config overrides go to the config ------------------------------------------------------------
def test_config_overrides_go_to_the_config(tmp_path, load_report):
    saved(tmp_path, "gpt2", "alibi")
    model = hf_posenc.from_pretrained(tmp_path, model_class=transformers.GPT2ForSequenceClassification, num_labels=5)
    assert "missing keys: score.weight." in load_report[0]  # a new head, as transformers says too
    assert model.config.num_labels == 5 and model.score.out_features == 5
    assert model(ids(OLD_LIMIT + 20)).logits.shape == (1, 5)
    with pytest.raises(ValueError, match="n_positions= cannot be overridden.*max_position_embeddings=..."):
        hf_posenc.from_pretrained(tmp_path, n_positions=10)


# ---- issue 14.14: a hand-edited posenc entry gets a message naming the key and the fix ---------------------------
@pytest.mark.parametrize("edit,message", [
    (lambda p: p.update(format_version="1"), r"'posenc' entry: format_version must be an integer >= 1 .*writes 1"),
    (lambda p: p.pop("original_max_position_embeddings"),
     r"'posenc' entry: 'original_max_position_embeddings' is missing: add it \(the model's position limit before"),
    (lambda p: p.update(options=["slope_scale"]), r"'posenc' entry: options must be a dict"),
    (lambda p: p.update(original_max_position_embeddings="64"), "original_max_position_embeddings must be a positive"),
    (lambda p: p.update(methods="alibi"), r"unknown key\(s\) \['methods'\]"),
])
def test_hand_edited_posenc_entry_is_named(tmp_path, edit, message):
    saved(tmp_path, "gpt2", "alibi")
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    edit(config["posenc"])
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        hf_posenc.from_pretrained(tmp_path)


def test_posenc_config_from_dict_without_a_method_is_named():
    with pytest.raises(ValueError, match="'method' is missing"):
        hf_posenc.PosEncConfig.from_dict({"options": {}})


# ---- issue 14.5: the caller's config object stays the caller's -------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_converting_one_model_leaves_others_sharing_its_config_alone(family, tmp_path):
    config = tiny_config(family)
    head = {"gpt2": transformers.GPT2LMHeadModel, "llama": transformers.LlamaForCausalLM}[family]
    before = config.to_dict()
    a, b = head(config).eval(), head(config).eval()
    hf_posenc.convert(a, "alibi")
    assert type(config) is type(b.config) and config.to_dict() == before
    assert b.config is config and not hf_posenc.is_converted(b)
    for module in a.modules():  # every submodule reads the converted copy (attention: config._attn_implementation)
        assert getattr(module, "config", a.config) is a.config, type(module).__name__
    assert a(ids(100)).logits.shape == (1, 100, VOCAB)
    b(ids(OLD_LIMIT))
    if family == "gpt2":
        with pytest.raises(IndexError):  # b is plain GPT-2 still
            b(ids(100))
    b.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == family


# ---- issue 14.8: an absurd or unallocatable limit leaves the model as it was --------------------------------------
def test_an_absurd_limit_is_refused_before_anything_changes():
    model = tiny_model("bert")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"above hf_posenc's limit of 67108864 .*use a smaller max_position_emb"):
        hf_posenc.convert(model, "alibi", max_position_embeddings=10**12)
    assert_unchanged(model, before)
    assert model.bert.embeddings.position_ids.shape[-1] == OLD_LIMIT
    hf_posenc.convert(model, "alibi", max_position_embeddings=4096)
    assert model(ids(100)).logits.shape == (1, 100, VOCAB)


def test_the_default_limit_stays_below_the_cap_so_the_checkpoint_reloads():
    model = hf_posenc.convert(tiny_model("llama", max_position_embeddings=2**23), "alibi")  # 16x would be 2**27
    assert model.config.max_position_embeddings == 2**26
    assert hf_posenc.PosEncConfig.from_dict(model.config.posenc, saved=True).max_position_embeddings == 2**26


def test_buffers_that_cannot_be_allocated_leave_the_model_as_it_was(monkeypatch):
    import dataclasses
    import importlib

    from hf_posenc.arches.bert import BERT

    convert_module = importlib.import_module("hf_posenc.convert")  # (hf_posenc.convert is the function)

    def out_of_memory(base, limit):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory")

    failing = dataclasses.replace(BERT, extend_limit=out_of_memory)
    monkeypatch.setattr(convert_module, "arch_for", lambda config: failing)
    model = tiny_model("bert")
    before = snapshot(model)
    with pytest.raises(ValueError, match="cannot allocate bert's length buffers.*pass a smaller max_position_emb"):
        hf_posenc.convert(model, "alibi", max_position_embeddings=4096)
    assert_unchanged(model, before)
    assert not hf_posenc.is_converted(model)


# ---- issue 14.11: models built on the meta device --------------------------------------------------------------
@pytest.mark.parametrize("family,method", [("llama", "alibi"), ("gpt2", "t5"), ("bert", "shaw"), ("llama", "rope"),
                                           ("gpt2", "sinusoidal")])
def test_convert_on_the_meta_device_then_load_weights(family, method):
    options = {"scale": 0.05} if method == "sinusoidal" else {}
    reference = hf_posenc.convert(tiny_model(family), method, **options)
    with torch.device("meta"):
        model = type(reference)(tiny_config(family))
    hf_posenc.convert(model, method, **options)
    assert hf_posenc.is_converted(model) and model.config.posenc == reference.config.posenc
    model.to_empty(device="cpu")
    model.load_state_dict(reference.state_dict())  # strict: the converted model has the same weights
    if family != "bert" and (family, method) != ("llama", "rope"):  # no buffers of values to recompute after to_empty
        x = ids(OLD_LIMIT + 20)
        assert torch.equal(model.eval()(x).logits, reference(x).logits)


def test_sinusoidal_on_the_meta_device_needs_its_scale():
    with torch.device("meta"):
        model = transformers.GPT2LMHeadModel(tiny_config("gpt2"))
    with pytest.raises(ValueError, match="meta device .*pass scale= explicitly"):
        hf_posenc.convert(model, "sinusoidal")
    assert not hf_posenc.is_converted(model)


# ---- issue 14.12: another default dtype ------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["t5", "alibi", "rope", "shaw", "sinusoidal"])
def test_convert_under_a_bfloat16_default_dtype(method):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = hf_posenc.convert(tiny_model("gpt2"), method)
        assert model(ids(OLD_LIMIT + 20)).logits.dtype == torch.bfloat16
    finally:
        torch.set_default_dtype(previous)
    if method == "t5":  # the ALiBi-shaped initial table, rounded once to bfloat16
        expected = hf_posenc.convert(tiny_model("gpt2"), "t5").transformer.posenc.relative_attention_bias.weight
        assert torch.equal(model.transformer.posenc.relative_attention_bias.weight, expected.bfloat16())


# ---- wrapped models: convert the base model first --------------------------------------------------------------
def test_a_peft_model_is_refused_with_the_fix():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("gpt2"), LoraConfig(target_modules=["c_attn"], fan_in_fan_out=True))
    with pytest.raises(TypeError, match="got PeftModel wrapping a GPT2LMHeadModel.*convert the base model first"):
        hf_posenc.convert(model, "alibi")
    inner = model.get_base_model()  # the transformers model with LoRA layers injected
    with pytest.raises(ValueError, match="has PEFT adapters in it: convert the base model first"):
        hf_posenc.convert(inner, "alibi")
    assert not hf_posenc.is_converted(inner)


def test_a_compiled_model_is_refused_with_the_fix():
    model = tiny_model("gpt2")
    with pytest.raises(TypeError, match="got OptimizedModule wrapping a GPT2LMHeadModel.*then wrap or compile it"):
        hf_posenc.convert(torch.compile(model), "alibi")
    assert not hf_posenc.is_converted(model)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("family", ["opt", "roberta"])
def test_learned_runs_a_padded_batch_whose_pads_sit_before_position_zero(family, side):
    """OPT and RoBERTa put pad tokens at position -1 (before the first table row); hidden by the attention mask,
    their position changes nothing, so ``learned`` runs the batch as the unconverted model does. A position before
    the first row on a token the mask shows is still refused."""
    model = hf_posenc.convert(tiny_model(family), "learned").eval()
    pad, real, n_pad = model.config.pad_token_id, ids(12)[0], 5
    padding = torch.full((n_pad,), pad)
    row = torch.cat([padding, real]) if side == "left" else torch.cat([real, padding])
    batch = torch.stack([row, ids(len(row))[0].roll(1)])
    mask = torch.ones_like(batch)
    mask[0] = batch[0] != pad
    with torch.no_grad():
        logits = model(batch, attention_mask=mask).logits
        alone = model(real[None]).logits
    torch.testing.assert_close(logits[0][mask[0].bool()], alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[1], model(batch[1:]).logits[0], atol=1e-5, rtol=0)
    first_row = pad + 1 if family == "roberta" else 0  # the position id of the first token
    refused = "before the learned table's first row.*attention_mask"
    with pytest.raises(ValueError, match=refused):
        model(batch[:1], position_ids=torch.arange(-1, len(row) - 1)[None] + first_row)
    if family == "roberta":  # pads found by their id, no mask: attended, at position -1
        with pytest.raises(ValueError, match=refused):
            model(batch[:1])
