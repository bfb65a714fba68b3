"""Masked and ghost BatchNorm for any mask: groups with fewer than 2 real entries, the
running update by real counts, and collapsed channels, against direct computations."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from normbench.data import build_dataset
from normbench.norms import TimeBatchNorm, TokenBatchNorm
from normbench.probes.monitor import Probes
from tests.helpers.config_defaults import norm_spec

D = 3


def real_masks(batches: int, batch_size: int = 16, seed: int = 0) -> list[torch.Tensor]:
    """(N, T) padding masks of synthetic_text training batches, as the loop draws them."""
    data = build_dataset(name="synthetic_text", n_train=512, n_val=16, seq_len=48)
    loader = data.train_loader(batch_size, seed=seed)
    return [next(loader).mask for _ in range(batches)]


def reference_target(x: torch.Tensor, mask: torch.Tensor, k: int):
    """The documented update target by boolean indexing: mean over the real rows of the groups
    with >= 2 of them, variance sum SS_g / sum (n_g - 1); None if no group qualifies."""
    rows, ss, dof = [], 0.0, 0
    for g in range(0, x.shape[0], k):
        real = x[g:g + k][mask[g:g + k]]
        if real.shape[0] >= 2:
            rows.append(real)
            ss = ss + (real - real.mean(0)).square().sum(0)
            dof += real.shape[0] - 1
    if not rows:
        return None
    return torch.cat(rows).mean(0), ss / dof


# Steps checked against the hand-computed EMA as well: common, rarer and rare (t = 47).
EXACT_STEPS = (0, 1, 30, 40, 44, 47)


@pytest.mark.slow
@pytest.mark.parametrize("k", [None, 2, 4])
def test_iid_inputs_through_real_padding_keep_every_step_at_the_true_statistics(k):
    """N(3, 1) inputs, 300 batches of real synthetic_text masks, per-step BN as in the LSTM."""
    masks = real_masks(300)  # each batch as wide as its longest sentence, as the loop gets it
    steps, group = 48, k or 16
    bn = TimeBatchNorm(D, steps, norm_spec("batch", stats_batch=k, momentum=None)).train()
    ema = TimeBatchNorm(D, steps, norm_spec("batch", stats_batch=k, momentum=0.1)).train()
    g = torch.Generator().manual_seed(0)
    ref_mean, ref_var = torch.zeros(steps, D), torch.ones(steps, D)
    updates, dof = torch.zeros(steps, dtype=torch.long), torch.zeros(steps)
    for mask in masks:
        for t in range(mask.shape[1]):
            x = torch.randn(16, D, generator=g) + 3.0
            y = bn.at(t)(x, mask[:, t])
            assert torch.isfinite(y).all()
            n_g = mask[:, t].reshape(-1, group).sum(1)
            updates[t] += bool((n_g >= 2).any())
            dof[t] += ((n_g - 1) * (n_g >= 2)).sum()
            if t in EXACT_STEPS:
                ema.at(t)(x, mask[:, t])
                target = reference_target(x, mask[:, t], group)
                if target is not None:  # the EMA with momentum 0.1, by hand
                    ref_mean[t] += 0.1 * (target[0] - ref_mean[t])
                    ref_var[t] += 0.1 * (target[1] - ref_var[t])
    assert updates[0] == 300 and updates[47] < 100  # real padding: late steps rarely valid
    for t in EXACT_STEPS:
        torch.testing.assert_close(ema.at(t).running_mean, ref_mean[t], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ema.at(t).running_var, ref_var[t], rtol=1e-4, atol=1e-5)
    for t in range(steps):
        step = bn.at(t)
        assert int(step.num_batches_tracked) == int(updates[t])
        if updates[t] == 0:  # never a valid group: the initial statistics
            assert torch.equal(step.running_mean, torch.zeros(D))
            assert torch.equal(step.running_var, torch.ones(D))
            continue
        # Cumulative average of the targets: within 4 standard errors of 3 / 1 everywhere,
        # and within a few percent where the data allow it.
        assert (step.running_var - 1).abs().max() < 4 * (2 / dof[t]) ** 0.5 + 0.02, t
        assert (step.running_mean - 3).abs().max() < 4 * (1 / (dof[t] + updates[t])) ** 0.5, t
        if dof[t] >= 2000:
            assert (step.running_var - 1).abs().max() < 0.1, t
            assert (step.running_mean / 3 - 1).abs().max() < 0.02, t


def test_degenerate_groups_are_normalized_with_the_pool_and_skip_the_update():
    torch.manual_seed(0)
    x = (torch.randn(6, D) * 2 + 1).requires_grad_()
    # Groups of 2 rows: 2 real rows, 1 real row, none.
    mask = torch.tensor([True, True, True, False, False, False])
    bn = TokenBatchNorm(D, stats_batch=2, momentum=0.5, affine=False).train()
    y = bn(x, mask)
    eps = bn.eps
    own_var, own_mean = torch.var_mean(x[:2].detach(), dim=0, correction=0)
    pool_var, pool_mean = torch.var_mean(x[:3].detach(), dim=0, correction=0)
    torch.testing.assert_close(y[:2], (x[:2] - own_mean) / (own_var + eps).sqrt())
    torch.testing.assert_close(y[2], (x[2] - pool_mean) / (pool_var + eps).sqrt())
    # Padding rows are normalized as zeros (finite whatever they hold).
    torch.testing.assert_close(y[3:], (0 - pool_mean.expand(3, D)) / (pool_var + eps).sqrt())
    (y * torch.randn(6, D)).sum().backward()
    assert torch.isfinite(x.grad).all()
    # Only the valid group moves the running statistics.
    torch.testing.assert_close(bn.running_mean, 0.5 * x[:2].detach().mean(0))
    torch.testing.assert_close(bn.running_var, 0.5 + 0.5 * x[:2].detach().var(0))
    assert int(bn.num_batches_tracked) == 1


def test_update_weights_the_valid_groups_by_their_real_tokens():
    torch.manual_seed(1)
    x = torch.randn(6, 4, D) * 3 - 1
    lengths = torch.tensor([3, 2, 1, 1, 1, 0])  # groups of 2 sequences: 5, 2 and 1 real tokens
    mask = torch.arange(4) < lengths[:, None]
    bn = TokenBatchNorm(D, stats_batch=2, momentum=1.0).train()
    y = bn(x, mask)
    a, b = x[:2][mask[:2]], x[2:4][mask[2:4]]
    ss = lambda r: (r - r.mean(0)).square().sum(0)  # noqa: E731
    torch.testing.assert_close(bn.running_mean, (5 * a.mean(0) + 2 * b.mean(0)) / 7)
    torch.testing.assert_close(bn.running_var, (ss(a) + ss(b)) / (4 + 1))
    # The last group (1 real token) uses the moments of all 8 real tokens.
    every = x[mask]
    var, mean = torch.var_mean(every, dim=0, correction=0)
    torch.testing.assert_close(y[4:][mask[4:]], (x[4:][mask[4:]] - mean) / (var + bn.eps).sqrt())


@pytest.mark.parametrize("k", [None, 2])
def test_a_step_with_fewer_than_two_real_rows_uses_the_running_statistics(k):
    bn = TokenBatchNorm(D, stats_batch=k).train()
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([1.0, -1.0, 0.5]))
        bn.running_var.copy_(torch.tensor([4.0, 0.25, 1.0]))
    before = {n: b.clone() for n, b in bn.named_buffers()}
    for real in ([True, False, False, False], [False] * 4):
        x = (torch.randn(4, D) * 5).requires_grad_()
        y = bn(x, torch.tensor(real))
        real_x = torch.where(torch.tensor(real)[:, None], x, 0.0)  # padding counts as 0
        expected = (real_x - bn.running_mean) / (bn.running_var + bn.eps).sqrt()
        torch.testing.assert_close(y, expected)
        y.sum().backward()
        assert torch.isfinite(x.grad).all()
        for name, buffer in bn.named_buffers():  # nothing moves, not even the counter
            assert torch.equal(buffer, before[name]), name


def test_a_constant_feature_in_a_batch_of_two_is_counted_and_maps_to_beta_in_eval():
    bn = TokenBatchNorm(D, stats_batch=2)
    with torch.no_grad():
        bn.bias.copy_(torch.tensor([0.1, 0.2, 0.3]))
    model = nn.Sequential(bn)
    probes = Probes(model)
    x = torch.tensor([[1.0, 5.0, -2.0], [3.0, 5.0, 2.0]])  # feature 1 is constant
    for _ in range(50):  # the running variance of feature 1 decays towards 0
        with probes.watch_forward(True):
            y = model(x)
    assert torch.isfinite(y).all() and torch.allclose(y[:, 1], torch.tensor(0.2))
    values = probes.flush()
    assert values["bn_gap/degenerate/0"] == 1
    # TID over the live channels only (0 and 2): the collapsed one has sigma_B = sqrt(eps).
    var_b, mean_b = torch.var_mean(x, dim=0, correction=0)
    sigma_b = (var_b + bn.eps).sqrt()
    sigma = (bn.running_var / 2 + bn.eps).sqrt()  # biased scale, n = 2 (last step's state)
    assert values["bn_gap/tid_sigma/0"] < 1
    assert math.isfinite(values["bn_gap/tid_mu/0"])
    assert (sigma[1] / sigma_b[1] - 1) > 1  # what the average would otherwise include
    assert probes.degenerate_layers() == ["0"]
    assert bn.collapsed.tolist() == [False, True, False]
    assert bn.running_var[1] < 1e-2
    model.eval()
    # The constant drifted off the running mean: eval still gives what training gave (beta),
    # not the lag times 1/sqrt(running_var + eps).
    shifted = x + torch.tensor([0.0, 0.05, 0.0])
    out = model(shifted)
    assert torch.isfinite(out).all()
    assert torch.equal(out[:, 1], torch.full((2,), 0.2))
    expected = ((shifted - bn.running_mean) / (bn.running_var + bn.eps).sqrt() * bn.weight
                + bn.bias)
    torch.testing.assert_close(out[:, [0, 2]], expected[:, [0, 2]])


def test_collapsed_flags_survive_a_state_dict_and_old_checkpoints_load():
    bn = TokenBatchNorm(D)
    bn.collapsed[1] = True
    clone = TokenBatchNorm(D)
    clone.load_state_dict(bn.state_dict())
    assert clone.collapsed.tolist() == [False, True, False]
    old = {k: v for k, v in bn.state_dict().items() if k != "collapsed"}
    clone.load_state_dict(old)  # a checkpoint from before the buffer existed
    assert not clone.collapsed.any()


def test_a_collapsed_group_channel_gives_beta_and_passes_no_amplified_gradient():
    x = torch.tensor([[1.0, 2.0], [1.0, -2.0], [0.5, 3.0], [4.0, 1.0]], requires_grad=True)
    bn = TokenBatchNorm(2, stats_batch=2).train()
    y = bn(x, torch.ones(4, dtype=torch.bool))
    assert torch.equal(y[:2, 0], bn.bias[0].expand(2))  # group 0, channel 0: constant
    (y * torch.tensor([[3.0, 1.0], [-5.0, 1.0], [2.0, 1.0], [-1.0, 3.0]])).sum().backward()
    assert torch.equal(x.grad[:2, 0], torch.zeros(2))  # not 1/sqrt(eps) * (g - mean g)
    assert torch.isfinite(x.grad).all() and x.grad[2:].abs().sum() > 0


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_a_non_finite_padding_entry_does_not_reach_the_real_statistics(bad):
    torch.manual_seed(3)
    x = torch.randn(4, D) * 2 + 1
    x[3] = bad
    mask = torch.tensor([True, True, True, False])
    bn = TokenBatchNorm(D, momentum=0.5)
    y = bn(x, mask)
    real = x[:3]
    ref = nn.BatchNorm1d(D, momentum=0.5)
    torch.testing.assert_close(y[:3], ref(real))
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    torch.testing.assert_close(bn.running_var, ref.running_var)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("stats_batch", [None, 2])
def test_a_non_finite_padding_entry_does_not_reach_the_real_gradients(bad, stats_batch):
    # A loss on the real rows only: 0 upstream at the padding, where 0 * inf would be NaN
    # in the gradient of the variance if the padding entered x - mean.
    torch.manual_seed(4)
    x = torch.randn(6, D) * 2 + 1
    mask = torch.tensor([True, True, True, False, True, True])
    upstream = torch.randn(6, D) * mask[:, None]
    grads = []
    for fill in (0.0, bad):
        xi = x.clone()
        xi[3] = fill
        xi.requires_grad_(True)
        bn = TokenBatchNorm(D, stats_batch=stats_batch)
        (bn(xi, mask) * upstream).sum().backward()
        grads.append((xi.grad, bn.weight.grad, bn.bias.grad))
    for clean, dirty in zip(*grads, strict=True):
        assert torch.isfinite(dirty).all()
        torch.testing.assert_close(dirty, clean)


@pytest.mark.parametrize("value", [3000.7, -30000.7, 123.4])
def test_a_large_constant_channel_counts_as_collapsed_in_float32(value):
    """fp32 rounding gives a constant channel of |mean| ~ 1e3..1e4 a variance of 1e-7..1e-4,
    above 1e-4 * eps; it is still constant, and normalizes to beta."""
    x = torch.cat([torch.full((64, 1), value), torch.randn(64, 1)], dim=1)
    bn = TokenBatchNorm(2, affine=False)
    y = bn(x)
    assert torch.equal(y[:, 0], torch.zeros(64))
    assert bn.collapsed.tolist() == [True, False]
    torch.testing.assert_close(y[:, 1], nn.BatchNorm1d(1, affine=False)(x[:, 1:])[:, 0])
