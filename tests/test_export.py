"""hf_posenc.export: a converted model as a checkpoint plain transformers (or onnxruntime) runs without hf_posenc.

Every mapping of docs/export.md is exported from a tiny random converted model; one fresh interpreter that never
imports hf_posenc loads every export (``AutoModelForCausalLM`` / ``AutoModelForMaskedLM``, no remote code; ONNX
with onnxruntime) and returns its logits and greedy generations, which must match the converted model's (fp32,
<= 1e-4) inside and past the old position limit (64). Refusals name what can be exported and write nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from tiny_models import OLD_LIMIT, VOCAB, tiny_model

import hf_posenc
from hf_posenc import cli
from hf_posenc.exporters import plan_export
from hf_posenc.exporters.bert_roformer import interleaving
from hf_posenc.exporters.onnx import mask_position_ids

TOLERANCE = 1e-4
LENGTHS = (20, OLD_LIMIT + 36)  # inside and past the old limit
PROMPT, NEW_TOKENS = OLD_LIMIT - 6, 12  # greedy generation runs across the old limit
SHARP = 0.3  # initializer_range: attention sharp enough that a wrong rotary shows far above TOLERANCE (with
# transformers' 0.02 a tiny random model attends almost uniformly, and RoFormer without the row reordering is
# within 2e-5)
NO_DROPOUT = {"gpt2": dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
              "bert": dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)}

# name -> (family, method, options, expected format, transformers class the export loads as)
CASES = {
    "llama-yarn": ("llama", "rope", {"scaling": "yarn", "factor": 4.0}, "native", "LlamaForCausalLM"),
    "mistral-linear": ("mistral", "rope", {"scaling": "linear", "factor": 2.0, "theta": 5e4}, "native",
                       "MistralForCausalLM"),
    "gpt2-rope": ("gpt2", "rope", {}, "native", "GPTNeoXForCausalLM"),
    "gpt2-rope-partial-yarn": ("gpt2", "rope", {"fraction": 0.5, "scaling": "yarn", "factor": 4.0}, "native",
                               "GPTNeoXForCausalLM"),
    "bert-rope": ("bert", "rope", {}, "native", "RoFormerForMaskedLM"),
    "gpt2-alibi": ("gpt2", "alibi", {}, "native", "BloomForCausalLM"),
    "gemma3-yarn": ("gemma3", "rope", {"scaling": "yarn", "factor": 4.0}, "native", "Gemma3ForCausalLM"),
    "llama-alibi": ("llama", "alibi", {}, "onnx", None),
    "bert-t5": ("bert", "t5", {}, "onnx", None),
    "llama-dynamic-yarn": ("llama", "rope", {"scaling": "dynamic_yarn", "factor": 4.0}, "onnx", None),
    "llama-longrope-start": ("llama", "rope", {"scaling": "longrope", "factor": 4.0, "start_tokens": 4,
                                               "long_factor": [1.0, 1.5, 3.0, 6.0]}, "onnx", None),
}
CAUSAL = {"llama", "qwen2", "mistral", "gpt2", "gemma3"}

FRESH_SCRIPT = r'''
import json, sys
import torch, transformers
cases, inputs = json.loads(sys.argv[1]), torch.load(sys.argv[2])
results = {}
for name, (folder, kind, causal) in cases.items():
    if kind == "onnx":
        import onnxruntime
        session = onnxruntime.InferenceSession(folder + "/model.onnx", providers=["CPUExecutionProvider"])
        names = [node.name for node in session.get_inputs()]
        results[name] = {"onnx": [torch.from_numpy(session.run(None, {n: feeds[n].numpy() for n in names})[0])
                                  for feeds in inputs["onnx"]]}
        continue
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModelForMaskedLM
    model = auto.from_pretrained(folder).eval()
    with torch.no_grad():
        out = {"class": type(model).__name__, "logits": [model(input_ids=x).logits for x in inputs["logits"]]}
        if causal:
            out["generated"] = model.generate(inputs["prompt"], max_new_tokens=inputs["new_tokens"], do_sample=False,
                                              min_new_tokens=inputs["new_tokens"])
    results[name] = out
tokenizer = transformers.AutoTokenizer.from_pretrained(cases["gpt2-rope"][0])
results["tokenized"] = tokenizer("Full fathom five").input_ids
assert "hf_posenc" not in sys.modules, "the fresh interpreter imported hf_posenc"
torch.save(results, sys.argv[3])
'''


def converted(family: str, method: str, options: dict):
    model = tiny_model(family, initializer_range=SHARP, **NO_DROPOUT.get(family, {}))
    return hf_posenc.convert(model, method, **options)


def ids(length: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def onnx_inputs() -> list[dict[str, torch.Tensor]]:
    """Several lengths, past the old limit too (dynamic YaRN: scale 1, 1.6 and 4); the second row left-padded, its
    positions counted from its first token (what the graph's position_ids input is for)."""
    feeds = []
    for length in (5, 40, OLD_LIMIT + 36, 4 * OLD_LIMIT):
        x = ids(length, seed=length)
        mask = torch.ones_like(x)
        mask[1, : length // 4] = 0
        feeds.append({"input_ids": x, "attention_mask": mask, "position_ids": mask_position_ids(mask)})
    return feeds


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_tokenizer):
    """name -> (converted model, export folder); the GPT-2 + rope one through the CLI, from a saved checkpoint."""
    root = tmp_path_factory.mktemp("export")
    tokenizer = tiny_tokenizer
    out = {}
    for name, (family, method, options, _, _) in CASES.items():
        model = converted(family, method, options)
        folder = root / name
        if name == "gpt2-rope":
            saved = root / "gpt2-rope-converted"
            model.save_pretrained(saved)
            tokenizer.save_pretrained(saved)
            assert cli.main(["export", "--model-path", str(saved), "--out", str(folder)]) == 0
        else:
            hf_posenc.export(model, folder, tokenizer=tokenizer)
        out[name] = (model, folder)
    return out


@pytest.fixture(scope="module")
def fresh_results(exported, tmp_path_factory):
    """What a fresh interpreter (hf_posenc never imported) computes with every export."""
    root = tmp_path_factory.mktemp("fresh")
    torch.save({"logits": [ids(n) for n in LENGTHS], "prompt": ids(PROMPT, batch=1, seed=3),
                "new_tokens": NEW_TOKENS, "onnx": onnx_inputs()}, root / "inputs.pt")
    cases = {name: (str(folder), CASES[name][3], CASES[name][0] in CAUSAL) for name, (_, folder) in exported.items()}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}
    script = root / "fresh.py"
    script.write_text(FRESH_SCRIPT)
    run = subprocess.run([sys.executable, str(script), json.dumps(cases), str(root / "inputs.pt"),
                          str(root / "results.pt")], capture_output=True, text=True, env=env, cwd=root)
    assert run.returncode == 0, run.stderr[-3000:]
    return torch.load(root / "results.pt")


@pytest.mark.parametrize("name", [n for n, case in CASES.items() if case[3] == "native"])
def test_native_export_matches_in_a_fresh_interpreter(name, exported, fresh_results):
    family, _, _, _, target_class = CASES[name]
    model, folder = exported[name]
    result = fresh_results[name]
    assert result["class"] == target_class
    saved = json.loads((folder / "config.json").read_text())
    assert "posenc" not in saved and "auto_map" not in saved and saved["model_type"] != "hf_posenc"
    with torch.no_grad():
        for n, logits in zip(LENGTHS, result["logits"]):
            expected = model(input_ids=ids(n)).logits
            assert (logits - expected).abs().max() <= TOLERANCE, (name, n)
        if family in CAUSAL:
            prompt = ids(PROMPT, batch=1, seed=3)
            expected = model.generate(prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
            assert expected.shape[-1] == PROMPT + NEW_TOKENS > OLD_LIMIT
            assert torch.equal(result["generated"], expected)
    assert "Exported by hf_posenc" in (folder / "README.md").read_text()


@pytest.mark.parametrize("name", [n for n, case in CASES.items() if case[3] == "onnx"])
def test_onnx_export_matches_with_onnxruntime(name, exported, fresh_results):
    model, folder = exported[name]
    assert (folder / "model.onnx").is_file() and (folder / "README.md").is_file()
    for feeds, logits in zip(onnx_inputs(), fresh_results[name]["onnx"]):
        with torch.no_grad():
            expected = model(**feeds)[0]
        assert logits.shape == expected.shape
        kept = feeds["attention_mask"].bool()  # padded positions' outputs are not defined
        assert (logits - expected)[kept].abs().max() <= TOLERANCE, (name, kept.shape)


def test_the_tokenizer_travels_with_the_export(fresh_results, exported):
    tokenizer = transformers.AutoTokenizer.from_pretrained(exported["gpt2-rope"][1])
    assert fresh_results["tokenized"] == tokenizer("Full fathom five").input_ids
    for name, (_, folder) in exported.items():
        assert (folder / "tokenizer.json").is_file(), name


def test_the_rotary_reordering_interleaves_halves():
    """RoFormer's pair (2i, 2i+1) is hf_posenc's pair (i, i + D/2)."""
    assert interleaving(8).tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


@pytest.mark.parametrize(("family", "method", "options", "why"), [
    ("gpt2", "alibi", {}, None),
    ("gpt2", "alibi", {"slope_scale": 0.5}, "slope_scale"),
    ("llama", "rope", {"fraction": 0.5}, "partial rotary"),
    ("llama", "rope", {"scaling": "linear", "factor": 2.0}, None),
    ("bert", "rope", {"theta": 500.0}, "theta"),
    ("gpt2", "sinusoidal", {}, "no transformers architecture"),
])
def test_auto_picks_native_only_where_exact(family, method, options, why):
    plan = plan_export(converted(family, method, options), "auto")
    assert plan.format == ("native" if why is None else "onnx")
    assert why is None or why in plan.why_not_native


def test_a_head_the_native_target_lacks_goes_to_onnx():
    model = hf_posenc.convert(tiny_model("bert", head="BertModel"), "rope")  # RoFormer has no pooler
    plan = plan_export(model, "auto")
    assert plan.format == "onnx" and "BertForMaskedLM" in plan.why_not_native


@pytest.mark.parametrize(("family", "options", "format", "message"), [
    ("gpt2", {"scaling": "dynamic", "factor": 4.0}, "native", "follows the input length"),
    ("gpt2", {"scaling": "dynamic", "factor": 4.0}, "auto", "chooses its frequencies per input length"),
    ("llama", {"scaling": "dynamic_yarn", "factor": 4.0}, "native", "no transformers rope_type"),
    ("qwen2", {"scaling": "dynamic", "factor": 4.0}, "native", "keeps the longest length it has seen"),
    ("gpt2", {"scaling": "dynamic", "factor": 4.0}, "onnx", "chooses its frequencies per input length"),
])
def test_refusals_list_what_can_be_exported_and_write_nothing(family, options, format, message, tmp_path):
    model = converted(family, "rope", options)
    with pytest.raises(ValueError, match=message) as err:
        hf_posenc.export(model, tmp_path / "out", format=format)
    assert "gpt2 + rope -> GPT-NeoX" in str(err.value) and "bert + rope -> RoFormer" in str(err.value)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_bad_input_is_refused_before_anything_is_written(tmp_path):
    plain = tiny_model("gpt2")
    with pytest.raises(ValueError, match="hf_posenc.convert"):
        hf_posenc.export(plain, tmp_path / "out")
    with pytest.raises(ValueError, match="format must be one of"):
        hf_posenc.export(converted("gpt2", "alibi", {}), tmp_path / "out", format="gguf")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        hf_posenc.export(converted("gpt2", "rope", {}), tmp_path / "full")
    assert os.listdir(tmp_path / "full") == ["keep.txt"] and sorted(os.listdir(tmp_path)) == ["full"]


def test_cli_reports_a_refusal(tmp_path, capsys):
    saved = tmp_path / "converted"
    converted("llama", "rope", {"scaling": "dynamic_yarn", "factor": 4.0}).save_pretrained(saved)
    assert cli.main(["export", "--model-path", str(saved), "--out", str(tmp_path / "out"), "--format", "native"]) == 2
    assert "no transformers rope_type" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_retrofit_export_writes_the_result_for_plain_transformers(tmp_path, tiny_tokenizer_dir, monkeypatch, capsys):
    from tiny_models import DATA, TEXT

    from hf_posenc import retrofit

    monkeypatch.setenv("HF_POSENC_CACHE", str(tmp_path / "cache"))
    checkpoint = tmp_path / "tiny-gpt2"
    tiny_model("gpt2").save_pretrained(checkpoint)
    for f in tiny_tokenizer_dir.iterdir():
        (checkpoint / f.name).write_bytes(f.read_bytes())
    argv = ["--model", str(checkpoint), "--method", "rope", "--data", str(TEXT), "--heldout", str(TEXT),
            "--other-heldout", str(DATA / "other.txt"), "--steps", "1", "--seq-len", "32", "--batch-size", "1",
            "--eval-lengths", "32", "--eval-tokens", "64", "--passkey-samples", "1", "--out", str(tmp_path / "run"),
            "--export"]
    assert retrofit.main(argv) == 0
    out = tmp_path / "run" / "export"
    assert "export:" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["architectures"] == ["GPTNeoXForCausalLM"]
    assert (out / "tokenizer.json").is_file() and (out / "README.md").is_file()


def test_bloom_embedding_layernorm_returns_each_embedding_minus_its_mean():
    """What makes GPT-2 + ALiBi -> BLOOM exact: BLOOM's extra LayerNorm on the (rescaled) table gives back GPT-2's
    embeddings up to their mean, which every later LayerNorm removes."""
    from hf_posenc.exporters.gpt2_bloom import identity_embedding_layernorm

    embeddings = torch.randn(50, 16, dtype=torch.float64) * 0.3 + 0.1
    table, gain = identity_embedding_layernorm(embeddings, 1e-5)
    normed = torch.nn.functional.layer_norm(table, (16,), gain, torch.zeros(16, dtype=torch.float64), 1e-5)
    torch.testing.assert_close(normed, embeddings - embeddings.mean(-1, keepdim=True))
