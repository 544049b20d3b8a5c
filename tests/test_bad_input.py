"""Bad input gets a clear error that names the fix, and leaves the model exactly as it was."""

from __future__ import annotations

import pytest
import torch
import transformers
from tiny_models import OLD_LIMIT, tiny_model

import hf_posenc


def snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        model.config.to_dict(),
        model.config._attn_implementation,
        [type(m).__name__ for m in model.modules()],
    )


def assert_unchanged(model, before):
    state, config, attn, modules = before
    after = snapshot(model)
    assert after[1] == config
    assert after[2] == attn
    assert after[3] == modules
    assert state.keys() == after[0].keys()
    for key in state:
        assert torch.equal(state[key], after[0][key]), key


@pytest.mark.parametrize(
    "method, options, message",
    [
        ("alibii", {}, "known methods: alibi, rope, t5, shaw, sinusoidal, nope, learned, xpos, transformer_xl, fire"),
        ("rope", {"scaling": "ntk"}, "option 'scaling' must be one of"),
        ("rope", {"factor": 0.5}, "option 'factor' must be a number >= 1.0, got 0.5"),
        ("rope", {"scaling": "yarn"}, "option 'factor' must be > 1"),
        ("rope", {"fraction": 0.0}, "option 'fraction' must be a number in [1e-09, 1.0], got 0.0"),
        ("rope", {"fraction": 0.1}, "leaves fewer than 2"),
        ("rope", {"mscale": 0.5}, "give scaling='yarn' or 'dynamic_yarn' with it"),
        ("t5", {"max_distance": 16, "num_buckets": 32}, "option 'max_distance' must be > "),
        ("rope", {"scaling": "linear", "factor": 2.0, "mscale": 0.5}, "give scaling='yarn' or 'dynamic_yarn'"),
        ("rope", {"scaling": "yarn", "factor": 2.0, "mscale": -0.1}, "option 'mscale' must be a number >= 0.0"),
        ("rope", {"scaling": "yarn", "factor": 2.0, "growth": 2.0}, "give scaling='dynamic_yarn' with it"),
        ("rope", {"growth": 2.0}, "option 'growth' sets how Dynamic YaRN's scale follows the input"),
        ("rope", {"scaling": "dynamic_yarn", "factor": 2.0, "growth": 0.0}, "option 'growth' must be a number"),
        ("rope", {"thetaa": 5.0},
         "unknown option(s) ['thetaa'] for method 'rope'; valid options: attention_factor, checkpoint_rope, factor, fraction"),
        ("t5", {"num_buckets": 1}, "option 'num_buckets' must be an integer >= 2, got 1"),
        ("t5", {"num_buckets": 3.5}, "option 'num_buckets' must be an integer"),
        ("t5", {"init": "random"}, "option 'init' must be one of ['alibi', 'zeros']"),
        ("shaw", {"max_distance": 0}, "option 'max_distance' must be an integer >= 1, got 0"),
        ("alibi", {"slope_scale": -1}, "option 'slope_scale'"),
        ("sinusoidal", {"base": 1}, "option 'base'"),
        # non-finite numbers: nan compares False with every bound, inf passes an open one
        ("alibi", {"slope_scale": float("nan")}, "option 'slope_scale' must be a finite number >= 1e-06, got nan"),
        ("alibi", {"slope_scale": float("inf")}, "option 'slope_scale' must be a finite number >= 1e-06, got inf"),
        ("rope", {"theta": float("nan")}, "option 'theta' must be a finite number"),
        ("rope", {"factor": float("inf"), "scaling": "linear"}, "option 'factor' must be a finite number"),
        ("sinusoidal", {"base": float("nan")}, "option 'base' must be a finite number"),
        ("sinusoidal", {"scale": float("inf")}, "option 'scale' must be a finite number"),
        ("nope", {"anything": 1}, "unknown option(s) ['anything'] for method 'nope'; valid options: (none)"),
        ("learned", {"extend": "tile"}, "option 'extend' must be one of ['copy', 'interpolate', 'zeros']"),
        ("xpos", {"scale_base": 0}, "option 'scale_base' must be a number >= 1e-06, got 0"),
        ("xpos", {"gamma": float("nan")}, "option 'gamma' must be a finite number"),
        ("transformer_xl", {"init_std": -1.0}, "option 'init_std' must be a number >= 0.0, got -1.0"),
        ("transformer_xl", {"base": 1.0}, "option 'base'"),
        ("fire", {"width": 1}, "option 'width' must be an integer >= 2, got 1"),
        ("fire", {"threshold": 0.5}, "option 'threshold' must be a number >= 1.0, got 0.5"),
        ("fire", {"init": "t5"}, "option 'init' must be one of ['alibi', 'zeros']"),
    ],
)
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_bad_method_or_option_is_named_and_model_untouched(family, method, options, message):
    model = tiny_model(family)
    before = snapshot(model)
    with pytest.raises(ValueError) as err:
        hf_posenc.convert(model, method, **options)
    assert message in str(err.value)
    assert_unchanged(model, before)


def test_bad_position_limit_is_refused():
    model = tiny_model("gpt2")
    before = snapshot(model)
    with pytest.raises(ValueError, match="below the model's current limit 64"):
        hf_posenc.convert(model, "alibi", max_position_embeddings=32)
    for bad in ("big", float("nan"), float("inf"), 4096.0):
        with pytest.raises(ValueError, match="max_position_embeddings must be a positive integer"):
            hf_posenc.convert(model, "alibi", max_position_embeddings=bad)
    assert_unchanged(model, before)


def test_unsupported_architecture_names_the_supported_ones():
    config = transformers.GPTNeoXConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2,
                                        intermediate_size=32, vocab_size=50, max_position_embeddings=32)
    model = transformers.GPTNeoXForCausalLM(config)
    before = snapshot(model)
    with pytest.raises(ValueError) as err:
        hf_posenc.convert(model, "alibi")
    assert "unsupported architecture 'gpt_neox'" in str(err.value)
    assert str(hf_posenc.supported_archs()) in str(err.value)
    known = {"gpt2", "bert", "llama", "opt", "roberta", "qwen3", "gemma2", "gemma3_text"}
    assert known <= set(hf_posenc.supported_archs())
    assert "Adding a family" in str(err.value)
    assert_unchanged(model, before)


def test_not_a_transformers_model():
    with pytest.raises(TypeError, match="expects a transformers PreTrainedModel"):
        hf_posenc.convert(torch.nn.Linear(2, 2), "alibi")


@pytest.mark.parametrize("second", ["alibi", "rope"])
def test_converting_twice_is_a_clear_error(second):
    model = hf_posenc.convert(tiny_model("gpt2"), "t5")
    before = snapshot(model)
    with pytest.raises(ValueError, match="already converted to 't5'.*Load the original checkpoint"):
        hf_posenc.convert(model, second)
    assert_unchanged(model, before)


def test_from_pretrained_on_a_plain_checkpoint_says_what_to_do(tmp_path):
    tiny_model("gpt2").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not an hf_posenc checkpoint.*hf_posenc.convert"):
        hf_posenc.from_pretrained(tmp_path)


def test_from_pretrained_refuses_a_newer_format(tmp_path):
    model = hf_posenc.convert(tiny_model("gpt2"), "alibi")
    model.config.posenc["format_version"] = hf_posenc.FORMAT_VERSION + 1
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="newer hf_posenc"):
        hf_posenc.from_pretrained(tmp_path)


def test_posenc_config_object_is_accepted_once():
    config = hf_posenc.PosEncConfig("rope", {"scaling": "linear", "factor": 2.0})
    model = hf_posenc.convert(tiny_model("gpt2"), config)
    assert model.config.posenc["options"]["factor"] == 2.0
    with pytest.raises(TypeError, match="not both"):
        hf_posenc.convert(tiny_model("gpt2"), config, factor=3.0)


def test_from_pretrained_posenc_options_replace_the_saved_ones(tmp_path):
    """A saved Dynamic YaRN model reloaded with another mscale is that model converted with it; the saved
    checkpoint is not changed."""
    x = torch.randint(4, 300, (1, 2 * OLD_LIMIT))
    hf_posenc.convert(tiny_model("llama"), "rope", scaling="dynamic_yarn", factor=4.0).save_pretrained(tmp_path)
    before = (tmp_path / "config.json").read_text()
    reloaded = hf_posenc.from_pretrained(tmp_path, posenc_options={"mscale": 0.0})
    expected = hf_posenc.convert(tiny_model("llama"), "rope", scaling="dynamic_yarn", factor=4.0, mscale=0.0)
    assert reloaded.config.posenc["options"]["mscale"] == 0.0
    torch.testing.assert_close(reloaded(x).logits, expected(x).logits)
    assert (tmp_path / "config.json").read_text() == before


@pytest.mark.parametrize("method, saved, options, message", [
    ("rope", {}, {"mscalee": 1.0}, "posenc_options: unknown option(s) ['mscalee'] for method 'rope'"),
    ("rope", {}, {"mscale": 0.5}, "posenc_options: option 'mscale' is YaRN's attention temperature"),
    ("shaw", {"max_distance": 8}, {"max_distance": 4}, "do not fit the method's options"),
])
def test_from_pretrained_bad_posenc_options_are_named(tmp_path, method, saved, options, message):
    hf_posenc.convert(tiny_model("gpt2"), method, **saved).save_pretrained(tmp_path)
    with pytest.raises(ValueError) as err:
        hf_posenc.from_pretrained(tmp_path, posenc_options=options)
    assert message in str(err.value)


# ---- finetune: every check runs before the first write, and a refused run leaves no folder -----------------


def saved_tiny(root, tokenizer_dir, family, name, **config):
    """A tiny checkpoint with the tiny tokenizer, as a user's local model folder."""
    import shutil

    out = root / name
    tiny_model(family, **config).save_pretrained(out)
    shutil.copytree(tokenizer_dir, out, dirs_exist_ok=True)
    return out


@pytest.fixture(scope="module")
def finetune_models(tmp_path_factory, tiny_tokenizer_dir):
    root = tmp_path_factory.mktemp("finetune_models")
    return {name: saved_tiny(root, tiny_tokenizer_dir, family, name, **config) for name, family, config in (
        ("gpt2", "gpt2", {}), ("gpt2_vocab100", "gpt2", {"vocab_size": 100}), ("roberta", "roberta", {}))}


def finetune_config(model, out, **overrides):
    from tiny_models import TEXT

    from hf_posenc.training import load_config

    values = {"model": str(model), "method": "alibi", "data": {"files": [str(TEXT)]}, "seq_len": 32,
              "batch_size": 2, "max_steps": 1, "eval_every": 0, "eval_multipliers": [1], "eval_tokens": 32,
              "save_every": 0, "report_to": ["none"], "output_dir": str(out), **overrides}
    return load_config(overrides=values)


def test_finetune_refuses_a_tokenizer_the_model_cannot_embed_before_writing(finetune_models, tmp_path):
    """Was: checks passed, metrics.jsonl and train_config.json written, a bare IndexError at the first step, and
    the folder then refused the corrected run as another run's."""
    from hf_posenc.training import DataError, train

    out = tmp_path / "runs" / "out"
    with pytest.raises(DataError, match=r"holds token id \d+, but '.*gpt2_vocab100' embeds only 100 token ids "
                                        r"\(0..99\).*use the model's own tokenizer"):
        train(finetune_config(finetune_models["gpt2_vocab100"], out))
    assert not (tmp_path / "runs").exists()  # no metrics, no train_config.json, no empty folder
    assert train(finetune_config(finetune_models["gpt2"], out)).step == 1  # the corrected run goes ahead


def test_mlm_masking_needs_every_tokenizer_id_in_the_embedding(tiny_tokenizer):
    """The MLM collator swaps in random ids from the whole tokenizer, so its size must fit, not only the text's."""
    from hf_posenc.training import DataError
    from hf_posenc.training.data import Corpus, check_token_ids

    corpus = Corpus(torch.arange(10), torch.arange(10), "ten ids")
    rows = len(tiny_tokenizer) - 1
    check_token_ids(corpus, tiny_tokenizer, "causal", rows, "m")  # only the text's ids reach a causal model
    with pytest.raises(DataError, match=rf"the tokenizer has {rows + 1} tokens .* embeds only {rows} token ids"):
        check_token_ids(corpus, tiny_tokenizer, "mlm", rows, "m")


@pytest.mark.parametrize("model, overrides, error, message", [
    ("gpt2", {"data": {"files": ["no/such/text.txt"]}}, "DataError", "no/such/text.txt does not exist"),
    ("gpt2", {"resume_from": "no/such/checkpoint"}, "FileNotFoundError", "not a complete checkpoint"),
    # checks only the loaded model can make: were a raw ValueError from convert, or an error after the last step
    ("gpt2", {"max_position_embeddings": 32}, "ConfigError", "method 'alibi': .*below the model's current limit 64"),
    ("gpt2", {"method": "learned", "max_position_embeddings": 64, "eval_multipliers": [1, 4]}, "ConfigError",
     r"reaches 128 tokens, but the model runs at most 64 \(.*learned method embeds positions below 64 only.*set "
     "max_position_embeddings: 128"),
    # a position limit is the method's declared capability (PositionMethod.position_limit), not a name list
    ("gpt2", {"method": "sinusoidal", "eval_multipliers": [1, 2], "position_limit": 48}, "ConfigError",
     r"reaches 64 tokens, but the model runs at most 48 \(.*sinusoidal method embeds positions below 48 only"),
    ("roberta", {"max_position_embeddings": 64, "eval_multipliers": [1, 2]}, "ConfigError",
     r"runs at most 62 \(max_position_embeddings=64: the roberta length buffers\); set max_position_embeddings: 66"),
])
def test_a_finetune_refused_by_its_checks_leaves_no_folder(finetune_models, tmp_path, monkeypatch, model, overrides,
                                                           error, message):
    import hf_posenc.training as training
    from hf_posenc.registry import method_class

    overrides = dict(overrides)
    if "position_limit" in overrides:  # a method declaring a limit of its own
        limit = overrides.pop("position_limit")
        monkeypatch.setattr(method_class(overrides["method"]), "position_limit", property(lambda self: limit))

    errors = {"DataError": training.DataError, "ConfigError": training.ConfigError,
              "FileNotFoundError": FileNotFoundError}
    with pytest.raises(errors[error], match=message):
        training.train(finetune_config(finetune_models[model], tmp_path / "runs" / "out", **overrides))
    assert not (tmp_path / "runs").exists()
    kept = tmp_path / "kept"  # a folder that was there before stays, as it was
    kept.mkdir()
    with pytest.raises(errors[error]):
        training.train(finetune_config(finetune_models[model], kept, **overrides))
    assert kept.is_dir() and not any(kept.iterdir())


@pytest.mark.parametrize("family", ["bert", "roberta"])
@pytest.mark.parametrize("method", ["alibi", "learned"])
def test_an_input_past_the_length_buffers_names_the_limit_to_convert_with(family, method):
    """BERT / RoBERTa embeddings read token_type_ids and position_ids from buffers of max_position_embeddings:
    past them the error names the limit to convert with, not transformers' bare expand error; with both passed
    (no buffer read) ALiBi runs past them."""
    model = hf_posenc.convert(tiny_model(family), method, max_position_embeddings=OLD_LIMIT)
    ids = torch.randint(5, 100, (1, OLD_LIMIT + 8))
    with pytest.raises(ValueError, match=f"max_position_embeddings={OLD_LIMIT + 8}\\) or more"):
        model(ids)
    if method == "alibi":
        positions = torch.arange(ids.shape[1])[None] + (2 if family == "roberta" else 0)  # RoBERTa: pad + 1 offset
        out = model(ids, token_type_ids=torch.zeros_like(ids), position_ids=positions)
        assert torch.isfinite(out.logits).all()
