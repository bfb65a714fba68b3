"""The report's grid: runs grouped into rows (norm, plus model/arch/dataset/lr when they vary)
and columns (the swept variable), one cell of seed statistics per group.

Plain data shared by the report's outputs (`normbench.report.command`) and its figures
(`normbench.report.plots`); it imports neither.
"""

from __future__ import annotations

import difflib
import math
import statistics
from dataclasses import dataclass, field

from normbench.errors import UserError
from normbench.report.runs import Run

# Candidates for --x auto, in order: the first that takes several values is the swept one.
AUTO_X = ("batch_size", "stats_batch", "lr", "weight_decay", "num_groups", "group_size", "depth",
          "width")
# model.arch and model.target: which model a builder made (model=torchvision, timm, custom);
# residual_init: norm=none with and without SkipInit are two rows (experiment=landscape).
ROW_KEYS = ("model", "arch", "target", "dataset", "norm", "residual_init")
# summary.json's final values of the why-probes (landscape_loss_range, hessian_lambda_max, ...)
WHY_PREFIXES = ("landscape_", "ics_", "hessian_", "act_similarity_")


def metric_direction(metric: str) -> str | None:
    """'higher' or 'lower' is better, or None for a metric with no better side.

    Read from the name, so every accuracy (val_acc, val_precise_acc, val_batchstats_acc,
    any added later) is maximized without a list to keep in step. None for a logged probe
    (a TensorBoard tag: a gap, a gradient norm) and for the train/eval discrepancy
    (val_gap_*: running minus batch statistics), which are only higher or lower; a gap of
    either sign means the two evaluations disagree. None for the why-probes' final values
    (curvature, smoothness, covariate shift, similarity: what they say is the question)."""
    if "/" in metric or metric.startswith(("val_gap_", *WHY_PREFIXES)):
        return None
    return "higher" if metric.split("_")[-1] in ("acc", "accuracy") else "lower"


def sort_key(value):
    """Numbers in numeric order, then everything else as text; None last (tuples of
    several swept values: element by element)."""
    if isinstance(value, tuple):
        return (1, tuple(map(sort_key, value)))
    if isinstance(value, bool) or value is None:
        return (2, str(value))
    if isinstance(value, (int, float)):
        return (0, float(value))
    return (1, str(value))


def fmt_value(value) -> str:
    if value is None:  # runs the swept variable does not apply to (GroupNorm vs stats_batch)
        return "n/a"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):  # several swept values (--x unit,sample): char/line
        return "/".join(map(fmt_value, value))
    return str(value)


def choose_x(runs: list[Run], x: str) -> str:
    if x != "auto":
        if all(r.get(x) is None for r in runs):
            known = sorted({k for r in runs for k, v in r.summary.items()
                            if not isinstance(v, dict)})
            close = difflib.get_close_matches(x, [*known, *AUTO_X], n=1)
            hint = f"did you mean --x {close[0]}? " if close else ""
            raise UserError(f"no run records '{x}'",
                            f"{hint}use a summary or config key, e.g. {', '.join(AUTO_X[:3])}")
        return x
    # Swept = varies among runs of the same model, dataset and norm (a key that differs
    # only between models, such as each model's own lr, is part of the setup, not a sweep).
    for key in AUTO_X:
        groups: dict[tuple, set] = {}
        for r in runs:
            if r.get(key) is not None:
                groups.setdefault(tuple(r.get(k) for k in ROW_KEYS), set()).add(r.get(key))
        if any(len(values) > 1 for values in groups.values()):
            return key
    return "batch_size"


@dataclass
class Cell:
    values: list[float] = field(default_factory=list)  # the metric of completed runs
    seeds: list = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)  # non-completed runs by status

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        # Sample standard deviation over seeds; one seed has none.
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    def text(self, digits: int | None = None) -> str:
        """'12.30 ± 0.40 (3)': mean ± std over the completed seeds, and how many there were.
        Two decimals, or three significant digits for a mean below 1 (a gap of 0.0374)."""
        parts = []
        if self.mean is not None:
            size = abs(self.mean)
            if digits is None and 0 < size < 1e-3:  # 3.74e-05 ± 2.1e-06
                mean, std = f"{self.mean:.3g}", f"{self.std:.2g}" if self.std is not None else ""
            else:
                if digits is None:  # 3 significant digits below 1; 2 decimals above
                    digits = 2 if round(size, 3) >= 1 or size == 0 else (
                        2 - math.floor(math.log10(size)))
                mean = f"{self.mean:.{digits}f}"
                std = f"{self.std:.{digits}f}" if self.std is not None else ""
            parts.append(mean + (f" ± {std}" if std else "") + f" ({len(self.values)})")
        parts += [f"{n} {status}" for status, n in sorted(self.statuses.items())]
        return ", ".join(parts) if parts else "-"


@dataclass
class Report:
    x: str
    metric: str
    row_keys: list[str]
    rows: list[tuple]
    columns: list
    cells: dict[tuple, Cell]  # (row, x value) -> Cell
    runs: list[Run]
    best_lr: dict[tuple, tuple[float, float]]  # row without lr -> (lr, mean metric)

    @property
    def higher_is_better(self) -> bool:
        return metric_direction(self.metric) == "higher"

    @property
    def directed(self) -> bool:
        """Whether one direction of the metric is better (`metric_direction`)."""
        return metric_direction(self.metric) is not None

    @property
    def direction_note(self) -> str:
        """'lower is better', or '' for an undirected metric."""
        direction = metric_direction(self.metric)
        return f"{direction} is better" if direction else ""

    def row_label(self, row: tuple) -> str:
        shown = [(k, v) for k, v in zip(self.row_keys, row, strict=True)]
        return " ".join(f"{k}={fmt_value(v)}" if k == "lr" else fmt_value(v) for k, v in shown)


def build_report(runs: list[Run], x: str = "auto", metric: str = "val_err") -> Report:
    x = choose_x(runs, x)
    completed = [r for r in runs if r.status == "completed"]
    if completed and all(r.metric(metric) is None for r in completed):
        if "/" in metric:  # a TensorBoard tag
            tags = sorted({t for r in completed for t in r.scalars()})
            close = difflib.get_close_matches(metric, tags, n=3)
            raise UserError(f"no completed run logged the scalar '{metric}' in the second half "
                            "of its training", f"use --metric with a logged tag, e.g. "
                            f"{', '.join(close or [t for t in tags if '/mean/' in t][:3] or tags[:3])}")
        names = sorted({k for r in completed for k in (r.summary.get("final") or {})})
        if "val_acc" in names:
            names.append("val_err")
        raise UserError(f"no completed run has the metric '{metric}'",
                        f"use --metric with one of: {', '.join(names)}, or a TensorBoard tag "
                        "such as bn_gap/mean/tid_sigma (its mean over the second half of training)")
    # Rows: the norm, plus model/arch/dataset when they vary, plus lr when it varies among runs
    # that share a row and an x value (an lr grid crossed with x rather than tied to it).
    row_keys = [k for k in ROW_KEYS if k == "norm" or len({r.get(k) for r in runs}) > 1]
    if x != "lr":
        groups: dict[tuple, set] = {}
        for r in runs:
            groups.setdefault((*(r.get(k) for k in row_keys), r.get(x)), set()).add(r.get("lr"))
        if any(len(lrs) > 1 for lrs in groups.values()):
            row_keys.append("lr")

    cells: dict[tuple, Cell] = {}
    for r in runs:
        row = tuple(r.get(k) for k in row_keys)
        cell = cells.setdefault((row, r.get(x)), Cell())
        value = r.metric(metric)
        if r.status == "completed" and value is not None and math.isfinite(value):
            cell.values.append(value)
            cell.seeds.append(r.get("seed"))
        else:
            status = r.status if r.status != "completed" else "no metric"
            cell.statuses[status] = cell.statuses.get(status, 0) + 1
    rows = sorted({row for row, _ in cells}, key=lambda row: tuple(map(sort_key, row)))
    columns = sorted({col for _, col in cells}, key=sort_key)
    report = Report(x, metric, row_keys, rows, columns, cells, runs, {})
    report.best_lr = best_lrs(report)
    return report


def best_lrs(report: Report) -> dict[tuple, tuple[float, float]]:
    """Per row (without lr), the learning rate with the best mean metric over its completed
    runs — only when lr was swept (as x, or as an independent row key)."""
    if (report.x != "lr" and "lr" not in report.row_keys) or not report.directed:
        return {}  # no sweep of lr, or a metric with no better side (a logged gap)
    keys = [k for k in report.row_keys if k != "lr"]
    by_lr: dict[tuple, dict[float, list[float]]] = {}
    for r in report.runs:
        value = r.metric(report.metric)
        if r.status != "completed" or value is None or not math.isfinite(value):
            continue
        by_lr.setdefault(tuple(r.get(k) for k in keys), {}).setdefault(r.get("lr"), []).append(
            value)
    pick = max if report.higher_is_better else min
    best = {}
    for row, lrs in by_lr.items():
        means = {lr: statistics.fmean(v) for lr, v in lrs.items()}
        lr = pick(means, key=means.get)
        best[row] = (lr, means[lr])
    return best
