"""A run's event file holds the tags of DESIGN.md §5, and the BN gaps equal a direct computation."""

import json
import math

import pytest
import torch

from normbench.data import DataInfo
from normbench.models import build_model
from normbench.optim import build_scheduler
from normbench.probes import Probes
from normbench.train import run_experiment
from tests.config_defaults import model_options, norm_spec
from tests.conftest import read_scalars


@pytest.fixture(scope="module")
def batch_run(tmp_path_factory):
    from tests.conftest import TINY, compose_config

    run_dir = tmp_path_factory.mktemp("run")
    summary = run_experiment(compose_config(TINY), run_dir, live=False)
    return run_dir, summary


def test_run_logs_the_required_tags(batch_run):
    run_dir, summary = batch_run
    tags = read_scalars(run_dir)
    for tag in ("train/loss", "train/acc", "train/lr", "val/loss", "val/acc", "grad/global_norm",
                "grad/norm/stem.0.weight", "grad/norm/head.weight", "bn_gap/dmu/stem.1",
                "bn_gap/dvar/blocks.0.norm2"):
        assert tag in tags, tag
    assert [step for step, _ in tags["train/loss"]] == [2, 4, 6]
    assert all(value >= 0 for _, value in tags["bn_gap/dmu/stem.1"])


def test_summary_json_follows_the_contract(batch_run):
    run_dir, summary = batch_run
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["status"] == "completed" and on_disk["steps"] == 6
    for key in ("dataset", "model", "norm", "batch_size", "lr", "seed", "elapsed_s"):
        assert key in on_disk
    assert set(on_disk["final"]) >= {"val_loss", "val_acc", "train_loss"}
    assert 0.0 <= on_disk["final"]["val_acc"] <= 1.0


def test_summary_records_the_data_sizes_and_images_log_no_bpc(batch_run):
    run_dir, summary = batch_run
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert (on_disk["n_train"], on_disk["n_val"]) == (256, 128)  # TINY's sizes
    assert "train/bpc" not in read_scalars(run_dir)


def scheduled_rates(config: dict, steps: int) -> list[float]:
    """The learning rate each step 1..steps trains with, from a scheduler of its own."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=config["lr"])
    scheduler = build_scheduler(optimizer, steps, **config["sched"])
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_train_lr_is_the_rate_the_logged_step_used(tmp_path, tiny_config):
    # Warm-up over 3 of 6 steps: the rate changes at every step, so the rate of step s
    # (rates[s - 1]) differs from the one the scheduler holds after it (rates[s]).
    config = tiny_config("sched.warmup_frac=0.5", "probes=false")
    run_experiment(config, tmp_path, live=False)
    rates = scheduled_rates(config, 6)
    logged = read_scalars(tmp_path)["train/lr"]
    assert [step for step, _ in logged] == [2, 4, 6]
    for step, value in logged:
        assert value == pytest.approx(rates[step - 1], rel=1e-6)
    assert rates[1] == pytest.approx(config["lr"] * 2 / 3) and rates[1] != rates[2]


def test_text_runs_log_bits_per_character(tmp_path):
    from tests.conftest import compose_config

    config = compose_config(["dataset=synthetic_text", "model=transformer", "norm=layer",
                             "dataset.n_train=64", "dataset.n_val=32", "batch_size=16", "steps=4",
                             "log_every=2", "eval_every=0", "probes=false"])
    summary = run_experiment(config, tmp_path, live=False)
    tags = read_scalars(tmp_path)
    losses = dict(tags["train/loss"])
    assert [step for step, _ in tags["train/bpc"]] == [2, 4]
    for step, bpc in tags["train/bpc"]:
        assert bpc == pytest.approx(losses[step] / math.log(2), rel=1e-5)
    assert (summary["n_train"], summary["n_val"]) == (64, 32)  # sentences


def test_layer_norm_run_has_no_batchnorm_tags(tmp_path, tiny_config):
    run_experiment(tiny_config("norm=layer"), tmp_path, live=False)
    tags = read_scalars(tmp_path)
    assert "train/loss" in tags and not any(t.startswith("bn_gap/") for t in tags)


def test_bn_gaps_match_a_direct_computation_on_uneven_batches():
    """dmu = ||mu_B - mu||/d, dvar = ||var_B - var_run * (n-1)/n||/d, running stats before update."""
    torch.manual_seed(0)
    model = build_model(model_options("resnet", depth=8), norm_spec("batch", momentum=0.3),
                        DataInfo(kind="image", num_classes=10))
    model.train()
    probes = Probes(model)
    conv, bn = model.stem[0], model.stem[1]
    for n in (5, 2, 7, 3):
        x = torch.randn(n, 3, 8, 8) * (1 + n) + n
        with torch.no_grad():
            h = conv(x)
            mean = h.mean(dim=(0, 2, 3))
            var = h.var(dim=(0, 2, 3), correction=0)
            count = n * 8 * 8
            run_mean, run_var = bn.running_mean.clone(), bn.running_var.clone()
        with probes.watch_forward(True):
            model(x)
        values = probes.flush()
        d = mean.numel()
        dmu = torch.linalg.vector_norm(mean - run_mean).item() / d
        dvar = torch.linalg.vector_norm(var - run_var * (count - 1) / count).item() / d
        assert values["bn_gap/dmu/stem.1"] == pytest.approx(dmu, rel=1e-4)
        assert values["bn_gap/dvar/stem.1"] == pytest.approx(dvar, rel=1e-4)
        assert not torch.equal(bn.running_mean, run_mean)  # the layer did update afterwards


def test_hooks_are_only_attached_on_logging_steps():
    model = build_model(model_options("resnet", depth=8), norm_spec("batch"),
                        DataInfo(kind="image", num_classes=10))
    probes = Probes(model)
    with probes.watch_forward(False):
        assert all(not m._forward_pre_hooks for m in probes.bn_layers.values())
        model(torch.randn(2, 3, 8, 8))
    assert probes.flush() == {}
    with probes.watch_forward(True):
        assert all(m._forward_pre_hooks for m in probes.bn_layers.values())
    assert all(not m._forward_pre_hooks for m in probes.bn_layers.values())


def test_grad_norms_match_torch(tiny_config):
    model = build_model(model_options("resnet", depth=8), norm_spec("group", num_groups=4),
                        DataInfo(kind="image", num_classes=10))
    model(torch.randn(3, 3, 8, 8)).sum().backward()
    probes = Probes(model)
    probes.record_grads()
    values = probes.flush()
    grads = [p.grad for p in model.parameters()]
    expected = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item()
    assert values["grad/global_norm"] == pytest.approx(expected, rel=1e-5)
    assert values["grad/norm/head.weight"] == pytest.approx(model.head.weight.grad.norm().item(), rel=1e-5)
