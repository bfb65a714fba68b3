"""`normbench train dataset=imagefolder dataset.stream=true` end to end on a generated folder
of JPEGs of mixed sizes: a run trains and evaluates; SIGKILL mid-epoch and resume=auto end
as the uninterrupted run; a truncated JPEG mid-epoch is skipped, named and counted; a bad
layout is one line before anything is written; and two torchrun processes read disjoint
shards that together are each epoch, training as one process does at the global batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from normbench.data.synthetic import write_shapes_folder
from tests.helpers.common import REPO, read_scalars, run_cli, run_with_fault

pytestmark = pytest.mark.slow

N_TRAIN, N_VAL, BATCH = 60, 23, 8  # 7 steps per epoch
STEPS = 12


def run_options(root: Path, *extra: str, lr: float = 0.02) -> list[str]:
    return ["dataset=imagefolder", f"dataset.root={root}", "dataset.stream=true",
            "dataset.image_size=24", "dataset.workers=2", "model.depth=8", f"batch_size={BATCH}",
            f"steps={STEPS}", "epochs=null", "log_every=2", "eval_every=0", "checkpoint_every=4",
            "keep_checkpoints=2", f"lr={lr}", "precise_bn_batches=2", *extra]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("jpegs")
    write_shapes_folder(root, n_train=N_TRAIN, n_val=N_VAL, min_size=20, max_size=90)
    return root


@pytest.fixture(scope="module")
def reference(folder, tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("reference")
    result = run_cli("train", *run_options(folder), "hydra.run.dir=runs/ref", cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd / "runs" / "ref"


def summary_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_a_streamed_run_trains_and_evaluates_on_every_image(reference):
    summary = summary_of(reference)
    assert summary["status"] == "completed" and summary["steps"] == STEPS
    assert (summary["n_train"], summary["n_val"]) == (N_TRAIN, N_VAL)
    assert summary["skipped_draws"] == 0 and summary["unreadable_images"] == {}
    final = summary["final"]
    for key in ("val_loss", "val_acc", "val_batchstats_loss", "val_precise_loss"):
        assert final[key] == final[key] and 0 <= final["val_acc"] <= 1, key  # finite
    losses = [v for _, v in read_scalars(reference)["train/loss"]]
    assert len(losses) == STEPS // 2 and losses[-1] < losses[0]  # it learns


def test_sigkill_mid_epoch_then_resume_auto_ends_as_the_uninterrupted_run(folder, reference,
                                                                           tmp_path):
    # Killed at step 10, the newest checkpoint is step 8: epoch 1, one step into it.
    killed = run_with_fault("kill", 10, "train", *run_options(folder), "hydra.run.dir=runs/r",
                            cwd=tmp_path)
    assert killed.returncode == -9
    resumed = run_cli("train", *run_options(folder), "hydra.run.dir=runs/r", "resume=auto",
                      cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got, want = summary_of(tmp_path / "runs" / "r"), summary_of(reference)
    assert got["resumed_from_step"] == 8
    assert got["final"] == want["final"]  # exact
    curves, reference_curves = read_scalars(tmp_path / "runs" / "r"), read_scalars(reference)
    assert curves["train/loss"] == reference_curves["train/loss"]


def test_a_truncated_jpeg_mid_epoch_is_skipped_named_and_counted(folder, tmp_path):
    root = tmp_path / "jpegs"
    shutil.copytree(folder, root)
    bad = sorted((root / "train" / "ring").glob("*.jpg"))[2]
    data = bad.read_bytes()
    bad.write_bytes(data[:len(data) // 2])
    result = run_cli("train", *run_options(root), "hydra.run.dir=runs/r", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [ln for ln in result.stderr.splitlines() if "unreadable image" in ln]
    assert len(lines) == 1 and str(bad) in lines[0] and "truncated" in lines[0], result.stderr
    summary = summary_of(tmp_path / "runs" / "r")
    assert summary["status"] == "completed" and list(summary["unreadable_images"]) == [str(bad)]
    # 12 steps of 8 = 96 draws from 60 images: the file is drawn once or twice (drop-last)
    assert summary["skipped_draws"] in (1, 2)


@pytest.mark.parametrize("layout,message", [
    ("empty", "train is not a folder"),
    ("no_val", "val is not a folder"),
    ("extra_val_class", "(only val/ has zebra)"),
])
def test_a_bad_layout_is_one_line_in_the_pre_flight(folder, tmp_path, layout, message):
    root = tmp_path / "data"
    root.mkdir()
    if layout != "empty":
        shutil.copytree(folder / "train", root / "train")
    if layout == "extra_val_class":
        shutil.copytree(folder / "val", root / "val")
        shutil.copytree(folder / "val" / "disk", root / "val" / "zebra")
    result = run_cli("train", *run_options(root), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "runs").exists()


def test_two_torchrun_processes_read_disjoint_shards_that_are_the_epoch(folder, reference,
                                                                          tmp_path):
    draws = tmp_path / "draws"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "NB_DRAWS": str(draws)}
    env.pop("NORMBENCH_STAMP", None)
    # A small lr for the comparison below: float32 rounding between two ways of summing the
    # same numbers (DDP's average of two gradients, one process's sum) grows with the lr.
    options = [o for o in run_options(folder, lr=0.005) if not o.startswith("batch_size=")]
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "tests.helpers.record_draws", "train", *options, f"batch_size={BATCH // 2}",
         "hydra.run.dir=runs/two"], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((draws / f"rank{r}.json").read_text()) for r in range(2)]
    steps = N_TRAIN // BATCH
    for epoch in ("0/0", "0/1"):  # seed 0; 12 steps: epoch 0 whole, epoch 1 in part
        a, b = ranks[0][epoch], ranks[1][epoch]
        assert len(a) == len(b) and not set(a) & set(b)
    whole = ranks[0]["0/0"] + ranks[1]["0/0"]
    assert len(whole) == steps * BATCH and len(set(whole)) == len(whole)  # the epoch, less the tail
    # Together they are one process's draws at the global batch (the reference, BN over 4+4)
    summary = summary_of(tmp_path / "runs" / "two")
    assert summary["world_size"] == 2 and summary["global_batch"] == BATCH
    assert summary["n_val"] == N_VAL  # every validation image, read in strides by the ranks
    ghost = run_cli("train", *run_options(folder, lr=0.005), f"norm.stats_batch={BATCH // 2}",
                    "hydra.run.dir=runs/one", cwd=tmp_path)
    assert ghost.returncode == 0, ghost.stderr[-3000:]
    one, two = read_scalars(tmp_path / "runs" / "one"), read_scalars(tmp_path / "runs" / "two")
    for tag in ("train/loss", "val/loss"):  # (an accuracy moves by 1/23 on one prediction)
        for (_, x), (_, y) in zip(one[tag], two[tag], strict=True):
            assert x == pytest.approx(y, rel=1e-3), tag
