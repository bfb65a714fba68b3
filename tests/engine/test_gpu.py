"""The CUDA path: the same numbers as on the CPU. Skipped where there is no GPU (CI)."""

import pytest
import torch

from normbench.data import build_dataset
from normbench.engine.train import run_experiment
from normbench.norms import GhostBatchNorm2d, TokenBatchNorm

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_masked_and_ghost_batchnorm_match_the_cpu():
    torch.manual_seed(0)
    x = torch.randn(8, 5, 6)
    mask = torch.arange(5)[None, :] < torch.tensor([5, 3, 1, 4, 5, 2, 2, 5])[:, None]
    for layer, args in ((TokenBatchNorm(6, stats_batch=4), (x, mask)),
                        (GhostBatchNorm2d(5, stats_batch=2), (x.reshape(8, 5, 2, 3),))):
        cpu = layer(*args)
        gpu = layer.cuda()(*(a.cuda() for a in args))
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_data_lives_on_the_gpu_and_training_completes(tmp_path, tiny_config):
    data = build_dataset("shapes", n_train=64, n_val=32).to("cuda")
    assert data.train_x.is_cuda and next(data.train_loader(16, seed=0)).x.is_cuda
    summary = run_experiment(tiny_config("device=cuda"), tmp_path, live=False)
    assert summary["status"] == "completed" and summary["device"].startswith("cuda")
    assert torch.isfinite(torch.tensor(summary["final"]["train_loss"]))


@pytest.mark.parametrize("norm", ["batch", "batch_renorm", "power"])
def test_no_training_step_waits_on_the_host(tmp_path, tiny_config, norm):
    """Between logging steps nothing syncs: torch raises on any synchronizing call."""
    from rich.console import Console

    from normbench.engine.experiment import build
    from normbench.engine.train import train_step

    # warm-up and relaxation end within the steps run, so both paths of each norm run
    exp = build(tiny_config("device=cuda", "log_every=100", "steps=20", f"norm={norm}",
                            *(("norm.warmup_steps=3",) if norm == "power" else ()),
                            *(("norm.relax_from=2", "norm.r_max_by=4", "norm.d_max_by=4")
                              if norm == "batch_renorm" else ())),
                tmp_path, Console(), live=False)
    train_step(exp, 1, log_now=False)  # first step: lazy initialisations may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(2, 6):
            train_step(exp, step, log_now=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    exp.tracker.close()


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_with_channels_last_trains(tmp_path, tiny_config, precision):
    summary = run_experiment(tiny_config("device=cuda", f"precision={precision}",
                                         "channels_last=true"), tmp_path, live=False)
    assert summary["status"] == "completed" and summary["precision"] == precision
    assert torch.isfinite(torch.tensor(summary["final"]["val_loss"]))
