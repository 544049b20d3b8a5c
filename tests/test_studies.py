"""The study scripts run end to end on tiny settings (the full runs are the developers', not CI's)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from tiny_models import TEXT

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "studies" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_gpt2_study_quick(tmp_path, monkeypatch):
    from hf_posenc import sources

    monkeypatch.setattr(sources, "text_splits", lambda name: {"train": TEXT, "heldout": TEXT})
    study = load_script("gpt2_extrapolation")
    out = tmp_path / "study"
    assert study.main(["--out", str(out), "--quick", "--methods", "alibi,nope", "--plot", str(tmp_path / "p.png")]) == 0
    results = json.loads((out / "results.json").read_text())
    ppl = results["perplexity"]
    assert set(ppl) == {"native (pretrained)", "native (continued)", "alibi", "nope", study.ZERO_TRAINING}
    assert set(ppl[study.ZERO_TRAINING]) == {"32", "64", "128"}  # the copied table covers every length
    assert set(ppl["native (pretrained)"]) == {"32"}  # the learned table covers 1x only
    assert set(ppl["alibi"]) == {"32", "64", "128"}
    assert "| alibi |" in (out / "table.md").read_text()
    assert (tmp_path / "p.png").stat().st_size > 1000
    # re-running reuses every stage
    assert study.main(["--out", str(out), "--quick", "--methods", "alibi,nope"]) == 0


def test_minilm_study_quick(tmp_path, monkeypatch):
    import torch
    import transformers
    from tiny_models import OLD_LIMIT, tiny_config, train_tiny_tokenizer

    from hf_posenc import sources

    monkeypatch.setattr(sources, "text_splits", lambda name: {"train": TEXT, "heldout": TEXT})
    model_dir = tmp_path / "tiny-bert"
    train_tiny_tokenizer(model_dir)
    torch.manual_seed(0)  # a fixed random BertModel (no position beyond OLD_LIMIT)
    transformers.BertModel(tiny_config("bert")).save_pretrained(model_dir)
    study = load_script("minilm_alibi_embeddings")
    out = tmp_path / "study"
    args = ["--out", str(out), "--quick", "--model", str(model_dir)]
    assert study.main([*args, "--plot", str(tmp_path / "p.png")]) == 0
    results = json.loads((out / "results.json").read_text())
    assert {"converted", "train", "finetuned", "long", "original_past_limit"} <= set(results)
    assert results["limit"] == OLD_LIMIT
    assert "Error" in results["original_past_limit"]  # the original cannot take 2x its limit
    assert set(results["finetuned"]) == {"8", "16", "32", "64"}
    # fine-tuning brought the student closer to the original at every length
    for n in results["finetuned"]:
        assert results["finetuned"][n]["mean"] > results["converted"][n]["mean"], n
    long = results["long"]["256"]  # 4x the tiny model's limit, embedded whole by the student
    assert long["pieces"] == 5 and long["fine-tuned (whole)"]["n"] == 8
    assert -1 <= long["fine-tuned (whole)"]["mean"] <= 1
    assert "| fine-tuned (whole) | 256 |" in (out / "table.md").read_text()
    assert "| learned copy, no fine-tune (whole) | 256 |" in (out / "table.md").read_text()
    assert (tmp_path / "p.png").stat().st_size > 1000
    # re-running reuses every stage (the student is not trained again)
    mtime = (out / "student" / "config.json").stat().st_mtime
    assert study.main(args) == 0
    assert (out / "student" / "config.json").stat().st_mtime == mtime


def test_smollm2_study_quick(tmp_path, monkeypatch):
    """Every variant (training-free scaling, fine-tunes, retrofits) trains / scores on a tiny Llama; the tiny
    model's trained context is OLD_LIMIT = 64, so 256 and 512 are past it."""
    import torch
    from tiny_models import tiny_model, train_tiny_tokenizer

    from hf_posenc import sources

    monkeypatch.setattr(sources, "text_splits", lambda name: {"train": TEXT, "heldout": TEXT})
    model_dir = tmp_path / "tiny-llama"
    train_tiny_tokenizer(model_dir)
    torch.manual_seed(0)
    tiny_model("llama").save_pretrained(model_dir)
    study = load_script("smollm2_long_context")
    out = tmp_path / "study"
    args = ["--out", str(out), "--quick", "--model", str(model_dir)]
    assert study.main([*args, "--plot", str(tmp_path / "p.png")]) == 0
    results = json.loads((out / "results.json").read_text())
    names = [v.name for v in study.variants(study.QUICK)]
    assert list(results["variants"]) == names
    for name in names:
        entry = results["variants"][name]
        assert "error" not in entry, (name, entry.get("error"))
        assert set(entry["ppl"]) == {"64", "256", "512"}
        assert all(1 < v["ppl"] < 1e4 and 1 < v["last"] < 1e4 for v in entry["ppl"].values()), name
        assert set(entry["passkey"]) == {"256", "512", "256@0", "256@1", "512@0", "512@1",  # 64: prompt too long
                                         "256/n", "512/n", "256/nll", "512/nll"}
        assert entry["finetune"] == ("finetune_run" in entry)
    retrofit = results["variants"]["ALiBi, fine-tuned"]["finetune_run"]
    assert retrofit["steps"] == study.QUICK.ft_steps and retrofit["lr"] == study.QUICK.lr_retrofit
    # training-free YaRN at 1x is the original up to YaRN's attention temperature; linear PI at 1x is not
    ppl = {n: results["variants"][n]["ppl"]["64"]["ppl"] for n in ("original", "linear (PI) x4")}
    assert ppl["original"] != ppl["linear (PI) x4"]
    assert "| ALiBi, fine-tuned | 2 |" in (out / "table.md").read_text()
    assert (tmp_path / "p.png").stat().st_size > 1000
    # a time budget skips the remaining variants and says so; finished variants are kept
    (out / "results.json").write_text(json.dumps({"variants": {"original": results["variants"]["original"]}}))
    assert study.main([*args, "--budget-s", "0.001"]) == 0
    skipped = json.loads((out / "results.json").read_text())["variants"]
    assert skipped["original"] == results["variants"]["original"]
    assert all("time budget" in skipped[n]["skipped"] for n in names[1:])


def test_gemma3_study_scores_the_original_and_the_family_retrofit(tmp_path, tiny_tokenizer_dir):
    """Inside the trained context (64) the default retrofit (Dynamic YaRN) scores exactly as the original."""
    import shutil

    from tiny_models import tiny_model

    model = tmp_path / "tiny-gemma3"
    tiny_model("gemma3").save_pretrained(model)
    for f in tiny_tokenizer_dir.iterdir():
        shutil.copy(f, model)
    study = load_script("gemma3_long_context")
    out = tmp_path / "study"
    assert study.main(["--out", str(out), "--model", str(model), "--corpora", str(TEXT), "--lengths", "32,48"]) == 0
    rows = json.loads((out / "results.json").read_text())
    assert [(r["variant"], r["length"]) for r in rows] == [("original", 32), ("original", 48), ("retrofit", 32),
                                                           ("retrofit", 48)]
    assert "dynamic_yarn" in rows[2]["conversion"] and rows[2]["last"] == rows[0]["last"]
    assert "| 48 |" in (out / "table.md").read_text()


def test_smollm2_cpu_study_rows_on_a_tiny_llama(tmp_path, tiny_llama_dir):
    """The CPU study's plumbing: fine-tuned rows through hf-posenc retrofit, training-free rows scored alone, the
    original shared through the source cache, one results.json / table.md."""
    from tiny_models import DATA

    model = tiny_llama_dir
    study = load_script("smollm2_cpu_retrofit")
    extra = (f"--model {model} --data {TEXT} --heldout {TEXT} --other-heldout {DATA / 'other.txt'} --steps 2 "
             "--seq-len 32 --batch-size 2 --eval-tokens 128")
    assert study.main(["--out", str(tmp_path / "study"), "--only", "default,dynamic-ntk", "--lengths", "32,128",
                       "--retrofit-args", extra]) == 0
    rows = json.loads((tmp_path / "study" / "results.json").read_text())
    assert {"original", "default", "dynamic-ntk"} <= set(rows)
    assert any(name.endswith("training-free") for name in rows)
    assert rows["default"]["finetune"]["tokens"] == 2 * 2 * 32
    table = (tmp_path / "study" / "table.md").read_text()
    assert "Held-out other" in table and "| dynamic-ntk |" in table


def test_recipe_variants_score_several_windows_on_a_tiny_llama(tmp_path, tiny_llama_dir):
    """The variants study: a variant's fine-tune gets its own keyed folder; every row scores the asked windows."""
    from tiny_models import DATA

    model = tiny_llama_dir
    study = load_script("smollm2_recipe_variants")
    extra = (f"--model {model} --data {TEXT} --heldout {TEXT} --other-heldout {DATA / 'other.txt'} --steps 2 "
             "--seq-len 32 --batch-size 2")
    out = tmp_path / "variants"
    assert study.main(["--out", str(out), "--rows", "training-free,training-free-mscale-0.5,default,pose-2x", "--lengths", "64,128",
                       "--windows", "2", "--retrofit-args", extra]) == 0
    rows = json.loads((out / "variants-W2.json").read_text())
    assert rows["training-free"]["finetune"] is None
    assert rows["training-free-mscale-0.5"]["options"]["mscale"] == 0.5
    assert rows["training-free-mscale-0.5"]["tempest@128"] != rows["training-free"]["tempest@128"]
    assert rows["default"]["finetune"]["dir"] != rows["pose-2x"]["finetune"]["dir"]
    assert all(rows[r][f"tempest@{n}"]["windows"] == 2 for r in rows for n in (64, 128))
    assert "| pose-2x |" in (out / "variants-W2.md").read_text()


def test_recipe_variants_score_passkey_with_the_asked_prompts(tmp_path, tiny_llama_dir):
    """Passkey rows (training-free scalings, no perplexity): 5 depths x --passkey-samples prompts per length."""
    from tiny_models import DATA

    study = load_script("smollm2_recipe_variants")
    extra = f"--model {tiny_llama_dir} --data {TEXT} --heldout {TEXT} --other-heldout {DATA / 'other.txt'} --seq-len 32"
    out = tmp_path / "passkey"
    assert study.main(["--out", str(out), "--rows", "dynamic-ntk,training-free", "--lengths", "",
                       "--passkey-lengths", "512", "--passkey-samples", "1", "--windows", "1",
                       "--retrofit-args", extra]) == 0
    rows = json.loads((out / "variants-W1.json").read_text())
    assert rows["dynamic-ntk"]["options"]["scaling"] == "dynamic"
    assert all(rows[r]["passkey"]["512/n"] == 5 for r in rows)  # 5 depths x 1
    markdown = (out / "variants-W1.md").read_text()
    assert "| dynamic-ntk | 0." in markdown and "; NLL " in markdown
    # a second run into the folder adds its cells; it does not drop the first run's rows or lengths
    assert study.main(["--out", str(out), "--rows", "dynamic-ntk", "--lengths", "64", "--windows", "1",
                       "--retrofit-args", extra]) == 0
    again = json.loads((out / "variants-W1.json").read_text())
    assert again["training-free"] == rows["training-free"]
    assert again["dynamic-ntk"]["passkey"] == rows["dynamic-ntk"]["passkey"] and "tempest@64" in again["dynamic-ntk"]
    assert "| row | other 64 | tempest 64 | passkey 512 |" in (out / "variants-W1.md").read_text()


def test_ruler_study_runs_one_eval_per_cell_and_resumes(tmp_path, monkeypatch):
    """studies/smollm2_ruler.py: one `hf-posenc eval` per (row, task, length) with the row's conversion in
    --model_args, RULER's score read from lm-eval's results file, a finished cell read back instead of run again."""
    study = load_script("smollm2_ruler")
    calls = []

    def fake_eval(argv, check, env, stdout):  # what hf-posenc eval writes: <out>/<model>/results_<time>.json
        calls.append(argv)
        out = Path(argv[argv.index("--output_path") + 1]) / "model"
        out.mkdir(parents=True)
        task, length = argv[argv.index("--tasks") + 1], json.loads(argv[argv.index("--metadata") + 1])
        (out / "results_1.json").write_text(json.dumps(
            {"results": {task: {f"{length['max_seq_lengths'][0]},none": 0.9}}}))

    monkeypatch.setattr(study.subprocess, "run", fake_eval)
    argv = ["--out", str(tmp_path), "--rows", "self-extend-w4096-g8", "--lengths", "16384", "--limit", "3"]
    assert study.main(argv) == 0
    assert len(calls) == 2  # niah_single_1, niah_multikey_2
    model_args = calls[0][calls[0].index("--model_args") + 1]
    assert model_args == ("pretrained=smollm2-135m,posenc=self_extend,window=4096,group=8,dynamic=True,"
                          "max_length=16384")
    assert calls[0][calls[0].index("--limit") + 1] == "3"
    assert "| self-extend-w4096-g8 | niah_single_1 | 16384 | 0.90 | 3 |" in (tmp_path / "table.md").read_text()
    assert study.main(argv) == 0 and len(calls) == 2  # resumed: nothing run again
    with pytest.raises(SystemExit):
        study.main(["--out", str(tmp_path), "--rows", "nope"])


def test_recipe_variants_resume_from_per_window_cells(tmp_path, tiny_llama_dir, monkeypatch):
    """Every window, reach and passkey prompt is a file as soon as it is scored: a rerun with more windows scores
    only the new ones, the cells combine to what window_scores / context_gain give in one go, and a cell another
    study wrote is refused."""
    import torch
    from tiny_models import DATA

    from hf_posenc.integrations import long_context

    study = load_script("smollm2_recipe_variants")
    monkeypatch.setattr(study, "TRAINED", 32)  # the reach of the context gain (the tiny model's context: 64)
    monkeypatch.setitem(study.TRAINING_FREE_METHODS, "rerope-w16", ("rerope", {"window": 16, "dynamic": True}))
    extra = f"--model {tiny_llama_dir} --data {TEXT} --heldout {TEXT} --other-heldout {DATA / 'other.txt'} --seq-len 32"
    out = tmp_path / "cells"
    forwards = []
    token_nll = long_context.token_nll
    monkeypatch.setattr(long_context, "token_nll",
                        lambda model, ids, chunk=None: forwards.append(len(ids)) or token_nll(model, ids, chunk))
    run = ["--out", str(out), "--rows", "rerope-w16", "--lengths", "128", "--gain", "--retrofit-args", extra]
    assert study.main([*run, "--windows", "1"]) == 0
    assert forwards == [128, 32] * 2  # per corpus: the window, its last 32 tokens
    forwards.clear()
    assert study.main([*run, "--windows", "2", "--passkey-lengths", "256", "--passkey-samples", "1"]) == 0
    assert forwards == [128, 32] * 2  # only each corpus' second window; the passkey runs in its own forward
    row = json.loads((out / "variants-W2.json").read_text())["rerope-w16"]

    from hf_posenc import retrofit

    plan, _ = study.plan_for("rerope-w16", str(out), extra)
    retrofit.fetch_model(plan)
    model, tokenizer, _ = retrofit.load_original(plan, study.TRAINING_FREE_METHODS["rerope-w16"])
    ids = torch.tensor(tokenizer(Path(TEXT).read_text())["input_ids"])
    whole = long_context.window_scores(model, ids, 128, 256, 1024)
    assert row["tempest@128"]["last"] == pytest.approx(whole["last"]) and row["tempest@128"]["windows"] == 2
    gain = long_context.context_gain(model, model, ids, 128, 256, 32, 1024)
    assert row["gain:tempest@128"]["gain"] == pytest.approx(gain["gain"])
    assert row["passkey"]["256/n"] == 5
    monkeypatch.setattr(long_context, "passkey_prompt", lambda model, doc: pytest.fail("a prompt scored twice"))
    assert study.main([*run, "--windows", "2", "--passkey-lengths", "256", "--passkey-samples", "1"]) == 0
    assert json.loads((out / "variants-W2.json").read_text())["rerope-w16"]["passkey"] == row["passkey"]

    cell = next((out / "cells" / "rerope-w16").glob("tempest@128#0.json"))
    saved = json.loads(cell.read_text())
    saved["identity"]["options"]["window"] = 8  # another study's row of the same name
    cell.write_text(json.dumps(saved))
    with pytest.raises(SystemExit, match="scored by another study .*options.*use another --out"):
        study.main([*run, "--windows", "1"])


def test_recipe_variants_score_the_factors_a_fit_found(tmp_path, tiny_llama_dir):
    """--fit DIR adds the fitted-longrope row: rope's longrope with the fit's factors.json; a folder without one is
    refused, naming the command that writes it."""
    import transformers
    from tiny_models import DATA

    study = load_script("smollm2_recipe_variants")
    extra = f"--model {tiny_llama_dir} --data {TEXT} --heldout {TEXT} --other-heldout {DATA / 'other.txt'} --seq-len 32"
    run = ["--out", str(tmp_path / "out"), "--rows", "fitted-longrope", "--lengths", "128", "--windows", "1",
           "--retrofit-args", extra]
    with pytest.raises(SystemExit, match="factors.json does not exist: run hf-posenc fit --out"):
        study.main([*run, "--fit", str(tmp_path / "fit")])
    config = transformers.AutoConfig.from_pretrained(tiny_llama_dir)
    pairs = config.hidden_size // config.num_attention_heads // 2
    (tmp_path / "fit").mkdir()
    (tmp_path / "fit" / "factors.json").write_text(json.dumps({"factor": 2.0, "long_factor": [2.0] * pairs}))
    assert study.main([*run, "--fit", str(tmp_path / "fit"), "--corpora", "tempest"]) == 0
    row = json.loads((tmp_path / "out" / "variants-W1.json").read_text())["fitted-longrope"]
    assert "other@128" not in row  # --corpora: only the named held-out texts
    assert row["method"] == "rope" and row["options"] == {"scaling": "longrope", "factor": 2.0, "long_factor": [2.0] * pairs}
    assert row["tempest@128"]["last"] > 1


def test_gemma3_study_chunked_scores_what_the_whole_forward_scores_and_resumes(tmp_path, tiny_tokenizer_dir):
    """--chunk: the original through a chunked prefill, and the retrofit (Dynamic YaRN, which follows the input
    length) as YaRN at the window's scale: both score what one whole forward of the window scores. A rerun skips the
    rows results.json has."""
    import shutil

    from tiny_models import OLD_LIMIT, tiny_model

    model = tmp_path / "tiny-gemma3"
    tiny_model("gemma3").save_pretrained(model)
    for f in tiny_tokenizer_dir.iterdir():
        shutil.copy(f, model)
    study = load_script("gemma3_long_context")
    run = ["--model", str(model), "--corpora", str(TEXT), "--lengths", f"{OLD_LIMIT // 2},{2 * OLD_LIMIT}"]
    assert study.main(["--out", str(tmp_path / "whole"), *run]) == 0
    assert study.main(["--out", str(tmp_path / "chunked"), *run, "--chunk", "24"]) == 0
    whole, chunked = (json.loads((tmp_path / f / "results.json").read_text()) for f in ("whole", "chunked"))
    for a, b in zip(whole, chunked, strict=True):
        assert (a["variant"], a["length"]) == (b["variant"], b["length"])
        assert b["last"] == pytest.approx(a["last"], rel=1e-4) and b["ppl"] == pytest.approx(a["ppl"], rel=1e-4)
    assert chunked[-1]["conversion"].endswith(f"'scaling': 'yarn', 'factor': 2.5, 'mscale': 1.0}} at {2 * OLD_LIMIT}")
    assert chunked[-2]["conversion"].endswith(f"= the original at {OLD_LIMIT // 2}")
    assert study.main(["--out", str(tmp_path / "chunked"), *run, "--chunk", "24", "--lengths", f"{OLD_LIMIT},"
                       f"{2 * OLD_LIMIT}"]) == 0
    again = json.loads((tmp_path / "chunked" / "results.json").read_text())
    assert again[:4] == chunked and [(r["variant"], r["length"]) for r in again[4:]] == [("original", OLD_LIMIT),
                                                                                       ("retrofit", OLD_LIMIT)]
