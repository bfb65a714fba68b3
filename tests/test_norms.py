"""The norm registry against the formulas of DESIGN.md §3 and PyTorch's reference layers."""

import pytest
import torch
from torch import nn

from normbench.errors import UserError
from normbench.norms import (
    NORMS,
    NormSpec,
    TokenBatchNorm,
    batch_moments,
    check_norms,
    norm_factory,
)

torch.manual_seed(0)


def standardize(x, dims):
    var, mean = torch.var_mean(x, dim=dims, keepdim=True, correction=0)
    return (x - mean) / torch.sqrt(var + 1e-5)


@pytest.mark.parametrize("n", [2, 5])
def test_image_norms_match_their_formulas(n):
    x = torch.randn(n, 8, 4, 3) * 3 + 1
    make = lambda name, **kw: norm_factory(NormSpec(name=name, num_groups=4, **kw), "image")(8)  # noqa: E731
    torch.testing.assert_close(make("batch")(x), standardize(x, (0, 2, 3)))
    torch.testing.assert_close(make("layer")(x), standardize(x, (1, 2, 3)))
    grouped = standardize(x.reshape(n, 4, 2, 4, 3), (2, 3, 4)).reshape_as(x)
    torch.testing.assert_close(make("group")(x), grouped)
    assert torch.equal(make("none")(x), x)


def test_token_norms_match_their_formulas():
    x = torch.randn(3, 5, 8) * 2 - 1
    make = lambda name: norm_factory(NormSpec(name=name, num_groups=2), "tokens")(8)  # noqa: E731
    torch.testing.assert_close(make("layer")(x), standardize(x, (2,)))
    grouped = standardize(x.reshape(3, 5, 2, 4), (3,)).reshape_as(x)
    torch.testing.assert_close(make("group")(x), grouped)
    torch.testing.assert_close(make("batch")(x), standardize(x, (0, 1)))
    assert torch.equal(make("none")(x, mask=None), x)


def test_feature_norms_match_their_formulas():
    x = torch.randn(4, 6)
    make = lambda name: norm_factory(NormSpec(name=name, num_groups=3), "features")(6)  # noqa: E731
    torch.testing.assert_close(make("batch")(x), standardize(x, (0,)))
    torch.testing.assert_close(make("layer")(x), standardize(x, (1,)))
    torch.testing.assert_close(make("group")(x), standardize(x.reshape(4, 3, 2), (2,)).reshape_as(x))


@pytest.mark.parametrize("lengths", [[5, 2], [1, 4, 3], [6, 6]])
def test_token_batchnorm_uses_only_real_tokens(lengths):
    """Same outputs on real tokens and same running buffers as BatchNorm1d fed only those."""
    n, t, d = len(lengths), 6, 4
    x = torch.randn(n, t, d) * 2 + 3
    mask = torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]
    x = x.masked_fill(~mask[..., None], 1e3)  # padding garbage must not leak into statistics
    ours, ref = TokenBatchNorm(d), nn.BatchNorm1d(d)
    for _ in range(3):
        out = ours(x, mask)
        expected = ref(x[mask])
        torch.testing.assert_close(out[mask], expected)
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    mean, var, count = batch_moments(ours, x, mask)
    assert count.item() == sum(lengths)
    torch.testing.assert_close(mean, x[mask].mean(0))
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x, mask)[mask], ref(x[mask]))


def test_batchnorm_train_and_eval_differ_and_running_var_is_unbiased():
    bn = norm_factory(NormSpec(name="batch", momentum=0.1), "image")(3)
    x = torch.randn(2, 3, 2, 2) * 4 + 2  # batch of 2: n = 8 values per channel
    y_train = bn(x)
    batch_var = x.var(dim=(0, 2, 3), correction=1)
    torch.testing.assert_close(bn.running_var, 0.9 * torch.ones(3) + 0.1 * batch_var)
    torch.testing.assert_close(bn.running_mean, 0.1 * x.mean(dim=(0, 2, 3)))
    bn.eval()
    y_eval = bn(x)
    expected_eval = (x - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + 1e-5)
    torch.testing.assert_close(y_eval, expected_eval)
    assert not torch.allclose(y_train, y_eval, atol=1e-2)


def test_per_sample_norms_ignore_the_rest_of_the_batch():
    x = torch.randn(4, 8, 3, 3)
    for name in ("layer", "group"):
        norm = norm_factory(NormSpec(name=name, num_groups=4), "image")(8)
        torch.testing.assert_close(norm(x)[:1], norm(x[:1]))


def test_unknown_norm_names_the_choices():
    with pytest.raises(UserError) as err:
        norm_factory(NormSpec(name="instance"), "image")
    for name in NORMS:
        assert name in str(err.value)


def test_group_count_that_does_not_divide_names_the_layer():
    make = norm_factory(NormSpec(name="group", num_groups=3), "image")
    model = nn.Sequential(nn.Conv2d(3, 6, 1), make(6), nn.Sequential(nn.Conv2d(6, 8, 1), make(8)))
    with pytest.raises(UserError) as err:
        check_norms(model)
    line = err.value.line()
    assert "'2.1'" in line and "8 channels" in line and "num_groups=3" in line
    assert "\n" not in line
