"""``hf-posenc retrofit`` end to end on a tiny model with tiny settings; resume; bad input."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal

import pytest
from tiny_models import DATA, TEXT, tiny_model

from hf_posenc import retrofit

OTHER = DATA / "other.txt"  # held-out text of another domain


@pytest.fixture()
def tiny_checkpoint(tmp_path, tiny_tokenizer_dir, monkeypatch):
    monkeypatch.setenv("HF_POSENC_CACHE", str(tmp_path / "cache"))  # shared scores land here, not in ~/.cache
    path = tmp_path / "tiny-gpt2"
    tiny_model("gpt2").save_pretrained(path)
    for f in tiny_tokenizer_dir.iterdir():
        shutil.copy(f, path)
    return path


def run(tmp_path, model, *extra, method=("--method", "alibi")):
    argv = ["--model", str(model), *method, "--data", str(TEXT), "--heldout", str(TEXT),
            "--other-heldout", str(OTHER), "--steps", "3", "--seq-len", "32", "--batch-size", "2",
            "--eval-lengths", "32,64,256", "--eval-tokens", "256", "--passkey-samples", "1",
            "--out", str(tmp_path / "run"), *extra]
    return retrofit.main(argv)


def scores(out, label):
    (path,) = (out / "eval").glob(f"{label}-*.json")
    return json.loads(path.read_text())["scores"]


def test_retrofit_end_to_end_then_resume(tmp_path, tiny_checkpoint, capsys):
    assert run(tmp_path, tiny_checkpoint) == 0
    printed = capsys.readouterr().out
    for stage in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]"):
        assert stage in printed
    out = tmp_path / "run"
    report = (out / "report.md").read_text()
    assert "| 256 |" in report and "skipped" in report  # the learned GPT-2 table stops at 64
    assert "training tokens" in report and "distill" in report
    original = scores(out, "original")
    for corpus in ("tempest", "other"):  # the fine-tune's held-out text and the other-domain one
        assert original["ppl"][corpus]["256"] == "skipped"
        assert {"ppl", "last", "windows"} <= set(original["ppl"][corpus]["64"])
        retro = scores(out, "retrofit")["ppl"][corpus]
        assert all(math.isfinite(v["last"]) for v in retro.values())
    assert retrofit.TOO_SHORT == original["passkey"]["64"]
    assert (out / "plots" / "perplexity.png").is_file()
    assert (out / "retrofit.log").is_file()

    # a second run reuses every stage
    assert run(tmp_path, tiny_checkpoint) == 0
    again = capsys.readouterr().out
    assert "found the fine-tuned model" in again
    assert again.count("skipping") == 3


def test_another_method_into_the_same_out_is_its_own_run(tmp_path, tiny_checkpoint, capsys):
    """Stages are keyed by everything that produced them: a re-run with another method reuses only the original's
    scores, never the first method's model (it used to, under the new method's title)."""
    assert run(tmp_path, tiny_checkpoint) == 0
    capsys.readouterr()
    assert run(tmp_path, tiny_checkpoint, method=("--method", "t5")) == 0
    again = capsys.readouterr().out
    assert "found the fine-tuned model" not in again and again.count("skipping") == 1  # the original's scores
    assert len(list((tmp_path / "run").glob("finetune-*"))) == 2
    assert "-> t5" in (tmp_path / "run" / "report.md").read_text()


def test_default_recipe_follows_the_family(tmp_path, tiny_checkpoint, capsys):
    """No --method: a learned-table family (GPT-2) gets ALiBi + distillation; the report names the recipe."""
    assert run(tmp_path, tiny_checkpoint, method=()) == 0
    report = (tmp_path / "run" / "report.md").read_text()
    assert "alibi-distill" in report and "measure" not in retrofit.RECIPES["learned"].name
    from hf_posenc.registry import arch_for

    llama = tiny_model("llama")
    assert retrofit.family_recipe(arch_for(llama.config)).options["scaling"] == "dynamic_yarn"


def test_retrofit_resumes_an_interrupted_finetune(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    from hf_posenc import training

    calls = []
    real_train = training.train

    def ctrl_c_at_step_2(config):
        calls.append(config.resume_from)
        if len(calls) > 1:
            return real_train(config)
        # the first run gets a real SIGINT after step 2: the loop checkpoints and reports an interruption
        return real_train(config, [lambda state: state.step == 2 and os.kill(os.getpid(), signal.SIGINT)])

    monkeypatch.setattr(training, "train", ctrl_c_at_step_2)
    assert run(tmp_path, tiny_checkpoint, "--steps", "4") == 130
    assert run(tmp_path, tiny_checkpoint, "--steps", "4") == 0
    assert calls[0] is None and calls[1].endswith("step-0000002")
    assert "resuming from" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--method", "alibbi"], "known methods"),
        (["--method", "alibi", "--eval-lengths", "128,-5"], "positive integers"),
        (["--method", "alibi", "--eval-lengths", "12x"], "positive integers"),
        (["--method", "alibi", "--steps", "0"], "--steps must be a positive integer"),
        (["--method", "alibi", "--model", "no-such-model-dir"], "no-such-model-dir"),
    ],
)
def test_bad_input_fails_before_work(tmp_path, argv, message, capsys):
    extra = ["--data", str(TEXT), "--heldout", str(TEXT), "--out", str(tmp_path / "o")]
    if "--model" not in argv:
        extra += ["--model", str(tmp_path / "missing-but-unused")]
    assert retrofit.main(argv + extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o" / "finetune").exists()


def test_too_little_text_is_refused(tmp_path, tiny_checkpoint, capsys):
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be.")
    code = retrofit.main(["--model", str(tiny_checkpoint), "--method", "alibi", "--data", str(TEXT),
                          "--heldout", str(short), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "fewer than one" in capsys.readouterr().err


def test_rotary_default_chooses_the_retrofit_on_the_training_text(tmp_path, tiny_llama_dir, capsys):
    """A rotary model's recipe: no fine-tune by default (it lost every measured choice), the training-free
    candidates (Dynamic YaRN over its temperature grid, Self-Extend, ReRoPE) each scored on the end of the training
    text; the lowest perplexity is the retrofit, saved whole with its method and options; the report shows the
    table and why nothing was fine-tuned, and a re-run reuses every score."""
    import hf_posenc

    assert run(tmp_path, tiny_llama_dir, method=()) == 0
    printed = capsys.readouterr().out
    assert "no fine-tune: the 40-step" in printed
    assert "[2/6] choosing the retrofit among 4 candidates on 128 tokens" in printed
    out = tmp_path / "run"
    assert not list(out.glob("finetune-*"))
    choice = json.loads((out / "selection.json").read_text())
    scored = choice["chosen_by"]["candidates"]
    assert [(c["model"], c["method"], c["options"].get("mscale")) for c in scored] == [
        ("training-free", "rope", 1.0), ("training-free", "rope", 0.5), ("training-free", "self_extend", None),
        ("training-free", "rerope", None)]
    assert len({c["ppl"] for c in scored}) == 4  # every candidate's own conversion reaches the scores
    best = min(scored, key=lambda c: c["ppl"])
    assert (choice["model"], choice["method"], choice["options"]) == (best["model"], best["method"], best["options"])
    report = (out / "report.md").read_text()
    assert "| candidate | method | options | perplexity |" in report and "Fine-tune: none (" in report
    saved = hf_posenc.from_pretrained(out / "retrofit")
    assert saved.config.posenc["method"] == best["method"]
    saved_options = saved.config.posenc["options"]  # resolved: theta etc. filled in
    assert {k: saved_options[k] for k in best["options"]} == best["options"]

    assert run(tmp_path, tiny_llama_dir, method=()) == 0
    again = capsys.readouterr().out
    assert again.count("skipping") == 4 + 3  # candidates, three rows


def test_the_retrofit_is_scored_for_retrieval_past_the_context_and_its_scores_are_shared(tmp_path, tiny_llama_dir,
                                                                                          capsys):
    """Past the trained 64 the retrofit's row alone gets a passkey at the longest length (5 depths x
    --retrieval-samples); the other rows say not run; a training-free retrofit is the source model converted, so
    another run (another --out) finds its scores in the source cache."""
    lengths = ("--eval-lengths", "32,64,256,512")
    assert run(tmp_path, tiny_llama_dir, *lengths, "--retrieval-samples", "2", method=()) == 0
    capsys.readouterr()
    out = tmp_path / "run"
    retrofit_scores, original = scores(out, "retrofit"), scores(out, "original")
    assert retrofit_scores["passkey"]["512/n"] == 10
    assert {f"512@{d:g}" for d in retrofit.RETRIEVAL_DEPTHS} <= set(retrofit_scores["passkey"])
    assert original["passkey"]["512"] == retrofit.NOT_RUN and "512/n" not in original["passkey"]
    report = (out / "report.md").read_text()
    assert "at 512 (past the original's context) the retrofit's only" in report
    assert report.splitlines()[-3].endswith(f"| {retrofit_scores['passkey']['512']:.2f} (10) |")

    os.rename(out, tmp_path / "first")
    assert run(tmp_path, tiny_llama_dir, *lengths, "--retrieval-samples", "2", method=()) == 0
    assert capsys.readouterr().out.count("skipping") == 4 + 3  # candidates, three rows: all from the source cache
    assert scores(out, "retrofit") == retrofit_scores


def test_retrieval_samples_zero_scores_no_passkey_past_the_context(tmp_path, tiny_llama_dir, capsys):
    assert run(tmp_path, tiny_llama_dir, "--eval-lengths", "32,64,256,512", "--retrieval-samples", "0",
               method=()) == 0
    assert "512/n" not in scores(tmp_path / "run", "retrofit")["passkey"]
    assert retrofit.main(["--retrieval-samples", "-1", "--out", str(tmp_path / "bad")]) == 2
    assert "--retrieval-samples must be >= 0" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_rotary_finetune_on_request_competes_with_the_training_free_candidates(tmp_path, tiny_llama_dir, capsys):
    """``--finetune``: the fine-tune runs, and its temperature grid joins the candidates."""
    assert run(tmp_path, tiny_llama_dir, "--finetune", method=()) == 0
    printed = capsys.readouterr().out
    assert "[3/7] choosing the retrofit among 6 candidates on 128 tokens" in printed
    scored = json.loads((tmp_path / "run" / "selection.json").read_text())["chosen_by"]["candidates"]
    assert [c["model"] for c in scored] == ["training-free"] * 2 + ["fine-tuned"] * 2 + ["training-free"] * 2
    assert len(list((tmp_path / "run").glob("finetune-*"))) == 1


def test_a_training_text_too_short_to_choose_on_is_refused(tmp_path, tiny_llama_dir, capsys):
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be. " * 3)
    code = retrofit.main(["--model", str(tiny_llama_dir), "--data", str(short), "--heldout", str(TEXT),
                          "--seq-len", "32", "--out", str(tmp_path / "o")])
    assert code == 2
    assert "less than one window for choosing the retrofit" in capsys.readouterr().err
    assert not list((tmp_path / "o").glob("finetune-*"))


def test_passkey_gaps_are_labelled_by_the_plan_not_the_cached_scores():
    """A score cached by an older version said n/a where this one says not run: the table labels every row alike."""
    plan = retrofit.Plan(out=None, recipe=None, train=None, trained_length=8192, lengths=[1024, 16384], corpora={},
                         eval_tokens=0, passkey_lengths=[1024], depths=[0.5], num_samples=1)
    rows = {"old": {"passkey": {"1024": 1.0, "1024/n": 2, "16384": retrofit.TOO_SHORT}},
            "new": {"passkey": {"1024": 0.5, "1024/n": 2, "16384": retrofit.NOT_RUN}},
            "table": {"passkey": {"1024": retrofit.SKIPPED, "16384": retrofit.SKIPPED}}}
    lines = retrofit.passkey_table(plan, rows).splitlines()
    assert lines[2:] == [f"| old | 1.00 (2) | {retrofit.NOT_RUN} |", f"| new | 0.50 (2) | {retrofit.NOT_RUN} |",
                         "| table | skipped | skipped |"]


def test_options_left_at_their_default_are_the_same_options():
    """The plain fine-tune chosen at mscale 1 (YaRN's default) is the fine-tune's own folder, not a copy."""
    assert retrofit.same_options("rope", {"scaling": "yarn", "factor": 2.0, "mscale": 1.0},
                                 {"scaling": "yarn", "factor": 2.0})
    assert not retrofit.same_options("rope", {"scaling": "yarn", "factor": 2.0, "mscale": 0.5},
                                     {"scaling": "yarn", "factor": 2.0})


def test_rotary_fit_budget_adds_a_fitted_longrope_candidate_keyed_as_a_stage(tmp_path, tiny_llama_dir, capsys):
    """``--fit-budget 8``: hf-posenc fit for the recipe's 4x the trained context (256 tokens: 1 window + 3 passkey
    prompts = 4 forwards a candidate, so 2 candidates) on the training text; its best factors compete in the
    selection; the report says the budget and the wall time; a re-run scores nothing again."""
    assert run(tmp_path, tiny_llama_dir, "--fit-budget", "8", method=()) == 0
    printed = capsys.readouterr().out
    assert "[2/7] fitting LongRoPE factors for 256 tokens with 8 forward passes" in printed
    assert "[3/7] choosing the retrofit among 5 candidates" in printed
    out = tmp_path / "run"
    (fit_dir,) = out.glob("fit-longrope-*")
    lines = (fit_dir / "evaluations.jsonl").read_text().splitlines()
    assert len(lines) == 1 + 2
    scored = json.loads((out / "selection.json").read_text())["chosen_by"]["candidates"]
    fitted = json.loads((fit_dir / "factors.json").read_text())
    assert scored[-1]["options"] == {"scaling": "longrope", **fitted} and scored[-1]["model"] == "training-free"
    report = (out / "report.md").read_text()
    assert "budget 8 forward passes, 8 spent over 2 candidates" in report and "s of wall time" in report

    assert run(tmp_path, tiny_llama_dir, "--fit-budget", "8", method=()) == 0
    assert capsys.readouterr().out.count("skipping") == 5 + 3  # candidates, three rows
    assert (fit_dir / "evaluations.jsonl").read_text().splitlines() == lines


@pytest.mark.parametrize("extra, message", [(("--fit-budget", "-1"), "--fit-budget must be >= 0"),
                                            (("--fit-budget", "4", "--method", "alibi"), "rotary recipe")])
def test_a_fit_budget_outside_the_rotary_recipe_is_refused(tmp_path, tiny_llama_dir, capsys, extra, message):
    assert run(tmp_path, tiny_llama_dir, *extra, method=()) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_trained_context_is_the_one_convert_takes_for_a_scaled_rotary(tmp_path):
    """A Llama-3.1-style checkpoint (llama3 rotary, its own original_max_position_embeddings 16 < the limit 64):
    retrofit's plan (eval lengths, PoSE target, selection window) read 16, convert the old limit 64."""
    import transformers

    import hf_posenc

    rope = {"rope_type": "llama3", "rope_theta": 1e4, "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16}
    tiny_model("llama", rope_parameters=rope, num_hidden_layers=1).save_pretrained(tmp_path / "llama31")
    _, trained = retrofit.model_facts(str(tmp_path / "llama31"))
    converted = hf_posenc.convert(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "llama31"), "alibi")
    assert trained == converted.config.posenc["original_max_position_embeddings"] == 64
