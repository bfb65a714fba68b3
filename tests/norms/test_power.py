"""PowerNorm (norm=power): the forward pass and the approximate backward of Shen et al.
2020's Algorithm 1 on hand examples, padding kept out of every statistic, the per-step
version, and what the probes, PreciseBN and val_batchstats make of its psi^2."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normbench.data import Batch, DataInfo
from normbench.engine.evaluation import evaluate_batchstats
from normbench.engine.precise_bn import population_statistics, precise_bn_stats, precise_distances
from normbench.engine.train import run_experiment
from normbench.norms import TimePowerNorm, TokenPowerNorm, create_norm, make_norm_factory
from normbench.norms.counts import layer_formulas
from normbench.probes.monitor import Probes
from tests.helpers.common import compose_config, read_scalars
from tests.helpers.config_defaults import norm_spec

EPS = 1e-5
M = 0.1  # momentum: the paper's alpha = 0.9


def power(width: int = 2, *, warmup: int, layout: str = "tokens", **kw) -> nn.Module:
    return create_norm(norm_spec("power", warmup_steps=warmup, **kw), layout, width,
                       t_max=3).train()


def set_affine(norm, gamma, beta):
    with torch.no_grad():
        norm.weight.copy_(torch.tensor(gamma))
        norm.bias.copy_(torch.tensor(beta))


# Four entries per channel, as a batch of 2 sequences of 2 tokens (2, 2, 2):
# channel 0: [1, -1, 2, 0] -> psi_B^2 = 6/4 = 1.5; channel 1: [3, 0, 0, -1] -> 10/4 = 2.5.
X1 = torch.tensor([[1.0, 3.0], [-1.0, 0.0], [2.0, 0.0], [0.0, -1.0]])
# channel 0: [2, 2, 0, 0] -> psi_B^2 = 2; channel 1: [1, 1, 1, 1] -> 1.
X2 = torch.tensor([[2.0, 1.0], [2.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
GAMMA, BETA = torch.tensor([2.0, 0.5]), torch.tensor([0.1, -0.2])


def test_forward_follows_algorithm_1_on_a_hand_example():
    norm = power(warmup=1)
    set_affine(norm, GAMMA.tolist(), BETA.tolist())
    # Warm-up batch: its own psi_B^2; then psi^2 = 0.9 * 1 + 0.1 * [1.5, 2.5] = [1.05, 1.15].
    y = norm(X1.reshape(2, 2, 2)).reshape(4, 2)
    torch.testing.assert_close(y, GAMMA * X1 / torch.sqrt(torch.tensor([1.5, 2.5]) + EPS) + BETA)
    torch.testing.assert_close(norm.running_psi2, torch.tensor([1.05, 1.15]))
    # After warm-up: the running psi_{t-1}^2 = [1.05, 1.15], not this batch's [2, 1];
    # then psi^2 = 0.9 * [1.05, 1.15] + 0.1 * [2, 1] = [1.145, 1.135].
    y = norm(X2.reshape(2, 2, 2)).reshape(4, 2)
    torch.testing.assert_close(y, GAMMA * X2 / torch.sqrt(torch.tensor([1.05, 1.15]) + EPS) + BETA)
    torch.testing.assert_close(norm.running_psi2, torch.tensor([1.145, 1.135]))
    assert int(norm.num_batches_tracked) == 2
    # Eval: the running statistic, nothing updated.
    y = norm.eval()(X1.reshape(2, 2, 2)).reshape(4, 2)
    torch.testing.assert_close(y, GAMMA * X1 / torch.sqrt(torch.tensor([1.145, 1.135]) + EPS)
                               + BETA)
    torch.testing.assert_close(norm.running_psi2, torch.tensor([1.145, 1.135]))


def test_backward_is_the_approximate_backprop_and_updates_nu():
    norm = power(warmup=0)
    set_affine(norm, GAMMA.tolist(), BETA.tolist())
    psi2, nu = torch.tensor([4.0, 1.0]), torch.tensor([0.5, -0.25])
    with torch.no_grad():
        norm.running_psi2.copy_(psi2)
        norm.nu.copy_(nu)
    x = X1.reshape(2, 2, 2).clone().requires_grad_()
    grad_y = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 2.0], [0.5, -1.0]])
    norm(x).backward(grad_y.reshape(2, 2, 2))
    # Algorithm 1, written out: g = gamma * dL/dy, x_hat = x / sqrt(psi^2 + eps),
    # dL/dx = (g - nu_{t-1} x_hat) / sqrt(psi^2 + eps),
    # nu_t = nu_{t-1} (1 - m Gamma) + m Lambda, Gamma = mean(x_hat^2), Lambda = mean(g x_hat).
    sigma = torch.sqrt(psi2 + EPS)
    x_hat = X1 / sigma
    g = GAMMA * grad_y
    torch.testing.assert_close(x.grad.reshape(4, 2), (g - nu * x_hat) / sigma)
    gam, lam = x_hat.square().mean(0), (g * x_hat).mean(0)
    torch.testing.assert_close(norm.nu, nu * (1 - M * gam) + M * lam)
    torch.testing.assert_close(norm.weight.grad, (grad_y * x_hat).sum(0))
    torch.testing.assert_close(norm.bias.grad, grad_y.sum(0))
    # The batch's statistic never entered the gradient: it would have changed it.
    exact = torch.autograd.functional.vjp(
        lambda z: GAMMA * z / torch.sqrt(z.square().mean(0) + EPS), X1, grad_y)[1]
    assert not torch.allclose(x.grad.reshape(4, 2), exact, atol=1e-3)


def padded(seed: int = 0, garbage: float | None = None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 4, 2, generator=g) * 2 + 0.5
    mask = torch.arange(4)[None, :] < torch.tensor([4, 2, 1])[:, None]  # 7 real tokens
    if garbage is not None:
        x[~mask] = garbage
    return x, mask


def test_warm_up_gradient_is_the_exact_gradient_of_the_batch_statistic():
    norm = power(warmup=5)
    set_affine(norm, GAMMA.tolist(), BETA.tolist())
    x, mask = padded()
    weights = torch.randn(x.shape) * mask[..., None]  # a loss on real tokens only
    x_in = x.clone().requires_grad_()
    (norm(x_in, mask) * weights).sum().backward()
    x_ref = x.clone().requires_grad_()
    psi2 = x_ref[mask].square().mean(0)
    ref = GAMMA * x_ref / torch.sqrt(psi2 + EPS) + BETA
    (ref * weights).sum().backward()
    torch.testing.assert_close(x_in.grad, x_ref.grad)
    # nu learns meanwhile (the authors' code does too): Gamma, Lambda from the real tokens.
    x_hat = (x / torch.sqrt(psi2.detach() + EPS))[mask]
    g = (GAMMA * weights)[mask]
    torch.testing.assert_close(norm.nu, M * (g * x_hat).mean(0))


def test_padding_never_reaches_psi_gamma_lambda_or_a_real_output():
    runs = []
    for garbage in (None, 1e3, float("inf")):
        norm = power(warmup=1)
        set_affine(norm, GAMMA.tolist(), BETA.tolist())
        outputs, grads = [], []
        for seed in range(3):  # one warm-up batch, then two with the running statistic
            x, mask = padded(seed, garbage)
            weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
            x = x.requires_grad_()
            y = norm(x, mask)
            (torch.where(mask[..., None], y, 0.0) * weights).sum().backward()
            outputs.append(y[mask])
            grads.append(x.grad[mask])
        runs.append((outputs, grads, norm.running_psi2.clone(), norm.nu.clone()))
    clean = runs[0]
    for other in runs[1:]:
        for a, b in zip(clean[0] + clean[1], other[0] + other[1], strict=True):
            assert torch.equal(a, b)
        assert torch.equal(clean[2], other[2]) and torch.equal(clean[3], other[3])
    # psi_B^2 itself: the mean of x^2 over the 7 real tokens.
    x, mask = padded(0, 1e3)
    norm = power(warmup=1)
    norm(x, mask)
    torch.testing.assert_close(norm.running_psi2, 0.9 + 0.1 * x[mask].square().mean(0))


def test_per_step_power_norm_keeps_each_steps_statistic():
    norm = power(warmup=1, layout="steps")
    assert isinstance(norm, TimePowerNorm)
    assert not make_norm_factory(norm_spec("power"), "steps").recentres
    x = torch.randn(2, 4, 2) * 3  # a batch of 2; step 3 reuses step 2's child
    mask = torch.arange(4)[None, :] < torch.tensor([3, 1])[:, None]  # step 3: no real row
    y = norm(x, mask)
    psi = [x[:, t][mask[:, t]].square().mean(0) for t in range(3)]
    for t in range(3):
        expected = 0.1 * x[:, t] / torch.sqrt(psi[t] + EPS)  # warm-up; gamma starts at 0.1
        torch.testing.assert_close(y[:, t][mask[:, t]], expected[mask[:, t]])
        torch.testing.assert_close(norm.at(t).running_psi2, 0.9 + 0.1 * psi[t])
    # Step 3 is past the warm-up of the shared child and has no real row: the running
    # statistic normalizes it and nothing moves.
    torch.testing.assert_close(y[:, 3], 0.1 * x[:, 3] / torch.sqrt(0.9 + 0.1 * psi[2] + EPS))
    assert int(norm.at(3).num_batches_tracked) == 1 and norm.at(3) is norm.at(2)


def test_center_scale_and_counts():
    assert layer_formulas(norm_spec("power"), "images") == ("2C", "2C")  # gamma, beta; psi^2, nu
    assert layer_formulas(norm_spec("power", center=False, scale=False), "tokens") == ("0", "2C")
    assert layer_formulas(norm_spec("power"), "steps") == ("2C", "2CT")
    norm = power(warmup=0, layout="images", center=False)
    assert norm.bias is None and norm.weight is not None
    x = torch.randn(2, 2, 3, 3)
    psi2 = torch.tensor([1.0, 1.0])  # the initial running statistic
    torch.testing.assert_close(norm(x), x / torch.sqrt(psi2 + EPS).reshape(1, 2, 1, 1))


# ----------------------------------------------------------------------------- probes, PreciseBN


class TokenNet(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.norm = norm

    def forward(self, x, mask=None):
        return self.norm(x, mask=mask)


def test_probes_compare_psi_b_with_the_running_psi():
    norm = TokenPowerNorm(2, eps=EPS, warmup_steps=0)
    with torch.no_grad():
        norm.running_psi2.copy_(torch.tensor([1.0, 4.0]))
    net = TokenNet(norm.train())
    probes = Probes(net)
    with probes.watch_forward(True):
        net(X1.reshape(2, 2, 2))
    v = probes.flush()
    # psi_B^2 = [1.5, 2.5] against [1, 4]; no (n-1)/n: psi^2 is no variance.
    assert v["bn_gap/dvar/norm"] == pytest.approx(math.sqrt(0.5**2 + 1.5**2) / 2, rel=1e-6)
    tid = (abs(math.sqrt(1 + EPS) / math.sqrt(1.5 + EPS) - 1)
           + abs(math.sqrt(4 + EPS) / math.sqrt(2.5 + EPS) - 1)) / 2
    assert v["bn_gap/tid_sigma/norm"] == pytest.approx(tid, rel=1e-6)
    assert v["bn_gap/degenerate/norm"] == 0
    assert "bn_gap/dmu/norm" not in v and "bn_gap/tid_mu/norm" not in v  # no mean
    assert v["act/in_mean/norm"] == pytest.approx(float(X1.mean()), rel=1e-6)
    assert v["act/in_std/norm"] == pytest.approx(float(X1.std(correction=0)), rel=1e-6)


def test_precise_bn_psi2_is_the_mean_square_of_every_real_entry():
    norm = TokenPowerNorm(2, eps=EPS, warmup_steps=0)
    with torch.no_grad():
        norm.running_psi2.copy_(torch.tensor([9.0, 0.2]))
    norm.num_batches_tracked.fill_(50)
    net = TokenNet(norm)
    batches = []
    real = []
    for seed in (0, 1):
        x, mask = padded(seed, garbage=1e3)
        batches.append(Batch(x, torch.zeros(3, 4, dtype=torch.long), mask))
        real.append(x[mask])
    before = copy.deepcopy(norm.state_dict())
    stats = precise_bn_stats(net, batches)
    psi2 = torch.cat(real).double().square().mean(0)
    assert stats["norm"].count == 14
    torch.testing.assert_close(norm.population(stats["norm"])["var"].double(), psi2)
    distances = precise_distances(net, stats)
    assert set(distances) == {"bn_gap/precise_dvar/norm"}
    assert distances["bn_gap/precise_dvar/norm"] == pytest.approx(
        float((torch.tensor([9.0, 0.2]).double() - psi2).norm() / 2), rel=1e-5)
    x = torch.randn(2, 3, 2)
    with population_statistics(net, stats), torch.no_grad():
        torch.testing.assert_close(net(x), x / torch.sqrt(psi2.float() + EPS))
    for key, value in norm.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert norm.training


class Fixed:
    info = DataInfo(kind="text", num_classes=2)

    def __init__(self, batches):
        self.batches = batches

    def val_batches(self, batch_size, shuffle_seed=None):
        return iter(self.batches)


def test_val_batchstats_normalizes_each_batch_with_its_own_psi():
    norm = TokenPowerNorm(2, eps=EPS, warmup_steps=0)
    set_affine(norm, GAMMA.tolist(), BETA.tolist())
    with torch.no_grad():
        norm.running_psi2.copy_(torch.tensor([9.0, 0.2]))  # far from any batch's
    norm.num_batches_tracked.fill_(50)  # past warm-up: train mode uses the running psi^2
    net = TokenNet(norm).eval()
    batches = []
    for seed in (0, 1):
        x, mask = padded(seed, garbage=1e3)
        y = torch.randint(0, 2, (3, 4), generator=torch.Generator().manual_seed(seed))
        batches.append(Batch(x, y, mask))
    before = copy.deepcopy(norm.state_dict())
    got = evaluate_batchstats(net, Fixed(batches), 3, seed=0)
    total = correct = count = 0.0
    for b in batches:
        psi2 = b.x[b.mask].square().mean(0)  # this batch's own, by hand
        logits = (GAMMA * b.x / torch.sqrt(psi2 + EPS) + BETA)[b.mask]
        total += float(F.cross_entropy(logits, b.y[b.mask], reduction="sum"))
        correct += float((logits.argmax(-1) == b.y[b.mask]).sum())
        count += int(b.mask.sum())
    assert got["val_batchstats/loss"] == pytest.approx(total / count, rel=1e-5)
    assert got["val_batchstats/acc"] == pytest.approx(correct / count)
    assert norm.use_batch_stats is False and not norm.training
    for key, value in norm.state_dict().items():
        assert torch.equal(value, before[key]), key
    with torch.no_grad():  # train mode alone would have used the running psi^2
        b = batches[0]
        assert not torch.allclose(net.train()(b.x, b.mask)[b.mask],
                                  (GAMMA * b.x / torch.sqrt(b.x[b.mask].square().mean(0) + EPS)
                                   + BETA)[b.mask])


@pytest.mark.slow
def test_a_tiny_transformer_run_logs_the_gaps_and_both_validations(tmp_path):
    config = compose_config(["dataset=synthetic_text", "model=transformer", "norm=power",
                             "norm.warmup_steps=2", "dataset.n_train=64", "dataset.n_val=32",
                             "batch_size=16", "steps=4", "log_every=2", "eval_every=4",
                             "precise_bn_batches=2"])
    summary = run_experiment(config, tmp_path, live=False)
    assert summary["status"] == "completed"
    tags = read_scalars(tmp_path)
    layers = {t.split("/", 2)[2] for t in tags if t.startswith("bn_gap/dvar/")}
    assert layers and all(f"bn_gap/tid_sigma/{layer}" in tags for layer in layers)
    assert all(f"bn_gap/precise_dvar/{layer}" in tags for layer in layers)
    assert not any(t.startswith(("bn_gap/dmu/", "bn_gap/tid_mu/", "bn_gap/precise_dmu/"))
                   for t in tags)
    for family in ("val_batchstats/loss", "val_batchstats/bpc", "val_precise/loss",
                   "val_gap/loss", "act/in_std/" + min(layers)):
        assert family in tags, family
    for tag, points in tags.items():
        if tag.startswith(("bn_gap/", "val")):
            assert all(math.isfinite(v) for _, v in points), tag
