"""The why-probes in whole runs: they leave the training bit for bit as it is, log their
tags, charts and final values, and report a diverging run's values as non-finite."""

from __future__ import annotations

import math

import pytest
import torch

from normbench.engine.checkpoint import list_checkpoints
from normbench.engine.dashboards import layout
from normbench.engine.train import run_experiment
from normbench.probes.why import FINAL, WhyProbes, spread
from tests.helpers.common import TINY, compose_config, read_scalars

# every probe on every logging step (6 steps, log_every 2), the Hessian on the last one
# (the costliest, with double backward through every layer), small enough for a test
ALL_ON = ["why.landscape.every=1", "why.landscape.lr_factors=[1,4]", "why.ics.every=1",
          "why.ics.layers=3", "why.hessian.every=3",
          "why.hessian.trace_samples=2", "why.hessian.max_hvps=20", "why.hessian.batch_size=8",
          "why.similarity.every=1"]
CASES = {
    "resnet-batch": [],
    "resnet-ghost-k2": ["norm.stats_batch=2"],
    "resnet-power": ["norm=power", "norm.warmup_steps=2"],  # its backward updates a buffer
    "resnet-batch_renorm": ["norm=batch_renorm"],  # r and d read the running statistics
    "transformer-text": ["model=transformer", "dataset=synthetic_text"],  # padded sequences
    # hardsigmoid has no second derivative: every why-probe but the Hessian
    "torchvision-mobilenet": ["model=torchvision", "model.arch=mobilenet_v3_small"],
    "lstm-per-step-bn": ["model=lstm", "dataset=synthetic_text", "dataset.seq_len=24",
                         "dataset.max_depth=0", "batch_size=16", "dataset.n_val=32",
                         "precise_bn_batches=0", "steps=4"],
    # short: a BN per time step, and a double backward through every one of them
}


def final_weights(run_dir) -> dict[str, torch.Tensor]:
    return torch.load(list_checkpoints(run_dir)[0], weights_only=False)["model"]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_probes_on_leave_the_run_bit_identical(tmp_path, case):
    # the tiny run, without the ResNet's own sizes where another model is chosen
    tiny = [o for o in TINY if not (o.startswith("model.") and "model=torchvision" in CASES[case])]
    off = run_experiment(compose_config([*tiny, *CASES[case]]), tmp_path / "off", live=False)
    probes = [o for o in ALL_ON if not ("mobilenet" in case and o.startswith("why.hessian"))]
    # the case's own overrides last: they may narrow the run and the Hessian's interval
    on = run_experiment(compose_config([*tiny, *probes, *CASES[case]]), tmp_path / "on", live=False)
    assert off["status"] == on["status"] == "completed"
    shared = {k for k in off["final"] if not k.startswith("perf")}
    assert shared and {k: on["final"][k] for k in shared} == {k: off["final"][k] for k in shared}
    a, b = final_weights(tmp_path / "off"), final_weights(tmp_path / "on")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [read_scalars(tmp_path / d)["train/loss"] for d in ("off", "on")]
    assert losses[0] == losses[1]
    # and they measured something, on every logging step (log_every 2), the Hessian on the last
    scalars = read_scalars(tmp_path / "on")
    steps = list(range(2, on["steps"] + 1, 2))
    for tag in ("landscape/loss_range", "landscape/beta_smoothness", "ics/mean/l2",
                *(["hessian/trace"] if probes == ALL_ON else []), "act/similarity_mean"):
        assert [s for s, _ in scalars[tag]] == (steps[-1:] if tag.startswith("hessian") else steps)
        assert all(math.isfinite(v) for _, v in scalars[tag]), tag
    for tag in FINAL:
        skipped = tag.startswith("hessian") and probes != ALL_ON
        assert (tag.replace("/", "_") in on["final"]) != skipped, tag


@pytest.mark.slow
def test_probe_tags_charts_and_values_of_a_resnet_run(tiny_config, tmp_path):
    summary = run_experiment(tiny_config(*ALL_ON, "lr=0.05", "sched=constant",
                                         "sched.warmup_frac=0"), tmp_path, live=False)
    scalars = read_scalars(tmp_path)
    final = summary["final"]
    # 2/lr beside lambda_max, from the lr the step used
    assert [v for _, v in scalars["hessian/two_over_lr"]] == pytest.approx([40.0])
    # the deepest weights of the forward are measured; cos of a gradient with itself is <= 1
    ics_layers = {t.split("/", 2)[2] for t in scalars if t.startswith("ics/l2/")}
    assert len(ics_layers) == 3 and "head.weight" in ics_layers
    assert all(-1 - 1e-6 <= v <= 1 + 1e-6 for t in scalars if t.startswith("ics/cos/")
               for _, v in scalars[t])
    assert final["hessian_trace_stderr"] > 0 and final["landscape_loss_range"] >= 0
    assert final["landscape_beta_smoothness"] > 0 and 0 <= final["act_similarity_max"] <= 1
    # one chart per probe family in the run's custom-scalars layout
    charts = layout(True, True, False, frozenset({"landscape", "ics", "hessian", "similarity"}))
    titles = " ".join(charts["normbench"])
    assert "lambda_max beside 2/lr" in titles and "covariate shift" in titles
    assert "similarity" in titles and "beta-smoothness" in titles
    assert not any("Hessian" in t for t in layout(True, True, False)["normbench"])


@pytest.mark.slow
def test_a_diverging_run_reports_non_finite_values_without_crashing(tiny_config, tmp_path):
    summary = run_experiment(tiny_config(*ALL_ON, "why.hessian.every=1", "norm=none", "lr=1e6",
                                         "log_every=1"), tmp_path, live=False)
    assert summary["status"] == "diverged"
    scalars = read_scalars(tmp_path)
    values = [v for tag in ("landscape/loss_range", "hessian/lambda_max", "ics/mean/l2")
              for _, v in scalars[tag]]
    assert any(not math.isfinite(v) for v in values)


def test_spread_keeps_the_first_and_last_and_is_even():
    items = [f"w{i}" for i in range(10)]
    assert spread(items, 3) == ["w0", "w4", "w9"] or spread(items, 3) == ["w0", "w5", "w9"]
    assert spread(items, None) == items and spread(items, 20) == items
    assert spread(items, 1) == ["w9"] and spread(items, 2) == ["w0", "w9"]


def test_due_steps_follow_the_interval_in_logging_steps_and_the_last_step(tiny_config):
    from normbench.engine.experiment import load_data
    from normbench.models import build_model
    from normbench.norms import make_spec

    config = tiny_config("why.landscape.every=2", "why.hessian.every=3", "log_every=5")
    data = load_data(config["dataset"], torch.device("cpu"))
    model = build_model(config["model"], make_spec(**config["norm"]), data.info)
    probes = WhyProbes(model, config, data, 37, lambda b: b)
    due = {step: probes.due(step) for step in range(5, 38, 5)}
    assert [s for s, d in due.items() if "landscape" in d] == [10, 20, 30]
    assert [s for s, d in due.items() if "hessian" in d] == [15, 30]
    assert probes.due(37) == {"landscape", "hessian"}  # the last step, for the final values
    assert WhyProbes(model, config, data, 37, lambda b: b, enabled=False).due(37) == frozenset()


@pytest.mark.slow
def test_a_model_without_second_derivatives_is_refused_before_anything_is_written(tmp_path):
    from normbench.errors import UserError

    tiny = [o for o in TINY if not o.startswith("model.")]
    config = compose_config([*tiny, "model=torchvision", "model.arch=mobilenet_v3_small",
                             "why.hessian.every=1"])
    with pytest.raises(UserError, match=r"^why.hessian needs second derivatives, which "
                                        r"model=torchvision model.arch=mobilenet_v3_small"):
        run_experiment(config, tmp_path / "run", live=False)
    assert not (tmp_path / "run").exists()
