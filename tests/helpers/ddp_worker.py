"""One rank of the two-process equivalence runs in test_distributed.py (spawned, gloo, CPU).

Each case trains a real model for a few SGD steps under DDP, every rank on its shard of
the same global batches (`normbench.engine.distributed.RankShard`), and saves what the test
compares with one process on the whole global batch: the first step's outputs and
averaged gradients, the parameters after the last step, and the running statistics after
`average_buffers`. Everything runs in float64, so that "equal" means equal to rounding.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from normbench.data import Batch, DataInfo
from normbench.engine import distributed
from normbench.engine.evaluation import forward, loss_and_counts
from normbench.models import build_model
from normbench.norms import make_spec
from normbench.norms.sync import synchronized

STEPS = 3
PER_RANK = 4  # samples per rank: the ghost BN reference uses stats_batch=PER_RANK
LR = 0.1


def info_of(case: dict) -> DataInfo:
    if case["kind"] == "image":
        return DataInfo(kind="image", num_classes=5, in_channels=3, image_size=8)
    return DataInfo(kind="text", num_classes=11, seq_len=case["seq_len"])


def global_batches(case: dict, world: int) -> list[Batch]:
    """The global batches of the run: the same on every rank and in the reference."""
    g = torch.Generator().manual_seed(case["data_seed"])
    n = PER_RANK * world
    out = []
    for _ in range(STEPS):
        if case["kind"] == "image":
            out.append(Batch(torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64),
                             torch.randint(0, 5, (n,), generator=g)))
            continue
        t = case["seq_len"]
        tokens = torch.randint(0, 11, (n, t + 1), generator=g)
        lengths = torch.tensor(case["lengths"] * (n // len(case["lengths"])))
        mask = torch.arange(t)[None, :] < lengths[:, None]
        out.append(Batch(tokens[:, :-1], tokens[:, 1:], mask))
    return out


def build(case: dict, norm: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(case["model"], make_spec(**norm), info_of(case)).double()


def train(model: torch.nn.Module, runner: torch.nn.Module, batches, share=None) -> dict:
    """STEPS steps of SGD; the first step's outputs and gradients, the final parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=LR, momentum=0.9)
    device = params[0].device
    record = {}
    for step, batch in enumerate(batches):
        batch = Batch(*(None if t is None else t.to(device) for t in (batch.x, batch.y, batch.mask)))
        with synchronized():
            logits = forward(runner, batch)
        loss, _, count = loss_and_counts(logits, batch)
        optimizer.zero_grad(set_to_none=True)
        (share(loss, count) if share else loss).backward()
        if step == 0:
            record["outputs"] = logits.detach().cpu()
            record["grads"] = {n: p.grad.detach().cpu() for n, p in model.named_parameters()
                               if p.grad is not None}
        optimizer.step()
    record["params"] = {n: p.detach().cpu() for n, p in model.named_parameters()}
    return record


def work(rank: int, world: int, port: int, out_dir: str, cases: dict, device: str = "cpu") -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    distributed.init()  # gloo for CPU tensors, NCCL for CUDA ones
    try:
        train_cases(rank, world, out_dir, cases, device)
    finally:
        distributed.shutdown()
    # What is still running once the group is gone: a thread of it would outlive the
    # interpreter and meet the C++ teardown at exit (test_distributed checks there is none).
    (Path(out_dir) / f"threads_{rank}.txt").write_text("\n".join(thread_names()))


def train_cases(rank: int, world: int, out_dir: str, cases: dict, device: str) -> None:
    where = torch.device("cuda", rank) if device == "cuda" else torch.device("cpu")
    for name, case in cases.items():
        for mode, sync in (("per_rank", False), ("sync", True)):
            model = build(case, {**case["norm"], "sync": sync}).to(where)
            shard = distributed.RankShard(iter(global_batches(case, world)), rank, world)
            runner = distributed.wrap(model, where)
            record = train(model, runner, shard, share=shard.loss_share)
            distributed.average_buffers(model)
            record["buffers"] = {n: b.cpu() for n, b in model.named_buffers()}
            torch.save(record, Path(out_dir) / f"{name}_{mode}_{rank}.pt")


def thread_names() -> list[str]:
    """The names of this process's threads (Linux); empty where /proc is missing."""
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return []
    return sorted((t / "comm").read_text().strip() for t in tasks.iterdir())
