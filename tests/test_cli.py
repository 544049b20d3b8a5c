"""``hf-posenc convert`` and the command dispatcher."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch
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


def test_convert_command_rejects_bad_method_before_writing(tmp_path):
    src = tmp_path / "plain"
    tiny_model("gpt2").save_pretrained(src)
    with pytest.raises(ValueError, match="known methods"):
        cli.main(["convert", "--model-path", str(src), "--method", "alibbi", "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_console_script_help_lists_commands():
    exe = shutil.which("hf-posenc")
    assert exe, "the hf-posenc console script is not installed (pip install -e .)"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    for name in cli.SUBCOMMANDS:
        assert name in out
    helped = subprocess.run([exe, "convert", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--method" in helped and "--option" in helped


def test_unknown_command_fails():
    assert cli.main(["frobnicate"]) == 2
