"""Real data-parallel fine-tuning: 2 CPU processes (gloo) launched by Accelerate with the shipped
recipes/accelerate/cpu_ddp.yaml. Each rank reports its world size, a hash of its first batch and of its final
weights (``rank_report``): the ranks must see different batches and end with identical weights."""

import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from processes import free_port, run_processes
from tiny_models import tiny_model

import hf_posenc

ROOT = Path(__file__).resolve().parents[1]


def test_two_process_ddp_on_cpu(tmp_path, tiny_tokenizer_dir, text_path):
    model_dir = tmp_path / "tiny_gpt2"
    tiny_model("gpt2").save_pretrained(model_dir)
    shutil.copytree(tiny_tokenizer_dir, model_dir, dirs_exist_ok=True)
    out = tmp_path / "out"
    config = tmp_path / "ddp.yaml"
    config.write_text(json.dumps({
        "model": str(model_dir), "method": "alibi", "data": {"files": [str(text_path)], "max_train_tokens": 4096},
        "seq_len": 32, "batch_size": 4, "max_steps": 3, "lr": 3e-3, "warmup_steps": 1, "eval_every": 0,
        "eval_tokens": 256, "log_every": 1, "save_every": 0, "report_to": "none", "rank_report": True,
        "output_dir": str(out),
    }))  # JSON is YAML
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(ROOT / "recipes" / "accelerate" / "cpu_ddp.yaml"), "--main_process_port", str(free_port()),
        str(ROOT / "recipes" / "finetune.py"), "--config", str(config),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = run_processes(command, env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in reports] == [2, 2], reports
    assert reports[0]["distributed_type"] == reports[1]["distributed_type"] == "DistributedType.MULTI_CPU"
    assert reports[0]["first_batch"] != reports[1]["first_batch"]  # each rank its own shard of the data
    assert reports[0]["weights"] == reports[1]["weights"]  # gradients all-reduced: the replicas stay equal

    start = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert start["processes"] == 2
    trained = hf_posenc.from_pretrained(out)
    initial = load_file(model_dir / "model.safetensors")
    assert not torch.equal(trained.transformer.h[0].attn.c_attn.weight, initial["transformer.h.0.attn.c_attn.weight"])
