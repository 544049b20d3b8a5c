"""Fine-tuning on tiny random models and The Tempest: loss goes down, LoRA (with the position tables trained via
modules_to_save), BERT MLM from a headless checkpoint, resume = straight run, Ctrl-C, gradient checkpointing, and
bad input failing before training. One process, CPU, no network."""

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_model

import hf_posenc
from hf_posenc.training import ConfigError, load_config, load_finetuned, read_metrics, train
from hf_posenc.training.config import DataArgs
from hf_posenc.training.data import eval_windows, load_corpus


def save_tiny(tmp_path: Path, tokenizer_dir: Path, family: str, head: str | None = None, **overrides) -> str:
    """A tiny random checkpoint with the tiny tokenizer, as a user's local model directory."""
    out = tmp_path / f"tiny_{family}_{head or 'lm'}"
    tiny_model(family, head, **overrides).save_pretrained(out)
    shutil.copytree(tokenizer_dir, out, dirs_exist_ok=True)
    return str(out)


def run(model: str, out: Path, text_path: Path, argv=(), callbacks=(), **overrides):
    values = {
        "model": model, "method": "alibi", "data": {"files": [str(text_path)]}, "seq_len": 32, "batch_size": 8,
        "max_steps": 20, "lr": 3e-3, "warmup_steps": 2, "eval_every": 10, "eval_tokens": 512, "log_every": 5,
        "save_every": 0, "report_to": ["none"], "output_dir": str(out), **overrides,
    }
    return train(load_config(argv=list(argv), overrides=values), callbacks=list(callbacks))


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, tiny_tokenizer_dir):
    return save_tiny(tmp_path_factory.mktemp("models"), tiny_tokenizer_dir, "gpt2")


def heldout_perplexity(model, tokenizer, text_path, length, eval_tokens=512):
    corpus = load_corpus(DataArgs(files=[str(text_path)]), tokenizer, "causal", 32, length)
    windows = eval_windows(corpus.heldout, length, eval_tokens)
    with torch.no_grad():
        return math.exp(model.eval()(input_ids=windows, labels=windows).loss.item())


def test_full_finetune_lowers_the_loss_and_saves_a_reloadable_model(gpt2_dir, tmp_path, text_path, tiny_tokenizer):
    out = tmp_path / "out"
    result = run(gpt2_dir, out, text_path)
    assert result.step == 20 and not result.interrupted and len(result.losses) == 20
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-3:]) / 3
    assert last < first - 0.3, result.losses

    records = read_metrics(out)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [5, 10, 15, 20]
    assert all(r["tokens_per_s"] > 0 and r["lr"] >= 0 for r in steps)
    assert steps[0]["lr"] > steps[-1]["lr"]  # cosine decay
    assert [r["step"] for r in records if "eval_ppl" in r] == [10]
    final = [r for r in records if r.get("final")][-1]
    assert set(final["final_ppl"]) == {"32", "64", "128"} and all(math.isfinite(v) for v in final["final_ppl"].values())

    model = hf_posenc.from_pretrained(out)  # the saved model is the trained one
    assert model.config.posenc["method"] == "alibi"
    assert model.config.use_cache  # training runs without a KV cache; the saved model generates with one
    for length in (32, 128):
        expected = result.final_perplexity[length]
        assert heldout_perplexity(model, tiny_tokenizer, text_path, length) == pytest.approx(expected, rel=1e-4)
    assert (out / "tokenizer.json").exists() and (out / "train_config.json").exists()


def test_lora_trains_t5_table_alongside_adapters_and_keeps_them_separate(
        gpt2_dir, tmp_path, text_path, tiny_tokenizer_dir):
    out = tmp_path / "lora"
    result = run(gpt2_dir, out, text_path, ["--lora.r", "4", "--lora.merge", "false"], method="t5",
                 max_steps=6, eval_every=0, eval_multipliers=[1, 2])
    start = read_metrics(out)[0]
    assert start["train"] == "lora" and start["trainable_params"] < 10_000  # adapters + the (16, 4) table

    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    table_keys = [k for k in adapter if "posenc.relative_attention_bias" in k]
    assert table_keys and any("lora_" in k for k in adapter)
    converted = hf_posenc.convert(tiny_model("gpt2"), "t5")
    initial_table = converted.transformer.posenc.relative_attention_bias.weight
    assert not torch.allclose(adapter[table_keys[0]], initial_table)  # the position table trained

    base = hf_posenc.from_pretrained(out)  # base weights untouched by LoRA
    assert torch.equal(base.transformer.h[0].attn.c_attn.weight, converted.transformer.h[0].attn.c_attn.weight)
    peft_model = load_finetuned(out)
    ids = torch.randint(3, 300, (1, 96))  # past the tiny model's 64 positions
    with torch.no_grad():
        with_adapter = peft_model(input_ids=ids).logits
        merged = peft_model.merge_and_unload()(input_ids=ids).logits
    torch.testing.assert_close(with_adapter, merged, rtol=1e-4, atol=1e-4)
    assert math.isfinite(result.final_perplexity[64])


def test_lora_merged_trains_shaw_tables_of_a_llama(tmp_path, text_path, tiny_tokenizer_dir):
    model_dir = save_tiny(tmp_path, tiny_tokenizer_dir, "llama")
    out = tmp_path / "lora_llama"
    run(model_dir, out, text_path, ["--lora.r", "4"], method="shaw", method_options={"max_distance": 8},
        max_steps=4, eval_every=0, eval_multipliers=[1, 2])
    assert not (out / "adapter").exists()
    model = hf_posenc.from_pretrained(out)  # merged: a plain converted model
    tables = model.model.posenc.layers
    assert all(t.keys.abs().sum() > 0 and t.values.abs().sum() > 0 for t in tables)  # started at zero
    original = tiny_model("llama")
    layer, before = model.model.layers[0], original.model.layers[0]
    assert not torch.equal(layer.self_attn.q_proj.weight, before.self_attn.q_proj.weight)  # LoRA merged in
    assert torch.equal(layer.mlp.up_proj.weight, before.mlp.up_proj.weight)  # not a LoRA target


def test_bert_mlm_from_a_headless_checkpoint(tmp_path, text_path, tiny_tokenizer_dir):
    model_dir = save_tiny(tmp_path, tiny_tokenizer_dir, "bert", head="BertModel")
    out = tmp_path / "bert"
    result = run(model_dir, out, text_path, max_steps=16, eval_every=0)
    start = read_metrics(out)[0]
    assert start["objective"] == "mlm"
    assert "cls.predictions.transform.dense.weight" in start["fresh_weights"]
    assert sum(result.losses[-4:]) / 4 < sum(result.losses[:4]) / 4 - 0.2, result.losses
    model = hf_posenc.from_pretrained(out)
    assert type(model).__name__ == "BertForMaskedLM" and model.config.posenc["method"] == "alibi"
    assert set(result.final_perplexity) == {32, 64, 128}
    assert all(math.isfinite(p) for p in result.final_perplexity.values())


RESUME = dict(max_steps=4, grad_accum=2, batch_size=4, eval_every=0, eval_multipliers=[1], log_every=1,
              eval_tokens=64, warmup_steps=1)
SMALL = ["--data.max_train_tokens", "640"]  # 20 blocks: 5 micro-batches an epoch, so 4 x 2 crosses an epoch end


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory, tiny_tokenizer_dir):
    return save_tiny(tmp_path_factory.mktemp("models"), tiny_tokenizer_dir, "bert")


@pytest.mark.parametrize("family, method", [("gpt2", "t5"), ("bert", "shaw")])  # causal / MLM (masks resume too)
def test_ctrl_c_saves_and_two_plus_two_resumed_steps_equal_four_straight(family, method, request, tmp_path,
                                                                         text_path):
    model_dir = request.getfixturevalue(f"{family}_dir")
    resume = {**RESUME, "method": method}
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN under nohup / a background CI job
    straight = run(model_dir, tmp_path / "straight", text_path, SMALL, **resume)

    def interrupt_at_two(state):
        if state.step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends

    resumed_dir = tmp_path / "resumed"
    first = run(model_dir, resumed_dir, text_path, SMALL, callbacks=[interrupt_at_two], **resume)
    assert first.interrupted and first.step == 2 and first.checkpoint.name == "step-0000002"
    assert not (resumed_dir / "model.safetensors").exists()  # no final model for an interrupted run
    assert signal.getsignal(signal.SIGINT) is before  # the handler found is restored

    second = run(model_dir, resumed_dir, text_path, SMALL + ["--resume_from", "latest"], **resume)
    assert second.step == 4 and not second.interrupted
    assert first.losses + second.losses == straight.losses
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(resumed_dir / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    with pytest.raises(ConfigError, match="batch_size: 4 -> 8"):
        run(model_dir, resumed_dir, text_path, SMALL + ["--resume_from", str(first.checkpoint)],
            **{**resume, "batch_size": 8})


QUICK = dict(max_steps=2, eval_every=0, eval_multipliers=[1], eval_tokens=64, log_every=1, save_every=1)


def test_an_output_dir_holding_another_runs_files_is_refused(gpt2_dir, tmp_path, text_path):
    """Checkpoints and metrics carry the identity of the run that wrote them: another run into the same folder is
    refused before training (fresh or `--resume_from latest` alike), and so is a checkpoint of another run; the
    same run resumes, also with more steps."""
    out = tmp_path / "out"
    first = run(gpt2_dir, out, text_path, SMALL, **QUICK)
    metrics = (out / "metrics.jsonl").read_text()

    for argv in ([], ["--resume_from", "latest"]):
        with pytest.raises(ConfigError, match=r"checkpoints of another run.*lr: 0.003 -> 0.001.*another output_dir"):
            run(gpt2_dir, out, text_path, SMALL + argv, lr=1e-3, **QUICK)
    with pytest.raises(ConfigError, match="method: alibi -> t5"):
        run(gpt2_dir, out, text_path, SMALL, method="t5", **QUICK)
    with pytest.raises(ConfigError, match="checkpoints of this run.*--resume_from latest"):
        run(gpt2_dir, out, text_path, SMALL, **QUICK)  # a fresh start: `latest` would later pick the old ones
    with pytest.raises(ConfigError, match=r"resume_from: .*step-0000002 was written by another run.*lr: 0.003"):
        run(gpt2_dir, tmp_path / "new", text_path, SMALL + ["--resume_from", str(first.checkpoint)], lr=1e-3,
            **QUICK)
    assert (out / "metrics.jsonl").read_text() == metrics  # the refused runs wrote nothing

    (out / "checkpoints" / ".step-0000003.partial").mkdir()  # a save cut short by a crash
    more = run(gpt2_dir, out, text_path, SMALL + ["--resume_from", "latest"], **{**QUICK, "max_steps": 3})
    assert more.step == 3 and (out / "checkpoints" / "step-0000003").is_dir()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002", "step-0000003"]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp folder, no lock left
    starts = [r for r in read_metrics(out) if r.get("event") == "start"]
    assert len(starts) == 2 and starts[0]["run"] == starts[1]["run"]

    with pytest.raises(ConfigError, match=r"checkpoints past step-0000002 \(step-0000003\)"):  # going back
        run(gpt2_dir, out, text_path, SMALL + ["--resume_from", str(first.checkpoint)], **{**QUICK, "max_steps": 3})

    shutil.rmtree(out / "checkpoints")  # the metrics (and the final model) identify the run too
    with pytest.raises(ConfigError, match="metrics of another run.*lr: 0.003 -> 0.001"):
        run(gpt2_dir, out, text_path, SMALL, lr=1e-3, **QUICK)
    model_dir = tmp_path / "model_as_out"
    shutil.copytree(gpt2_dir, model_dir)
    with pytest.raises(ConfigError, match="holds a model"):  # output_dir = the model being fine-tuned
        run(str(model_dir), model_dir, text_path, SMALL, **QUICK)


def test_gradient_checkpointing_gives_the_same_steps(gpt2_dir, tmp_path, text_path):
    common = dict(method="t5", max_steps=2, eval_every=0, eval_multipliers=[1], eval_tokens=64)
    plain = run(gpt2_dir, tmp_path / "plain", text_path, SMALL, **common)
    checkpointed = run(gpt2_dir, tmp_path / "gc", text_path, SMALL + ["--gradient_checkpointing"], **common)
    assert checkpointed.losses == pytest.approx(plain.losses, rel=1e-5)


def test_bad_input_fails_before_training(gpt2_dir, tmp_path, text_path):
    out = tmp_path / "bad"
    with pytest.raises(ConfigError, match=r"lora.target_modules \['q_proj'\] match no Linear module.*c_attn"):
        run(gpt2_dir, out, text_path, ["--lora.target_modules", "[q_proj]"])
    with pytest.raises(ConfigError, match="not a local checkpoint"):
        run(str(tmp_path / "no_model"), out, text_path)
    with pytest.raises(ConfigError, match="'mlm' needs a BERT-style model"):
        run(gpt2_dir, out, text_path, objective="mlm")
    with pytest.raises(ValueError, match="does not exist"):
        run(gpt2_dir, out, text_path, data={"files": [str(tmp_path / "missing.txt")]})
    assert not (out / "metrics.jsonl").exists()  # nothing started


def test_a_converted_checkpoint_keeps_training_without_method(gpt2_dir, tmp_path, text_path):
    first = tmp_path / "first"
    run(gpt2_dir, first, text_path, SMALL, max_steps=1, eval_every=0, eval_multipliers=[1], eval_tokens=64)
    with pytest.raises(ConfigError, match="already converted to 'alibi'"):
        run(str(first), tmp_path / "again", text_path, SMALL, method="rope")
    again = run(str(first), tmp_path / "again", text_path, SMALL, method=None, max_steps=1, eval_every=0,
                eval_multipliers=[1], eval_tokens=64)
    assert again.step == 1
    assert json.loads((tmp_path / "again" / "config.json").read_text())["posenc"]["method"] == "alibi"


def test_a_second_run_into_the_same_output_dir_is_refused(tmp_path):
    """The lock keeps a run from resuming a checkpoint that another live run into the same folder is pruning;
    a lock whose process is gone is taken over, and the lock goes away with the run."""
    from hf_posenc.training.checkpointing import LOCK, OutputLock

    with OutputLock(tmp_path):
        assert (tmp_path / LOCK).is_file()
        with pytest.raises(ConfigError, match="in use by another run.*choose another output_dir"):
            OutputLock(tmp_path).__enter__()
    assert not (tmp_path / LOCK).exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / LOCK).write_text(f"{socket.gethostname()} {dead.stdout.strip()}")  # a run that crashed
    with OutputLock(tmp_path) as lock:
        assert (tmp_path / LOCK).read_text() == lock.owner
    with OutputLock(tmp_path, enabled=False):  # processes other than the main one do not lock
        assert not (tmp_path / LOCK).exists()
