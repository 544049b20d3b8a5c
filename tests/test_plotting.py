"""`hf-posenc plot` on result folders written here in lm-eval's results JSON layout (the end-to-end test in
test_lm_eval.py plots real `hf-posenc eval` output)."""

import json

import pytest

pytest.importorskip("matplotlib")

from hf_posenc.cli import main as cli  # noqa: E402
import torch  # noqa: E402

from hf_posenc.integrations import plotting, position_plots  # noqa: E402
from hf_posenc.methods.alibi import alibi_slopes  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def write_result(folder, name, model_args, results, date, trained=None):
    """One lm-eval results file, as EvaluationTracker lays it out: <out>/<model>/results_<date>.json."""
    path = folder / name.replace("/", "__") / f"results_{date}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    config = {"model": "hf-posenc", "model_args": model_args, "trained_length": trained}
    path.write_text(json.dumps({"results": results, "config": config, "date": date}))


def per_length(task, values, extra=None):
    metrics = {"name": task, "alias": task, "sample_len": 4}
    for n, v in values.items():
        metrics[f"{n},none"] = v
        metrics[f"{n}_stderr,none"] = "N/A"
    return {task: {**metrics, **(extra or {})}}


@pytest.fixture
def result_folders(tmp_path):
    """Two --output_path folders: an ALiBi checkpoint (ppl + passkey, then a re-run of ppl) and a RoPE one
    converted on load (ppl, prose passkey, RULER with its -1 for lengths not run)."""
    first, second = tmp_path / "run_a", tmp_path / "run_b"
    alibi = {"pretrained": "/ckpt/gpt2-alibi", "max_length": 4096}
    write_result(first, alibi["pretrained"], alibi, {
        **per_length("posenc_ppl", {1024: 20.0, 2048: 19.0, 4096: 30.0}),
        **per_length("posenc_passkey", {1024: 1.0, 4096: 0.5}, {"1024@0,none": 1.0}),
    }, date=1.0, trained=1024)
    write_result(first, alibi["pretrained"], alibi, per_length("posenc_ppl", {4096: 18.5}), date=2.0, trained=1024)
    rope = "pretrained=gpt2,posenc=rope,scaling=yarn,factor=4"  # model_args as a string
    write_result(second, "gpt2", rope, {
        **per_length("posenc_ppl", {1024: 21.0, 4096: 25.0}),
        **per_length("posenc_passkey_prose", {1024: 0.75}),
        **per_length("niah_single_1", {1024: 0.25, 4096: -1}),
        **per_length("hellaswag", {}, {"acc,none": 0.3}),
    }, date=3.0, trained=1024)
    return first, second


def test_collect_returns_one_series_per_model_and_task(result_folders):
    series, trained = plotting.collect(plotting.load_results(result_folders))
    assert series["perplexity"] == {
        "gpt2+rope": [(1024, 21.0), (4096, 25.0)],
        "gpt2-alibi": [(1024, 20.0), (2048, 19.0), (4096, 18.5)],  # the later run replaced 4096
    }
    assert series["passkey"] == {
        "gpt2+rope [niah_single_1]": [(1024, 0.25)],  # RULER's -1 (length not run) dropped
        "gpt2+rope [posenc_passkey_prose]": [(1024, 0.75)],
        "gpt2-alibi": [(1024, 1.0), (4096, 0.5)],  # per-depth metrics are not lengths
    }
    assert trained == {"gpt2-alibi": 1024, "gpt2+rope": 1024}


def test_plot_command_writes_both_pngs(result_folders, tmp_path, capsys):
    out = tmp_path / "plots"
    assert cli(["plot", *map(str, result_folders), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(out / "perplexity.png"), str(out / "passkey.png"), str(out / "needle.png")]
    for path in printed:
        assert open(path, "rb").read(8) == PNG


def test_only_panels_with_data_are_drawn(tmp_path):
    write_result(tmp_path, "m", {"pretrained": "m"}, per_length("posenc_ppl", {512: 9.0}), date=1.0)
    assert [p.name for p in plotting.plot(plotting.collect(plotting.load_results([tmp_path]))[0], tmp_path)] == [
        "perplexity.png"]


def test_no_results_and_missing_folder_are_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert plotting.main([str(tmp_path / "empty")]) == 2
    assert "no posenc_ppl" in capsys.readouterr().err
    assert plotting.main([str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ---- position terms and needles -----------------------------------------------------------------------------
def test_needle_grid_reads_depth_by_length(tmp_path):
    write_result(tmp_path, "m", {"pretrained": "m"}, per_length(
        "posenc_passkey", {1024: 0.5}, {"1024@0,none": 1.0, "1024@0.5,none": 0.0, "2048@0.5,none": 0.25}), date=1.0)
    grids = plotting.needle_grid(plotting.load_results([tmp_path]))
    assert grids == {"m": {(0.0, 1024): 1.0, (0.5, 1024): 0.0, (0.5, 2048): 0.25}}
    assert open(position_plots.plot_needles(grids, tmp_path)[0], "rb").read(8) == PNG


@pytest.mark.parametrize("method, what", [("alibi", "score bias"), ("fire", "score bias"),
                                          ("xpos", "rotated score"), ("transformer_xl", "content term"),
                                          ("learned", "cosine similarity")])
def test_position_term_per_method_kind(method, what):
    from test_matrix import converted

    model = converted("gpt2", method)
    term, label = position_plots.position_term(model.base_model.posenc, 16)
    assert label.startswith(what)
    heads = 1 if method == "learned" else model.config.num_attention_heads
    assert term.shape == (heads, 16, 16) and torch.isfinite(term).all()
    if method == "alibi":  # the bias itself: -m_h |i - j|
        slopes = alibi_slopes(heads)
        distance = (torch.arange(16)[:, None] - torch.arange(16)[None]).abs()
        torch.testing.assert_close(term, -slopes[:, None, None] * distance)


def test_plot_positions_command_on_a_saved_model(tmp_path, capsys):
    from tiny_models import tiny_model

    import hf_posenc

    hf_posenc.convert(tiny_model("llama"), "rope").save_pretrained(tmp_path / "model")
    out = tmp_path / "plots"
    assert cli(["plot", "--positions", str(tmp_path / "model"), "--lengths", "8", "24", "--out", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(out / name) for name in ("positions_8.png", "positions_24.png", "positions_distance.png")]
    for path in printed:
        assert open(path, "rb").read(8) == PNG


def test_plot_positions_errors_name_the_problem(tmp_path, capsys):
    from tiny_models import tiny_model

    import hf_posenc

    hf_posenc.convert(tiny_model("gpt2"), "nope").save_pretrained(tmp_path / "nope")
    assert cli(["plot", "--positions", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    assert "adds no position term" in capsys.readouterr().err
    assert cli(["plot", "--positions", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    with pytest.raises(SystemExit):
        cli(["plot", "--out", str(tmp_path)])
