"""Welch's t-test and the confidence interval of a difference of two means, from the seeds
of two report cells; with the Student t distribution computed here (no scipy).

Welch (1947): for samples a and b with means m_a, m_b, sample variances s_a², s_b² and sizes
n_a, n_b, the difference d = m_b - m_a has the standard error se = sqrt(s_a²/n_a + s_b²/n_b),
t = d / se, and the Welch–Satterthwaite degrees of freedom

    df = se⁴ / ((s_a²/n_a)² / (n_a - 1) + (s_b²/n_b)² / (n_b - 1)),

not n_a + n_b - 2 (that is the pooled test, which assumes equal variances: a BatchNorm cell
at a tiny statistics batch varies far more over seeds than a GroupNorm cell). The two-sided
p-value is P(|T_df| >= |t|) and the 95% interval is d ± t_{0.975, df} · se.

The t distribution: P(|T_ν| >= t) = I_x(ν/2, 1/2) with x = ν / (ν + t²), where I is the
regularized incomplete beta function, evaluated by its continued fraction (modified Lentz);
the quantile is found by bisection on that tail probability.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

LEVEL = 0.95  # of every confidence interval in the report
ALPHA = 1 - LEVEL  # a difference with p below this is marked significant

_TINY = 1e-300  # Lentz: keeps a vanishing denominator from dividing by zero
_EPS = 1e-14
_MAX_TERMS = 100_000  # the fraction needs about sqrt(max(a, b)) terms: df up to ~1e9


def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b) (Numerical Recipes' betacf), by modified Lentz."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    h = d
    for m in range(1, _MAX_TERMS + 1):
        m2 = 2 * m
        for numerator in (m * (b - m) * x / ((qam + m2) * (a + m2)),
                          -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > _TINY else _TINY)
            c = 1.0 + numerator / c
            c = c if abs(c) > _TINY else _TINY
            delta = c * d
            h *= delta
        if abs(delta - 1.0) < _EPS:
            return h
    raise ArithmeticError(f"incomplete beta fraction did not converge (a={a}, b={b}, x={x})")


def incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), for a, b > 0 and 0 <= x <= 1."""
    if not (a > 0 and b > 0 and 0.0 <= x <= 1.0):
        raise ValueError(f"incomplete_beta needs a, b > 0 and 0 <= x <= 1, got {a}, {b}, {x}")
    if x in (0.0, 1.0):
        return x
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    # The fraction converges fast only below the mean of the beta distribution; above it,
    # use the symmetry I_x(a, b) = 1 - I_{1-x}(b, a).
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with `df` (> 0, not necessarily whole) degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    if math.isinf(t):
        return 0.0
    # x = df / (df + t^2) and 1 - x = t^2 / (df + t^2), written so that neither overflows
    # for a huge |t| nor loses its digits to 1 - x for a tiny one.
    r = abs(t) / math.sqrt(df)
    if r > 1.0:
        x = 1.0 / (1.0 + r * r) if r < 1e150 else (1.0 / r) / r
        return incomplete_beta(df / 2.0, 0.5, x)
    y = r * r / (1.0 + r * r)  # 1 - x, computed directly
    return 1.0 - incomplete_beta(0.5, df / 2.0, y)  # I_x(a, b) = 1 - I_{1-x}(b, a)


def t_cdf(t: float, df: float) -> float:
    """P(T <= t)."""
    tail = t_two_sided_p(t, df) / 2.0
    return 1.0 - tail if t > 0 else tail


def t_quantile(q: float, df: float) -> float:
    """The t with P(T <= t) = q, for 0 < q < 1 (e.g. q = 0.975: the 95% interval's factor)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile level must be in (0, 1), got {q}")
    if q == 0.5:
        return 0.0
    target = 2.0 * min(q, 1.0 - q)  # the two-sided tail beyond |t|
    low, high = 0.0, 1.0
    while t_two_sided_p(high, df) > target:  # bracket: the tail shrinks as |t| grows
        low, high = high, high * 2.0
    for _ in range(200):  # bisection: 200 halvings reach double precision from any bracket
        mid = 0.5 * (low + high)
        if mid in (low, high):
            break
        if t_two_sided_p(mid, df) > target:
            low = mid
        else:
            high = mid
    t = 0.5 * (low + high)
    return t if q > 0.5 else -t


@dataclass(frozen=True)
class Welch:
    """Welch's comparison of two samples a and b: the difference of means b - a.

    `p` and `half_width` are None when either sample has fewer than 2 values (no variance,
    so no test: `note` says so). When both samples have zero variance the difference is
    exact: half_width 0, p 0 (different) or 1 (equal), no t and no df.
    """

    n_a: int
    n_b: int
    diff: float | None  # mean(b) - mean(a); None when a sample is empty
    se: float | None = None
    t: float | None = None
    df: float | None = None
    p: float | None = None
    half_width: float | None = None  # of the LEVEL confidence interval of diff
    note: str = ""

    @property
    def tested(self) -> bool:
        return self.p is not None

    @property
    def significant(self) -> bool:
        return self.p is not None and self.p < ALPHA

    @property
    def interval(self) -> tuple[float, float] | None:
        if self.half_width is None or self.diff is None:
            return None
        return self.diff - self.half_width, self.diff + self.half_width


def welch(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> Welch:
    """Welch's t-test of mean(b) - mean(a), two-sided, with its `level` confidence interval."""
    n_a, n_b = len(a), len(b)
    if not n_a or not n_b:
        return Welch(n_a, n_b, None, note="no completed run")
    diff = statistics.fmean(b) - statistics.fmean(a)
    if n_a < 2 or n_b < 2:
        return Welch(n_a, n_b, diff, note=f"n={min(n_a, n_b)}, no test")
    va, vb = statistics.variance(a) / n_a, statistics.variance(b) / n_b
    if va == 0.0 and vb == 0.0:  # identical seeds in both cells: nothing is noise
        return Welch(n_a, n_b, diff, se=0.0, p=0.0 if diff else 1.0, half_width=0.0,
                     note="no spread in either cell: the difference is exact")
    se = math.sqrt(va + vb)
    # Welch–Satterthwaite, with the variances scaled to their sum first: the squares of
    # tiny (or huge) variances would underflow (or overflow) on their own.
    fa, fb = va / (va + vb), vb / (va + vb)
    df = 1.0 / (fa * fa / (n_a - 1) + fb * fb / (n_b - 1))
    t = diff / se
    return Welch(n_a, n_b, diff, se=se, t=t, df=df, p=t_two_sided_p(t, df),
                 half_width=t_quantile(0.5 + level / 2.0, df) * se)
