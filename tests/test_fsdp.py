"""FSDP2 (torch's ``fully_shard``) on 2 CPU processes (gloo) trains a converted model as DDP does: the same losses,
step by step, with the parameters really sharded. Accelerate 1.x does not engage its FSDP plugin on CPU (it runs
MULTI_CPU data parallel instead), so the training loop refuses an FSDP launch there (test below) rather than
silently running DDP."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from processes import free_port, run_processes

HERE = Path(__file__).parent


def test_fsdp2_losses_equal_ddp_on_two_cpu_processes(tmp_path):
    out = tmp_path / "report.json"
    cases = ["alibi", "t5", "rope"]  # t5: a learned position table at the model root, sharded with the root
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), str(HERE / "fsdp_worker.py"), str(out), *cases]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)])}
    done = run_processes(command, env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    for case in cases:
        ddp, fsdp = report[case]["ddp"], report[case]["fsdp"]
        assert fsdp["sharded_params"] > 0 and ddp["sharded_params"] == 0
        assert fsdp["losses"] == pytest.approx(ddp["losses"], abs=1e-5), case
        assert fsdp["losses"][0] != pytest.approx(fsdp["losses"][-1], abs=1e-3)  # it trained


def test_an_fsdp_launch_that_accelerate_runs_unsharded_is_refused(tmp_path):
    """``accelerate launch`` with an FSDP config sets ACCELERATE_USE_FSDP; on CPU Accelerate then runs without
    sharding. One process stands in for the launch (a subprocess: Accelerate's state is process-wide)."""
    script = (
        "from hf_posenc.training.config import TrainConfig, ConfigError\n"
        "from hf_posenc.training.loop import make_accelerator\n"
        f"config = TrainConfig(model='m', method='alibi', output_dir={str(tmp_path)!r})\n"
        "try:\n    make_accelerator(config)\nexcept ConfigError as err:\n    print('refused:', err)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_FSDP": "true", "PYTHONPATH": str(HERE.parent)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert "refused:" in done.stdout and "does not shard on CPU" in done.stdout, done.stdout + done.stderr[-2000:]
