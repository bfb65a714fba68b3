"""The loop's own logging: which training and validation scalars a run writes and at which
steps, summary.json's fields, the rate logged as train/lr, bits per character on text.

What the probes add (bn_gap/, act/, grad/, update/) is tested in test_probes.py."""

import json
import math

import pytest
import torch

from normbench.engine.optim import build_scheduler
from normbench.engine.train import run_experiment
from tests.helpers.common import read_scalars

pytestmark = pytest.mark.slow  # every test reads a whole training run


@pytest.fixture(scope="module")
def batch_run(tmp_path_factory):
    from tests.helpers.common import TINY, compose_config

    run_dir = tmp_path_factory.mktemp("run")
    summary = run_experiment(compose_config(TINY), run_dir, live=False)
    return run_dir, summary


def test_run_logs_training_scalars_on_logging_steps_and_validation_at_the_end(batch_run):
    run_dir, summary = batch_run
    tags = read_scalars(run_dir)
    for tag in ("train/loss", "train/acc", "train/lr", "perf/samples_per_sec"):
        assert [step for step, _ in tags[tag]] == [2, 4, 6], tag  # log_every=2
    for tag in ("val/loss", "val/acc"):
        assert [step for step, _ in tags[tag]] == [6], tag  # eval_every=0: the last step only
    assert all(value > 0 for _, value in tags["perf/samples_per_sec"])
    assert tags["train/loss"][-1][1] == pytest.approx(summary["final"]["train_loss"])
    assert tags["val/acc"][-1][1] == pytest.approx(summary["final"]["val_acc"])


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
    from tests.helpers.common import compose_config

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


def test_the_logged_gradient_norm_is_the_one_the_divergence_guard_saw(tmp_path, tiny_config,
                                                                      monkeypatch):
    # On logging steps (2, 4, 6) the probes' global norm is the guard's: the global norm is
    # computed once per step, by grad_norm only on the steps in between.
    from normbench.engine import guard, train

    computed, observed = [], {}
    real_grad_norm, real_observe = guard.grad_norm, guard.DivergenceWatch.observe

    def counting_grad_norm(params):
        computed.append(1)
        return real_grad_norm(params)

    def recording_observe(self, step, loss, norm):
        observed[step] = float(norm)
        return real_observe(self, step, loss, norm)

    monkeypatch.setattr(train, "grad_norm", counting_grad_norm)
    monkeypatch.setattr(guard.DivergenceWatch, "observe", recording_observe)
    run_experiment(tiny_config("probes=true"), tmp_path, live=False)
    logged = read_scalars(tmp_path)["grad/global_norm"]
    assert [step for step, _ in logged] == [2, 4, 6]
    for step, value in logged:
        assert value == pytest.approx(observed[step], rel=1e-6)
    assert len(computed) == 3 and sorted(observed) == [1, 2, 3, 4, 5, 6]
