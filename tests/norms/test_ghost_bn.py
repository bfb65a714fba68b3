"""Ghost BatchNorm (norm.stats_batch=k): statistics from groups of k samples."""

import copy

import pytest
import torch
from torch import nn

from normbench.engine.train import run_experiment
from normbench.norms import (
    GhostBatchNorm2d,
    StepBatchNorm,
    TokenBatchNorm,
    create_norm,
)
from normbench.norms.stats import batch_moments, bn_training_stats
from tests.helpers.common import compose_config, run_cli
from tests.helpers.config_defaults import norm_spec


def affine_randomized(bn):
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn


def test_unset_is_exactly_torch_batchnorm():
    torch.manual_seed(0)
    layer = affine_randomized(create_norm(norm_spec("batch", momentum=0.2), "images", 4))
    ref = nn.BatchNorm2d(4, momentum=0.2)
    ref.load_state_dict(layer.state_dict())
    for n in (8, 5):  # torch's own forward, whatever the batch size
        x = torch.randn(n, 4, 3, 3) * 2 + 1
        assert torch.equal(layer(x), ref(x)) and torch.equal(layer(x, mask=None), ref(x))
    for key, value in ref.state_dict().items():
        assert torch.equal(layer.state_dict()[key], value), key
    layer.eval(), ref.eval()
    assert torch.equal(layer(x), ref(x))


def test_k_equal_to_the_batch_is_exactly_batchnorm2d():
    torch.manual_seed(0)
    ghost = affine_randomized(GhostBatchNorm2d(3, stats_batch=8, momentum=0.2))
    ref = nn.BatchNorm2d(3, momentum=0.2)
    ref.load_state_dict(ghost.state_dict())
    for _ in range(3):
        x = torch.randn(8, 3, 4, 5) * 2 + 1
        assert torch.equal(ghost(x), ref(x))
    assert torch.equal(ghost.running_mean, ref.running_mean)
    assert torch.equal(ghost.running_var, ref.running_var)
    ghost.eval(), ref.eval()
    assert torch.equal(ghost(x), ref(x))


@pytest.mark.parametrize("n,k", [(8, 2), (12, 4), (6, 3)])
def test_groups_are_normalized_as_by_their_own_batchnorm(n, k):
    torch.manual_seed(1)
    m = 0.3
    ghost = affine_randomized(GhostBatchNorm2d(3, stats_batch=k, momentum=m))
    expected_mean, expected_var = torch.zeros(3), torch.ones(3)
    for _ in range(2):
        x = torch.randn(n, 3, 4, 4) * 3 - 1
        out = ghost(x)
        means, variances = [], []
        for g in range(n // k):
            own = nn.BatchNorm2d(3)
            own.load_state_dict(ghost.state_dict(), strict=False)
            part = x[g * k:(g + 1) * k]
            torch.testing.assert_close(out[g * k:(g + 1) * k], own(part))
            means.append(part.mean(dim=(0, 2, 3)))
            variances.append(part.var(dim=(0, 2, 3), correction=1))  # unbiased per group
        # The documented update: one EMA step towards the mean over groups.
        expected_mean = (1 - m) * expected_mean + m * torch.stack(means).mean(0)
        expected_var = (1 - m) * expected_var + m * torch.stack(variances).mean(0)
        torch.testing.assert_close(ghost.running_mean, expected_mean)
        torch.testing.assert_close(ghost.running_var, expected_var)


def test_token_groups_use_their_own_real_tokens():
    torch.manual_seed(2)
    lengths = torch.tensor([5, 2, 6, 1, 3, 4])
    x = torch.randn(6, 6, 4) * 2 + 1
    mask = torch.arange(6)[None, :] < lengths[:, None]
    x = x.masked_fill(~mask[..., None], 50.0)  # padding must not leak
    ghost = TokenBatchNorm(4, stats_batch=2)
    out = ghost(x, mask)
    for g in range(3):
        rows = slice(2 * g, 2 * g + 2)
        ref = nn.BatchNorm1d(4)
        real = x[rows][mask[rows]]
        torch.testing.assert_close(out[rows][mask[rows]], ref(real))


def test_lstm_step_groups_use_their_own_real_rows():
    torch.manual_seed(3)
    x = torch.randn(8, 5)
    mask = torch.tensor([True, True, True, False, True, True, True, True])
    bn = StepBatchNorm(5, stats_batch=4, affine=False)
    out = bn(x, mask=mask)
    for g in range(2):
        rows = slice(4 * g, 4 * g + 4)
        ref = nn.BatchNorm1d(5, affine=False)
        torch.testing.assert_close(out[rows][mask[rows]], ref(x[rows][mask[rows]]))


def test_probe_moments_are_the_pooled_batch_and_the_target_is_the_groups():
    torch.manual_seed(4)
    x = torch.randn(8, 2, 3, 3)
    x[:4] += 3.0  # groups with different means: the between-group variance matters
    bn = GhostBatchNorm2d(2, stats_batch=4)
    mean, var, count = batch_moments(bn, x)
    pooled_var, pooled_mean = torch.var_mean(x.transpose(0, 1).reshape(2, -1), dim=1,
                                             correction=0)
    torch.testing.assert_close(mean, pooled_mean)
    torch.testing.assert_close(var, pooled_var)
    assert count.item() == 8 * 9
    # What the running update moves towards: the groups' own statistics.
    mean_t, var_t, count_t, valid = bn_training_stats(bn, x)
    groups = x.reshape(2, 4, 2, 3, 3)
    torch.testing.assert_close(mean_t, groups.mean(dim=(1, 3, 4)).mean(0))
    torch.testing.assert_close(var_t, groups.var(dim=(1, 3, 4), correction=0).mean(0))
    assert count_t.item() == 4 * 9 and bool(valid)


def test_uneven_evaluation_tail_is_its_own_group():
    bn = GhostBatchNorm2d(2, stats_batch=4)
    x = torch.randn(10, 2, 3, 3)
    before = bn.running_mean.clone()
    out = bn(x)
    ref = nn.BatchNorm2d(2)
    torch.testing.assert_close(out[8:], ref(x[8:]))
    # Only the two full groups moved the running mean.
    torch.testing.assert_close(bn.running_mean,
                               0.9 * before + 0.1 * x[:8].reshape(2, 4, 2, 3, 3).mean(dim=(1, 3, 4)).mean(0))


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    ["dataset.n_train=256", "model.depth=8"],
    ["model=transformer", "dataset=synthetic_text", "optim=adamw", "lr=0.01"],
    ["model=lstm", "dataset=synthetic_text", "optim=adamw", "lr=0.01"],
])
def test_stats_batch_trains_in_every_model(tmp_path, overrides):
    config = compose_config([*overrides, "norm.stats_batch=8", "batch_size=16", "steps=4",
                             "eval_every=0", "log_every=2"])
    summary = run_experiment(config, tmp_path, live=False)
    assert summary["status"] == "completed"
    assert summary["stats_batch"] == 8 and summary["batch_size"] == 16


@pytest.mark.slow
def test_summary_records_the_whole_batch_when_unset(tmp_path, tiny_config):
    summary = run_experiment(tiny_config(), tmp_path, live=False)
    assert summary["stats_batch"] == summary["batch_size"] == 32


@pytest.mark.slow
@pytest.mark.parametrize("k,fragment", [(5, "does not divide batch_size=32"), (1, ">= 2")])
def test_bad_stats_batch_is_one_line_exit_2(tmp_path, k, fragment):
    result = run_cli("train", "batch_size=32", f"norm.stats_batch={k}", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in result.stderr


def test_ghost_buffers_survive_copy():
    bn = GhostBatchNorm2d(2, stats_batch=2)
    clone = copy.deepcopy(bn)
    assert clone.stats_batch == 2
