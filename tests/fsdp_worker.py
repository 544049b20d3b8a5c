"""One rank of tests/test_fsdp.py (launched by torch.distributed.run, gloo): fine-tunes a converted tiny GPT-2 for
a few AdamW steps twice, under DDP and under FSDP2 (``fully_shard`` per block, then the root, where the position
method lives), each rank on its own batches, and writes the mean loss of every step and what was sharded."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).parent))
from test_matrix import converted  # noqa: E402


def train(case: str, kind: str, rank: int, steps: int = 3) -> dict:
    model = converted("gpt2", case).train()
    if kind == "fsdp":
        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
    else:
        model = DistributedDataParallel(model)
    sharded = sum(isinstance(p, DTensor) for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batches = torch.Generator().manual_seed(rank)
    losses = []
    for _ in range(steps):
        x = torch.randint(4, 300, (2, 24), generator=batches)
        loss = model(x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / dist.get_world_size())
    return {"losses": losses, "sharded_params": sharded}


def main(out: str, cases: list[str]) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    report = {case: {kind: train(case, kind, rank) for kind in ("ddp", "fsdp")} for case in cases}
    if rank == 0:
        Path(out).write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
