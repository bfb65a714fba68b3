"""Cross-sample similarity against numpy on fixed tensors, and the hooks that collect it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from normbench.models import build_model
from normbench.norms.steps import PerStepNorm
from normbench.probes.similarity import SimilarityProbe, mean_cosine_similarity, similarity_places
from tests.helpers.config_defaults import model_options, norm_spec


def numpy_mean_cosine(rows: np.ndarray) -> float:
    """Mean of cos(r_i, r_j) over ordered pairs i != j of non-zero rows, by the full matrix."""
    rows = rows[np.linalg.norm(rows, axis=1) > 0].astype(np.float64)
    n = len(rows)
    if n < 2:
        return math.nan
    units = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    gram = units @ units.T
    return float((gram.sum() - np.trace(gram)) / (n * (n - 1)))


def test_images_compare_whole_samples():
    x = torch.randn(7, 3, 4, 4, generator=torch.Generator().manual_seed(0)) + 0.3
    expected = numpy_mean_cosine(x.reshape(7, -1).numpy())
    assert mean_cosine_similarity(x).item() == pytest.approx(expected, rel=1e-6)


def test_identical_samples_are_one_and_opposite_pairs_minus_one():
    row = torch.randn(5)
    assert mean_cosine_similarity(row.repeat(4, 1)).item() == pytest.approx(1.0, abs=1e-6)
    assert mean_cosine_similarity(torch.stack([row, -row])).item() == pytest.approx(-1.0, abs=1e-6)


def test_tokens_pair_samples_at_the_same_position_and_skip_padding():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 5, generator=g)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    x_padded = x.clone()
    x_padded[~mask] = 1e6  # whatever padding holds never enters
    total = pairs = 0.0
    for t in range(3):
        rows = x[mask[:, t], t].numpy()
        n = len(rows)
        if n >= 2:
            total += numpy_mean_cosine(rows) * n * (n - 1)
            pairs += n * (n - 1)
    # position 0: 3 real samples (6 pairs), position 1: 2 (2 pairs), position 2: 1 (none)
    assert pairs == 8
    got = mean_cosine_similarity(x_padded, mask).item()
    assert got == pytest.approx(total / pairs, rel=1e-6)


def test_zero_rows_one_row_and_no_row():
    x = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    assert mean_cosine_similarity(x).item() == pytest.approx(1 / math.sqrt(2), rel=1e-6)
    assert math.isnan(mean_cosine_similarity(x[:2]).item())  # one non-zero row: no pair
    steps_mask = torch.tensor([True, False, False])
    assert math.isnan(mean_cosine_similarity(x, steps_mask).item())


def test_step_rows_take_their_row_mask():
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([1, 0, 1, 1, 0], dtype=torch.bool)
    expected = numpy_mean_cosine(x[mask].numpy())
    assert mean_cosine_similarity(x, mask).item() == pytest.approx(expected, rel=1e-6)


def test_nearly_equal_samples_are_within_float32_rounding():
    # the sums of unit rows are float32 (no float64 copy of an activation): near 1 the
    # value is exact to ~1e-6, enough to tell 0.9999 from 0.99999
    g = torch.Generator().manual_seed(3)
    base = torch.ones(1000)
    x = torch.stack([base + 2e-3 * torch.randn(1000, generator=g) for _ in range(16)])
    expected = numpy_mean_cosine(x.numpy())
    assert 1 - expected == pytest.approx(4e-6, rel=0.2)
    assert abs(mean_cosine_similarity(x).item() - expected) < 1e-6


def test_probe_averages_pairs_over_the_calls_of_a_module():
    norm = nn.Identity()
    probe = SimilarityProbe(nn.Sequential())
    probe.places = {"cell": norm}
    a = torch.randn(3, 4, generator=torch.Generator().manual_seed(4))
    b = torch.randn(2, 4, generator=torch.Generator().manual_seed(5))
    with probe.watch(True):
        norm(a)
        norm(b)
        norm(b[:1])  # one sample: adds no pair
    value = probe.take()["act/similarity/cell"].item()
    expected = (numpy_mean_cosine(a.numpy()) * 6 + numpy_mean_cosine(b.numpy()) * 2) / 8
    assert value == pytest.approx(expected, rel=1e-6)
    assert not norm._forward_hooks and probe.take() == {}


@pytest.mark.parametrize("norm", ["batch", "none"])
def test_places_are_the_norm_layers_and_none_identities(norm):
    from normbench.data import DataInfo

    info = DataInfo(kind="text", num_classes=11, seq_len=6)
    model = build_model(model_options("lstm", depth=1, hidden=8, embed=8, t_max=6),
                        norm_spec(norm), info)
    places = similarity_places(model)
    # per-step BN: one child per time step for norm_h and norm_c, norm_x's too; never the container
    assert places and not any(isinstance(m, PerStepNorm) for m in places.values())
    probe = SimilarityProbe(model)
    x = torch.randint(0, 11, (4, 6))
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[0, 3:] = False
    with probe.watch(True):
        model(x, mask=mask)
    values = probe.take()
    assert values and all(tag.startswith("act/similarity/") for tag in values)
    assert all(-1 <= v.item() <= 1 for v in values.values() if not math.isnan(v.item()))


@pytest.mark.parametrize("scale", [2e17, 1e-23])
def test_a_cosine_does_not_depend_on_the_scale_of_huge_or_tiny_activations(scale):
    # A diverging network without normalization reaches activations whose squared norm per
    # sample overflows float32 (> 3.4e38) while its loss is still finite: with that norm at
    # inf every row would count as 0 (-1/7 here); tiny ones (a subnormal squared norm) would
    # read as a false collapse (above 1).
    x = torch.randn(8, 64, 16, 16, generator=torch.Generator().manual_seed(0))
    expected = mean_cosine_similarity(x).item()
    assert mean_cosine_similarity(x * scale).item() == pytest.approx(expected, abs=1e-5)
