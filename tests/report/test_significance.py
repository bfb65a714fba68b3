"""Student's t distribution and Welch's test (normbench.report.significance) against published table
values and hand computations."""

from __future__ import annotations

import math
import statistics

import pytest

from normbench.report.significance import (
    incomplete_beta,
    t_cdf,
    t_quantile,
    t_two_sided_p,
    welch,
)


@pytest.mark.parametrize("t, df, p", [
    (2.0, 5, 0.1019),  # two-sided, from t tables
    (2.228, 10, 0.0500),
    (12.7062, 1, 0.0500),
    (1.0, 1, 0.5),  # Cauchy: P(|T| > 1) = 1/2 exactly
    (0.0, 7, 1.0),
])
def test_two_sided_p_matches_tables(t, df, p):
    assert t_two_sided_p(t, df) == pytest.approx(p, abs=5e-5)
    assert t_two_sided_p(-t, df) == t_two_sided_p(t, df)


def test_cauchy_and_normal_limits_in_closed_form():
    # df = 1 is the Cauchy distribution: P(T <= t) = 1/2 + atan(t)/pi.
    for t in (-3.0, -0.4, 0.7, 5.0):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
    # df = 2: P(T <= t) = 1/2 + t / (2 sqrt(2 + t^2)).
    for t in (-2.5, 0.3, 4.0):
        assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
    # Large df: the normal distribution, P(|Z| > 1.96) = erfc(1.96 / sqrt 2).
    assert t_two_sided_p(1.96, 1e7) == pytest.approx(math.erfc(1.96 / math.sqrt(2)), rel=1e-5)


@pytest.mark.parametrize("df, q", [(2, 4.3027), (4, 2.7764), (10, 2.2281), (30, 2.0423),
                                   (1, 12.7062)])
def test_quantile_matches_tables(df, q):
    assert t_quantile(0.975, df) == pytest.approx(q, abs=5e-5)
    assert t_quantile(0.025, df) == pytest.approx(-q, abs=5e-5)


def test_quantile_tends_to_the_normal_one_and_inverts_the_cdf():
    assert t_quantile(0.975, 1e6) == pytest.approx(1.959964, abs=1e-5)
    assert t_quantile(0.975, 1e4) > t_quantile(0.975, 1e6) > 1.959963
    for df in (1.5, 3, 5.16, 40):
        for q in (0.6, 0.9, 0.995):
            assert t_cdf(t_quantile(q, df), df) == pytest.approx(q, abs=1e-12)


def test_incomplete_beta_closed_forms():
    # I_x(a, 1) = x^a; I_x(1, b) = 1 - (1 - x)^b; I_x(a, b) + I_{1-x}(b, a) = 1.
    for x in (0.05, 0.3, 0.8, 0.99):
        assert incomplete_beta(2.5, 1, x) == pytest.approx(x ** 2.5, rel=1e-12)
        assert incomplete_beta(1, 3.5, x) == pytest.approx(1 - (1 - x) ** 3.5, rel=1e-12)
        assert incomplete_beta(4, 7, x) + incomplete_beta(7, 4, 1 - x) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        incomplete_beta(0, 1, 0.5)


def test_welch_on_two_cells_with_a_known_answer():
    w = welch([10, 11, 12], [20, 21, 22])
    assert w.diff == pytest.approx(10.0)
    assert w.se == pytest.approx(math.sqrt(2 / 3))
    assert w.t == pytest.approx(12.2474, abs=1e-4)
    assert w.df == pytest.approx(4.0)
    assert w.p == pytest.approx(2.552e-4, rel=1e-3)
    assert w.half_width == pytest.approx(2.2670, abs=1e-4)  # t_{0.975,4} * sqrt(2/3)
    assert w.interval == pytest.approx((7.7330, 12.2670), abs=1e-4)
    assert w.significant


def test_welch_degrees_of_freedom_are_not_the_pooled_ones():
    # Unequal sizes and variances: df = (1/3 + 2)^2 / ((1/3)^2/2 + 2^2/4) = 5.1579, not the
    # pooled 3 + 5 - 2 = 6 (which would give p = 1.44e-4 and a half-width of 3.738).
    a, b = [10, 11, 12], [20, 22, 24, 26, 28]
    w = welch(a, b)
    se2 = statistics.variance(a) / 3 + statistics.variance(b) / 5
    assert w.se == pytest.approx(math.sqrt(se2)) and se2 == pytest.approx(7 / 3)
    assert w.df == pytest.approx((7 / 3) ** 2 / ((1 / 3) ** 2 / 2 + 2 ** 2 / 4))
    assert w.df == pytest.approx(5.157895, abs=1e-6)
    assert w.t == pytest.approx(13 / math.sqrt(7 / 3))
    assert w.p == pytest.approx(3.1568e-4, rel=1e-3)
    assert w.half_width == pytest.approx(3.8907, abs=1e-4)


def test_within_noise_pair_is_not_significant():
    w = welch([20.0, 22.0, 21.0], [21.0, 23.0, 21.5])
    assert w.diff == pytest.approx(2.5 / 3)
    assert w.tested and not w.significant and w.p > 0.3
    low, high = w.interval
    assert low < 0 < high


def test_one_seed_has_no_test_and_no_interval():
    w = welch([10.0], [20.0, 21.0])
    assert w.diff == pytest.approx(10.5)
    assert w.p is None and w.half_width is None and w.interval is None
    assert not w.tested and not w.significant and w.note == "n=1, no test"
    assert welch([], [1.0, 2.0]).diff is None


def test_zero_variance_in_both_cells_is_an_exact_difference():
    same = welch([5.0, 5.0], [5.0, 5.0, 5.0])
    assert same.diff == 0 and same.p == 1.0 and same.half_width == 0 and not same.significant
    apart = welch([5.0, 5.0], [7.0, 7.0])
    assert apart.diff == 2.0 and apart.p == 0.0 and apart.interval == (2.0, 2.0)
    assert apart.significant and apart.t is None and "exact" in apart.note
    # One cell without spread: Welch's df are the other cell's n - 1.
    one = welch([5.0, 5.0, 5.0], [6.0, 7.0, 8.0])
    assert one.df == pytest.approx(2.0) and one.half_width == pytest.approx(4.3027 / math.sqrt(3),
                                                                             abs=1e-4)


def test_extreme_t_values_keep_their_digits():
    # Reference values from the closed forms: df = 1 is Cauchy, p = 1 - 2 atan(|t|) / pi,
    # and for |t| -> 0, p = 1 - 2 |t| f(0) with f(0) = Gamma((df+1)/2) / (sqrt(df pi) Gamma(df/2)).
    assert t_two_sided_p(1e155, 1) == pytest.approx(2 / (math.pi * 1e155), rel=1e-9)  # no overflow
    f0 = math.exp(math.lgamma(5000.5) - math.lgamma(5000)) / math.sqrt(1e4 * math.pi)
    assert 1 - t_two_sided_p(1e-6, 1e4) == pytest.approx(2e-6 * f0, rel=1e-6)  # not 1 - x's rounding


def test_welch_with_tiny_variances_has_the_satterthwaite_df():
    # [0, e] vs [0, 2e]: variances e^2/2 and 2 e^2, each over n = 2: df = 25/17 whatever e is.
    # At e = 1e-150 the squared variances (1e-600) underflow to 0 unless scaled first.
    result = welch([0.0, 1e-150], [0.0, 2e-150])
    assert result.df == pytest.approx(25 / 17, rel=1e-12)
    assert result.t == pytest.approx(0.5 / math.sqrt(1.25), rel=1e-9)
