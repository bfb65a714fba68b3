"""The report's findings paragraph: per row, the largest significant change along x (or
"flat within noise"), and how each row compares with the reference norm's row.

Every number it states is a difference of cell means with the half-width of its 95%
confidence interval (Welch), and every "significant" is p < 0.05, two-sided, uncorrected
for the number of comparisons; the paragraph's first sentence says so.
"""

from __future__ import annotations

from normbench.report.differences import (
    REFERENCE,
    Difference,
    against_reference,
    all_pairs,
    fmt_number,
    fmt_p,
)
from normbench.report.grid import Report, fmt_value
from normbench.report.significance import LEVEL

PREAMBLE = ("Differences are Welch's t-tests over seeds (two-sided; significant: p < 0.05, "
            "not corrected for the number of comparisons); ± is the half-width of the "
            f"{LEVEL:.0%} confidence interval of the difference of means.")


def findings(report: Report, reference: str | None) -> str:
    """The paragraph (plain text, one line per sentence joined by spaces)."""
    sentences = [PREAMBLE]
    has_x = len([c for c in report.columns if c is not None]) > 1
    for row in report.rows:
        if has_x:
            sentences.append(along_sentence(report, row))
    by_row: dict[tuple, list[Difference]] = {}
    for d in against_reference(report, reference):
        by_row.setdefault(d.b[0], []).append(d)
    for row, diffs in by_row.items():
        sentences.append(reference_sentence(report, row, diffs, reference))
    return " ".join(s for s in sentences if s)


def _amount(report: Report, d: Difference) -> str:
    unit = " points" if report.metric == "val_err" else f" ({report.metric})"
    t = d.test
    return f"{fmt_number(abs(t.diff), report.metric)} ± {fmt_number(t.half_width, report.metric)}{unit}"


def _evidence(d: Difference, first_is_a: bool = True) -> str:
    t = d.test
    seeds = (f"{t.n_a} seeds" if t.n_a == t.n_b else
             f"{t.n_a} and {t.n_b} seeds" if first_is_a else f"{t.n_b} and {t.n_a} seeds")
    if t.t is None:  # no spread in either cell
        return f"{seeds}, no spread between seeds"
    return f"{seeds}, p={fmt_p(t)}"


def _worse_is_b(report: Report, d: Difference) -> bool:
    """Whether cell b is worse than cell a (a larger error, or a smaller accuracy)."""
    return (d.test.diff < 0) if report.higher_is_better else (d.test.diff > 0)


def _words(report: Report, text: str) -> str:
    """Worse/better in the report's terms; higher/lower for a metric with no better side
    (treated as lower-is-better, so 'worse' is the higher one)."""
    if report.directed:
        return text
    return text.replace("worse", "higher").replace("better", "lower")


def along_sentence(report: Report, row: tuple) -> str:
    label, x = report.row_label(row), report.x
    cols = [c for c in report.columns if (row, c) in report.cells]
    if cols == [None]:
        n = len(report.cells[(row, None)].values)
        return f"{label} has no {x} (one cell, {n} seed{'s' * (n != 1)})."
    pairs = all_pairs(report, row)
    if not pairs:
        return ""
    tested = [d for d in pairs if d.test.tested]
    single = [c for c in cols if c is not None and len(report.cells[(row, c)].values) < 2]
    untested = (f"; not tested at {x} {', '.join(map(fmt_value, single))} (fewer than 2 seeds)"
                if single else "")
    significant = [d for d in tested if d.test.significant]
    if significant:
        d = max(significant, key=lambda d: abs(d.test.diff))
        worse_is_b = _worse_is_b(report, d)
        worse, better = (d.b[1], d.a[1]) if worse_is_b else (d.a[1], d.b[1])
        return (f"{label} at {x} {fmt_value(worse)} is {_amount(report, d)} "
                f"{_words(report, 'worse')} than at "
                f"{fmt_value(better)} ({_evidence(d, first_is_a=not worse_is_b)}){untested}.")
    if not tested:
        return f"{label}: no test along {x} (each cell has fewer than 2 seeds)."
    d = max(tested, key=lambda d: abs(d.test.diff))
    return (f"{label} is flat within noise along {x} (largest difference {_amount(report, d)}, "
            f"between {fmt_value(d.a[1])} and {fmt_value(d.b[1])}, {_evidence(d)}){untested}.")


def reference_sentence(report: Report, row: tuple, diffs: list[Difference],
                       reference: str) -> str:
    """'BN vs group (reference): worse at x 2, 4 (by up to ...); within noise at 8, 16.'"""
    x = report.x
    groups: dict[str, list[Difference]] = {"worse": [], "better": [], "within noise": [],
                                           "no test": []}
    for d in diffs:
        assert d.kind == REFERENCE
        if not d.test.tested:
            groups["no test"].append(d)
        elif not d.test.significant:
            groups["within noise"].append(d)
        else:
            groups["worse" if _worse_is_b(report, d) else "better"].append(d)
    parts = []
    for name, found in groups.items():
        if not found:
            continue
        where = ", ".join(fmt_value(d.b[1]) for d in found)
        where = f" at {x} {where}" if any(d.b[1] is not None for d in found) else ""
        text = f"{name}{where}"
        if name in ("worse", "better"):
            d = max(found, key=lambda d: abs(d.test.diff))
            at = f" at {fmt_value(d.b[1])}" if len(found) > 1 else ""
            text += f" (by {'up to ' if len(found) > 1 else ''}{_amount(report, d)}{at}, " \
                    f"{_evidence(d, first_is_a=False)})"
        elif name == "no test":
            text += " (fewer than 2 seeds in a cell)"
        parts.append(_words(report, text))
    return f"{report.row_label(row)} vs {reference} (reference): {'; '.join(parts)}."
