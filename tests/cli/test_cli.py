"""The `normbench` command as a user meets it: subprocess runs, help, list, a sweep refused
before it starts. (Bad single-run input: test_cli_errors.py.)"""

import json
import subprocess
import sys

import pytest

from normbench.engine.train import run_experiment
from tests.helpers.common import REPO, TINY, run_cli
from tests.helpers.images import write_imagefolder

pytestmark = pytest.mark.slow  # every test runs the CLI or a training


def one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_help_lists_the_subcommands(cli):
    result = cli("--help")
    assert result.returncode == 0
    for command in ("train", "list"):
        assert command in result.stdout


def test_unknown_subcommand(cli):
    one_line_error(cli("trian"), "unknown command 'trian'", "did you mean 'train'")


def test_train_help_lists_config_groups(cli):
    result = cli("train", "--help")
    assert result.returncode == 0
    for group in ("dataset", "model", "norm", "optim", "sched"):
        assert f"{group}:" in result.stdout
    assert "normbench train" in result.stdout


def test_list_reads_the_config_tree(cli):
    out = cli("list").stdout
    for name in ("shapes", "cifar10", "cifar100", "imagefolder", "resnet", "batch", "layer",
                 "group", "none", "batch_renorm", "power", "instance", "rms", "frn", "dyt",
                 "weight"):
        assert name in out
    assert "CIFAR ResNet" in out  # the description line of conf/model/resnet.yaml
    # per-layer counts in each layout: learned + kept for inference
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    assert rows["batch"] == ["batch", "2C", "+", "2C", "2C", "+", "2C", "2C", "+", "2CT"]
    assert rows["layer"] == ["layer", "2C", "2C", "2C"]


def test_train_runs_end_to_end(tmp_path, cli):
    result = cli("train", *TINY)
    assert result.returncode == 0, result.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("shapes-resnet-batch-bs32_")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 6
    # ResNet-8 with BatchNorm: 7 norm layers of 16, 32 or 64 channels, 2C learned + 2C kept
    channels = 16 * 3 + 32 * 2 + 64 * 2
    assert summary["norm_params"] == summary["norm_state"] == 2 * channels
    assert (run_dir / ".hydra" / "config.yaml").exists()
    assert list(run_dir.glob("events.out.tfevents.*"))
    assert "tensorboard --logdir" in result.stdout


def test_cfg_job_prints_the_composed_config(cli):
    result = cli("train", "--cfg", "job", "norm=layer")
    assert result.returncode == 0 and "name: layer" in result.stdout


def test_two_runs_started_together_do_not_collide(tmp_path):
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "normbench", "train", *TINY, "steps=2"],
                              cwd=tmp_path, env={**env, "PATH": "/usr/bin:/bin"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 2
    assert all(json.loads((r / "summary.json").read_text())["status"] == "completed" for r in runs)


def test_a_bad_job_in_a_sweep_is_rejected_before_any_job_runs(tmp_path):
    result = run_cli("train", "-m", *TINY, "norm=group", "norm.num_groups=4,7", cwd=tmp_path)
    one_line_error(result, "num_groups=7")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("overrides", [["norm=group"], ["norm=layer"], ["norm=none"],
                                       ["model.depth=56", "steps=2"]])
def test_variants_train(tmp_path, tiny_config, overrides):
    summary = run_experiment(tiny_config(*overrides), tmp_path, live=False)
    assert summary["status"] == "completed"
    assert summary["final"]["train_loss"] > 0


def test_imagefolder_through_the_cli(tmp_path, cli):
    write_imagefolder(tmp_path / "folder", classes=("cat", "dog", "owl", "fox"), per_class=30)
    result = cli("train", "dataset=imagefolder", f"dataset.root={tmp_path / 'folder'}",
                 "dataset.n_train=64", "dataset.n_val=64", "batch_size=8", "steps=2",
                 "log_every=2", "model.depth=8")
    assert result.returncode == 0, result.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["dataset"] == "imagefolder"
    assert (summary["n_train"], summary["n_val"]) == (64, 64)  # of 120 in each split
    assert "n_train: 64" in (run_dir / ".hydra" / "config.yaml").read_text()


def test_imagefolder_without_root_is_a_user_error(cli):
    one_line_error(cli("train", "dataset=imagefolder"), "dataset.root")


@pytest.mark.slow
def test_a_diverged_run_ends_with_a_line_that_says_what_to_try(cli, tmp_path):
    result = cli("train", *TINY, "norm=none", "lr=1e6", "model.residual_init=default",
                 "hydra.run.dir=runs/r")
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr + result.stdout
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("diverged: non-finite loss or gradient norm at step "), last
    for fragment in ("lr=500000", "model.residual_init=zero",
                     "normbench train -m experiment=lr_sweep norm=none"):
        assert fragment in last, last
    summary = json.loads((tmp_path / "runs" / "r" / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["residual_init"] == "default"


def test_the_hint_leaves_out_the_init_a_run_already_had(tiny_config):
    from normbench.engine.train import divergence_hint

    assert "model.residual_init=zero" in divergence_hint(tiny_config("lr=0.4"))
    zero = divergence_hint(tiny_config("lr=0.4", "model.residual_init=zero"))
    assert "residual_init" not in zero and "lr=0.2" in zero
    lstm = divergence_hint(tiny_config("model=lstm", "norm=layer"))  # no residual branches
    assert "residual_init" not in lstm and "norm=layer" in lstm
