"""Fine-tune config: shipped YAML files, flag overrides, and bad input caught before anything loads. Fast."""

from pathlib import Path

import pytest
import yaml

from hf_posenc.training.config import ConfigError, LoraArgs, TrainConfig, load_config, parse_flags, reference

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "recipes" / "configs").glob("*.yaml"))
ACCELERATE_CONFIGS = sorted((ROOT / "recipes" / "accelerate").glob("*.yaml"))


def test_the_four_recipes_ship():
    names = {p.stem for p in CONFIGS}
    assert {"gpt2_alibi", "gpt2_rope", "smollm2_alibi", "bert_alibi_mlm"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_loads_with_known_keys(path):
    raw = yaml.safe_load(path.read_text())
    config = load_config(path)  # unknown keys, bad values, unknown method/options raise here
    assert config.method and config.output_dir and config.model == raw["model"]
    assert config.data.text == "shakespeare"
    assert config.seq_len * max(config.eval_multipliers) >= 2 * config.seq_len


def test_bert_recipe_is_mlm_and_smollm2_uses_lora():
    bert = load_config(ROOT / "recipes/configs/bert_alibi_mlm.yaml")
    assert bert.objective == "mlm" and bert.lora is None
    smol = load_config(ROOT / "recipes/configs/smollm2_alibi.yaml")
    assert smol.lora is not None and smol.lora.merge and "q_proj" in smol.lora.target_modules


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.stem)
def test_accelerate_configs_parse(path):
    values = yaml.safe_load(path.read_text())
    assert values["distributed_type"] in ("MULTI_GPU", "MULTI_CPU", "FSDP", "DEEPSPEED")
    assert values["num_processes"] >= 2


def test_flags_override_yaml_and_lora_flag_enables_lora():
    path = ROOT / "recipes/configs/gpt2_alibi.yaml"
    config = load_config(path, ["--max_steps", "200", "--lora.r", "16", "--lr=3e-4", "--gradient-checkpointing"])
    assert config.max_steps == 200 and config.lr == 3e-4 and config.gradient_checkpointing is True
    assert config.lora == LoraArgs(r=16) and config.train_mode == "lora"
    assert load_config(path, ["--lora", "none"]).lora is None
    assert load_config(path).lora is None and load_config(path).train_mode == "full"
    nested = load_config(path, ["--data.files", "a.txt", "--data.text", "none", "--eval_multipliers", "[1,8]"])
    assert nested.data.files == ["a.txt"] and nested.data.text is None and nested.eval_multipliers == [1, 8]


def test_parse_flags_reads_config_path_and_yaml_values():
    path, flags = parse_flags(["--config", "x.yaml", "--method_options", "{scaling: yarn, factor: 4}", "--cpu"])
    assert path == "x.yaml" and flags == {"method_options": {"scaling": "yarn", "factor": 4}, "cpu": True}
    with pytest.raises(ConfigError, match="expected a --key flag"):
        parse_flags(["max_steps", "3"])


BASE = {"model": "m", "method": "alibi", "output_dir": "o", "data": {"files": ["t.txt"]}}


@pytest.mark.parametrize("change, message", [
    ({"max_step": 3}, "unknown config key 'max_step'; did you mean 'max_steps'"),
    ({"lora": {"rank": 4}}, "unknown config key 'lora.rank'"),
    ({"data": {"file": ["x"]}}, "unknown config key 'data.file'"),
    ({"method": "alibbi"}, "unknown position method 'alibbi'"),
    ({"method_options": {"slope": 2}}, "unknown option.*slope.*valid options: slope_scale"),
    ({"method_options": {"slope_scale": -1}}, "slope_scale"),
    ({"max_steps": "many"}, "max_steps: cannot use 'many'"),
    ({"seq_len": 0}, "seq_len must be an integer >= 1"),
    ({"objective": "seq2seq"}, "objective must be one of"),
    ({"lr_scheduler": "cosine_annealing"}, "lr_scheduler 'cosine_annealing' unknown"),
    ({"optimizer": "lion"}, "optimizer 'lion' is not a torch.optim class"),
    ({"data": {}}, "give exactly one of data.text"),
    ({"data": {"files": ["a"], "text": "shakespeare"}}, "give exactly one of"),
    ({"model": None}, "model is required"),
    ({"lora": {"r": 0}}, "lora.r must be an integer >= 1"),
    ({"eval_multipliers": [1, 0]}, "eval_multipliers"),
])
def test_bad_config_fails_with_a_clear_message(change, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides={**BASE, **change})


def test_missing_config_file_fails():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("no/such/file.yaml")


def test_docs_describe_every_config_key():
    docs = (ROOT / "docs" / "finetune.md").read_text()
    missing = [key for key, _, _ in reference() if f"`{key}`" not in docs]
    assert not missing, f"docs/finetune.md does not describe {missing}"


def test_reference_covers_every_field():
    keys = {key for key, _, _ in reference()}
    assert {"model", "data.files", "lora.r", "lora.merge", "eval_multipliers"} <= keys
    assert all(help for _, help, _ in reference()), "every config field needs metadata help"
    assert TrainConfig().lora is None


def recipe_main():
    import importlib.util

    spec = importlib.util.spec_from_file_location("finetune_recipe", ROOT / "recipes" / "finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the recipe only imports hf_posenc.training.cli.main
    return module.main


def test_recipe_script_help_and_clean_errors(tmp_path, capsys):
    main = recipe_main()
    assert main(["--help"]) == 0
    assert "--lora.r" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: m\nmethod: alibi\noutput_dir: o\ndata: {files: [t.txt]}\nmax_step: 3\n")
    assert main(["--config", str(bad)]) == 2
    assert "finetune: error: unknown config key 'max_step'; did you mean 'max_steps'" in capsys.readouterr().err
    assert main(["--config", str(bad), "--method", "alibbi"]) == 2
    assert "unknown" in capsys.readouterr().err


def test_native_method_trains_without_conversion(tmp_path, tiny_tokenizer_dir):
    """method 'native' (pre-training, baselines) keeps the model's own positions and refuses evaluation lengths
    past a learned table."""
    import shutil

    from tiny_models import TEXT, tiny_model

    from hf_posenc.training import ConfigError, load_config, train

    src = tmp_path / "plain"
    tiny_model("gpt2").save_pretrained(src)
    for f in tiny_tokenizer_dir.iterdir():
        shutil.copy(f, src)
    base = {"model": str(src), "method": "native", "data": {"files": [str(TEXT)]}, "seq_len": 32,
            "batch_size": 2, "max_steps": 2, "eval_every": 0, "save_every": 0, "eval_tokens": 128,
            "output_dir": str(tmp_path / "out")}
    with pytest.raises(ConfigError, match="learned position table"):
        train(load_config(overrides={**base, "eval_multipliers": [1, 4]}))
    with pytest.raises(ConfigError, match="method_options"):
        load_config(overrides={**base, "method_options": {"theta": 5.0}})
    result = train(load_config(overrides={**base, "eval_multipliers": [1, 2]}))
    assert set(result.final_perplexity) == {32, 64}
    import json

    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "posenc" not in saved and saved["model_type"] == "gpt2"


def test_adam_family_takes_the_fused_kernel_unless_the_config_says_otherwise():
    """make_optimizer: Adam / AdamW on plain CPU tensors run torch's fused update (the default per-tensor loop was ~4x
    slower here); optimizer_args that set ``fused`` or ``foreach`` win; other optimizers are left alone. The fused
    update is the same as the default one to rounding."""
    import torch

    from hf_posenc.training.loop import make_optimizer

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))

    def fused(config):
        return make_optimizer(model(), config).defaults.get("fused")

    assert fused(TrainConfig()) is True
    assert fused(TrainConfig(optimizer="adam")) is True
    assert fused(TrainConfig(optimizer_args={"fused": False})) is False
    assert fused(TrainConfig(optimizer_args={"foreach": True})) in (None, False)
    assert fused(TrainConfig(optimizer="sgd")) in (None, False)

    def trained(config):
        net = model()
        optimizer = make_optimizer(net, config)
        x = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
        for _ in range(5):
            net(x).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        return torch.cat([p.detach().flatten() for p in net.parameters()])

    reference = trained(TrainConfig(lr=1e-2, optimizer_args={"fused": False}))
    assert not torch.equal(reference, trained(TrainConfig(lr=1e-3, optimizer_args={"fused": False})))
    torch.testing.assert_close(trained(TrainConfig(lr=1e-2)), reference, rtol=1e-5, atol=1e-6)


def test_config_syntax_errors_name_the_file_and_the_fix(tmp_path, capsys):
    """A YAML syntax error in the config file or in a flag value, and a bare --config: one line, exit 2 (was a
    raw yaml traceback that named neither the file nor the flag)."""
    main = recipe_main()
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: m\ndata: {files: [t.txt]\nmax_steps: 3\n")
    for argv, message in (
        (["--config", str(bad)], f"config file {bad} is not valid YAML: "),
        (["--model", "m", "--eval_multipliers", "[1,2"], "--eval_multipliers '[1,2' is not a valid YAML value"),
        (["--config", "--max_steps", "3"], "--config needs a YAML file"),
        (["--config", str(tmp_path)], f"config file {tmp_path} is a folder"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"finetune: error: {message}" in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(ConfigError, match=r"line 3, column 1; fix the YAML syntax"):
        load_config(bad)


def test_max_position_embeddings_in_method_options_names_the_top_level_key():
    with pytest.raises(ConfigError, match="not a method option; set the top-level key max_position_embeddings"):
        load_config(overrides={**BASE, "method_options": {"max_position_embeddings": 128}})


def test_an_output_dir_that_is_a_file_exits_2_and_stays(tmp_path, capsys):
    """Was a raw FileExistsError from the output lock's mkdir; a file in the way of a parent too."""
    main = recipe_main()
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    for out, message in ((afile, "is an existing file, not a folder"), (afile / "sub", "cannot be created")):
        argv = ["--model", "m", "--method", "alibi", "--data.files", "[t.txt]", "--output_dir", str(out)]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"finetune: error: output_dir {out} {message}" in err and "choose another output_dir" in err
    assert afile.read_text() == "not a folder"
