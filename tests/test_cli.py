"""``hf-posenc convert`` and the command dispatcher."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from tiny_models import OLD_LIMIT, tiny_model

import hf_posenc
from hf_posenc import cli


def test_convert_command_round_trip(tmp_path, tiny_tokenizer_dir, capsys):
    src, out = tmp_path / "plain", tmp_path / "converted"
    tiny_model("gpt2").save_pretrained(src)
    for f in tiny_tokenizer_dir.iterdir():
        shutil.copy(f, src)
    code = cli.main(["convert", "--model-path", str(src), "--method", "rope",
                     "--option", "scaling=yarn", "--option", "factor=4", "--out", str(out)])
    assert code == 0
    assert "saved rope model" in capsys.readouterr().out
    model = hf_posenc.from_pretrained(out)
    assert model.config.posenc["options"]["scaling"] == "yarn"
    assert model.config.posenc["options"]["factor"] == 4
    assert (out / "tokenizer.json").exists()
    logits = model(torch.randint(4, 300, (1, 3 * OLD_LIMIT))).logits
    assert torch.isfinite(logits).all()


def test_convert_command_rejects_bad_method_before_writing(tmp_path, capsys):
    src = tmp_path / "plain"
    tiny_model("gpt2").save_pretrained(src)
    with pytest.raises(SystemExit) as exit_:  # exit 2 and one line, not a traceback
        cli.main(["convert", "--model-path", str(src), "--method", "alibbi", "--out", str(tmp_path / "o")])
    assert exit_.value.code == 2 and "known methods" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_console_script_help_lists_commands():
    # beside this interpreter first: `.venv/bin/python -m pytest` works without the venv on PATH
    exe = shutil.which("hf-posenc", path=str(Path(sys.executable).parent)) or shutil.which("hf-posenc")
    assert exe, "the hf-posenc console script is not installed (pip install -e .)"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    for name in cli.SUBCOMMANDS:
        assert name in out
    helped = subprocess.run([exe, "convert", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--method" in helped and "--option" in helped


def test_unknown_command_fails():
    assert cli.main(["frobnicate"]) == 2


def checkpoint_dir(tmp_path, tokenizer_dir, family="gpt2", name="plain"):
    src = tmp_path / name
    tiny_model(family).save_pretrained(src)
    shutil.copytree(tokenizer_dir, src, dirs_exist_ok=True)
    return src


def test_convert_keeps_the_checkpoints_own_head_class(tmp_path, tiny_tokenizer_dir):
    """A BERT MLM checkpoint stays BertForMaskedLM (AutoModelForCausalLM would make it the causal BertLMHeadModel)."""
    src, out = checkpoint_dir(tmp_path, tiny_tokenizer_dir, "bert"), tmp_path / "converted"
    assert cli.main(["convert", "--model-path", str(src), "--method", "alibi", "--out", str(out)]) == 0
    model = hf_posenc.from_pretrained(out)
    assert type(model).__name__ == "BertForMaskedLM"
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertForMaskedLM"]
    original = tiny_model("bert")
    torch.testing.assert_close(model.cls.predictions.transform.dense.weight,
                               original.cls.predictions.transform.dense.weight)  # the MLM head came along


def test_convert_without_architectures_asks_for_model_class(tmp_path, tiny_tokenizer_dir, capsys):
    src = checkpoint_dir(tmp_path, tiny_tokenizer_dir, "bert")
    config = json.loads((src / "config.json").read_text())
    del config["architectures"]
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["convert", "--model-path", str(src), "--method", "alibi", "--out", str(tmp_path / "o")])
    assert exit_.value.code == 2 and "--model-class" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def convert(src, out, *extra):
    return cli.main(["convert", "--model-path", str(src), "--method", "alibi", "--out", str(out), *extra])


def test_convert_refuses_an_existing_file_or_a_non_empty_out(tmp_path, tiny_tokenizer_dir, capsys):
    src = checkpoint_dir(tmp_path, tiny_tokenizer_dir)
    file = tmp_path / "model.bin"
    file.write_text("not a folder")
    for extra in ((), ("--overwrite",)):
        with pytest.raises(SystemExit) as exit_:
            convert(src, file, *extra)
        assert exit_.value.code == 2 and "existing file" in capsys.readouterr().err
    assert file.read_text() == "not a folder"

    other = checkpoint_dir(tmp_path, tiny_tokenizer_dir, "bert", name="other")
    before = {p.name: p.read_bytes() for p in other.iterdir()}
    with pytest.raises(SystemExit) as exit_:
        convert(src, other)
    assert exit_.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in other.iterdir()} == before  # untouched


def test_convert_overwrite_replaces_out_only_after_a_complete_save(tmp_path, tiny_tokenizer_dir, monkeypatch):
    src = checkpoint_dir(tmp_path, tiny_tokenizer_dir)
    out = checkpoint_dir(tmp_path, tiny_tokenizer_dir, "bert", name="out")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_save = type(tiny_model("gpt2")).save_pretrained

    def save_then_fail(self, path, **kwargs):  # config.json written, then the disk fills up
        real_save(self, path, **kwargs)
        raise OSError("No space left on device")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", save_then_fail)
    with pytest.raises(OSError, match="No space"):
        convert(src, out, "--overwrite")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old checkpoint, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "plain"]  # no temp folder left behind

    monkeypatch.undo()
    (out / "stale.txt").write_text("from the old folder")
    assert convert(src, out, "--overwrite") == 0
    assert type(hf_posenc.from_pretrained(out)).__name__ == "GPT2LMHeadModel"
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "plain"]


@pytest.fixture(scope="module")
def gpt2_checkpoint(tmp_path_factory, tiny_tokenizer_dir):
    return checkpoint_dir(tmp_path_factory.mktemp("cli"), tiny_tokenizer_dir)


@pytest.mark.parametrize("extra, message", [
    # an option with a flag of its own: was `TypeError: multiple values for keyword argument`
    (["--option", "max_position_embeddings=128"], "not a method option; pass --max-position-embeddings 128"),
    (["--option", "thetaa=5"], "unknown option(s) ['thetaa'] for method 'alibi'"),
    (["--option", "slope_scale=2", "--option", "slope_scale=3"],  # was: the last value, silently
     "--option slope_scale=... is given twice (2 and 3); give it once"),
    (["--max-position-embeddings", "0"], "max_position_embeddings must be a positive integer"),
    (["--max-position-embeddings", "32"], "below the model's current limit 64"),  # known once the model is read
])
def test_convert_bad_options_exit_2_with_one_line_before_writing(gpt2_checkpoint, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_:
        convert(gpt2_checkpoint, tmp_path / "o", *extra)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_convert_a_missing_model_path_exits_2_naming_it(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        convert(tmp_path / "no_such_model", tmp_path / "o")
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"--model-path {tmp_path / 'no_such_model'}: not a local checkpoint" in err
    assert not (tmp_path / "o").exists()


def test_retrofit_flag_errors_exit_2_with_one_line(tiny_llama_dir, tmp_path, capsys):
    """--out that is a file (was a raw FileExistsError after the model fetch), an --option without `=` (was
    argparse's usage of an empty parser) and --option max_position_embeddings (a config key, not a method option)."""
    from hf_posenc import retrofit
    from tiny_models import TEXT

    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    base = ["--model", str(tiny_llama_dir), "--method", "alibi", "--data", str(TEXT), "--heldout", str(TEXT),
            "--other-heldout", "none", "--out"]
    for extra, message in (
        ([str(afile)], f"--out {afile} is an existing file, not a folder; choose another --out"),
        ([str(tmp_path / "o"), "--option", "factor"], "--option expects KEY=VALUE"),
        ([str(tmp_path / "o"), "--option", "max_position_embeddings=256"], "--option max_position_embeddings=... is not a method option; set"),
        ([str(tmp_path / "o"), "--option", "slope_scale=2", "--option", "slope_scale=2"],
         "--option slope_scale=... is given twice (2 and 2); give it once"),
    ):
        assert retrofit.main(base + extra) == 2
        assert f"hf-posenc retrofit: error: {message}" in capsys.readouterr().err
    assert afile.read_text() == "not a folder" and not (tmp_path / "o").exists()
