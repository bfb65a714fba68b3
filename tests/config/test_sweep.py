"""Sweeps: expanded as Hydra's basic sweeper expands them, presets compose, local parallel
jobs get their share of the cores, and a failing or diverging job is isolated and reported
only after every job is done."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from hydra import compose
from omegaconf import OmegaConf

from normbench.cli import preflight, threads_per_job
from normbench.config.compose import compose_jobs
from normbench.config.tree import config_options, initialized
from normbench.errors import UserError
from normbench.report.command import report_command
from tests.helpers.common import TINY, compose_config
from tests.helpers.images import write_imagefolder


def summaries(sweep_root: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text())
            for p in sorted(sweep_root.glob("runs/sweeps/*/*/summary.json"))}


def sweeper_params(experiment: str) -> dict:
    with initialized():
        cfg = compose("train", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    return OmegaConf.to_container(cfg.hydra.sweeper.params)


def grid(jobs: list[dict], *keys: str) -> list[tuple]:
    """Each job's values of dotted `keys`, in job order."""
    def get(config, key):
        for part in key.split("."):
            config = config[part]
        return config
    return [tuple(get(job, k) for k in keys) for job in jobs]


def test_a_sweep_expands_choices_and_ranges_last_key_fastest():
    jobs = compose_jobs(["norm=batch,group", "batch_size=range(2,9,2)", "steps=3"], multirun=True)
    assert grid(jobs, "norm.name", "batch_size") == [
        ("batch", 2), ("batch", 4), ("batch", 6), ("batch", 8),
        ("group", 2), ("group", 4), ("group", 6), ("group", 8)]
    assert {job["steps"] for job in jobs} == {3}
    assert jobs[4]["norm"]["num_groups"] == 8  # each job composed with its own group option


def test_a_glob_sweeps_every_option_of_a_group():
    jobs = compose_jobs(["norm=glob(*,exclude=none)", "steps=3"], multirun=True)
    from normbench.config.tree import config_options

    assert grid(jobs, "norm.name") == [(n,) for n in config_options("norm") if n != "none"]


def test_a_preset_sweeps_its_params_and_the_command_line_replaces_one_in_place():
    # Hydra's sweeper: the preset's params first, then the command line; a key given twice
    # keeps its first place and takes its last value.
    params = sweeper_params("lr_sweep")
    jobs = compose_jobs(["experiment=lr_sweep", "lr_factor=0.5,2"], multirun=True)
    norms = params["norm"].split(",")
    seeds = [int(s) for s in params["seed"].split(",")]
    assert grid(jobs, "norm.name", "lr", "seed") == [
        (n, lr, s) for n in norms for lr in (0.1, 0.4) for s in seeds]  # x the setup's 0.2
    assert {(job["epochs"], job["batch_size"]) for job in jobs} == {(18, 32)}  # the setup's epochs


def test_without_multirun_a_preset_is_one_job():
    (job,) = compose_jobs(["experiment=lr_sweep"])
    # the setup's lr at batch 32 and the default norm, not the grid
    assert job["lr"] == 0.2 and job["norm"]["name"] == "batch"


@pytest.mark.parametrize("batch_size, lr", [(2, 0.0125), (4, 0.025), (8, 0.05), (16, 0.1),
                                            (32, 0.2)])
def test_batch_size_sweep_scales_lr_linearly_and_keeps_epochs(batch_size, lr):
    cfg = compose_config(["experiment=batch_size_sweep", f"batch_size={batch_size}"])
    assert cfg["lr"] == pytest.approx(cfg["base_lr"] * batch_size / cfg["base_batch_size"])
    assert cfg["lr"] == pytest.approx(lr)
    assert cfg["epochs"] == 18  # same epochs at every batch size: more steps when small
    assert cfg["log_every"] * batch_size == 256  # a log point every 256 samples
    assert (cfg["dataset"]["name"], cfg["model"]["name"]) == ("shapes", "resnet")


def test_batch_size_sweep_grid_is_norms_by_batch_sizes_by_seeds():
    params = sweeper_params("batch_size_sweep")
    assert params["norm"].split(",") == ["batch", "group", "layer", "none"]
    assert [int(b) for b in params["batch_size"].split(",")] == [2, 4, 8, 16, 32]
    assert len(params["seed"].split(",")) >= 2


@pytest.mark.parametrize("setup, base_lr", [("shapes_small", 0.2), ("cifar10", 0.1),
                                             ("tinyshakespeare", 1e-3), ("text_char", 1e-3)])
def test_lr_sweep_grid_is_relative_to_the_setups_lr(setup, base_lr):
    # SGD setups get an SGD grid, the AdamW text setups an AdamW one: 1/8 to 8 times base_lr.
    params = sweeper_params("lr_sweep")
    assert params["norm"].split(",") == ["batch", "group", "layer", "none"]
    jobs = compose_jobs(["experiment=lr_sweep", f"setup={setup}", "norm=batch", "seed=0"],
                        multirun=True)
    assert [job["lr"] for job in jobs] == pytest.approx([base_lr * 2.0 ** k for k in range(-3, 4)])
    assert {job["optim"]["name"] for job in jobs} == {"adamw" if base_lr < 0.01 else "sgd"}


@pytest.mark.slow
def test_a_swept_key_that_a_fixed_value_overrules_is_refused():
    # lr=0.1 fixes what lr_sweep's lr_factor would set: 7 identical jobs per norm and seed.
    with pytest.raises(UserError, match=r"lr_factor=0.125 and lr_factor=0.25 give the same job"):
        preflight(["experiment=lr_sweep", "lr=0.1"], True)
    with pytest.raises(UserError, match=r"base_lr=0.1 and base_lr=0.2 give the same job"):
        preflight(["setup=shapes_small", "base_lr=0.1,0.2", "lr=0.3", "debug=tiny"], True)
    # A swept lr itself, or a factor that reaches lr, is a real sweep.
    assert preflight(["norm=batch", "lr=0.1,0.2", "debug=tiny"], True)
    assert preflight(["setup=shapes_small", "base_lr=0.1,0.2", "debug=tiny"], True)


@pytest.mark.slow
def test_preflight_expands_preset_params_and_checks_every_job():
    # A command-line value replaces the preset's sweep of the same key (as in Hydra's
    # sweeper), and every job is composed and checked before any runs.
    assert preflight(["experiment=lr_sweep", "norm=group", "seed=0", "lr_factor=0.5"], True)
    with pytest.raises(UserError, match="lr=-1.0 must be a positive number"):
        preflight(["experiment=lr_sweep", "lr=0.1,-1.0"], True)
    with pytest.raises(UserError, match="batch_size=0 must be a positive integer"):
        preflight(["experiment=batch_size_sweep", "batch_size=2,0"], True)
    with pytest.raises(UserError, match="cannot compute lr: ZeroDivisionError"):
        preflight(["experiment=batch_size_sweep", "base_batch_size=0"], True)


@pytest.mark.slow
@pytest.mark.parametrize("preset", config_options("experiment"))
def test_every_job_of_every_preset_passes_the_checks(preset):
    # Each preset's own sweep is expanded and every job composed and checked: a preset key
    # that some job's builder would not read fails here, not in the middle of a sweep.
    assert preflight([f"experiment={preset}"], True) is not None


@pytest.mark.slow  # a whole sweep's pre-flight
def test_a_preset_on_another_dataset_keeps_its_sizes_or_is_refused():
    # Image datasets read the preset's n_train / n_val / image_size (honoured, not dropped);
    # a text dataset reads no image_size, and the line names the preset it came from.
    assert preflight(["experiment=batch_size_sweep", "dataset=cifar10", "seed=0"], True)
    cfg = compose_config(["experiment=batch_size_sweep", "dataset=cifar10"])
    assert (cfg["dataset"]["n_train"], cfg["dataset"]["image_size"]) == (2000, 16)
    with pytest.raises(UserError, match=r"dataset.image_size \(from the preset "
                                         r"setup=shapes_small\) is not an option of "
                                         r"dataset=synthetic_text"):
        preflight(["experiment=batch_size_sweep", "dataset=synthetic_text", "model=transformer"],
                  True)
    with pytest.raises(UserError, match=r"\(from the command line\) is not an option of "
                                         r"norm=group"):
        preflight(["experiment=lr_sweep", "++norm.stats_batch=4"], True)


def test_a_key_only_the_swept_options_have_is_applied_per_job():
    # The sweep's base composes the default option (dataset=shapes, no root): the key is
    # held out of the base and handed to Hydra as a one-value sweep, applied per job.
    from normbench.config.compose import compose_sweep

    sweep = compose_sweep(["dataset=cifar10,cifar100", "dataset.root=/data/x", "seed=0"], True)
    assert [(j.config["dataset"]["name"], j.config["dataset"]["root"]) for j in sweep.jobs] == [
        ("cifar10", "/data/x"), ("cifar100", "/data/x")]
    assert sweep.hydra_overrides == ["dataset=cifar10,cifar100", "dataset.root=choice(/data/x)",
                                     "seed=0"]
    empty = compose_sweep(["dataset=cifar10,cifar100", "dataset.root=", "seed=0"], True)
    assert empty.hydra_overrides[1] == "dataset.root=choice('')"
    # Keys the base has stay as they were; a job whose option lacks the key is refused.
    assert compose_sweep(["norm=batch,group", "seed=0"], True).hydra_overrides == [
        "norm=batch,group", "seed=0"]
    with pytest.raises(UserError, match=r"dataset.root \(from the command line\) is not an "
                                         r"option of dataset=shapes"):
        compose_sweep(["dataset=cifar10,shapes", "dataset.root=/data/x"], True)


@pytest.mark.slow
def test_cli_sweeps_a_group_whose_options_take_a_key_the_default_lacks(cli, tmp_path):
    # stat_gap's default gap_setup trains on images (no dataset.seq_len); both text setups
    # read it. Hydra alone would refuse the base config of this sweep.
    result = cli("train", "-m", "experiment=stat_gap", "gap_setup=transformer_text,lstm_text",
                 "dataset.seq_len=40", "seed=0", "debug=tiny")
    assert result.returncode == 0, result.stderr[-2000:]
    runs = summaries(tmp_path)
    assert sorted((s["model"], s["status"]) for s in runs.values()) == [
        ("lstm", "completed"), ("transformer", "completed")]
    configs = sorted((tmp_path / "runs" / "sweeps").glob("*/*/config.json"))
    assert [json.loads(c.read_text())["dataset"]["seq_len"] for c in configs] == [40, 40]


def test_threads_per_job_shares_the_cores(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)), raising=False)
    joblib = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
    assert threads_per_job({"_target_": joblib, "n_jobs": 2}) == 4
    assert threads_per_job({"_target_": joblib, "n_jobs": 3}) == 2
    assert threads_per_job({"_target_": joblib, "n_jobs": -1}) == 1  # one job per core
    assert threads_per_job({"_target_": joblib, "n_jobs": -3}) == 1  # 6 jobs on 8 cores
    assert threads_per_job({"_target_": joblib, "n_jobs": 16}) == 1
    basic = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
    assert threads_per_job({"_target_": basic}) is None  # one job at a time: torch's default


@pytest.mark.slow
def test_joblib_sweep_with_a_diverging_job_finishes_the_others(cli, tmp_path, capsys):
    # lr=1e6 without normalization: the loss is non-finite within the first log steps.
    result = cli("train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                 "norm=none", "lr=1e6,0.05", "seed=0,1", "debug=tiny")
    assert result.returncode == 1, result.stderr[-2000:]
    runs = summaries(tmp_path)
    assert len(runs) == 4
    by_lr = {}
    for name, summary in runs.items():
        by_lr.setdefault(summary["lr"], []).append(summary["status"])
        assert len(list((tmp_path / "runs" / "sweeps").glob(f"*/{name}/.hydra/config.yaml"))) == 1
    assert by_lr == {1e6: ["diverged", "diverged"], 0.05: ["completed", "completed"]}
    assert all(s["steps"] == 6 for s in runs.values() if s["status"] == "completed")
    # The sweep's verdict comes once, at the end, naming each job that did not complete.
    last_lines = result.stderr.strip().splitlines()[-3:]
    assert "4 jobs, 2 completed, 2 not completed" in last_lines[0]
    assert all(line.endswith(": diverged") and "lr=1000000.0" in line for line in last_lines[1:])
    # Job folders: numbered in compose_jobs' order (the order the pre-flight checked them
    # in), then the values the job was given (debug=tiny left out).
    names = sorted(runs)
    expected = compose_jobs(["norm=none", "lr=1e6,0.05", "seed=0,1", *TINY], multirun=True)
    assert [(runs[n]["lr"], runs[n]["seed"]) for n in names] == grid(expected, "lr", "seed")
    assert [n.split("_")[0] for n in names] == ["0", "1", "2", "3"]
    assert names[0] == "0_lr=1000000.0,norm=none,seed=0"
    assert runs[names[0]]["run_name"] == "shapes-resnet-none-bs32_lr=1000000.0,norm=none,seed=0"

    # The report marks the diverged cell and keeps it out of the mean.
    # (In-process: the 2x2 test in test_report.py runs the report through the CLI.)
    (sweep,) = (tmp_path / "runs" / "sweeps").iterdir()
    assert report_command([str(sweep), "--no-plots"]) == 0
    assert "2 diverged" in capsys.readouterr().out
    with open(sweep / "report.csv", newline="") as f:
        rows = {float(r["lr"]): r for r in csv.DictReader(f)}
    assert (rows[1e6]["n_diverged"], rows[1e6]["n_completed"], rows[1e6]["mean"]) == ("2", "0", "")
    assert (rows[0.05]["n_diverged"], rows[0.05]["n_completed"]) == ("0", "2")
    assert "**diverged** (at step" in (sweep / "report.md").read_text()


@pytest.mark.slow
def test_failing_job_is_recorded_and_isolated(cli, tmp_path):
    # One image folder has its class folders but no image in them: the pre-flight, which
    # lists folders and no files, cannot know, so that job fails at run time; the sweep
    # records it as failed and the other job still completes.
    write_imagefolder(tmp_path / "good", per_class=12)
    for split in ("train", "val"):
        (tmp_path / "nope" / split / "cat").mkdir(parents=True)
    tiny = [o for o in TINY if not o.startswith(("dataset.", "batch_size="))]
    result = cli("train", "-m", "dataset=imagefolder",
                 f"dataset.root={tmp_path}/good,{tmp_path}/nope", "norm=none", "batch_size=8",
                 *tiny)
    assert result.returncode == 1, result.stderr[-2000:]
    runs = sorted(summaries(tmp_path).values(), key=lambda s: s["status"])
    assert [s["status"] for s in runs] == ["completed", "failed"]
    assert runs[0]["n_train"] == 36  # every image of the good folder
    assert "nope" in runs[1]["error"]
    assert "2 jobs, 1 completed, 1 not completed" in result.stderr
    assert result.stderr.strip().endswith(": failed")
