"""``hf-posenc fit``: LongRoPE factors searched by forward passes on the calibration text, within a budget,
resumable, keyed by the run's identity, spread over Accelerate processes. Tiny random Llama (trained context 64),
the tiny tokenizer, The Tempest as calibration text."""

from __future__ import annotations

import json
import math
import os
import random
import sys
from pathlib import Path

import pytest
import torch
from processes import free_port, run_processes
from tiny_models import OLD_LIMIT, TEXT, tiny_model

import hf_posenc
from hf_posenc import cli
from hf_posenc.fit import EVALUATIONS, FACTORS, SUMMARY, FitSettings, IdentityError, fit, run, search
from hf_posenc.integrations.long_context import token_nll

ROOT = Path(__file__).resolve().parents[1]
TARGET = 2 * OLD_LIMIT  # scale 2; perplexity only (the tiny tokenizer needs ~190 tokens for a passkey prompt)


def settings(out: Path, budget: int, **fields) -> FitSettings:
    return FitSettings("tiny-llama", fields.pop("target_length", TARGET), str(TEXT), budget, out,
                       **{"passkey_samples": 0, "population": 4, **fields})


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", initializer_range=0.3).eval()


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / EVALUATIONS).read_text().splitlines()[1:]]


def counting(monkeypatch) -> list:
    """Every candidate scored (its factors), by patching the one place the loop scores."""
    calls, original = [], run.evaluate
    monkeypatch.setattr(run, "evaluate", lambda m, objective, done: calls.append(1) or original(m, objective, done))
    return calls


def test_candidates_are_monotone_within_bounds_and_seeded_with_pi_ntk_yarn():
    scale, rng = 4.0, random.Random(0)
    start = search.seeds(4, scale, yarn=[1.0, 1.3, 3.0, 4.0])
    assert start["pi"] == [4.0] * 4 and start["ntk"][0] == 1.0 and start["ntk"][-1] == pytest.approx(4.0)
    scored = [(f, rng.random()) for f in start.values()]
    children = search.generation(0, [], list(start.values()), 8, scale, 0.5, 0)
    children += search.generation(1, scored, list(start.values()), 32, scale, 0.5, 0)
    assert children[:3] == list(start.values()) and len(children) == 40
    for factors in children:
        assert factors == sorted(factors) and 1.0 <= factors[0] and factors[-1] <= search.MAX_STRETCH * scale
    assert len({search.key(f) for f in children + list(start.values())}) == len(children)  # nothing twice


def test_projection_makes_any_draw_monotone():
    assert search.project([3.0, 0.5, 2.0, 100.0], scale=4.0) == [3.0, 3.0, 3.0, 8.0]


def test_fit_writes_factors_that_convert_takes_and_that_scored_as_recorded(tmp_path, model, tiny_tokenizer):
    out = tmp_path / "fit"
    top = fit(settings(out, budget=6), model, tiny_tokenizer, progress_bar=False)
    rows = records(out)
    assert len(rows) == 6 and [r.get("seed") for r in rows[:3]] == ["pi", "ntk", "yarn"]
    assert top["score"] == min(r["score"] for r in rows)
    assert all(r["long_factor"] == sorted(r["long_factor"]) and r["long_factor"][0] >= 1.0 for r in rows)
    options = json.loads((out / FACTORS).read_text())
    assert options["long_factor"] == top["long_factor"] and options["factor"] == TARGET / OLD_LIMIT
    converted = hf_posenc.convert(tiny_model("llama", initializer_range=0.3).eval(), "rope", scaling="longrope",
                                  **options)
    window = torch.tensor(tiny_tokenizer(TEXT.read_text()[-8 * TARGET:])["input_ids"][-TARGET:])  # the text's end
    nll = token_nll(converted, window)[-(TARGET - 1):].double().mean()
    assert float(nll) == pytest.approx(top["score"], abs=1e-5)  # the recorded score is that model's
    summary = json.loads((out / SUMMARY).read_text())
    assert summary["forwards"] == 6 and summary["identity"]["target_length"] == TARGET


def test_a_rerun_with_a_larger_budget_continues_and_never_rescores(tmp_path, model, tiny_tokenizer, monkeypatch):
    """Stopped after 5 candidates (a budget of 5), rerun with 11: 6 more scored, and the file is the one an
    uninterrupted run of 11 writes (the same candidates, in order, with the same scores)."""
    calls = counting(monkeypatch)
    fit(settings(tmp_path / "a", budget=5), model, tiny_tokenizer, progress_bar=False)
    assert len(calls) == 5
    fit(settings(tmp_path / "a", budget=11), model, tiny_tokenizer, progress_bar=False)
    assert len(calls) == 11
    fit(settings(tmp_path / "a", budget=11), model, tiny_tokenizer, progress_bar=False)
    assert len(calls) == 11  # nothing left to do
    fit(settings(tmp_path / "b", budget=11), model, tiny_tokenizer, progress_bar=False)
    assert records(tmp_path / "a") == records(tmp_path / "b")
    assert len({search.key(r["long_factor"]) for r in records(tmp_path / "a")}) == 11


def test_a_line_cut_short_by_a_crash_is_dropped_and_rescored(tmp_path, model, tiny_tokenizer, monkeypatch):
    out = tmp_path / "fit"
    fit(settings(out, budget=4), model, tiny_tokenizer, progress_bar=False)
    whole = records(out)
    text = (out / EVALUATIONS).read_text().splitlines()
    (out / EVALUATIONS).write_text("\n".join(text[:-1]) + "\n" + text[-1][:20])  # the last append cut short
    calls = counting(monkeypatch)
    fit(settings(out, budget=4), model, tiny_tokenizer, progress_bar=False)
    assert len(calls) == 1 and records(out) == whole


def test_a_fit_killed_mid_generation_keeps_every_candidate_it_scored(tmp_path, model, tiny_tokenizer, monkeypatch):
    """A candidate is on disk as soon as it is scored, not at the end of its generation (a 16k candidate is minutes on
    a CPU): killed during the third of a generation of 4, the rerun scores only the third and fourth."""
    scored, original = [], run.evaluate

    def killed_at_the_third(m, objective, done):
        if len(scored) == 2:
            raise KeyboardInterrupt
        scored.append(1)
        return original(m, objective, done)

    monkeypatch.setattr(run, "evaluate", killed_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        fit(settings(tmp_path / "a", budget=4), model, tiny_tokenizer, progress_bar=False)
    assert len(records(tmp_path / "a")) == 2
    monkeypatch.setattr(run, "evaluate", original)
    calls = counting(monkeypatch)
    fit(settings(tmp_path / "a", budget=4), model, tiny_tokenizer, progress_bar=False)
    assert len(calls) == 2
    fit(settings(tmp_path / "b", budget=4), model, tiny_tokenizer, progress_bar=False)
    assert records(tmp_path / "a") == records(tmp_path / "b")


def test_the_progress_bar_moves_per_forward(tmp_path, model, tiny_tokenizer, monkeypatch):
    """A candidate is several forwards (minutes each at 16k on a CPU): the bar moves after each, not per candidate."""
    from hf_posenc.fit import setup

    updates = []

    class Bar:
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n):
            updates.append(n)

    monkeypatch.setattr(setup, "tqdm", Bar)
    fit(settings(tmp_path / "a", budget=4, windows=2), model, tiny_tokenizer)
    assert updates == [1, 1, 1, 1]  # 2 candidates x 2 windows


@pytest.mark.parametrize("change, named", [({"target_length": 3 * OLD_LIMIT}, "target_length: 128 there, 192 here"),
                                          ({"seed": 1}, "seed: 0 there, 1 here"),
                                          ({"last_tokens": 10}, "last_tokens: 1024 there, 10 here")])
def test_another_fits_evaluations_are_refused_naming_the_difference(tmp_path, model, tiny_tokenizer, change, named):
    out = tmp_path / "fit"
    fit(settings(out, budget=2), model, tiny_tokenizer, progress_bar=False)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(IdentityError, match=named):
        fit(settings(out, budget=4, **change), model, tiny_tokenizer, progress_bar=False)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_the_needle_loss_adds_the_passkey_answers_nll(tmp_path, model, tiny_tokenizer):
    """At 256 tokens the tiny tokenizer fits a passkey prompt: 3 prompts (one per depth) + 1 window per candidate."""
    out = tmp_path / "fit"
    top = fit(settings(out, budget=8, target_length=4 * OLD_LIMIT, passkey_samples=1), model, tiny_tokenizer,
              progress_bar=False)
    rows = records(out)
    assert len(rows) == 2 and all(r["forwards"] == 4 for r in rows)
    assert top["score"] == pytest.approx(math.log(top["last_ppl"]) + top["needle_nll"])


def test_cli_fit_and_its_bad_input_exit_2(tmp_path, tiny_llama_dir, capsys):
    base = ["fit", "--model", str(tiny_llama_dir), "--target-length", str(TARGET), "--data", str(TEXT),
            "--passkey-samples", "0", "--population", "3"]
    assert cli.main([*base, "--budget", "3", "--out", str(tmp_path / "fit")]) == 0
    assert json.loads((tmp_path / "fit" / FACTORS).read_text())["factor"] == 2.0
    bad = [(["--budget", "0"], "--budget must be >= 1"),
           (["--budget", "3", "--target-length", "32"], "within the model's trained context"),
           (["--budget", "3", "--passkey-samples", "1"], "--passkey-samples 0")]
    for extra, message in bad:
        with pytest.raises(SystemExit) as exit_info:
            cli.main([*base, "--out", str(tmp_path / "bad"), *extra])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()


def test_two_accelerate_processes_find_what_one_finds(tmp_path, tiny_llama_dir):
    """Rank r scores candidates r, r + 2, ...; the gathered file equals the single-process one."""
    args = ["fit", "--model", str(tiny_llama_dir), "--target-length", str(TARGET), "--data", str(TEXT),
            "--passkey-samples", "0", "--population", "4", "--budget", "7"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(ROOT / "recipes" / "accelerate" / "cpu_ddp.yaml"), "--main_process_port", str(free_port()),
              "-m", "hf_posenc.cli", *args, "--out", str(tmp_path / "two")]
    done = run_processes(launch, env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert json.loads((tmp_path / "two" / SUMMARY).read_text())["processes"] == 2
    assert cli.main([*args, "--out", str(tmp_path / "one")]) == 0
    for a, b in zip(records(tmp_path / "two"), records(tmp_path / "one"), strict=True):
        assert a["long_factor"] == b["long_factor"] and a["score"] == pytest.approx(b["score"], abs=1e-6)
