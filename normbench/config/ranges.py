"""Numeric ranges of config values, and the one line that refuses a value outside one.

The config checks (normbench/config/checks.py) give a range to any key; a norm option
declares its range beside its default (normbench/norms/options.py), so that the pre-flight
check and `normbench list` say the same bounds in the same words.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real

from normbench.errors import UserError


def show_number(value: float) -> str:
    """An integer in full (a seed's bound), any other number in %g."""
    return str(value) if isinstance(value, int) else f"{value:g}"


def show_value(value) -> str:
    """A value as it is written in an override."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return "[" + ",".join(show_value(v) for v in value) + "]"
    return str(value)


@dataclass(frozen=True)
class Range:
    """The numbers a value may take: [low, high] (either end open), whole numbers only if
    `integer`, null too if `nullable`. `example` goes into the fix ("use e.g. KEY=..."),
    `why` after the bound (it starts with its own separator: " (...)" or "; ...")."""

    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    nullable: bool = False
    example: str = ""
    why: str = ""

    def contains(self, value) -> bool:
        if value is None:
            return self.nullable
        wanted = Integral if self.integer else Real
        return (not isinstance(value, bool) and isinstance(value, wanted)
                and (not isinstance(value, float) or math.isfinite(value))
                and (value > self.low if self.low_open else value >= self.low)
                and (value < self.high if self.high_open else value <= self.high))

    def bound(self) -> str:
        """The interval in words: "above 0", "1 or more", "between 0 and 1", ..."""
        low, high = show_number(self.low), show_number(self.high)
        if self.high == math.inf:
            return f"above {low}" if self.low_open else f"{low} or more"
        if not (self.low_open or self.high_open):
            return f"between {low} and {high}"
        return (f"{'above' if self.low_open else 'at least'} {low} and "
                f"{'below' if self.high_open else 'at most'} {high}")

    def words(self, finite: bool = True) -> str:
        """What a value must be: "an integer, 1 or more (or null)"."""
        what = "an integer" if self.integer else "a number" if finite else "a finite number"
        return f"{what}, {self.bound()}{' (or null)' if self.nullable else ''}"

    def check(self, label: str, value) -> None:
        """A UserError (one line: the value, the range, the fix) unless `value` is inside."""
        if self.contains(value):
            return
        finite = not isinstance(value, float) or math.isfinite(value)
        # optim.betas[1] is not an override; the example then is the whole list
        fix_key = label.split("[")[0]
        raise UserError(f"{label}={show_value(value)} must be {self.words(finite)}{self.why}",
                        f"use e.g. {fix_key}={self.example}")


def check_milestones(milestones) -> None:
    """sched=step's milestones: fractions of the steps in (0, 1], each above the last."""
    fix = "use e.g. sched.milestones=[0.333,0.667,0.889] (epochs 30, 60, 80 of 90)"
    if not isinstance(milestones, list | tuple):
        raise UserError(f"sched.milestones={show_value(milestones)} must be a list of fractions "
                        "of the steps", fix)
    for i, m in enumerate(milestones):
        Range(0, 1, low_open=True, example="[0.333,0.667,0.889]",
              why=" (a fraction of the steps)").check(f"sched.milestones[{i}]", m)
        if i and m <= milestones[i - 1]:
            raise UserError(f"sched.milestones={show_value(milestones)} must increase: "
                            f"{show_value(m)} follows {show_value(milestones[i - 1])}", fix)
