"""PoSE position skipping and self-distillation from the unconverted model (fine-tune options ``pose`` and
``distill``), and ``hf_posenc.original_positions``, the context that runs a converted model as the original. Tiny
models, CPU, a few seconds each."""

import contextlib
import copy
import os
import signal
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny_models import OLD_LIMIT, tiny_model

import hf_posenc
from hf_posenc.training import ConfigError, load_config, read_metrics, train
from hf_posenc.training import loop
from hf_posenc.training.config import DistillArgs, LoraArgs, PoseArgs
from hf_posenc.training.data import pose_position_ids, pose_seed
from hf_posenc.training.distill import distillation_kl, teacher_logits
from hf_posenc.training.model import apply_lora

NO_DROPOUT = {"gpt2": dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
              "bert": dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), "llama": {}}
CONVERSIONS = [("alibi", {}), ("rope", {}), ("rope", {"scaling": "yarn", "factor": 4}), ("t5", {}),
               ("shaw", {"max_distance": 8}), ("sinusoidal", {}), ("nope", {})]


def save_tiny(tmp_path: Path, tokenizer_dir: Path, family: str, head: str | None = None) -> str:
    out = tmp_path / f"tiny_{family}_{head or 'lm'}"
    tiny_model(family, head, **NO_DROPOUT[family]).save_pretrained(out)
    shutil.copytree(tokenizer_dir, out, dirs_exist_ok=True)
    return str(out)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_tokenizer_dir):
    root = tmp_path_factory.mktemp("models")
    return {family: save_tiny(root, tiny_tokenizer_dir, family) for family in ("gpt2", "llama")}


def settings(model: str, out: Path, text_path: Path, **overrides) -> dict:
    return {"model": model, "method": "rope", "data": {"files": [str(text_path)], "max_train_tokens": 640},
            "seq_len": 32, "batch_size": 4, "max_steps": 2, "lr": 1e-3, "warmup_steps": 0, "eval_every": 0,
            "eval_tokens": 64, "eval_multipliers": [1], "log_every": 1, "save_every": 0, "report_to": ["none"],
            "output_dir": str(out), **overrides}


def run(model, out, text_path, argv=(), callbacks=(), **overrides):
    return train(load_config(argv=list(argv), overrides=settings(model, out, text_path, **overrides)),
                 callbacks=list(callbacks))


# ---- PoSE position ids ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("length, target, chunks, split", [
    (32, 1024, 2, "random"), (32, 1024, 4, "equal"), (16, 17, 3, "random"), (8, 4096, 8, "random"),
    (32, 64, 1, "random"), (256, 32768, 2, "random"),
])
def test_pose_ids_shape_range_and_chunks(length, target, chunks, split):
    ids = pose_position_ids(64, length, target, chunks, seed=3, split=split)
    assert ids.shape == (64, length) and ids.dtype == torch.long
    assert (ids[:, 0] == 0).all() and (ids >= 0).all() and (ids < target).all()
    steps = ids.diff(dim=1)
    assert (steps >= 1).all()  # strictly increasing: u_0 <= u_1 <= ... and contiguous inside a chunk
    jumps = (steps > 1).sum(dim=1)
    assert (jumps <= chunks - 1).all()  # at most one skip between consecutive chunks, none inside
    if chunks == 1:
        assert torch.equal(ids, torch.arange(length).expand(64, -1))
    if split == "equal":
        cuts = [k * length // chunks for k in range(1, chunks)]
        assert all(int(j) in cuts for row in steps for j in torch.nonzero(row > 1).flatten() + 1)
    if target - length >= 1000 and chunks > 1:
        assert ids[:, -1].max() > target // 2  # the skips reach far (uniform in [0, target - L])


def test_pose_ids_are_a_function_of_the_seed_only():
    a = pose_position_ids(4, 32, 1024, 2, seed=pose_seed(0, 5, 0))
    torch.manual_seed(123)  # the global RNG plays no part
    b = pose_position_ids(4, 32, 1024, 2, seed=pose_seed(0, 5, 0))
    assert torch.equal(a, b)
    others = [pose_position_ids(4, 32, 1024, 2, seed=pose_seed(*key)) for key in ((0, 6, 0), (0, 5, 1), (1, 5, 0))]
    assert all(not torch.equal(a, other) for other in others)  # step / micro-batch, rank and seed all matter


def test_run_inputs_carry_pose_ids_by_micro_batch_index():
    config = SimpleNamespace(seed=0, pose=PoseArgs(target_length=512, chunks=2))
    fake = SimpleNamespace(config=config, objective="causal", accelerator=SimpleNamespace(process_index=0))
    ids = torch.randint(3, 300, (4, 32))
    first = loop.Run.inputs(fake, ids, 7)
    assert set(first) == {"input_ids", "labels", "position_ids", "attention_mask"}
    assert first["position_ids"].shape == (4, 32)
    assert first["attention_mask"].all()  # no mask would make transformers cut the window at every skip
    loop.Run.inputs(fake, ids, 8)
    assert torch.equal(loop.Run.inputs(fake, ids, 7)["position_ids"], first["position_ids"])
    config.pose = None
    assert "position_ids" not in loop.Run.inputs(fake, ids, 7)


# ---- validation ------------------------------------------------------------------------------------------------

BASE = {"model": "m", "method": "rope", "output_dir": "o", "data": {"files": ["t.txt"]}, "seq_len": 256}


@pytest.mark.parametrize("change, message", [
    ({"pose": {"target_length": 256}}, r"pose.target_length must be an integer > seq_len \(256\)"),
    ({"pose": {"target_length": 100}}, "pose.target_length must be an integer > seq_len"),
    ({"pose": {"chunks": 0}}, r"pose.chunks must be an integer in \[1, seq_len=256\]"),
    ({"pose": {"chunks": 257}}, "pose.chunks must be an integer in"),
    ({"pose": {"split": "uneven"}}, "pose.split must be one of"),
    ({"pose": {"chunk": 2}}, "unknown config key 'pose.chunk'; did you mean 'pose.chunks'"),
    ({"pose": {}, "objective": "mlm"}, "PoSE position skipping is for causal language models"),
    ({"distill": {"temperature": 0}}, "distill.temperature must be > 0"),
    ({"distill": {"weight": -1}}, "distill.weight and distill.lm_weight must be >= 0"),
    ({"distill": {"weight": 0, "lm_weight": 0}}, "both 0"),
    ({"distill": {}, "method": None}, "no original to compare against"),
])
def test_bad_pose_or_distill_config_fails(change, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides={**BASE, **change})


def test_sections_are_off_unless_given():
    config = load_config(overrides=BASE)
    assert config.pose is None and config.distill is None
    config = load_config(argv=["--pose.chunks", "3", "--distill"], overrides=BASE)
    assert config.pose == PoseArgs(chunks=3) and config.distill == DistillArgs()


def test_bad_model_combinations_fail_before_training(models, tmp_path, text_path, tiny_tokenizer_dir):
    out = tmp_path / "bad"
    with pytest.raises(ConfigError, match="past the model's position limit max_position_embeddings=8192"):
        run(models["llama"], out, text_path, pose={"target_length": 10_000})
    with pytest.raises(ConfigError, match="lower pose.target_length"):  # GPT-2's own table stops at 64
        run(models["gpt2"], out, text_path, method="native", pose={"target_length": 2 * OLD_LIMIT})
    bert = save_tiny(tmp_path, tiny_tokenizer_dir, "bert")
    with pytest.raises(ConfigError, match="PoSE position skipping is for causal.*'mlm'"):
        run(bert, out, text_path, method="alibi", pose={"target_length": 512})
    with pytest.raises(ConfigError, match="learned position table covers 64 positions, but seq_len is 128"):
        run(models["gpt2"], out, text_path, method="alibi", distill={}, seq_len=128)
    headless = save_tiny(tmp_path, tiny_tokenizer_dir, "bert", head="BertModel")
    with pytest.raises(ConfigError, match="distill: .* lacks .* weights of its LM head"):
        run(headless, out, text_path, method="alibi", distill={})
    converted = tmp_path / "converted"
    hf_posenc.convert(tiny_model("llama"), "rope", scaling="yarn", factor=4).save_pretrained(converted)
    shutil.copytree(tiny_tokenizer_dir, converted, dirs_exist_ok=True)
    with pytest.raises(ConfigError, match="already converted to 'rope'.*no original model to distil from"):
        run(str(converted), out, text_path, distill={})
    assert not (out / "metrics.jsonl").exists()  # nothing started


# ---- original_positions ----------------------------------------------------------------------------------------


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", ["gpt2", "bert", "llama", "gemma3"])
@pytest.mark.parametrize("method, options", CONVERSIONS, ids=lambda v: str(v) if v else "")
def test_original_positions_give_the_unconverted_logits(family, method, options):
    original = tiny_model(family)
    ids = torch.randint(3, 300, (2, 40))
    expected = logits(original, ids)
    model = hf_posenc.convert(copy.deepcopy(original), method, **options)
    converted = logits(model, ids)
    keys = set(model.state_dict())
    with hf_posenc.original_positions(model) as same:
        assert same is model and model.config._attn_implementation == original.config._attn_implementation
        assert model.config.max_position_embeddings == OLD_LIMIT
        torch.testing.assert_close(logits(model, ids), expected, atol=1e-5, rtol=0)
    assert model.config._attn_implementation == hf_posenc.ATTN_IMPLEMENTATION
    torch.testing.assert_close(logits(model, ids), converted, atol=1e-5, rtol=0)
    assert set(model.state_dict()) == keys  # the stash is not saved, trained or registered
    assert not any(type(m) is torch.nn.Embedding and m.num_embeddings == OLD_LIMIT for m in model.modules())


def test_original_positions_restore_on_error_follow_dtype_and_refuse_rebuilt_models(tmp_path):
    original = tiny_model("llama")
    model = hf_posenc.convert(copy.deepcopy(original), "rope", scaling="yarn", factor=4)
    rope = copy.deepcopy(model.config.rope_parameters)
    ids = torch.randint(3, 300, (1, 24))
    converted = logits(model, ids)
    with pytest.raises(KeyError):
        with hf_posenc.original_positions(model):
            assert model.config.rope_parameters == original.config.rope_parameters
            raise KeyError("inside")
    assert model.config.rope_parameters == rope and model.config._attn_implementation == "hf_posenc"
    torch.testing.assert_close(logits(model, ids), converted, atol=0, rtol=0)

    model.to(torch.float64)  # the stashed rotary is not registered: it is moved when it is put back
    with hf_posenc.original_positions(model):
        torch.testing.assert_close(logits(model, ids), logits(copy.deepcopy(original).double(), ids))

    gpt2 = hf_posenc.convert(tiny_model("gpt2"), "alibi")
    gpt2.save_pretrained(tmp_path / "saved")
    with pytest.raises(ValueError, match="loaded from a converted checkpoint"):
        with hf_posenc.original_positions(hf_posenc.from_pretrained(tmp_path / "saved")):
            pass
    plain = tiny_model("gpt2")
    with hf_posenc.original_positions(plain):  # never converted: nothing to do
        torch.testing.assert_close(logits(plain, ids), logits(tiny_model("gpt2"), ids))


# ---- distillation --------------------------------------------------------------------------------------------


def test_distillation_kl_is_zero_for_equal_logits_and_matches_the_definition():
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    assert distillation_kl(student, student, 2.0).abs() < 1e-6
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    t = 2.0
    p = torch.softmax(teacher / t, -1)
    per_position = (p * (p.log() - torch.log_softmax(student / t, -1))).sum(-1)  # (B, L)
    expected = per_position[mask.bool()].mean()
    torch.testing.assert_close(distillation_kl(student, teacher, t, mask), expected)


@pytest.mark.parametrize("family, method", [("gpt2", "sinusoidal"), ("llama", "rope")])
def test_lora_teacher_is_the_unconverted_model(family, method):
    original = tiny_model(family, **NO_DROPOUT[family])
    ids = torch.randint(3, 300, (2, 24))
    expected = logits(original, ids)
    model = hf_posenc.convert(copy.deepcopy(original), method)
    peft_model = apply_lora(model, LoraArgs(r=4, dropout=0.1), family, [])
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_()  # adapters that change the function
    peft_model.train()
    student = peft_model(input_ids=ids).logits.detach()
    accelerator = SimpleNamespace(autocast=contextlib.nullcontext)
    target = teacher_logits(accelerator, peft_model, None, {"input_ids": ids, "labels": ids,
                                                            "position_ids": torch.arange(24)[None] * 7})
    torch.testing.assert_close(target, expected, atol=1e-5, rtol=0)  # adapters off, original positions, eval mode
    assert peft_model.training and model.config._attn_implementation == "hf_posenc"
    peft_model.eval()
    assert not torch.allclose(logits(peft_model, ids), expected, atol=1e-3)  # adapters and method back on
    assert not torch.allclose(student, expected, atol=1e-3)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_distill_kl_is_zero_when_the_conversion_keeps_the_function(models, tmp_path, text_path, lora):
    """Llama converted to plain RoPE computes what it did: the first step's KL to the original is ~0 (full: the
    frozen copy; LoRA: the same weights, adapters off, original positions back)."""
    argv = ["--lora.r", "4"] if lora else []
    run(models["llama"], tmp_path / "out", text_path, argv, max_steps=1, distill={"weight": 1.0})
    step = [r for r in read_metrics(tmp_path / "out") if "loss" in r][0]
    assert step["distill_kl"] < 1e-6 and step["loss"] == pytest.approx(step["lm_loss"] + step["distill_kl"])


def test_full_and_lora_teachers_agree_on_the_first_step(models, tmp_path, text_path):
    """LoRA starts as the identity, so the first step's KL is the same with the frozen copy as with the adapters
    disabled and the original positions restored."""
    common = dict(method="rope", method_options={"scaling": "yarn", "factor": 16}, max_steps=1,
                  pose={"target_length": 1024}, distill={"temperature": 2.0})
    run(models["llama"], tmp_path / "full", text_path, **common)
    run(models["llama"], tmp_path / "lora", text_path, ["--lora.r", "4"], **common)
    full, lora = ([r for r in read_metrics(tmp_path / name) if "loss" in r][0] for name in ("full", "lora"))
    assert full["distill_kl"] > 1e-8 and lora["distill_kl"] == pytest.approx(full["distill_kl"], rel=1e-4)
    assert lora["lm_loss"] == pytest.approx(full["lm_loss"], rel=1e-6)


def test_bert_mlm_distills_on_the_masked_inputs(tmp_path, text_path, tiny_tokenizer_dir):
    bert = save_tiny(tmp_path, tiny_tokenizer_dir, "bert")
    run(bert, tmp_path / "out", text_path, method="alibi", max_steps=1, distill={"lm_weight": 0.0})
    step = [r for r in read_metrics(tmp_path / "out") if "loss" in r][0]
    assert step["distill_kl"] > 0 and step["loss"] == pytest.approx(step["distill_kl"])  # pure distillation


# ---- end to end ---------------------------------------------------------------------------------------------


@pytest.fixture
def spy(monkeypatch):
    """Records (training?, position_ids) of every forward of the student's transformer and the teacher copy's."""
    seen = {"student": [], "teacher": []}
    load_model = loop.load_model

    def record(kind):
        def hook(module, args, kwargs):
            position_ids = kwargs.get("position_ids")
            seen[kind].append((module.training, None if position_ids is None else position_ids.clone()))
        return hook

    def spying(config, plan=None):
        loaded = load_model(config, plan)
        model = loaded.model.get_base_model() if hasattr(loaded.model, "get_base_model") else loaded.model
        model.base_model.register_forward_pre_hook(record("student"), with_kwargs=True)
        if loaded.teacher is not None:
            loaded.teacher.base_model.register_forward_pre_hook(record("teacher"), with_kwargs=True)
        return loaded

    monkeypatch.setattr(loop, "load_model", spying)
    return seen


@pytest.mark.parametrize("family, method, options, lora", [
    ("llama", "rope", {"scaling": "yarn", "factor": 16}, False),
    ("llama", "rope", {"scaling": "yarn", "factor": 16}, True),
    ("gpt2", "sinusoidal", {}, False),
    ("gpt2", "sinusoidal", {}, True),
], ids=["llama-yarn-full", "llama-yarn-lora", "gpt2-sinusoidal-full", "gpt2-sinusoidal-lora"])
def test_two_steps_with_pose_and_distill(models, tmp_path, text_path, spy, family, method, options, lora):
    out = tmp_path / "out"
    argv = ["--lora.r", "4"] if lora else []
    result = run(models[family], out, text_path, argv, method=method, method_options=options,
                 pose={"target_length": 1024, "chunks": 2}, distill={"weight": 0.5, "temperature": 2.0})
    assert result.step == 2 and not result.interrupted and (out / "model.safetensors").exists()
    steps = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert steps[0]["distill_kl"] > 0  # the conversion and the skipped positions change the function
    for r in steps:
        assert r["distill_kl"] >= 0 and r["loss"] == pytest.approx(r["lm_loss"] + 0.5 * 4 * r["distill_kl"], rel=1e-5)
    trained = [p for training, p in spy["student"] if training]
    assert len(trained) == 2 and all(p is not None and p.shape == (4, 32) for p in trained)
    assert max(int(p.max()) for p in trained) >= 32 and all((p < 1024).all() for p in trained)  # skipped ids
    teacher = spy["student" if lora else "teacher"]
    teacher_calls = [p for training, p in teacher if not training]
    assert len(teacher_calls) >= 2 and all(p is None for p in teacher_calls[:2])  # contiguous: no ids given
    if lora:
        assert not (out / "adapter").exists()  # merged as usual


def test_lora_distill_under_gradient_checkpointing_gives_the_same_steps(models, tmp_path, text_path):
    """The LoRA teacher runs the student's own modules: it runs before the student's forward, so checkpointed
    layers recompute with the student's per-forward state (T5's shared table term)."""
    common = dict(method="t5", pose={"target_length": 256}, distill={"temperature": 2.0})
    plain = run(models["llama"], tmp_path / "plain", text_path, ["--lora.r", "4"], **common)
    checkpointed = run(models["llama"], tmp_path / "gc", text_path, ["--lora.r", "4", "--gradient_checkpointing"],
                       **common)
    assert checkpointed.losses == pytest.approx(plain.losses, rel=1e-5)


def test_pose_ids_resume_exactly(models, tmp_path, text_path, spy):
    common = dict(max_steps=4, pose={"target_length": 512, "chunks": 3}, save_every=0)
    run(models["llama"], tmp_path / "straight", text_path, **common)
    straight = [p for training, p in spy["student"] if training]
    spy["student"].clear()

    def interrupt_at_two(state):
        if state.step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    first = run(models["llama"], tmp_path / "resumed", text_path, callbacks=[interrupt_at_two], **common)
    assert first.interrupted
    run(models["llama"], tmp_path / "resumed", text_path, ["--resume_from", "latest"], **common)
    resumed = [p for training, p in spy["student"] if training]
    assert len(straight) == len(resumed) == 4 and all(torch.equal(a, b) for a, b in zip(straight, resumed))
