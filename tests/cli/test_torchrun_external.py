"""`torchrun --nproc_per_node=2 -m normbench train model=torchvision norm.sync=true` on the
CPU (gloo): two processes train torchvision's ResNet-18 with SyncBN as one process trains
it with BatchNorm over the whole global batch, compared as tests/cli/test_torchrun.py
compares normbench's ResNet. Per-device BN under torchrun is test_torchrun's alone: nothing
of it depends on the model, and each torchrun costs ~15 s."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from normbench.engine.train import run_experiment
from tests.cli.test_torchrun import torchrun
from tests.helpers.common import compose_config, read_scalars

pytestmark = pytest.mark.slow

STEPS = 4
# 16 images per process at 8 px. lr=0.001: ResNet-18 starts with gradient norms near 50,
# and at test_torchrun's lr=0.01 the float32 rounding between two ways of summing the same
# numbers (or between 1 and 2 threads in one process) grows to 1e-3 of the loss in 4 steps.
RUN = ["optim=sgd", "model=torchvision", "model.arch=resnet18", "batch_size=16", f"steps={STEPS}",
       "epochs=null", "eval_every=0", "log_every=2", "dataset.n_train=128", "dataset.n_val=32",
       "dataset.image_size=8", "precise_bn_batches=2", "lr=0.001"]
TAGS = ("train/loss", "train/acc", "val/loss", "val/acc")


def last_checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / f"step_{STEPS:08d}.pt", weights_only=True)


def assert_same_training(two: Path, one: Path) -> None:
    """The two-process run and the one-process one: the same curves and final state, to the
    float32 rounding of summing the same numbers in another order."""
    a, b = read_scalars(two), read_scalars(one)
    for tag in TAGS:
        assert [s for s, _ in a[tag]] == [s for s, _ in b[tag]], tag
        for (_, x), (_, y) in zip(a[tag], b[tag], strict=True):
            assert x == pytest.approx(y, rel=1e-4), tag
    mine, theirs = last_checkpoint(two), last_checkpoint(one)
    assert mine["model"].keys() == theirs["model"].keys()
    for key, value in theirs["model"].items():  # the running statistics too
        torch.testing.assert_close(mine["model"][key], value, rtol=1e-2, atol=1e-3, msg=key)


def test_two_processes_with_syncbn_train_a_torchvision_resnet_as_one_process(tmp_path):
    result = torchrun("train", *RUN, "norm.sync=true", "hydra.run.dir=runs/two", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    two = tmp_path / "runs" / "two"
    summary = json.loads((two / "summary.json").read_text())
    assert (summary["status"], summary["model"], summary["world_size"]) == \
        ("completed", "torchvision", 2)
    assert (summary["global_batch"], summary["stats_batch"]) == (32, 32)
    assert {t.split("/", 2)[2] for t in read_scalars(two) if t.startswith("bn_gap/dmu/")} \
        >= {"bn1", "layer4.1.bn2", "layer2.0.downsample.1"}
    # One process on the global batch of 32, BatchNorm over all of it.
    config = compose_config([*(o for o in RUN if not o.startswith("batch_size=")),
                             "batch_size=32"])
    one = run_experiment(config, tmp_path / "one", live=False)
    assert one["status"] == "completed" and one["stats_batch"] == 32
    # Not val_batchstats: rank 0 evaluates alone and normalizes the validation batch by
    # itself there, as test_torchrun's per-device runs do.
    assert_same_training(two, tmp_path / "one")
