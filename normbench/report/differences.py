"""Which differences in a report's grid are more than seed noise: Welch's t-test between
neighbouring cells along x in each row, and between each row and the reference norm's row
at the same x (`normbench.report.significance` does the statistics).

The reference is a norm whose row every other row is compared with, cell by cell: by
default the first of REFERENCE_NORMS present (GroupNorm, then LayerNorm: they use no batch
statistics, so they are the GN paper's yardstick for BatchNorm's batch-size dependence);
`--reference NORM` picks another (`none` included: it is a norm), `--reference VALUE` a
row by another key's value (`--reference resnet`: the model), and `--reference off`
turns the comparison off. A reference row that has no value of x (GroupNorm in a
statistics-batch sweep: one cell under "n/a") is compared with every x value of the other
rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

from normbench.errors import UserError
from normbench.report.grid import Report, fmt_value
from normbench.report.significance import Welch, welch

REFERENCE_NORMS = ("group", "layer")
ALONG, REFERENCE = "along", "reference"


@dataclass(frozen=True)
class Difference:
    """Cell b minus cell a, each a (row, x value) key of `Report.cells`."""

    kind: str  # ALONG: a and b neighbours in one row; REFERENCE: a is the reference's cell
    a: tuple
    b: tuple
    test: Welch


def choose_reference(report: Report, name: str = "auto") -> str | None:
    """The reference's name (a norm, or a value of another row key such as a model), or
    None for no reference comparison."""
    norms = sorted({row[report.row_keys.index("norm")] for row in report.rows}, key=str)
    if name == "off":  # not "none": that is a norm's name
        return None
    if name == "auto":
        found = [n for n in REFERENCE_NORMS if n in norms]
        return found[0] if found and len(norms) > 1 else None
    if reference_key(report, name) is None:
        values = [f"{key}={', '.join(sorted({fmt_value(row[i]) for row in report.rows}))}"
                  for i, key in enumerate(report.row_keys)]
        raise UserError(f"--reference {name}: no row of this report has {name}",
                        f"use a norm or another row's value ({'; '.join(values)}; KEY=VALUE "
                        "picks the key), or off")
    return name


def reference_key(report: Report, name: str) -> tuple[int, str] | None:
    """(position in the row, value) of the reference: `KEY=VALUE` names the key; a bare
    name is a norm if a norm is so called, else the first row key (model, dataset) that
    takes that value."""
    key, sep, value = name.partition("=")
    if sep:
        if key not in report.row_keys:
            return None
        i = report.row_keys.index(key)
        return (i, value) if any(fmt_value(row[i]) == value for row in report.rows) else None
    order = sorted(range(len(report.row_keys)), key=lambda i: report.row_keys[i] != "norm")
    for i in order:
        if any(fmt_value(row[i]) == name for row in report.rows):
            return i, name
    return None


def reference_row(report: Report, row: tuple, reference: str) -> tuple | None:
    """The reference's row for `row`. A norm reference: the row with the same other keys
    (model, dataset, lr). Another key's value (--reference resnet): the reference row that
    shares the most other keys with `row` (the same norm, whatever the dataset), if one
    does so alone."""
    found = reference_key(report, reference)
    if found is None:
        return None
    i, value = found
    if fmt_value(row[i]) == value:
        return None
    others = row[:i] + row[i + 1:]
    shared = {r: sum(a == b for a, b in zip(r[:i] + r[i + 1:], others, strict=True))
              for r in report.rows if fmt_value(r[i]) == value}
    best = max(shared.values(), default=None)
    if report.row_keys[i] == "norm" and best != len(others):
        return None  # a norm reference shares the model, dataset and lr, or is none
    top = [r for r, n in shared.items() if n == best]
    return top[0] if len(top) == 1 else None


def along_x(report: Report) -> list[Difference]:
    """Each row's neighbouring x values that both have a cell: b is the larger value. With
    several keys as x (unit, sample), neighbours differ in one key only, the others fixed:
    char/line -> char/window and char/line -> word/line, never char/window -> word/line."""
    found = []
    for row in report.rows:
        cols = [c for c in report.columns if c is not None and (row, c) in report.cells]
        if not any(isinstance(c, tuple) for c in cols):
            pairs = list(pairwise(cols))
        else:
            pairs = []
            for i in range(len(cols[0])):
                lines: dict[tuple, list] = {}  # the other keys' values -> columns along key i
                for c in cols:
                    lines.setdefault(c[:i] + c[i + 1:], []).append(c)
                for line in lines.values():
                    pairs += pairwise(line)  # columns are sorted, so each line is too
        for left, right in pairs:
            found.append(_compare(report, ALONG, (row, left), (row, right)))
    return found


def against_reference(report: Report, reference: str | None) -> list[Difference]:
    """Each other row's cells minus the reference's cell at the same x (or its one cell
    when the reference has no value of x)."""
    if reference is None:
        return []
    found = []
    for row in report.rows:
        ref = reference_row(report, row, reference)
        if ref is None:
            continue
        for col in report.columns:
            if (row, col) not in report.cells:
                continue
            ref_col = col if (ref, col) in report.cells else None
            if (ref, ref_col) in report.cells:
                found.append(_compare(report, REFERENCE, (ref, ref_col), (row, col)))
    return found


def _compare(report: Report, kind: str, a: tuple, b: tuple) -> Difference:
    return Difference(kind, a, b, welch(report.cells[a].values, report.cells[b].values))


def all_pairs(report: Report, row: tuple) -> list[Difference]:
    """Every pair of x values of one row (for the largest significant change along x)."""
    cols = [c for c in report.columns if c is not None and (row, c) in report.cells]
    return [_compare(report, ALONG, (row, left), (row, right))
            for i, left in enumerate(cols) for right in cols[i + 1:]]


# ----------------------------------------------------------------------------- text


def mark(test: Welch) -> str:
    """'*' significant (p < 0.05), '≈' within noise, '–' no test (a cell with one seed)."""
    if not test.tested:
        return "–"
    return "*" if test.significant else "≈"


def fmt_p(test: Welch) -> str:
    if not test.tested:
        return test.note
    if test.t is None:  # both cells without spread
        return "exact" if test.diff else "equal"
    return f"{test.p:.3f}" if test.p >= 0.001 else f"{test.p:.1e}"


def fmt_number(value: float, metric: str) -> str:
    return f"{value:.2f}" if metric == "val_err" else f"{value:.3g}"


def fmt_interval(test: Welch, metric: str) -> str:
    interval = test.interval
    if interval is None:
        return ""
    return f"[{fmt_number(interval[0], metric)}, {fmt_number(interval[1], metric)}]"


def difference_rows(report: Report, differences: list[Difference]) -> list[list[str]]:
    """Table rows: what is compared, at which x, difference, 95% CI, p, seeds, mark."""
    rows = []
    for d in differences:
        (row_a, col_a), (row_b, col_b) = d.a, d.b
        if d.kind == ALONG:
            what, where = report.row_label(row_b), f"{fmt_value(col_a)} → {fmt_value(col_b)}"
        else:
            what = f"{report.row_label(row_b)} − {report.row_label(row_a)}"
            where = fmt_value(col_b) + ("" if col_a == col_b else f" (vs {fmt_value(col_a)} column)")
        t = d.test
        diff = "" if t.diff is None else ("+" if t.diff >= 0 else "") + fmt_number(
            t.diff, report.metric)
        seeds = f"{t.n_a}, {t.n_b}" if d.kind == ALONG else f"{t.n_b}, {t.n_a}"  # as labelled
        rows.append([what, where, diff, fmt_interval(t, report.metric), fmt_p(t), seeds,
                     mark(t)])
    return rows
