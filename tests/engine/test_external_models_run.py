"""The features normbench's own models have, on models built elsewhere: torchvision's
ResNet-18 (every norm replaced, or its own with norm=native), a timm model, a custom
builder. Runs in-process at 8 px (ResNet-18's last stages see 1x1 maps: cheap), a few
steps each; an interrupted run resumed bit for bit; the statistics-batch preset as a sweep
with its report, through the CLI. The two-process run is tests/cli/test_torchrun_external.py's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from normbench.config.checks import check_config
from normbench.engine.experiment import build_model_within_memory
from normbench.engine.train import run_experiment
from normbench.errors import UserError
from tests.helpers.common import compose_config, read_scalars, run_cli

slow = pytest.mark.slow  # every test here but the first trains

SMALL = ["optim=sgd", "batch_size=16", "epochs=null", "eval_every=0", "log_every=2", "dataset.n_train=64",
         "dataset.n_val=32", "dataset.image_size=8", "precise_bn_batches=2"]
TORCHVISION = ["model=torchvision", "model.arch=resnet18"]
BN_LAYERS = 20  # torchvision's ResNet-18: bn1, 2 per basic block x 8, 3 downsample BNs


def test_a_model_too_large_for_memory_is_named_by_its_arch(monkeypatch):
    import normbench.engine.experiment as experiment

    def refuse(*args):
        raise MemoryError("cannot allocate 90 GB")

    monkeypatch.setattr(experiment, "build_model", refuse)
    options = compose_config([*TORCHVISION, "+model.kwargs.width_per_group=4096"])["model"]
    with pytest.raises(UserError) as error:
        build_model_within_memory(options, None, None, torch.device("cpu"))
    assert str(error.value) == (
        "model=torchvision does not fit in the memory of cpu (model.arch=resnet18, "
        "model.kwargs={'width_per_group': 4096}: cannot allocate 90 GB). Fix: use a smaller "
        "model.arch, or model.kwargs that make it smaller.")


# The pre-flight builds these models on the CPU: norms without a scale (weight, none) need
# the gammas' values the builder set (zero_init_residual makes a ZeroGate).
@pytest.mark.parametrize("norm", ["batch", "native", "weight", "none"])
def test_the_pre_flight_check_builds_a_torchvision_model_with_each_norm(norm):
    check_config(compose_config([*SMALL, "steps=2", *TORCHVISION, f"norm={norm}"]))


def test_a_norm_without_a_tokens_version_names_the_place_that_sees_tokens():
    config = compose_config([*SMALL, "steps=2", "dataset.image_size=16", "norm=frn",
                             "model=torchvision", "model.arch=vit_b_16",
                             "+model.kwargs.image_size=16"])
    with pytest.raises(UserError, match=r"^model=torchvision model.arch=vit_b_16: the norm at "
                                        r"encoder\.layers\.encoder_layer_0\.ln_1 sees tokens "
                                        r"\(2, 2, 768\), and norm=frn has no version for tokens"):
        check_config(config)


def run(tmp_path: Path, name: str, *overrides: str, steps: int = 2,
        model: list[str] = TORCHVISION) -> tuple[dict, dict]:
    """(summary, scalars) of an in-process run."""
    config = compose_config([*SMALL, f"steps={steps}", *model, *overrides])
    summary = run_experiment(config, tmp_path / name, live=False)
    assert summary["status"] == "completed", summary
    assert math.isfinite(summary["final"]["train_loss"])
    return summary, read_scalars(tmp_path / name)


def layers_of(scalars: dict, family: str) -> set[str]:
    return {tag.removeprefix(family) for tag in scalars if tag.startswith(family)}


def batchnorm_paths(model: nn.Module) -> set[str]:
    return {name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}


@pytest.fixture(scope="module")
def resnet18_paths() -> set[str]:
    import torchvision

    paths = batchnorm_paths(torchvision.models.resnet18())
    assert len(paths) == BN_LAYERS
    return paths


@pytest.fixture(scope="module")
def batch_run(tmp_path_factory) -> tuple[dict, dict]:
    return run(tmp_path_factory.mktemp("batch"), "run")


@slow
def test_norm_batch_probes_every_bn_layer_and_counts_its_parameters(batch_run, resnet18_paths):
    summary, scalars = batch_run
    for family in ("bn_gap/dmu/", "bn_gap/tid_sigma/", "bn_gap/precise_dmu/", "act/out_std/"):
        assert layers_of(scalars, family) == resnet18_paths, family
    assert {"val_precise_acc", "val_batchstats_acc", "val_gap_acc"} <= set(summary["final"])
    # gamma and beta, running mean and variance: 2 x 4800 channels over the 20 layers
    assert summary["norm_params"] == summary["norm_state"] == 9600
    assert summary["residual_init"] is None and summary["n_params"] > 11_000_000
    assert summary["arch"] == "resnet18"  # which torchvision model, in summary.json and HParams


@slow
def test_norm_native_keeps_torch_batchnorm_which_the_probes_and_counts_see(tmp_path, batch_run,
                                                                          resnet18_paths):
    summary, scalars = run(tmp_path, "native", "norm=native")
    for family in ("bn_gap/dmu/", "bn_gap/precise_dvar/", "bn_gap/degenerate/", "act/in_std/"):
        assert layers_of(scalars, family) == resnet18_paths, family
    assert {"val_precise_acc", "val_batchstats_acc"} <= set(summary["final"])
    assert summary["stats_batch"] is None  # not normbench's option: torch's BN uses the batch
    # torch's BatchNorm2d holds what normbench's holds: the same counts as norm=batch
    assert (summary["norm_params"], summary["norm_state"]) == (9600, 9600)
    # ... and trains the same: normbench's BN in its place computes what torch's does
    assert summary["final"]["train_loss"] == pytest.approx(
        batch_run[0]["final"]["train_loss"], rel=1e-5)


def reparametrized(run_dir: Path) -> tuple[int, int]:
    """(weight-normed layers, conv and linear layers) in a run's last checkpoint."""
    (path,) = (run_dir / "checkpoints").glob("*.pt")
    keys = torch.load(path, weights_only=True)["model"].keys()
    normed = {k.split(".parametrizations.")[0] for k in keys if ".parametrizations.weight." in k}
    plain = {k.rsplit(".", 1)[0] for k in keys
             if k.endswith(".weight") and ("conv" in k or "fc" in k or "downsample.0" in k)}
    return len(normed), len(normed | plain)


@slow
@pytest.mark.parametrize("overrides, bn", [(["norm.weight_norm=true"], True),
                                           (["norm=weight"], False)])
def test_weight_normalization_reparametrizes_every_conv_and_linear(tmp_path, overrides, bn):
    summary, scalars = run(tmp_path, "wn", *overrides)
    normed, layers = reparametrized(tmp_path / "wn")
    assert normed == layers == 21  # 17 convs, 3 downsample convs, the fc head
    assert bool(layers_of(scalars, "bn_gap/dmu/")) == bn


@slow
def test_bf16_and_both_memory_formats(tmp_path, batch_run):
    # With the CIFAR stem: at 8 px the ImageNet stem leaves 1x1 maps for the stride-2 convs
    # of layer3 and layer4, where torch's CPU bf16 convolution returns an infinite weight
    # gradient (a torch fault, native BN alike: the run ends diverged at step 1).
    bf16, _ = run(tmp_path, "bf16", "precision=bf16", "model.cifar_stem=true")
    assert bf16["precision"] == "bf16"
    nchw, _ = run(tmp_path, "nchw", "channels_last=false")
    assert nchw["channels_last"] is False and batch_run[0]["channels_last"] is True
    # the same computation in another memory layout: only the rounding differs
    assert nchw["final"]["train_loss"] == pytest.approx(batch_run[0]["final"]["train_loss"],
                                                        rel=1e-4)


@slow
def test_ghost_batchnorm_normalizes_groups_of_stats_batch(tmp_path, resnet18_paths):
    summary, scalars = run(tmp_path, "ghost", "norm.stats_batch=4")
    assert summary["stats_batch"] == 4
    assert layers_of(scalars, "bn_gap/dmu/") == resnet18_paths


@slow
def test_a_timm_model_trains_with_normbench_batchnorm_in_place_of_its_own(tmp_path):
    timm = pytest.importorskip("timm")
    summary, scalars = run(tmp_path, "timm", model=["model=timm", "model.arch=resnet18"])
    expected = {name for name, m in timm.create_model("resnet18").named_modules()
                if isinstance(m, nn.BatchNorm2d)}
    assert len(expected) == BN_LAYERS
    assert layers_of(scalars, "bn_gap/dmu/") == expected
    assert summary["norm_params"] == 9600


CUSTOM = '''
from torch import nn


def tiny(num_classes, norm_layer=nn.BatchNorm2d, width=8):
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), norm_layer(width),
                         nn.ReLU(), nn.Conv2d(width, width, 3, padding=1, bias=False),
                         norm_layer(width), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, num_classes))
'''


@slow
@pytest.mark.parametrize("norm", ["batch", "native"])
def test_a_custom_builder_from_a_file(tmp_path, norm):
    (tmp_path / "my_model.py").write_text(CUSTOM)
    summary, scalars = run(tmp_path, "custom", f"norm={norm}", model=[
        "model=custom", f"model.target={tmp_path / 'my_model.py'}:tiny", "+model.kwargs.width=6"])
    assert layers_of(scalars, "bn_gap/dmu/") == {"1", "4"}
    assert (summary["norm_params"], summary["norm_state"]) == (24, 24)  # 2 layers x 6 x 2
    assert summary["model"] == "custom"


# ----------------------------------------------------------------------------- exact resume

RESUME = ["checkpoint_every=2", "keep_checkpoints=2", "log_every=2"]


@slow
def test_an_interrupted_run_resumed_with_resume_auto_ends_bit_identical(tmp_path, monkeypatch):
    """SIGTERM in step 3 (between checkpoints and logging steps): the run stops with a
    checkpoint of step 3 and its half-summed running means; resume=auto continues from it
    and ends as the uninterrupted run, bit for bit (weights, running statistics, momentum,
    final metrics, TensorBoard curves)."""
    import os
    import signal

    import normbench.engine.train as train

    reference, _ = run(tmp_path, "ref", *RESUME, steps=5)
    original, calls = train.loss_and_counts, []

    def stop_in_step_3(logits, batch):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(logits, batch)

    monkeypatch.setattr(train, "loss_and_counts", stop_in_step_3)
    config = compose_config([*SMALL, "steps=5", *TORCHVISION, *RESUME])
    stopped = run_experiment(config, tmp_path / "r", live=False)
    assert (stopped["status"], stopped["steps"]) == ("interrupted", 3)
    monkeypatch.setattr(train, "loss_and_counts", original)

    resumed = run_experiment({**config, "resume": "auto"}, tmp_path / "r", live=False)
    assert resumed["resumed_from_step"] == 3 and resumed["status"] == "completed"
    assert resumed["final"] == reference["final"]  # exact
    a, b = (torch.load(d / "checkpoints" / "step_00000005.pt", weights_only=True)
            for d in (tmp_path / "r", tmp_path / "ref"))
    assert a["model"].keys() == b["model"].keys()
    for key in b["model"]:  # the weights and the running statistics
        assert torch.equal(a["model"][key], b["model"][key]), key
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(),
                      strict=True):
        assert torch.equal(pa["momentum_buffer"], pb["momentum_buffer"])
    got, want = read_scalars(tmp_path / "r"), read_scalars(tmp_path / "ref")
    assert [s for s, _ in want["train/loss"]] == [2, 4, 5]
    for tag in ("train/loss", "train/acc", "bn_gap/dmu/layer4.1.bn2", "val/loss"):
        assert got[tag] == want[tag], tag


# ----------------------------------------------------------------------------- a preset's sweep


@slow
def test_the_statistics_batch_preset_sweeps_a_torchvision_model_and_reports_it(tmp_path,
                                                                               capsys):
    from normbench.report.command import report_command

    # The preset's grid cut to two statistics batches and one seed (the command line wins).
    result = run_cli("train", "-m", "experiment=stats_batch_sweep", *TORCHVISION, "debug=tiny",
                     "norm.stats_batch=4,32", "seed=0", "dataset.image_size=8",
                     "precise_bn_batches=2", "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sweep finished: 2 jobs, 2 completed" in result.stderr
    jobs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    for job, k in zip(jobs, (4, 32), strict=True):
        summary = json.loads((job / "summary.json").read_text())
        assert (summary["status"], summary["model"], summary["stats_batch"]) == \
            ("completed", "torchvision", k)
        config = json.loads((job / "config.json").read_text())
        assert config["model"] == {"name": "torchvision", "arch": "resnet18", "kwargs": {},
                                   "cifar_stem": False}
        assert config["epochs"] is None and config["steps"] == 6  # debug=tiny over the setup
    capsys.readouterr()
    assert report_command([str(tmp_path / "sweep"), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "norm \\ stats_batch" in out and "batch" in out
    assert (tmp_path / "sweep" / "report.csv").is_file()
