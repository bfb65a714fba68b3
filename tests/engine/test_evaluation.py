"""Evaluation: the loss over real targets and validation metrics weighted by them; the
train/eval discrepancy (batch-statistics evaluation and PreciseBN) checked against direct
computations, and the promise that the model, its buffers and the RNG come back untouched."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normbench.data import Batch, DataInfo
from normbench.data.synthetic import shapes_dataset
from normbench.engine.discrepancy import train_eval_discrepancy
from normbench.engine.evaluation import evaluate, evaluate_batchstats, loss_and_counts
from normbench.engine.precise_bn import population_statistics, precise_bn_stats
from normbench.norms import TokenBatchNorm


def test_loss_and_counts_on_padded_sequences_count_real_targets_only():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5)
    y = torch.tensor([[1, 2, 0], [4, 4, 4]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    loss, correct, count = loss_and_counts(logits, Batch(torch.zeros(2, 3), y, mask))
    real = F.cross_entropy(logits[mask], y[mask], reduction="none")
    assert float(count) == 3 and float(loss) == pytest.approx(float(real.mean()))
    assert float(correct) == float((logits[mask].argmax(-1) == y[mask]).sum())


class UnevenText:
    """Validation batches of 2 and 1 padded rows (5 and 1 real targets) of a fixed model."""

    info = DataInfo(kind="text", num_classes=4)

    def __init__(self):
        torch.manual_seed(1)
        self.batches = [Batch(torch.randn(2, 3, 4), torch.tensor([[0, 1, 2], [3, 3, 0]]),
                              torch.tensor([[True, True, True], [True, True, False]])),
                        Batch(torch.randn(1, 3, 4), torch.tensor([[2, 0, 0]]),
                              torch.tensor([[True, False, False]]))]

    def val_batches(self, batch_size, shuffle_seed=None):
        return iter(self.batches)


class Logits(nn.Module):
    """A model whose inputs are its logits."""

    def forward(self, x, mask=None):
        return x


def test_evaluate_weights_batches_by_real_targets_and_reports_bpc():
    data = UnevenText()
    metrics = evaluate(Logits(), data, batch_size=2)
    logits = torch.cat([b.x[b.mask] for b in data.batches])
    y = torch.cat([b.y[b.mask] for b in data.batches])
    loss = float(F.cross_entropy(logits, y))  # the mean over all 6 real targets
    assert metrics["val/loss"] == pytest.approx(loss)
    assert metrics["val/acc"] == pytest.approx(float((logits.argmax(-1) == y).float().mean()))
    assert metrics["val/bpc"] == pytest.approx(loss / math.log(2))


def conv_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 10))
    for m in net.modules():  # running statistics that differ from any batch's
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.num_batches_tracked.fill_(7)
    return net


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(model, before):
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k


def test_precise_bn_equals_pooled_statistics_over_uneven_batches():
    net = conv_net()
    net.train(False)
    batches = [Batch(torch.randn(n, 3, 6, 6) * 2 + 0.5, torch.zeros(n, dtype=torch.long))
               for n in (5, 2, 9, 3)]
    before = snapshot(net)
    stats = precise_bn_stats(net, batches)
    assert_same_state(net, before)
    assert not net.training and not net[1].training  # modes restored too

    # Direct computation: each layer's input, batch by batch, with BN in training mode
    # (a copy, so its buffers may change), pooled over all entries of all batches.
    ref = copy.deepcopy(net).train()
    inputs = {1: [], 4: []}
    with torch.no_grad():
        for b in batches:
            h = ref[0](b.x)
            inputs[1].append(h)
            h = ref[3](F.relu(F.batch_norm(h, None, None, ref[1].weight, ref[1].bias,
                                           training=True, eps=ref[1].eps)))
            inputs[4].append(h)
    for idx in (1, 4):
        pooled = torch.cat([x.transpose(0, 1).reshape(x.shape[1], -1) for x in inputs[idx]], 1)
        var, mean = torch.var_mean(pooled.double(), dim=1, correction=0)
        pop = stats[str(idx)]
        assert pop.count == pooled.shape[1] == 19 * 36
        assert torch.allclose(pop.mean.double(), mean, atol=1e-6)
        assert torch.allclose(pop.var.double(), var, rtol=1e-5)
        assert torch.allclose(pop.unbiased_var.double(), pooled.double().var(dim=1), rtol=1e-5)


class Net(nn.Module):
    """One masked token BatchNorm over 3 features."""

    def __init__(self):
        super().__init__()
        self.bn = TokenBatchNorm(3)

    def forward(self, x, mask=None):
        return self.bn(x, mask=mask)


def test_precise_bn_on_masked_tokens_counts_real_tokens_only():
    torch.manual_seed(1)
    net = Net()
    batches, real = [], []
    for n, t, lengths in ((2, 4, [4, 1]), (3, 6, [6, 2, 3])):
        x = torch.randn(n, t, 3) * 3 - 1
        mask = torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]
        batches.append(Batch(x, torch.zeros(n, t, dtype=torch.long), mask))
        real.append(x[mask])
    stats = precise_bn_stats(net, batches)["bn"]
    pooled = torch.cat(real).double()
    var, mean = torch.var_mean(pooled, dim=0, correction=0)
    assert stats.count == 16
    assert torch.allclose(stats.mean.double(), mean, atol=1e-6)
    assert torch.allclose(stats.var.double(), var, rtol=1e-5)


def test_population_statistics_are_used_in_eval_and_then_restored():
    net = conv_net().eval()
    batches = [Batch(torch.randn(4, 3, 6, 6), torch.zeros(4, dtype=torch.long))]
    stats = precise_bn_stats(net, batches)
    before = snapshot(net)
    x = torch.randn(2, 3, 6, 6)
    with population_statistics(net, stats), torch.no_grad():
        assert torch.equal(net[1].running_mean, stats["1"].mean)
        y = net(x)
    ref = copy.deepcopy(net)
    ref[1].running_mean.copy_(stats["1"].mean)
    ref[1].running_var.copy_(stats["1"].unbiased_var)
    ref[4].running_mean.copy_(stats["4"].mean)
    ref[4].running_var.copy_(stats["4"].unbiased_var)
    with torch.no_grad():
        assert torch.allclose(y, ref(x))
    assert_same_state(net, before)


def tiny_shapes(n_val: int):
    return shapes_dataset(n_train=64, n_val=n_val, image_size=8, seed=3)


def test_val_batchstats_equals_a_train_mode_forward_with_buffers_restored():
    data = tiny_shapes(n_val=9)  # batches of 4: 4, 4 and a tail of 1 that joins the last
    net = conv_net().eval()
    before = snapshot(net)
    rng = torch.get_rng_state()
    got = evaluate_batchstats(net, data, batch_size=4, seed=11)
    assert_same_state(net, before)
    assert torch.equal(torch.get_rng_state(), rng)
    assert not any(m.training for m in net.modules())

    g = torch.Generator().manual_seed(11)
    order = torch.randperm(9, generator=g)
    groups = [order[:4], order[4:]]  # the final sample merged into the second batch
    total_loss = correct = 0.0
    for idx in groups:
        ref = copy.deepcopy(net).train()  # fresh buffers each time: they must not matter
        x = data.normalize(data.val_x[idx])
        with torch.no_grad():
            logits = ref(x)
        total_loss += float(F.cross_entropy(logits, data.val_y[idx], reduction="sum"))
        correct += float((logits.argmax(1) == data.val_y[idx]).sum())
    assert got["val_batchstats/loss"] == pytest.approx(total_loss / 9, rel=1e-5)
    assert got["val_batchstats/acc"] == pytest.approx(correct / 9)


def test_discrepancy_leaves_model_rng_and_training_stream_untouched():
    data = tiny_shapes(n_val=10)
    net = conv_net().train()
    loader = data.train_loader(8, seed=0)
    next(loader)
    loader_state = copy.deepcopy(loader.state_dict())
    before = snapshot(net)
    rng = torch.get_rng_state()
    val = {"val/acc": 0.5, "val/loss": 2.0}
    out = train_eval_discrepancy(net, data, val, batch_size=8, eval_batch_size=5,
                                 precise_batches=3, seed=0)
    assert_same_state(net, before)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(m.training for m in net.modules())
    state = loader.state_dict()
    assert torch.equal(state["perm"], loader_state["perm"]) and state["pos"] == loader_state["pos"]
    assert torch.equal(state["generator"], loader_state["generator"])
    assert out["val_gap/acc"] == pytest.approx(0.5 - out["val_batchstats/acc"])
    assert {"val_precise/acc", "bn_gap/precise_dmu/1", "bn_gap/precise_dvar/4",
            "bn_gap/mean/precise_dmu", "bn_gap/max/precise_dvar"} <= out.keys()
    assert out["bn_gap/precise_dmu/1"] > 0  # running statistics were set far off


def test_discrepancy_is_empty_without_batchnorm():
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    assert train_eval_discrepancy(net, tiny_shapes(4), {"val/acc": 0.1}, batch_size=2,
                                  eval_batch_size=2, precise_batches=2, seed=0) == {}


# ----------------------------------------------------------------------------- ghost BatchNorm


def assert_population_of(stats, pooled: torch.Tensor) -> None:
    """PreciseBN's mean and biased variance equal those of `pooled` (entries, channels)."""
    var, mean = torch.var_mean(pooled.double(), dim=0, correction=0)
    assert torch.allclose(stats.mean.double(), mean, atol=1e-6)
    assert torch.allclose(stats.var.double(), var, rtol=1e-5)


def test_precise_bn_under_ghost_bn_pools_all_images_including_between_groups():
    from normbench.norms import GhostBatchNorm2d

    torch.manual_seed(2)
    net = nn.Sequential(GhostBatchNorm2d(3, stats_batch=2))
    batches = []
    for n in (4, 6, 5):  # 5: a last group of one image
        x = torch.randn(n, 3, 4, 4) * 2 + torch.arange(n).reshape(n, 1, 1, 1)  # groups differ
        batches.append(Batch(x, torch.zeros(n, dtype=torch.long)))
    stats = precise_bn_stats(net, batches)["0"]
    pooled = torch.cat([b.x for b in batches]).transpose(0, 1).reshape(3, -1).T
    assert stats.count == 15 * 16
    assert_population_of(stats, pooled)


def test_precise_bn_under_ghost_bn_pools_the_real_tokens_of_uneven_batches():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = TokenBatchNorm(3, stats_batch=2)

        def forward(self, x, mask=None):
            return self.bn(x, mask=mask)

    torch.manual_seed(3)
    batches, real = [], []
    for lengths in ([4, 1, 3, 2], [5, 2, 1, 0, 4, 5]):  # a group with 1 real token, one with 0
        n, t = len(lengths), max(lengths)
        x = torch.randn(n, t, 3) * 3 + torch.arange(n).reshape(n, 1, 1)
        mask = torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]
        batches.append(Batch(x, torch.zeros(n, t, dtype=torch.long), mask))
        real.append(x[mask])
    stats = precise_bn_stats(Net(), batches)["bn"]
    pooled = torch.cat(real)
    assert stats.count == pooled.shape[0] == 27
    assert_population_of(stats, pooled)


def test_precise_bn_leaves_out_a_layer_without_two_real_entries():
    mask = torch.tensor([[True, False], [False, False]])
    batch = Batch(torch.randn(2, 2, 3), torch.zeros(2, 2, dtype=torch.long), mask)
    assert precise_bn_stats(Net(), [batch]) == {}  # its running statistics stay in use
