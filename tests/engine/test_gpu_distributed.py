"""The CUDA side of several processes: NCCL collectives, synchronized BN on GPU tensors,
torchrun with device=cuda. Skipped where there is no GPU (or, for two ranks, fewer than two
GPUs: NCCL refuses two ranks on one device)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from normbench.norms.stats import group_stats
from normbench.norms.sync import synced_group_stats
from tests.helpers import ddp_worker

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")


def test_synced_statistics_of_cuda_tensors_equal_the_whole_batch_on_one_rank(tmp_path):
    """One rank (NCCL for CUDA tensors): the pooled statistics are the batch's own."""
    dist.init_process_group("cpu:gloo,cuda:nccl", rank=0, world_size=1,
                            store=dist.FileStore(str(tmp_path / "store"), 1))
    try:
        torch.manual_seed(0)
        x = torch.randn(6, 5, 4, device="cuda")
        mask = torch.arange(5, device="cuda")[None, :] < torch.tensor([5, 2, 4, 1, 5, 3],
                                                                      device="cuda")[:, None]
        got = synced_group_stats(x, mask, -1)
        want = group_stats(x.cpu(), mask.cpu(), 6, -1)
        for name in ("count", "mean", "ss"):
            torch.testing.assert_close(getattr(got, name).cpu(), getattr(want, name),
                                       rtol=1e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@two_gpus
def test_two_gpu_ranks_equal_one_process(tmp_path):
    """As tests/engine/test_distributed.py, with NCCL: per-device BN = ghost BN, sync = whole batch
    (to GPU float64 rounding: its kernels sum in another order than the CPU reference's)."""
    from tests.engine.test_distributed import CASES, WORLD, free_port, reference

    mp.start_processes(ddp_worker.work, args=(WORLD, free_port(), str(tmp_path), CASES, "cuda"),
                       nprocs=WORLD, start_method="spawn")
    b = ddp_worker.PER_RANK
    for name in CASES:
        for mode in ("per_rank", "sync"):
            want = reference(name, mode)
            ranks = [torch.load(tmp_path / f"{name}_{mode}_{r}.pt", weights_only=True)
                     for r in range(WORLD)]
            for r, got in enumerate(ranks):
                torch.testing.assert_close(got["outputs"], want["outputs"][r * b:(r + 1) * b],
                                           rtol=1e-7, atol=1e-8)
                for key, grad in want["grads"].items():
                    torch.testing.assert_close(got["grads"][key], grad, rtol=1e-7, atol=1e-8)
            for key in want["params"]:
                assert torch.equal(ranks[0]["params"][key], ranks[1]["params"][key]), key


@pytest.mark.slow
@two_gpus
def test_torchrun_on_two_gpus_trains_one_run(tmp_path):
    from tests.cli.test_torchrun import RUN, torchrun

    result = torchrun("train", *RUN, "device=cuda", "norm.sync=true", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["device"] == "cuda:0"
    assert (summary["world_size"], summary["global_batch"], summary["stats_batch"]) == (2, 64, 64)
