"""Batch Renormalization (norm=batch_renorm): plain BatchNorm bit for bit when its clips are
closed, r and d against a hand computation with clipping active, the relaxation schedule,
gradients that treat r and d as constants, and the probes, PreciseBN and val_batchstats
reading it as BatchNorm."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from normbench.data import Batch, DataInfo
from normbench.engine.evaluation import evaluate_batchstats
from normbench.engine.precise_bn import precise_bn_stats
from normbench.engine.train import run_experiment
from normbench.norms import BatchRenorm2d, TokenBatchRenorm, create_norm
from normbench.norms.counts import layer_formulas
from normbench.probes.monitor import Probes
from tests.helpers.common import read_scalars
from tests.helpers.config_defaults import norm_spec

EPS = 1e-5
CLOSED = dict(r_max=1.0, d_max=0.0, relax_from=0, r_max_by=0, d_max_by=0)  # r = 1, d = 0
OPEN = dict(relax_from=0, r_max_by=0, d_max_by=0)  # the full r_max, d_max from the start


def randomize(norm: nn.Module) -> None:
    """Affine and running statistics away from their defaults (so that r, d would matter)."""
    with torch.no_grad():
        for p in norm.parameters():
            p.uniform_(0.5, 1.5)
        for name, b in norm.named_buffers():
            if b.is_floating_point():
                b.uniform_(0.5, 2.0) if name.endswith("running_var") else b.uniform_(-1, 1)


def batch_for(layout: str, step: int, masked: bool):
    g = torch.Generator().manual_seed(step)
    if layout == "images":
        x = torch.randn(4, 3, 5, 5, generator=g) * 2 + 1
        mask = (torch.rand(4, 5, 5, generator=g) > 0.3) if masked else None
    else:
        x = torch.randn(4, 6, 3, generator=g) * 2 + 1
        lengths = torch.tensor([6, 2, 1, 4])  # a group of 2 with 3 real tokens, uneven
        mask = (torch.arange(6)[None, :] < lengths[:, None]) if masked else None
    return x, mask, torch.randn(x.shape, generator=g)


@pytest.mark.parametrize("layout,k,masked", [
    ("images", None, False), ("images", 2, False), ("images", None, True),
    ("tokens", None, True), ("tokens", 2, True), ("tokens", None, False),
    ("steps", None, True), ("steps", 2, False),
])
def test_closed_clips_are_batchnorm_bit_for_bit(layout, k, masked):
    bn = create_norm(norm_spec("batch", stats_batch=k), layout, 3, t_max=6).train()
    renorm = create_norm(norm_spec("batch_renorm", stats_batch=k, **CLOSED), layout, 3,
                         t_max=6).train()
    randomize(bn)
    renorm.load_state_dict(bn.state_dict())
    for step in range(3):  # the running statistics move: each step depends on the last
        x, mask, weights = batch_for(layout, step, masked)
        results = []
        for norm in (bn, renorm):
            x_in = x.clone().requires_grad_()
            y = norm(x_in, mask)
            (y * weights).sum().backward()
            results.append([y, x_in.grad] + [p.grad.clone() for p in norm.parameters()])
            norm.zero_grad()
        for ours, ref in zip(results[1], results[0], strict=True):
            assert torch.equal(ours, ref)
    for (key, ours), ref in zip(renorm.state_dict().items(), bn.state_dict().values(),
                                strict=True):
        assert torch.equal(ours, ref), key
    assert int(renorm.state_dict()[next(k for k in renorm.state_dict()
                                        if k.endswith("num_batches_tracked"))]) > 0
    renorm.eval(), bn.eval()
    x, mask, _ = batch_for(layout, 9, masked)
    assert torch.equal(renorm(x, mask), bn(x, mask))


def hand_example(layout: str):
    """Two channels of four values: [0, 2, 4, 6] (mean 3, biased var 5) and [1, 1.5, 0.5, 1]
    (mean 1, biased var 0.125), as image pixels (4, 2, 1, 1) or tokens (2, 2, 2)."""
    rows = torch.tensor([[0.0, 1.0], [2.0, 1.5], [4.0, 0.5], [6.0, 1.0]])
    x = rows.reshape(4, 2, 1, 1) if layout == "images" else rows.reshape(2, 2, 2)
    return x, rows


@pytest.mark.parametrize("layout", ["images", "tokens"])
def test_r_and_d_match_a_hand_computation_with_clipping_active(layout):
    norm = create_norm(norm_spec("batch_renorm", affine=False, r_max=2.0, d_max=1.5, **OPEN),
                       layout, 2).train()
    with torch.no_grad():
        norm.running_mean.copy_(torch.tensor([0.0, 1.2]))
        norm.running_var.copy_(torch.tensor([1.0, 0.25]))
    x, rows = hand_example(layout)
    # channel 0: r = sqrt(5 + eps) / sqrt(1 + eps) = 2.236 -> clipped to 2;
    #            d = (3 - 0) / sqrt(1 + eps) = 3.0 -> clipped to 1.5.
    # channel 1: r = sqrt(0.125 + eps) / sqrt(0.25 + eps) = 0.707 (inside [1/2, 2]);
    #            d = (1 - 1.2) / sqrt(0.25 + eps) = -0.4 (inside [-1.5, 1.5]).
    r = torch.tensor([2.0, math.sqrt(0.125 + EPS) / math.sqrt(0.25 + EPS)])
    d = torch.tensor([1.5, -0.2 / math.sqrt(0.25 + EPS)])
    mean, var = torch.tensor([3.0, 1.0]), torch.tensor([5.0, 0.125])
    expected = (rows - mean) / torch.sqrt(var + EPS) * r + d
    y = norm(x)
    torch.testing.assert_close(y.reshape(4, 2), expected)
    # The running update is BatchNorm's, after r and d were taken from the old statistics.
    torch.testing.assert_close(norm.running_mean, 0.9 * torch.tensor([0.0, 1.2]) + 0.1 * mean)
    torch.testing.assert_close(norm.running_var,
                               0.9 * torch.tensor([1.0, 0.25]) + 0.1 * var * 4 / 3)


def test_the_schedule_relaxes_linearly_between_relax_from_and_the_by_steps():
    norm = create_norm(norm_spec("batch_renorm", r_max=3.0, d_max=5.0, relax_from=10,
                                 r_max_by=30, d_max_by=20), "tokens", 2)
    expected = {0: (1, 0), 9: (1, 0), 10: (1, 0), 15: (1.5, 2.5), 20: (2, 5), 25: (2.5, 5),
                30: (3, 5), 1000: (3, 5)}
    for n, (r_max, d_max) in expected.items():
        norm.num_batches_tracked.fill_(n)
        got = [float(v) for v in norm.limits()]
        assert got == pytest.approx([r_max, d_max]), n
    # The counter is the layer's own, advanced by each training batch and checkpointed.
    norm.train().num_batches_tracked.fill_(9)
    norm(torch.randn(3, 4, 2))
    assert int(norm.num_batches_tracked) == 10 and "num_batches_tracked" in norm.state_dict()


def test_before_relax_from_the_output_is_batchnorm_whatever_the_clips():
    spec = dict(r_max=3.0, d_max=5.0, relax_from=4, r_max_by=8, d_max_by=8)
    renorm = create_norm(norm_spec("batch_renorm", **spec), "tokens", 3).train()
    bn = create_norm(norm_spec("batch"), "tokens", 3).train()
    randomize(bn)
    renorm.load_state_dict(bn.state_dict())
    for step in range(6):
        x = torch.randn(4, 5, 3) * 3 + 2
        same = torch.equal(renorm(x), bn(x))
        assert same == (step < 5), step  # n <= relax_from: closed; n = 5: r_max_t = 1.25


def formula(x, mask, gamma, beta, run_mean, run_var, r_max, d_max, *, detach=True):
    """Batch Renorm written out per channel on (N, T, D) tokens (real tokens only)."""
    real = x[mask]  # (n, D): boolean indexing is fine in a test
    mean = real.mean(0)
    var = real.var(0, correction=0)
    sigma_b, sigma = torch.sqrt(var + EPS), torch.sqrt(run_var + EPS)
    r = (sigma_b / sigma).clamp(1 / r_max, r_max)
    d = ((mean - run_mean) / sigma).clamp(-d_max, d_max)
    if detach:
        r, d = r.detach(), d.detach()
    return ((x - mean) / sigma_b * r + d) * gamma + beta


@pytest.mark.parametrize("layout", ["images", "tokens"])
def test_gradients_treat_r_and_d_as_constants(layout):
    torch.manual_seed(3)
    norm = create_norm(norm_spec("batch_renorm", r_max=1.5, d_max=0.5, **OPEN), layout, 3)
    randomize(norm)
    norm.train()
    if layout == "images":  # the folded torch kernel: channels moved last for the formula
        x = (torch.randn(4, 3, 2, 2) * 2 + 1).requires_grad_()
        mask = torch.ones(4, 2, 2, dtype=torch.bool)
        to_last = lambda t: t.permute(0, 2, 3, 1)  # noqa: E731
    else:  # the grouped path, with padding
        x = (torch.randn(3, 5, 3) * 2 + 1).requires_grad_()
        mask = torch.arange(5)[None, :] < torch.tensor([5, 3, 2])[:, None]
        to_last = lambda t: t  # noqa: E731
    weights = torch.randn(to_last(x).shape) * mask[..., None]
    state = {k: v.clone() for k, v in norm.state_dict().items()}
    y = norm(x, None if layout == "images" else mask)
    (to_last(y) * weights).sum().backward()
    grads = (x.grad.clone(), norm.weight.grad.clone(), norm.bias.grad.clone())

    results = {}
    for detach in (True, False):
        x_ref = x.detach().clone().requires_grad_()
        gamma = state["weight"].clone().requires_grad_()
        beta = state["bias"].clone().requires_grad_()
        out = formula(to_last(x_ref), mask, gamma, beta, state["running_mean"],
                      state["running_var"], 1.5, 0.5, detach=detach)
        (out * weights).sum().backward()
        results[detach] = (x_ref.grad, gamma.grad, beta.grad, out)
    torch.testing.assert_close(to_last(y)[mask], results[True][3][mask])
    for ours, ref in zip(grads, results[True][:3], strict=True):
        torch.testing.assert_close(ours, ref)
    # Differentiating through r and d would give another gradient: the test can tell.
    assert not torch.allclose(grads[0], results[False][0], atol=1e-4)


# ----------------------------------------------------------------------------- read as BatchNorm


def test_probes_read_batch_renorm_as_batchnorm():
    torch.manual_seed(4)
    norm = TokenBatchRenorm(3, eps=EPS, r_max=2.0, d_max=1.0)
    randomize(norm)
    net = nn.ModuleDict({"bn": norm})
    x = torch.randn(4, 5, 3) * 2 + 1
    var_b, mean_b = torch.var_mean(x.reshape(-1, 3), dim=0, correction=0)
    n = 20
    run_mean, run_var = norm.running_mean.clone(), norm.running_var.clone() * (n - 1) / n
    probes = Probes(net)
    with probes.watch_forward(True):
        norm.train()(x)
    v = probes.flush()
    assert v["bn_gap/dmu/bn"] == pytest.approx(float((mean_b - run_mean).norm() / 3), rel=1e-5)
    assert v["bn_gap/dvar/bn"] == pytest.approx(float((var_b - run_var).norm() / 3), rel=1e-5)
    tid_sigma = ((run_var + EPS).sqrt() / (var_b + EPS).sqrt() - 1).abs().mean()
    assert v["bn_gap/tid_sigma/bn"] == pytest.approx(float(tid_sigma), rel=1e-5)


class Fixed:
    """Fixed validation batches of a 3-class image task."""

    info = DataInfo(kind="image", num_classes=3)

    def __init__(self, batches):
        self.batches = batches

    def val_batches(self, batch_size, shuffle_seed=None):
        return iter(self.batches)


def two_layers(make):
    torch.manual_seed(5)
    net = nn.Sequential(make(), nn.Conv2d(3, 3, 1), make(), nn.Flatten(2),
                        nn.AdaptiveAvgPool1d(1), nn.Flatten())
    for m in (net[0], net[2]):
        randomize(m)
        m.num_batches_tracked.fill_(100)  # clips fully open for Batch Renorm
    return net


def test_val_batchstats_and_precise_bn_use_plain_batch_statistics():
    renorm = two_layers(lambda: BatchRenorm2d(3, eps=EPS, r_max=3.0, d_max=5.0))
    bn = two_layers(lambda: nn.BatchNorm2d(3, eps=EPS))
    assert all(torch.equal(a, b) for a, b in zip(renorm.state_dict().values(),
                                                bn.state_dict().values(), strict=True))
    batches = [Batch(torch.randn(n, 3, 4, 4) * 2 + 1, torch.randint(0, 3, (n,)))
               for n in (4, 6)]
    before = copy.deepcopy(renorm.state_dict())
    got, ref = (evaluate_batchstats(net.eval(), Fixed(batches), 4, seed=0)
                for net in (renorm, bn))
    assert got == pytest.approx(ref, rel=1e-6)
    assert renorm[0].use_batch_stats is False and not renorm[0].training
    for key, value in renorm.state_dict().items():
        assert torch.equal(value, before[key]), key
    # PreciseBN's second layer sees the first one's output: plain BatchNorm's there too.
    ours, theirs = (precise_bn_stats(net, batches)["2"] for net in (renorm, bn))
    torch.testing.assert_close(ours.mean, theirs.mean)
    torch.testing.assert_close(ours.var, theirs.var)
    # Whereas in training mode r and d pull the outputs towards the running statistics.
    with torch.no_grad():
        assert not torch.allclose(renorm.train()(batches[0].x), bn.train()(batches[0].x),
                                  atol=1e-3)


def test_a_constant_channel_outputs_beta_as_in_batchnorm():
    norm = create_norm(norm_spec("batch_renorm", r_max=3.0, d_max=5.0, **OPEN), "tokens", 2)
    randomize(norm)
    x = torch.randn(3, 4, 2)
    x[..., 1] = 7.0  # far from the running mean: d would be clipped at 5 if it applied
    y = norm.train()(x)
    torch.testing.assert_close(y[..., 1], norm.bias[1].expand(3, 4).detach())
    assert bool(norm.collapsed[1]) and not bool(norm.collapsed[0])


def test_counts_are_batchnorms():
    assert layer_formulas(norm_spec("batch_renorm"), "images") == ("2C", "2C")
    assert layer_formulas(norm_spec("batch_renorm", affine=False), "tokens") == ("0", "2C")
    assert layer_formulas(norm_spec("batch_renorm", center=False), "steps") == ("C", "2CT")


@pytest.mark.slow
def test_a_tiny_run_logs_every_batchnorm_family(tiny_config, tmp_path):
    config = tiny_config("norm=batch_renorm", "norm.relax_from=0", "norm.r_max_by=2",
                         "norm.d_max_by=2", "eval_every=6", "precise_bn_batches=2")
    summary = run_experiment(config, tmp_path, live=False)
    assert summary["status"] == "completed"
    tags = read_scalars(tmp_path)
    for family in ("bn_gap/dmu/stem.1", "bn_gap/dvar/stem.1", "bn_gap/tid_mu/stem.1",
                   "bn_gap/tid_sigma/stem.1", "bn_gap/precise_dmu/stem.1",
                   "val_batchstats/acc", "val_precise/acc", "val_gap/acc"):
        assert family in tags, family


def test_a_constant_channel_outputs_beta_on_the_plain_and_the_grouped_path():
    from normbench.norms import create_norm
    from tests.helpers.config_defaults import norm_spec

    outputs = []
    for k in (None, 2):
        layer = create_norm(norm_spec("batch_renorm", relax_from=0, r_max_by=0, d_max_by=0,
                                      stats_batch=k), "images", 2)
        layer.running_mean.copy_(torch.tensor([0.0, 1.0]))  # d would be clipped to d_max
        x = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(0))
        x[:, 1] = 3.0
        outputs.append(layer(x)[:, 1])
    for y in outputs:  # beta = 0: x_hat = 0, not d = 5
        assert y.abs().max() < 1e-3
