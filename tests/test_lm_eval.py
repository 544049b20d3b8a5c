"""lm-eval integration on tiny models: `hf-posenc eval` end to end, numbers cross-checked against a direct
computation, the Python API, bad input, and the bundled tasks' data. No network; a few CLI runs in-process."""

import json
import math
from pathlib import Path

import pytest
import torch
import transformers

pytest.importorskip("lm_eval")

import hf_posenc  # noqa: E402
from hf_posenc.cli import main as cli  # noqa: E402
from hf_posenc.integrations import plotting  # noqa: E402
from hf_posenc.integrations.tasks import TASKS_DIR, passkey, ppl  # noqa: E402
from hf_posenc.integrations.tasks.common import TaskInputError  # noqa: E402
from tiny_models import OLD_LIMIT, tiny_model  # noqa: E402

# past the tiny GPT-2's learned limit of 64; >= 183, what the passkey prompt needs with the tiny tokenizer
LENGTHS = [256, 512]
NUM_TOKENS = 1024  # ppl windows per length: 4 x 256, 2 x 512 (the same 1024 leading tokens)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_tokenizer_dir):
    """{"learned": plain tiny GPT-2 (64 learned positions), "alibi": the same weights converted}, each saved
    with the tiny tokenizer."""
    root = tmp_path_factory.mktemp("checkpoints")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    dirs = {"learned": root / "gpt2-learned", "alibi": root / "gpt2-alibi"}
    tiny_model("gpt2").save_pretrained(dirs["learned"])
    hf_posenc.convert(tiny_model("gpt2"), "alibi").save_pretrained(dirs["alibi"])
    for path in dirs.values():
        tokenizer.save_pretrained(path)
    return dirs


def metadata(text_path, **extra) -> str:
    values = {"max_seq_lengths": LENGTHS, "text_file": str(text_path), "num_tokens": NUM_TOKENS,
              "depths": [0.0, 1.0], "num_samples": 1, **extra}
    return json.dumps(values)


def run_eval(model_args: str, tasks: str, meta: str, out: Path | None = None, *extra: str) -> int:
    argv = ["eval", "--model", "hf-posenc", "--model_args", model_args, "--tasks", tasks, "--metadata", meta,
            "--device", "cpu", *extra]
    return cli(argv + (["--output_path", str(out)] if out else []))


def read_results(out: Path) -> dict:
    (file,) = out.rglob("results_*.json")
    return json.loads(file.read_text())


@pytest.fixture(scope="module")
def converted_run(checkpoints, text_path, tmp_path_factory):
    """`hf-posenc eval` of the converted checkpoint on posenc_ppl + posenc_passkey: (output dir, results)."""
    out = tmp_path_factory.mktemp("eval_out")
    rc = run_eval(f"pretrained={checkpoints['alibi']},max_length={max(LENGTHS)}", "posenc_ppl,posenc_passkey",
                  metadata(text_path), out)
    assert rc == 0
    return out, read_results(out)


# --- end to end ---------------------------------------------------------------------------------------------
def test_eval_reports_one_number_per_length(converted_run):
    _, results = converted_run
    perplexity, retrieval = results["results"]["posenc_ppl"], results["results"]["posenc_passkey"]
    for n in LENGTHS:
        assert 1 < perplexity[f"{n},none"] < 10 * 320  # a random tiny model: about its vocabulary size
        assert 0 <= retrieval[f"{n},none"] <= 1
        assert {f"{n}@0,none", f"{n}@1,none"} <= set(retrieval)
    assert results["config"]["posenc"]["method"] == "alibi"
    assert results["config"]["trained_length"] == OLD_LIMIT


def direct_perplexity(model, tokenizer, texts: list[str]) -> float:
    """exp(-mean log p) over every token of every text, each scored from scratch after the BOS token."""
    total, count = 0.0, 0
    for text in texts:
        ids = torch.tensor(tokenizer.encode(text))  # (n,)
        inputs = torch.cat([torch.tensor([tokenizer.bos_token_id]), ids[:-1]])[None]  # (1, n)
        with torch.no_grad():
            logp = torch.log_softmax(model(inputs).logits[0].double(), dim=-1)  # (n, V)
        total += logp[torch.arange(len(ids)), ids].sum().item()
        count += len(ids)
    return math.exp(-total / count)


def test_ppl_equals_direct_computation_on_the_same_windows(converted_run, checkpoints, text_path):
    _, results = converted_run
    model = hf_posenc.from_pretrained(checkpoints["alibi"]).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoints["alibi"])
    text = text_path.read_text()
    for n in LENGTHS:
        windows = ppl.windows(tokenizer, text, n, NUM_TOKENS)
        assert [w["n_tokens"] for w in windows] == [n] * (NUM_TOKENS // n)
        expected = direct_perplexity(model, tokenizer, [w["text"] for w in windows])
        assert results["results"]["posenc_ppl"][f"{n},none"] == pytest.approx(expected, rel=1e-5)


def test_convert_on_load_matches_the_converted_checkpoint(converted_run, checkpoints, text_path, tmp_path):
    _, results = converted_run
    rc = run_eval(f"pretrained={checkpoints['learned']},posenc=alibi,slope_scale=1.0,max_length=512",
                  "posenc_ppl", metadata(text_path, max_seq_lengths=[512]), tmp_path)
    assert rc == 0
    again = read_results(tmp_path)
    assert again["results"]["posenc_ppl"]["512,none"] == pytest.approx(
        results["results"]["posenc_ppl"]["512,none"], rel=1e-6)
    assert plotting.model_label(again) == "gpt2-learned+alibi"


def test_a_named_source_reaches_lm_eval_as_its_folder(checkpoints, text_path, tmp_path, monkeypatch):
    """RULER's tasks load their tokenizer from ``pretrained=`` with AutoTokenizer: a package source name
    (``pretrained=smollm2-135m``) must reach lm-eval as the fetched folder, which AutoTokenizer can read."""
    from hf_posenc import sources

    monkeypatch.setattr(sources, "available", lambda: {"tiny-alibi": "a test source"})
    monkeypatch.setattr(sources, "resolve_model", lambda name, cache_dir=None: checkpoints["alibi"])
    rc = run_eval("pretrained=tiny-alibi,max_length=256", "posenc_ppl", metadata(text_path, max_seq_lengths=[256]),
                  tmp_path)
    assert rc == 0
    model_args = read_results(tmp_path)["config"]["model_args"]
    assert model_args["pretrained"] == str(checkpoints["alibi"])
    transformers.AutoTokenizer.from_pretrained(model_args["pretrained"])  # what RULER's get_tokenizer does


def test_python_api_matches_the_cli(converted_run, checkpoints, text_path, tmp_path):
    from hf_posenc.integrations.lm_eval_model import evaluate

    _, results = converted_run
    model = hf_posenc.from_pretrained(checkpoints["alibi"]).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoints["alibi"])
    api = evaluate(model, tokenizer, tasks=["posenc_ppl"], lengths=[256], name="tiny-alibi",
                   metadata={"text_file": str(text_path), "num_tokens": NUM_TOKENS}, output_path=tmp_path)
    assert api["results"]["posenc_ppl"]["256,none"] == pytest.approx(
        results["results"]["posenc_ppl"]["256,none"], rel=1e-6)
    series, _ = plotting.collect(plotting.load_results([tmp_path]))
    assert list(series["perplexity"]) == ["tiny-alibi"]


def test_plot_draws_the_eval_output(converted_run, tmp_path):
    out, results = converted_run
    assert plotting.main([str(out), "--out", str(tmp_path)]) == 0
    for name in ("perplexity.png", "passkey.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    series, trained = plotting.collect(plotting.load_results([out]))
    expected = [(n, results["results"]["posenc_ppl"][f"{n},none"]) for n in LENGTHS]
    assert series["perplexity"] == {"gpt2-alibi": expected}
    assert [n for n, _ in series["passkey"]["gpt2-alibi"]] == LENGTHS
    assert trained == {"gpt2-alibi": OLD_LIMIT}


def test_limit_keeps_every_length(checkpoints, text_path, tmp_path):
    """Docs interleave the lengths: `--limit 2` scores one window of each length, not two of the shortest."""
    rc = run_eval(f"pretrained={checkpoints['alibi']},max_length={max(LENGTHS)}", "posenc_ppl",
                  metadata(text_path), tmp_path, "--limit", "2")
    assert rc == 0
    scores = read_results(tmp_path)["results"]["posenc_ppl"]
    assert all(math.isfinite(scores[f"{n},none"]) for n in LENGTHS), scores


def test_limit_that_leaves_a_metric_without_docs_is_refused(checkpoints, text_path, capsys):
    # passkey: 2 lengths x 2 depths; --limit 2 covers both lengths but not every "<length>@<depth>"
    rc = run_eval(f"pretrained={checkpoints['alibi']},max_length={max(LENGTHS)}", "posenc_passkey",
                  metadata(text_path), None, "--limit", "2")
    err = capsys.readouterr().err
    assert rc == 2
    assert "--limit 2 leaves no document" in err and "NaN" in err and "--limit 4" in err


# --- bad input ----------------------------------------------------------------------------------------------
def test_learned_positions_refuse_max_length_past_the_table(checkpoints, text_path, capsys):
    rc = run_eval(f"pretrained={checkpoints['learned']},max_length=512", "posenc_ppl", metadata(text_path))
    err = capsys.readouterr().err
    assert rc == 2
    assert "learned absolute positions for 64 tokens" in err and "posenc=alibi" in err
    assert "IndexError" not in err


def test_learned_positions_refuse_inputs_past_max_length(checkpoints, text_path, capsys):
    rc = run_eval(f"pretrained={checkpoints['learned']}", "posenc_ppl", metadata(text_path))
    err = capsys.readouterr().err
    assert rc == 2
    assert "asks for 512-token inputs but max_length is 64" in err and "IndexError" not in err


def test_unknown_task(checkpoints, text_path, capsys):
    assert run_eval(f"pretrained={checkpoints['alibi']}", "posenc_perplexity", metadata(text_path)) == 2
    err = capsys.readouterr().err
    assert "posenc_perplexity" in err and "posenc_ppl" in err


def test_missing_model_path(tmp_path, text_path, capsys):
    assert run_eval(f"pretrained={tmp_path / 'missing'}", "posenc_ppl", metadata(text_path)) == 2
    assert "does not exist" in capsys.readouterr().err


def test_length_past_explicit_max_length(checkpoints, text_path, capsys):
    rc = run_eval(f"pretrained={checkpoints['alibi']},max_length=256", "posenc_ppl", metadata(text_path))
    assert rc == 2
    assert "exceed max_length=256" in capsys.readouterr().err


@pytest.mark.parametrize(("model_args", "message"), [
    ("max_length=abc", "max_length=abc in --model_args must be a positive whole number of tokens"),  # TypeError
    ("max_length=1.5", "max_length=1.5 in --model_args must be a positive whole number of tokens"),
    ("max_length=0", "max_length=0 in --model_args must be a positive whole number"),  # was: the config's limit
    ("batch_size=4", "batch_size in --model_args: lm-eval passes its own flag"),  # TypeError: multiple values
])
def test_a_bad_model_arg_is_one_line_naming_it(checkpoints, text_path, capsys, model_args, message):
    rc = run_eval(f"pretrained={checkpoints['learned']},{model_args}", "posenc_ppl", metadata(text_path))
    err = capsys.readouterr().err
    assert rc == 2
    assert err.strip().splitlines()[-1].startswith(f"hf-posenc eval: error: {message}")


# --- task data ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    return transformers.AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def test_ppl_windows_are_consecutive_and_reject_short_text(tokenizer, tiny_tokenizer_dir, text_path):
    text = text_path.read_text()
    docs = ppl.build(tokenizer=str(tiny_tokenizer_dir), text_file=str(text_path), max_seq_lengths=[256, 512],
                     num_tokens=1024)
    assert [d["posenc_length"] for d in docs["test"]] == [256, 512, 256, 512, 256, 256]  # interleaved (--limit)
    windows = ppl.windows(tokenizer, text, 256, 768)
    assert len(windows) == 3 and text.startswith(windows[0]["text"])
    assert text.index(windows[1]["text"]) < text.index(windows[2]["text"])
    with pytest.raises(TaskInputError, match="fewer than one window"):
        ppl.windows(tokenizer, text[:200], 256)


def passkey_docs(tokenizer_dir, text_path, kind="repeat", **extra):
    meta = {"tokenizer": str(tokenizer_dir), "max_seq_lengths": [256, 1024], "depths": [0.0, 0.5, 1.0],
            "num_samples": 2, "text_file": str(text_path), **extra}
    return passkey.build_docs(meta, kind)


@pytest.mark.parametrize("kind", ["repeat", "prose"])
def test_passkey_docs_fit_their_length_with_the_needle_at_its_depth(tiny_tokenizer_dir, tokenizer, text_path, kind):
    docs = passkey_docs(tiny_tokenizer_dir, text_path, kind)
    assert len(docs) == 2 * 3 * 2
    assert [d["posenc_length"] for d in docs[:4]] == [256, 1024, 256, 1024]  # lengths interleaved (--limit)
    assert [d["depth"] for d in docs[:6]] == [0.0, 0.0, 0.5, 0.5, 1.0, 1.0]
    for doc in docs:
        budget = doc["posenc_length"] - passkey.ANSWER_TOKENS
        assert budget - 40 <= len(tokenizer.encode(doc["prompt"])) == doc["n_prompt_tokens"] <= budget
        body, needle = doc["prompt"].split("\n")[1], passkey.NEEDLE.format(key=doc["passkey"])
        filler_before = body.index(needle) / (len(body) - len(needle))  # fraction of the filler characters
        assert abs(filler_before - doc["depth"]) < 0.1
        assert doc["prompt"].endswith(passkey.QUESTION)
    filler = "The grass is green." if kind == "repeat" else "PROSPERO"
    assert any(filler in doc["prompt"] for doc in docs)


def test_passkey_is_deterministic_in_the_seed(tiny_tokenizer_dir, text_path):
    first = passkey_docs(tiny_tokenizer_dir, text_path, "prose")
    assert first == passkey_docs(tiny_tokenizer_dir, text_path, "prose")
    other = passkey_docs(tiny_tokenizer_dir, text_path, "prose", seed=1)
    assert [d["passkey"] for d in first] != [d["passkey"] for d in other]
    assert len({d["passkey"] for d in first}) > 1


def test_passkey_scoring_is_exact_match_of_the_first_number():
    doc = {"passkey": "12345", "posenc_length": 256, "metric_names": ["256", "512", "256@0", "512@0"],
           "own_metrics": ["256", "256@0"]}
    assert passkey.process_results(doc, [" 12345. Remember"]) == {
        "256": (1.0, 1.0), "512": (0.0, 0.0), "256@0": (1.0, 1.0), "512@0": (0.0, 0.0)}
    assert passkey.process_results(doc, [" 123456"])["256"] == (0.0, 1.0)
    assert passkey.process_results(doc, [" I do not know"])["256"] == (0.0, 1.0)


def test_passkey_too_short_length_says_how_long(tiny_tokenizer_dir, text_path):
    with pytest.raises(TaskInputError, match="too short"):
        passkey_docs(tiny_tokenizer_dir, text_path, max_seq_lengths=[64])


def test_passkey_yamls_leave_room_for_the_answer():
    import yaml

    for name in ("posenc_passkey.yaml", "posenc_passkey_prose.yaml"):
        text = (TASKS_DIR / name).read_text().replace("!function", "")
        assert yaml.safe_load(text)["generation_kwargs"]["max_gen_toks"] == passkey.ANSWER_TOKENS
