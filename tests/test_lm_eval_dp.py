"""`hf-posenc eval` data-parallel: 2 CPU processes (gloo) launched by `accelerate launch --multi_gpu --num_processes
2`, lm-eval's own data-parallel path, give the same scores and per-doc outputs as 1 process; each process scores
its own half of the docs, and only rank 0 writes results. Plus the launches that are refused."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import transformers

pytest.importorskip("lm_eval")

import hf_posenc  # noqa: E402
from hf_posenc.cli import main as cli  # noqa: E402
from hf_posenc.integrations.lm_eval_model import EvalInputError, HFPosencLM, prepare_cpu_launch  # noqa: E402
from processes import free_port, run_processes  # noqa: E402
from tiny_models import tiny_model  # noqa: E402

HERE = Path(__file__).parent
TASKS = ("posenc_ppl", "posenc_passkey")
# odd doc counts (ppl: 6 + 5 + 2 windows; passkey: 3 lengths x 1 depth), so lm-eval pads the shorter rank
METADATA = {"max_seq_lengths": [192, 256, 512], "num_tokens": 1280, "depths": [0.5], "num_samples": 1}


@pytest.fixture(scope="module")
def alibi_dir(tmp_path_factory, tiny_tokenizer_dir):
    """A tiny GPT-2 converted to ALiBi, saved with the tiny tokenizer."""
    path = tmp_path_factory.mktemp("dp") / "gpt2-alibi"
    hf_posenc.convert(tiny_model("gpt2"), "alibi").save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(tiny_tokenizer_dir).save_pretrained(path)
    return path


def eval_args(model_dir: Path, text_path: Path, out: Path) -> list[str]:
    meta = json.dumps({**METADATA, "text_file": str(text_path)})
    return ["--model", "hf-posenc", "--model_args", f"pretrained={model_dir},max_length=512", "--tasks",
            ",".join(TASKS), "--metadata", meta, "--log_samples", "--output_path", str(out)]


def launch_two_processes(args: list[str], report_dir: Path) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu --num_processes 2` of tests/lm_eval_dp_worker.py, GPUs hidden (CPU, gloo)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), str(HERE / "lm_eval_dp_worker.py"), str(report_dir), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": str(HERE.parent)}
    return run_processes(command, env)


def results_and_samples(out: Path) -> tuple[dict, dict]:
    """The one results JSON under ``out`` and {task: {doc_id: filtered response}} from the samples files."""
    (file,) = out.rglob("results_*.json")  # exactly one: only rank 0 writes
    samples = {}
    for task in TASKS:
        (lines,) = out.rglob(f"samples_{task}_*.jsonl")
        rows = [json.loads(line) for line in lines.read_text().splitlines()]
        samples[task] = {row["doc_id"]: row["filtered_resps"] for row in rows}
    return json.loads(file.read_text()), samples


def scores(results: dict) -> dict[tuple[str, str], float]:
    return {(task, key): value for task, metrics in results["results"].items() for key, value in metrics.items()
            if key.endswith(",none") and "_stderr" not in key}


@pytest.fixture(scope="module")
def runs(alibi_dir, text_path, tmp_path_factory):
    """(1-process results, samples), (2-process results, samples), the 2 processes' request reports."""
    one, two, reports = (tmp_path_factory.mktemp(name) for name in ("one", "two", "reports"))
    assert cli(["eval", *eval_args(alibi_dir, text_path, one), "--device", "cpu"]) == 0
    done = launch_two_processes(eval_args(alibi_dir, text_path, two), reports)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [json.loads((reports / f"rank{r}.json").read_text()) for r in (0, 1)]
    return results_and_samples(one), results_and_samples(two), ranks


def test_two_processes_score_as_one(runs):
    (results_1, samples_1), (results_2, samples_2), _ = runs
    assert results_2["n-samples"] == results_1["n-samples"]
    assert scores(results_2) == pytest.approx(scores(results_1), rel=1e-6)
    assert len(scores(results_1)) == 3 + 3 + 3  # ppl per length; passkey per length and per length@0.5
    for task in TASKS:  # every doc's output, gathered from both processes onto rank 0
        total = results_1["n-samples"][task]["effective"]
        assert sorted(samples_2[task]) == sorted(samples_1[task]) == list(range(total))
    for doc_id, (loglikelihood,) in samples_1["posenc_ppl"].items():  # the samples file writes floats as text
        assert float(samples_2["posenc_ppl"][doc_id][0]) == pytest.approx(float(loglikelihood), rel=1e-6), doc_id
    assert samples_2["posenc_passkey"] == samples_1["posenc_passkey"]  # the greedy generations, word for word


def test_each_process_scores_its_own_half_of_the_docs(runs):
    (results_1, _), _, ranks = runs
    assert [(r["rank"], r["world_size"]) for r in ranks] == [(0, 2), (1, 2)]
    for request_type, task in (("loglikelihood_rolling", "posenc_ppl"), ("generate_until", "posenc_passkey")):
        docs = [{doc for name, doc in rank[request_type] if name == task} for rank in ranks]  # padding repeats one
        total = results_1["n-samples"][task]["effective"]
        assert not docs[0] & docs[1], task
        assert docs[0] | docs[1] == set(range(total)), task
        assert sorted(map(len, docs)) == [total // 2, total - total // 2], task


# --- refused launches --------------------------------------------------------------------------------------
def test_accelerate_cpu_launch_of_several_processes_is_refused(monkeypatch):
    """`accelerate launch --cpu --num_processes 2` starts one process (no mpirun); its environment says so."""
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.raises(EvalInputError, match=r"started one process.*accelerate launch --multi_gpu --num_processes N"):
        prepare_cpu_launch()


def test_processes_outside_a_process_group_are_refused(monkeypatch):
    """A launch of 2 processes that Accelerate did not join (each would score every doc) is refused."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    lone = SimpleNamespace(accelerator=None, _world_size=1, _rank=0)
    with pytest.raises(EvalInputError, match="2 processes were launched but Accelerate joined 1.*torchrun"):
        HFPosencLM._join_data_parallel(lone)
