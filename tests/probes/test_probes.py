"""Training-step probes checked against hand computations and direct formulas, and the tag
families a whole run leaves in its event files."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from normbench.engine.train import run_experiment
from normbench.norms import TokenBatchNorm
from normbench.probes.monitor import (
    PERCENTILE_SAMPLE,
    Probes,
    activation_stats,
    excess_kurtosis,
    norm_layers,
)
from tests.helpers.common import read_scalars

# ----------------------------------------------------------------------------- hand computations


def one_bn(eps: float = 1e-12):  # eps > 0 is required; this one is lost in rounding
    bn = nn.BatchNorm1d(2, eps=eps)
    # Biased-scale running variances [5, 0.25] for batches of 4: stored unbiased (x 4/3).
    bn.running_mean.copy_(torch.tensor([0.5, 1.0]))
    bn.running_var.copy_(torch.tensor([5.0, 0.25]) * 4 / 3)
    return nn.Sequential(bn)


def test_bn_gaps_and_tid_match_hand_computation():
    model = one_bn()
    probes = Probes(model)
    # channel 0: [1,2,3,4] -> mean 2.5, biased var 1.25; channel 1: [0,0,2,2] -> mean 1, var 1
    x = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 2.0], [4.0, 2.0]])
    with probes.watch_forward(True):
        model(x)
    v = probes.flush()
    # tid_mu = mean(|0.5-2.5|/sqrt(1.25), 0) ; tid_sigma = mean(|sqrt(5)/sqrt(1.25)-1|, |0.5/1-1|)
    assert v["bn_gap/tid_mu/0"] == pytest.approx(1 / math.sqrt(1.25), rel=1e-6)
    assert v["bn_gap/tid_sigma/0"] == pytest.approx(0.75, rel=1e-6)
    assert v["bn_gap/dmu/0"] == pytest.approx(2.0 / 2, rel=1e-6)
    assert v["bn_gap/dvar/0"] == pytest.approx(math.sqrt(3.75**2 + 0.75**2) / 2, rel=1e-6)
    assert v["bn_gap/mean/tid_sigma"] == v["bn_gap/max/tid_sigma"] == v["bn_gap/tid_sigma/0"]


def test_bn_gaps_on_uneven_masked_tokens_match_direct_computation():
    torch.manual_seed(0)
    bn = TokenBatchNorm(3, eps=1e-5)
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = bn

        def forward(self, x, mask=None):
            return self.bn(x, mask=mask)

    net = Net()
    x = torch.randn(3, 5, 3) * 2 + 1
    lengths = torch.tensor([5, 2, 1])  # uneven sequences: 8 real tokens of 15
    mask = torch.arange(5)[None, :] < lengths[:, None]
    real = x[mask]  # (8, 3)
    var_b, mean_b = torch.var_mean(real, dim=0, correction=0)
    n = real.shape[0]
    running_mean, running_var = bn.running_mean.clone(), bn.running_var.clone() * (n - 1) / n
    probes = Probes(net)
    with probes.watch_forward(True):
        net(x, mask=mask)
    v = probes.flush()
    assert v["bn_gap/dmu/bn"] == pytest.approx(float((mean_b - running_mean).norm() / 3), rel=1e-5)
    assert v["bn_gap/dvar/bn"] == pytest.approx(float((var_b - running_var).norm() / 3), rel=1e-5)
    sigma_b = (var_b + 1e-5).sqrt()
    tid_mu = ((running_mean - mean_b).abs() / sigma_b).mean()
    tid_sigma = ((running_var + 1e-5).sqrt() / sigma_b - 1).abs().mean()
    assert v["bn_gap/tid_mu/bn"] == pytest.approx(float(tid_mu), rel=1e-5)
    assert v["bn_gap/tid_sigma/bn"] == pytest.approx(float(tid_sigma), rel=1e-5)
    # Activation statistics count real tokens only.
    assert v["act/in_mean/bn"] == pytest.approx(float(real.mean()), rel=1e-5, abs=1e-6)
    assert v["act/in_std/bn"] == pytest.approx(float(real.std(correction=0)), rel=1e-5)


def test_update_ratio_matches_hand_computation():
    lin = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    lin.weight.grad = torch.tensor([[1.0, -1.0], [1.0, -1.0]])
    probes = Probes(lin)
    with probes.watch_step(True):
        opt.step()
    v = probes.flush()
    # std(dW) = 0.1 * std([1,-1,1,-1]) = 0.1 * sqrt(4/3); std(W) = std([1,2,3,4]) = sqrt(5/3)
    expected = math.log10(0.1 * math.sqrt(4 / 3) / math.sqrt(5 / 3))
    assert v["update/weight"] == pytest.approx(expected, rel=1e-6)


def test_excess_kurtosis_matches_hand_computation():
    # mean 2; deviations [-2,-2,-2,-2,8]: m2 = 80/5 = 16, m4 = (4*16 + 4096)/5 = 832
    assert float(excess_kurtosis(torch.tensor([0.0, 0, 0, 0, 10]))) == pytest.approx(832 / 256 - 3)
    torch.manual_seed(0)
    assert abs(float(excess_kurtosis(torch.randn(200_000)))) < 0.05  # Gaussian: 0


def test_excess_kurtosis_leaves_the_gradient_alone_in_any_memory_format():
    # It squares a temporary in place: the gradient itself must not change, and a
    # channels_last kernel (not flattened, so not copied) gives the contiguous one's value.
    torch.manual_seed(0)
    g = torch.randn(8, 4, 3, 3).pow(3)
    kept = g.clone()
    last = g.to(memory_format=torch.channels_last)
    assert not last.is_contiguous()
    value = excess_kurtosis(g)
    assert torch.equal(g, kept) and torch.equal(last, kept)
    d = (kept.double() - kept.double().mean()).reshape(-1)
    direct = float((d ** 4).mean() / (d ** 2).mean() ** 2 - 3)
    assert float(value) == pytest.approx(direct, rel=1e-5)
    assert float(excess_kurtosis(last)) == pytest.approx(float(value), rel=1e-6)


def test_activation_stats_match_direct_computation():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5) * 3 + 2
    mean, std, p15, p50, p85 = activation_stats(x, percentiles=(15, 50, 85))
    assert float(mean) == pytest.approx(float(x.mean()), rel=1e-5)
    assert float(std) == pytest.approx(float(x.std(correction=0)), rel=1e-5)
    expected = torch.quantile(x.flatten(), torch.tensor([0.15, 0.5, 0.85]))
    assert torch.allclose(torch.stack([p15, p50, p85]), expected)
    # A large tensor is sampled: percentiles stay within sampling error of the truth.
    big = torch.randn(64, 16, 32, 32)
    assert big.numel() > 8 * PERCENTILE_SAMPLE
    _, _, p15, _, p85 = activation_stats(big, percentiles=(15, 50, 85))
    assert float(p15) == pytest.approx(-1.0364, abs=0.03)  # Gaussian 15th percentile
    assert float(p85) == pytest.approx(1.0364, abs=0.03)


def test_saturation_share_of_tanh_and_sigmoid_modules_over_several_calls():
    class Gates(nn.Module):
        def __init__(self):
            super().__init__()
            self.tanh, self.sigmoid = nn.Tanh(), nn.Sigmoid()

        def forward(self, x):  # called twice per forward, as a recurrent cell would
            return self.tanh(x) + self.sigmoid(x) + self.tanh(2 * x)

    model = Gates()
    # |tanh| > 0.97 beyond 2.09; sigmoid outside [0.03, 0.97] beyond 3.48
    x = torch.tensor([-4.0, 0.0, 1.0, 1.5])
    probes = Probes(model)
    with probes.watch_forward(True):
        model(x)
    v = probes.flush()
    # tanh(x): only -4 saturates (1/4); tanh(2x): -8 and 3 (2/4); mean over the two calls
    assert v["act/saturation/tanh"] == pytest.approx((0.25 + 0.5) / 2)
    assert v["act/saturation/sigmoid"] == pytest.approx(0.25)  # only -4


def test_hooks_exist_only_on_logging_steps_and_disabled_probes_record_nothing():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh())
    probes = Probes(model)
    with probes.watch_forward(False):
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    with probes.watch_forward(True):
        assert model[1]._forward_pre_hooks and model[1]._forward_hooks and model[2]._forward_hooks
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    off = Probes(model, enabled=False)
    with off.watch_forward(True):
        model(torch.randn(5, 3)).sum().backward()
    off.record_grads()
    assert off.flush() == {}


def test_gradient_histograms_every_few_logging_steps_travel_with_the_scalars():
    model = nn.Linear(10, 10)
    probes = Probes(model, hist_every=2)
    got = []
    for _ in range(3):
        model.zero_grad()
        model(torch.randn(8, 10)).pow(2).sum().backward()
        probes.record_grads()
        values = probes.flush()
        got.append(probes.take_histograms())
    assert [list(h) for h in got] == [["grad/hist/weight"], [], ["grad/hist/weight"]]
    h = got[2]["grad/hist/weight"]
    g = model.weight.grad
    assert h.num == 100 and sum(h.bucket_counts) == 100
    assert h.min == pytest.approx(float(g.min())) and h.bucket_limits[-1] == h.max
    assert h.sum_squares == pytest.approx(float(g.square().sum()), rel=1e-5)
    assert values["grad/norm/weight"] == pytest.approx(float(g.norm()), rel=1e-6)
    total = math.hypot(float(g.norm()), float(model.bias.grad.norm()))
    assert values["grad/global_norm"] == pytest.approx(total, rel=1e-6)


def test_norm_layers_are_found_by_type_and_identity_is_not_a_norm():
    from normbench.norms import create_norm
    from tests.helpers.config_defaults import norm_spec

    for name, expected in (("batch", 1), ("layer", 1), ("group", 1), ("none", 0)):
        for layout in ("images", "tokens"):
            norm = create_norm(norm_spec(name, num_groups=2), layout, 4)
            assert len(norm_layers(nn.Sequential(norm))) == expected, (name, layout)


# ----------------------------------------------------------------------------- whole runs


def families(tags) -> set[str]:
    """'bn_gap/dmu/blocks.0.norm1' -> 'bn_gap/dmu'; 'train/loss' -> 'train/loss'."""
    return {"/".join(t.split("/")[:2]) for t in tags}


BN_ONLY = {"bn_gap/dmu", "bn_gap/dvar", "bn_gap/tid_mu", "bn_gap/tid_sigma",
           "bn_gap/precise_dmu", "bn_gap/precise_dvar", "bn_gap/mean", "bn_gap/max",
           "val_batchstats/acc", "val_batchstats/loss", "val_precise/acc", "val_precise/loss",
           "val_gap/acc", "val_gap/loss"}
EVERY_NORM = {"act/in_mean", "act/in_std", "act/out_mean", "act/out_std", "act/out_p15",
              "act/out_p50", "act/out_p85"}
ALWAYS = {"train/loss", "val/acc", "grad/global_norm", "grad/norm", "grad/kurtosis",
          "update/blocks.0.conv1.weight", "perf/samples_per_sec"}


def event_accumulator(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"histograms": 0, "tensors": 0})
    acc.Reload()
    return acc


@pytest.mark.slow
def test_batchnorm_run_logs_every_family_and_the_dashboards(tiny_config, tmp_path):
    config = tiny_config("norm=batch", "eval_every=3", "hist_every=2", "precise_bn_batches=2")
    summary = run_experiment(config, tmp_path, live=False)
    scalars = read_scalars(tmp_path)
    present = families(scalars)
    assert BN_ONLY | EVERY_NORM | ALWAYS <= present
    layers = {t.split("/", 2)[2] for t in scalars if t.startswith("bn_gap/dmu/")}
    assert len(layers) == 7 and "stem.1" in layers  # depth 8: stem + 3 blocks x 2
    assert {s for s, _ in scalars["val_precise/acc"]} == {3, 6}
    assert summary["final"]["val_gap_acc"] == pytest.approx(
        summary["final"]["val_acc"] - summary["final"]["val_batchstats_acc"])
    for tag, points in scalars.items():
        if tag.startswith(("bn_gap/", "act/", "grad/norm", "update/")):
            assert all(math.isfinite(v) for _, v in points), tag

    acc = event_accumulator(tmp_path)
    hist_tags = acc.Tags()["histograms"]
    assert "grad/hist/head.weight" in hist_tags
    # Logging steps 2, 4, 6 -> histograms on the 1st and 3rd (hist_every=2).
    assert [e.step for e in acc.Histograms("grad/hist/head.weight")] == [2, 6]

    from tensorboard.plugins.custom_scalar import layout_pb2
    from tensorboard.plugins.hparams import metadata
    from tensorboard.util import tensor_util

    layout = layout_pb2.Layout()
    raw = acc.Tensors("custom_scalars__config__")[0].tensor_proto
    layout.ParseFromString(tensor_util.make_ndarray(raw).item())
    assert [c.title for c in layout.category] == ["normbench"]
    regexes = [r for chart in layout.category[0].chart for r in chart.multiline.tag]
    import re

    for family in BN_ONLY | EVERY_NORM | ALWAYS:  # every family has a chart
        tag = next(t for t in scalars if t.startswith(family))
        assert any(re.match(r, tag) for r in regexes), tag
    content = acc.PluginTagToContent("hparams")
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    assert start.hparams["norm"].string_value == "batch"
    assert start.hparams["batch_size"].number_value == 32
    assert start.hparams["dataset"].string_value == "shapes"
    experiment = metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG])
    assert "val/acc" in [m.name.tag for m in experiment.metric_infos]


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["layer", "none"])
def test_runs_without_batchnorm_have_no_bn_families(tiny_config, tmp_path, norm):
    run_experiment(tiny_config(f"norm={norm}"), tmp_path, live=False)
    present = families(read_scalars(tmp_path))
    assert ALWAYS <= present
    assert not present & BN_ONLY
    assert (EVERY_NORM <= present) if norm == "layer" else not present & EVERY_NORM


@pytest.mark.slow
def test_probes_off_logs_only_the_basics(tiny_config, tmp_path):
    import io

    from rich.console import Console

    out = io.StringIO()
    run_experiment(tiny_config("probes=false"), tmp_path / "run", live=False,
                   console=Console(file=out, width=300))
    assert f"tensorboard --logdir {tmp_path}" in out.getvalue()
    tmp_path = tmp_path / "run"
    present = families(read_scalars(tmp_path))
    assert present == {"train/loss", "train/acc", "train/lr", "perf/samples_per_sec",
                       "perf/eval_seconds", "val/loss", "val/acc"}


# ----------------------------------------------------------------------------- ghost and masked BN


class TokenNet(nn.Module):
    def __init__(self, bn):
        super().__init__()
        self.bn = bn

    def forward(self, x, mask=None):
        return self.bn(x, mask=mask)


def test_act_in_under_ghost_bn_is_the_spread_of_all_real_entries():
    torch.manual_seed(1)
    net = TokenNet(TokenBatchNorm(3, stats_batch=2))
    lengths = torch.tensor([4, 2, 3, 1, 4, 4])
    mask = torch.arange(4)[None, :] < lengths[:, None]
    x = torch.randn(6, 4, 3) + torch.arange(6).reshape(6, 1, 1)  # groups with different means
    real = x[mask]
    probes = Probes(net)
    with probes.watch_forward(True):
        net(x, mask=mask)
    v = probes.flush()
    assert v["act/in_mean/bn"] == pytest.approx(float(real.mean()), rel=1e-5)
    assert v["act/in_std/bn"] == pytest.approx(float(real.std(correction=0)), rel=1e-5)
    # The gaps compare the running statistics with this batch's update target: the groups'
    # real tokens weighted by count, their pooled within-group variance.
    groups = [x[g:g + 2][mask[g:g + 2]] for g in range(0, 6, 2)]
    mean_t = torch.cat(groups).mean(0)
    assert v["bn_gap/dmu/bn"] == pytest.approx(float(mean_t.norm() / 3), rel=1e-5)
    ss = sum((r - r.mean(0)).square().sum(0) for r in groups)
    var_t = ss / sum(r.shape[0] for r in groups)
    n_t = sum(r.shape[0] for r in groups) / 3
    assert v["bn_gap/dvar/bn"] == pytest.approx(
        float((var_t - (n_t - 1) / n_t).norm() / 3), rel=1e-5)


def test_a_layer_without_a_valid_call_reports_no_gap_and_others_average_valid_calls():
    torch.manual_seed(2)
    a = TokenBatchNorm(2)
    b = TokenBatchNorm(2)

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = a, b

        def forward(self, x, mask):
            self.a(x, mask=mask)  # valid
            self.a(x, mask=mask & False)  # no real row: adds nothing to a's averages
            return self.b(x, mask=mask & torch.tensor([True, False, False]))  # one real row

    net = Two()
    x = torch.randn(3, 2) * 2 + 1
    mask = torch.tensor([True, True, False])
    running = a.running_mean.clone()
    probes = Probes(net)
    with probes.watch_forward(True):
        net(x, mask)
    v = probes.flush()
    assert v["bn_gap/dmu/a"] == pytest.approx(float((x[:2].mean(0) - running).norm() / 2),
                                              rel=1e-5)
    assert math.isfinite(v["act/out_std/a"])
    assert not any(t.startswith("bn_gap/") and t.endswith("/b") for t in v)
    assert v["bn_gap/max/dmu"] == v["bn_gap/dmu/a"]  # summaries over layers with values only
    assert all(math.isfinite(val) for val in v.values())


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["instance", "rms", "frn", "dyt"])
def test_per_sample_norms_get_act_statistics_on_every_norm_layer(tiny_config, tmp_path, norm):
    """The act/ probes pick the layers by Norm.probed, not by name: every norm layer of the
    ResNet logs its output's spread, and no BatchNorm family appears."""
    from normbench.config.checks import placeholder_info
    from normbench.models import build_model
    from normbench.norms import make_spec

    config = tiny_config(f"norm={norm}")
    layers = norm_layers(build_model(config["model"], make_spec(**config["norm"]),
                                     placeholder_info(config["dataset"])))
    assert "stem.1" in layers and "blocks.0.norm2" in layers
    run_experiment(config, tmp_path, live=False)
    scalars = read_scalars(tmp_path)
    for name in layers:
        values = [v for _, v in scalars[f"act/out_std/{name}"]]
        assert values and all(math.isfinite(v) and v > 0 for v in values), name
    assert not families(scalars) & BN_ONLY
