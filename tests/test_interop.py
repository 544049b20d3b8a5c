"""A converted model everywhere a transformers model goes, and never loaded silently wrong.

- every Python block of docs/interop.md runs here (tiny random checkpoints stand in for the hub names it uses);
- every way to load a saved converted checkpoint, with and without hf_posenc imported (the latter in a fresh
  process), and with trust_remote_code None / False / True: either exact outputs or an error saying how to load it;
- PEFT with learned position tables, gradient checkpointing, bfloat16, ``.to(dtype)``, ``torch.compile``.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from tiny_models import TEXT, VOCAB, tiny_model

import hf_posenc
from hf_posenc import hub_code

DOC = Path(__file__).parents[1] / "docs" / "interop.md"
HEADS = {"gpt2": "GPT2LMHeadModel", "bert": "BertForMaskedLM", "llama": "LlamaForCausalLM"}
BASES = {"gpt2": "GPT2Model", "bert": "BertModel", "llama": "LlamaModel"}
AUTO_HEADS = {"gpt2": "AutoModelForCausalLM", "bert": "AutoModelForMaskedLM", "llama": "AutoModelForCausalLM"}
PIPELINES = {"gpt2": "text-generation", "bert": "fill-mask", "llama": "text-generation"}
# one method per family: a learned table where the old one is removed (GPT-2), a learned per-layer method on an
# encoder (BERT), and a method replacing native RoPE, which plain transformers would apply silently (Llama)
METHODS = {"gpt2": ("t5", {}), "bert": ("shaw", {"max_distance": 8}), "llama": ("alibi", {})}
NO_DROPOUT = {
    "gpt2": dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "bert": dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    "llama": {},
}


def subprocess_env(tmp_path: Path) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "hf_modules"),
            "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}


def randomise_tables(model) -> None:
    torch.manual_seed(1)
    for p in model.base_model.posenc.parameters():
        torch.nn.init.normal_(p, std=0.5)


def ids(length: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---- docs/interop.md: every block runs ----------------------------------------------------------------------
def doc_blocks() -> list[tuple[str, int, str]]:
    """(section heading, line number, code) for each ```python block of the doc, in order."""
    text = DOC.read_text()
    blocks, heading = [], ""
    for match in re.finditer(r"^## ([^\n]+)$|^```python\n(.*?)^```", text, flags=re.M | re.S):
        if match.group(1):
            heading = match.group(1).strip()
        else:
            blocks.append((heading, text[: match.start()].count("\n") + 2, match.group(2)))
    return blocks


DOC_BLOCKS = doc_blocks()
FRESH_PROCESS = "a fresh Python process"


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory, tiny_tokenizer_dir) -> dict[str, str]:
    """Hub names used in the doc -> tiny unconverted checkpoints (with the tiny tokenizer) on disk."""
    root = tmp_path_factory.mktemp("stand_ins")
    names = {"openai-community/gpt2": "gpt2", "google-bert/bert-base-uncased": "bert",
             "HuggingFaceTB/SmolLM2-135M": "llama"}
    out = {}
    for name, family in names.items():
        path = root / family
        tiny_model(family).save_pretrained(path)
        for f in tiny_tokenizer_dir.iterdir():
            shutil.copy(f, path)
        out[name] = str(path)
    out["corpus.txt"] = str(TEXT)
    return out


@pytest.fixture(scope="module")
def doc_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("doc_examples")


def run_block(code: str, line: int, stand_ins: dict, workdir: Path) -> str:
    for name, path in stand_ins.items():
        code = code.replace(f'"{name}"', repr(path))
    if FRESH_PROCESS in code.splitlines()[0]:
        done = subprocess.run([sys.executable, "-c", code], cwd=workdir, env=subprocess_env(workdir),
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"docs/interop.md:{line} failed in a fresh process:\n{done.stderr[-3000:]}"
        return done.stdout
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        exec(compile(code, f"{DOC}:{line}", "exec"), {"__name__": "__doc_example__"})
    finally:
        os.chdir(cwd)
    return ""


@pytest.fixture(scope="module")
def saved_example(stand_ins, doc_dir):
    """The doc's first block saves the checkpoint later blocks load."""
    _, line, code = DOC_BLOCKS[0]
    run_block(code, line, stand_ins, doc_dir)
    return doc_dir


def test_doc_has_an_example_for_each_interop_feature():
    code = "\n".join(block for _, _, block in DOC_BLOCKS)
    for needle in ("save_pretrained", "trust_remote_code=True", FRESH_PROCESS, '"text-generation"', '"fill-mask"',
                   "Trainer(", "get_peft_model", "modules_to_save", "merge_and_unload", "torch.compile",
                   "gradient_checkpointing_enable", "torch.bfloat16", ".to(torch.float64)"):
        assert needle in code, f"docs/interop.md has no example using {needle}"


@pytest.mark.parametrize("block", range(len(DOC_BLOCKS)), ids=[f"{h}:{n}" for h, n, _ in DOC_BLOCKS])
def test_doc_example_runs(block, stand_ins, saved_example):
    _, line, code = DOC_BLOCKS[block]
    run_block(code, line, stand_ins, saved_example)


# ---- loading a saved converted checkpoint: every path ---------------------------------------------------------
# Run both in this process (hf_posenc imported) and in a fresh one (not imported): only transformers and torch.
LOAD_PATHS = r'''
import sys
import torch
import transformers


def load_paths(cases, trusts):
    """Try every way to load each saved checkpoint; return one record per (checkpoint, path, trust_remote_code)."""
    results = []
    for case in cases:
        path, refs = case["path"], torch.load(case["refs"])
        x = refs["x"]
        auto_head, auto_base = getattr(transformers, case["auto_head"]), transformers.AutoModel
        head, base = getattr(transformers, case["head"]), getattr(transformers, case["base"])
        loaders = {
            "AutoConfig": (transformers.AutoConfig.from_pretrained, "config"),
            case["auto_head"]: (auto_head.from_pretrained, "logits"),
            "AutoModel": (auto_base.from_pretrained, "hidden"),
            f"pipeline:{case['task']}": (lambda p, **kw: transformers.pipeline(case["task"], model=p, **kw).model,
                                         "logits"),
            case["head"]: (head.from_pretrained, "logits"),
            case["base"]: (base.from_pretrained, "hidden"),
            "AutoTokenizer": (transformers.AutoTokenizer.from_pretrained, "tokenizer"),
        }
        for name, (load, compare) in loaders.items():
            for trust in trusts:
                record = dict(family=case["family"], path=name, trust=trust,
                              imported="hf_posenc" in sys.modules)
                kwargs = {} if trust is None else {"trust_remote_code": trust}
                try:
                    loaded = load(path, **kwargs)
                except Exception as err:  # noqa: BLE001 - the record says which
                    results.append({**record, "outcome": "error", "error": f"{type(err).__name__}: {err}"})
                    continue
                with torch.no_grad():
                    if compare == "config":
                        same = loaded.posenc == refs["posenc"] and loaded.max_position_embeddings == refs["limit"]
                        diff = 0.0 if same else float("inf")
                    elif compare == "tokenizer":
                        diff = 0.0
                    elif compare == "logits":
                        diff = (loaded.eval()(x).logits - refs["logits"]).abs().max().item()
                    else:
                        diff = (loaded.eval()(x).last_hidden_state - refs["hidden"]).abs().max().item()
                results.append({**record, "outcome": "loaded", "type": type(loaded).__name__, "diff": diff})
    return results
'''


@pytest.fixture(scope="module")
def saved_checkpoints(tmp_path_factory, tiny_tokenizer_dir) -> list[dict]:
    root = tmp_path_factory.mktemp("converted")
    cases = []
    for family, (method, options) in METHODS.items():
        model = hf_posenc.convert(tiny_model(family), method, **options)
        if list(model.base_model.posenc.parameters()):
            randomise_tables(model)
        path = root / family
        model.save_pretrained(path)
        for f in tiny_tokenizer_dir.iterdir():
            shutil.copy(f, path)
        x = ids(80)
        with torch.no_grad():
            refs = dict(x=x, logits=model(x).logits, hidden=model.base_model(x).last_hidden_state,
                        posenc=model.config.posenc, limit=model.config.max_position_embeddings)
        torch.save(refs, root / f"{family}.refs.pt")
        cases.append(dict(family=family, path=str(path), refs=str(root / f"{family}.refs.pt"),
                          head=HEADS[family], base=BASES[family], auto_head=AUTO_HEADS[family],
                          task=PIPELINES[family]))
    return cases


def check_outcome(record: dict, imported: bool) -> None:
    """Exact outputs, or an error that says how to load the checkpoint: nothing else."""
    where = f"{record['family']} {record['path']} trust_remote_code={record['trust']} (hf_posenc imported: {imported})"
    concrete = record["path"] in (*HEADS.values(), *BASES.values())
    if record["path"] == "AutoTokenizer":
        assert record["outcome"] == "loaded", f"{where}: {record.get('error')}"
    elif concrete:  # the family's own class never builds it, whatever else is imported or passed
        assert record["outcome"] == "error", f"{where}: loaded silently (diff {record.get('diff')})"
        assert "hf_posenc.from_pretrained(path)" in record["error"] and "trust_remote_code=True" in record["error"]
    elif imported or record["trust"]:
        assert record["outcome"] == "loaded", f"{where}: {record.get('error')}"
        assert record["diff"] <= 1e-6, f"{where}: outputs differ by {record['diff']}"
    else:
        assert record["outcome"] == "error", f"{where}: loaded without trust_remote_code (diff {record.get('diff')})"
        assert "trust_remote_code=True" in record["error"], where
    if record["outcome"] == "loaded" and record["path"] not in ("AutoConfig", "AutoTokenizer"):
        expected = BASES if record["path"] == "AutoModel" else HEADS
        assert record["type"] == expected[record["family"]], where


def test_plain_transformers_never_loads_silently_wrong(saved_checkpoints, tmp_path):
    """hf_posenc not imported: trust_remote_code None / False -> errors; True -> exact; concrete classes -> error."""
    script = LOAD_PATHS + (
        "import json\n"
        "cases = json.loads(sys.argv[1])\n"
        "out = load_paths(cases, (None, False))\n"  # before anything imports hf_posenc
        "out += load_paths(cases, (True,))\n"
        "print('RESULTS' + json.dumps(out))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, json.dumps(saved_checkpoints)], cwd=tmp_path,
                          env=subprocess_env(tmp_path), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    records = json.loads(done.stdout.split("RESULTS", 1)[1])
    assert len(records) == len(saved_checkpoints) * 7 * 3
    for record in records:
        if record["trust"] is not True:
            assert not record["imported"], "hf_posenc was imported before the trust_remote_code=True loads"
        check_outcome(record, imported=False)


def test_with_hf_posenc_imported_every_auto_path_is_exact(saved_checkpoints):
    namespace: dict = {}
    exec(LOAD_PATHS, namespace)
    records = namespace["load_paths"](saved_checkpoints, (None, False, True))
    assert len(records) == len(saved_checkpoints) * 7 * 3
    for record in records:
        check_outcome(record, imported=True)


@pytest.mark.parametrize("family", list(METHODS))
def test_concrete_class_with_a_loaded_config_refuses_to_run(saved_checkpoints, family):
    case = next(c for c in saved_checkpoints if c["family"] == family)
    config = transformers.AutoConfig.from_pretrained(case["path"])
    model = getattr(transformers, case["head"]).from_pretrained(case["path"], config=config)
    with pytest.raises(RuntimeError, match=r"hf_posenc.from_pretrained\(path\)"):
        model(ids(10))


def test_saved_format_and_in_memory_config(tmp_path):
    model = hf_posenc.convert(tiny_model("gpt2"), "alibi", max_position_embeddings=4096)
    config = model.config
    assert isinstance(config, transformers.GPT2Config) and config.model_type == "gpt2"
    assert config.to_dict()["model_type"] == "gpt2"  # what PEFT reads for its per-model defaults
    assert config.max_position_embeddings == 4096
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == hub_code.MODEL_TYPE and saved[hub_code.BASE_MODEL_TYPE] == "gpt2"
    assert "hf_posenc.from_pretrained(path)" in saved["n_positions"]
    assert saved["posenc"]["max_position_embeddings"] == 4096
    assert saved["auto_map"]["AutoConfig"] == "modeling_hf_posenc.PosEncAutoConfig"
    assert saved["auto_map"]["AutoModelForCausalLM"] == "modeling_hf_posenc.PosEncAutoModelForCausalLM"
    assert "AutoModelForMaskedLM" not in saved["auto_map"]  # GPT-2 has none
    code = (tmp_path / "modeling_hf_posenc.py").read_text()
    assert "from hf_posenc.hub_code import" in code
    for name in saved["auto_map"].values():
        assert hasattr(hub_code, name.split(".")[1])
    assert model.config.model_type == "gpt2" and model.config.n_positions == 4096  # saving changed nothing here

    # a config loaded back saves the same format; the caller's config is not changed by from_pretrained
    loaded = transformers.AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is type(config) and loaded.n_positions == 4096
    loaded.save_pretrained(tmp_path / "again")
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    assert again["n_positions"] == saved["n_positions"] and again["model_type"] == hub_code.MODEL_TYPE
    before = loaded.to_dict()
    hf_posenc.from_pretrained(tmp_path, config=loaded)
    assert loaded.to_dict() == before


def test_auto_entry_points_of_the_saved_code(saved_checkpoints):
    """What modeling_hf_posenc.py exports, called the way transformers calls remote code, and from_config."""
    case = next(c for c in saved_checkpoints if c["family"] == "gpt2")
    refs = torch.load(case["refs"])
    model = hub_code.PosEncAutoModelForCausalLM.from_pretrained(case["path"], trust_remote_code=True)
    base = hub_code.PosEncAutoModel.from_pretrained(case["path"])
    assert type(base) is transformers.GPT2Model
    with torch.no_grad():
        assert torch.equal(model(refs["x"]).logits, refs["logits"])
        assert torch.equal(base(refs["x"]).last_hidden_state, refs["hidden"])
    config = hub_code.PosEncAutoConfig.from_pretrained(case["path"])
    fresh = transformers.AutoModelForCausalLM.from_config(config)  # a new random model, converted as saved
    assert type(fresh) is transformers.GPT2LMHeadModel and fresh.config.posenc == refs["posenc"]
    assert fresh(ids(100)).logits.shape == (2, 100, VOCAB)
    with pytest.raises(ValueError, match="posenc_base_model_type"):
        hub_code.PosEncAutoConfig.from_dict({"model_type": hub_code.MODEL_TYPE})


def test_checkpoints_from_before_the_format_still_load(tmp_path):
    """config.json with the family's own model_type and a numeric limit (hf_posenc 0.1.0 format)."""
    model = hf_posenc.convert(tiny_model("llama"), "alibi")
    model.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(hub_code.native_dict(json.loads(path.read_text()))))
    (tmp_path / "modeling_hf_posenc.py").unlink()
    x = ids(70)
    assert torch.equal(hf_posenc.from_pretrained(tmp_path)(x).logits, model(x).logits)


def test_deepcopy_and_pickle_keep_the_method_with_its_model(tmp_path):
    model = hf_posenc.convert(tiny_model("gpt2"), "t5")
    randomise_tables(model)
    x = ids(70)
    before = model(x).logits
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.base_model.posenc.relative_attention_bias.weight.mul_(3)
    assert torch.equal(model(x).logits, before)  # the copy's attention uses the copy's table
    assert not torch.allclose(clone(x).logits, before)
    torch.save(model, tmp_path / "model.pt")
    unpickled = torch.load(tmp_path / "model.pt", weights_only=False)
    assert torch.equal(unpickled(x).logits, before)
    unpickled.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["model_type"] == hub_code.MODEL_TYPE
    # in a new process the config class is made when unpickling looks it up
    made = hub_code.PosEncQwen2Config
    assert issubclass(made, transformers.Qwen2Config) and made.model_type == "qwen2"


# ---- PEFT --------------------------------------------------------------------------------------------------
LORA_TARGETS = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"], "bert": ["query", "value"]}


@pytest.mark.parametrize("family,method", [("gpt2", "t5"), ("llama", "shaw"), ("bert", "t5"), ("gpt2", "learned"),
                                           ("llama", "learned")])
def test_lora_with_learned_positions_trains_saves_reloads_and_merges(family, method, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    base = hf_posenc.convert(tiny_model(family, **NO_DROPOUT[family]), method)
    base.save_pretrained(tmp_path / "base")
    original = {k: v.clone() for k, v in base.base_model.posenc.state_dict().items()}
    lora = LoraConfig(target_modules=LORA_TARGETS[family], fan_in_fan_out=family == "gpt2", modules_to_save=["posenc"])
    model = get_peft_model(base, lora)
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x = ids(40)
    labels = x if family != "bert" else x.masked_fill(torch.rand(x.shape) < 0.5, -100)
    for _ in range(2):
        model(x, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    wrapper = model.base_model.model.base_model.posenc
    trained = wrapper.modules_to_save["default"].state_dict()
    assert any(not torch.equal(trained[k], original[k]) for k in original), "the position tables did not train"
    for k, v in wrapper.original_module.state_dict().items():
        assert torch.equal(v, original[k])
    expected = model(x).logits
    model.save_pretrained(tmp_path / "adapter")

    from safetensors import safe_open

    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", framework="pt") as f:
        assert any(".posenc." in k for k in f.keys()), "the trained tables are not in the adapter"
    fresh = PeftModel.from_pretrained(hf_posenc.from_pretrained(tmp_path / "base"), tmp_path / "adapter").eval()
    torch.testing.assert_close(fresh(x).logits, expected)
    merged = fresh.merge_and_unload()
    assert type(merged) is type(base)
    torch.testing.assert_close(merged(x).logits, expected, atol=1e-5, rtol=0)
    merged.save_pretrained(tmp_path / "merged")  # and the merged model is a converted checkpoint again
    torch.testing.assert_close(hf_posenc.from_pretrained(tmp_path / "merged")(x).logits, expected, atol=1e-5, rtol=0)


# every method with parameters, and each way the model reaches them: attention (t5, shaw, fire, transformer_xl),
# the learned table's stand-in (GPT-2, OPT) and the embedding added before a Llama-style model's first layer
TRAINED_METHODS = [("gpt2", "learned"), ("opt", "learned"), ("llama", "learned"), ("gpt2", "t5"), ("bert", "shaw"),
                   ("gpt2", "fire"), ("llama", "transformer_xl")]
LORA_TARGETS_MORE = {**LORA_TARGETS, "opt": ["q_proj", "v_proj"]}


def test_every_method_with_parameters_is_trained_below():
    with_parameters = {m for m in hf_posenc.available_methods()
                       if list(hf_posenc.convert(tiny_model("gpt2"), m).base_model.posenc.parameters())}
    assert with_parameters == {method for _, method in TRAINED_METHODS}


@pytest.mark.parametrize("peft", [True, False], ids=["lora_modules_to_save", "full"])
@pytest.mark.parametrize("family,method", TRAINED_METHODS)
def test_one_step_on_the_position_parameters_changes_the_output(family, method, peft):
    """docs/interop.md: ``modules_to_save=["posenc"]`` trains the method's parameters (PEFT's copy of them is the
    one the model uses), as a full fine-tune does. Only they step here, so only they can change the output."""
    from peft import LoraConfig, get_peft_model

    model = hf_posenc.convert(tiny_model(family, **NO_DROPOUT.get(family, {})), method)
    if peft:
        lora = LoraConfig(target_modules=LORA_TARGETS_MORE[family], fan_in_fan_out=family == "gpt2",
                          modules_to_save=["posenc"])
        model = get_peft_model(model, lora)
    x = ids(24)
    model.eval()  # no dropout: the two outputs differ by the step alone
    before = model(x).logits.detach()
    position_parameters = [p for n, p in model.named_parameters() if ".posenc." in n and p.requires_grad]
    assert position_parameters
    optimizer = torch.optim.Adam(position_parameters, lr=1e-2)
    model(x).logits.float().pow(2).mean().backward()
    optimizer.step()
    change = (model(x).logits.detach() - before).abs().max()
    assert change > 1e-4, f"one step on the {method} parameters changed the logits by {float(change)}"


# ---- training and numerics --------------------------------------------------------------------------------
@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("family", ["gpt2", "bert", "llama"])
@pytest.mark.parametrize("method", ["t5", "shaw", "alibi"])
def test_gradient_checkpointing_gives_the_same_gradients(family, method, reentrant):
    def gradients(checkpointing: bool) -> dict:
        model = hf_posenc.convert(tiny_model(family, **NO_DROPOUT[family]), method)
        if list(model.base_model.posenc.parameters()):
            randomise_tables(model)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        x = ids(50)
        for _ in range(2):  # two steps: the memo must not leak from one forward/backward into the next
            model(x, labels=x).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys()
    assert any(".posenc." in n for n in plain) == (method != "alibi")
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-4, msg=name)


BF16_TOLERANCE = 0.02  # of the largest fp32 logit; measured <= 0.011 (see docs/interop.md)


@pytest.mark.parametrize("family", ["gpt2", "bert", "llama"])
@pytest.mark.parametrize("method", ["alibi", "rope", "t5", "shaw", "sinusoidal"])
def test_bfloat16_stays_within_the_documented_tolerance(family, method):
    model = hf_posenc.convert(tiny_model(family), method)
    if list(model.base_model.posenc.parameters()):
        randomise_tables(model)
    x = ids(150)
    with torch.no_grad():
        reference = model(x).logits
        half = model.to(torch.bfloat16)(x).logits
    assert half.dtype == torch.bfloat16
    assert (half.float() - reference).abs().max() <= BF16_TOLERANCE * reference.abs().max()


@pytest.mark.parametrize("family", ["gpt2", "bert", "llama"])
@pytest.mark.parametrize("case", ["alibi", "rope", "rope-partial", "rope-yarn", "rope-dynamic", "t5", "shaw",
                                  "sinusoidal", "nope"])
def test_to_dtype_moves_every_parameter_and_buffer(family, case):
    options = {"rope-partial": {"fraction": 0.5}, "rope-yarn": {"scaling": "yarn", "factor": 4.0},
               "rope-dynamic": {"scaling": "dynamic", "factor": 4.0}}.get(case, {})
    model = hf_posenc.convert(tiny_model(family), case.split("-")[0], **options)
    x = ids(100)
    reference = model(x).logits
    model.to(torch.float64)
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    left = {n: t.dtype for n, t in tensors.items() if t.is_floating_point() and t.dtype != torch.float64}
    assert not left, f"not moved by .to(torch.float64): {left}"
    out = model(x).logits
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, reference.double(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family,method", [("llama", "t5"), ("gpt2", "rope")])
def test_torch_compile_forward_matches_eager(family, method):
    """(GPT-2 + ALiBi is compiled by the docs example.) The first compile takes tens of seconds on CPU."""
    model = hf_posenc.convert(tiny_model(family), method)
    if list(model.base_model.posenc.parameters()):
        randomise_tables(model)
    x = ids(90)
    with torch.no_grad():
        eager = model(x).logits
        compiled = torch.compile(model)(x).logits
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=0)
