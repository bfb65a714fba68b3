"""Welch's t-test and the confidence interval of a difference of two means, from the seeds
of two report cells; Student's t distribution is scipy.stats.t.

Welch (1947): for samples a and b with means m_a, m_b, sample variances s_a², s_b² and sizes
n_a, n_b, the difference d = m_b - m_a has the standard error se = sqrt(s_a²/n_a + s_b²/n_b),
t = d / se, and the Welch–Satterthwaite degrees of freedom

    df = se⁴ / ((s_a²/n_a)² / (n_a - 1) + (s_b²/n_b)² / (n_b - 1)),

not n_a + n_b - 2 (that is the pooled test, which assumes equal variances: a BatchNorm cell
at a tiny statistics batch varies far more over seeds than a GroupNorm cell). The two-sided
p-value is P(|T_df| >= |t|) and the 95% interval is d ± t_{0.975, df} · se.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

LEVEL = 0.95  # of every confidence interval in the report
ALPHA = 1 - LEVEL  # a difference with p below this is marked significant

# scipy is imported by the functions that use it: importing scipy.stats takes a second or
# more, and the findings need only LEVEL from this module.


def incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), for a, b > 0 and 0 <= x <= 1."""
    from scipy import special

    # scipy answers a = 0 or b = 0 with the limit; here those are a caller's mistake.
    if not (a > 0 and b > 0 and 0.0 <= x <= 1.0):
        raise ValueError(f"incomplete_beta needs a, b > 0 and 0 <= x <= 1, got {a}, {b}, {x}")
    return float(special.betainc(a, b, x))


def _check_df(df: float) -> None:
    if not df > 0:  # scipy would answer nan
        raise ValueError(f"degrees of freedom must be positive, got {df}")


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with `df` (> 0, not necessarily whole) degrees of freedom."""
    from scipy import stats

    _check_df(df)
    # The survival function of |t|, not 1 - cdf: keeps its digits for a huge |t|.
    return float(min(1.0, 2.0 * stats.t.sf(abs(t), df)))


def t_cdf(t: float, df: float) -> float:
    """P(T <= t)."""
    from scipy import stats

    _check_df(df)
    return float(stats.t.cdf(t, df))


def t_quantile(q: float, df: float) -> float:
    """The t with P(T <= t) = q, for 0 < q < 1 (e.g. q = 0.975: the 95% interval's factor)."""
    from scipy import stats

    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile level must be in (0, 1), got {q}")
    _check_df(df)
    return float(stats.t.ppf(q, df))


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
