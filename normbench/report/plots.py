"""The report's figures (matplotlib, headless): final metric vs the swept variable, training
curves, and BatchNorm's batch-vs-running statistics gaps over training.

Curves are drawn against the fraction of training done (step / total steps), so that runs
with different step counts (the same epochs at different batch sizes, or different models)
share one axis.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: reports are written on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from normbench.report.grid import Report, fmt_value  # noqa: E402
from normbench.report.runs import Run  # noqa: E402

SHRINKING_X = ("batch_size", "stats_batch")
METRIC_LABELS = {"val_err": "validation error (%)", "val_acc": "validation accuracy",
                 "val_loss": "validation loss", "train_loss": "training loss",
                 "val_bpc": "validation bits per character",
                 "val_bpt": "validation bits per token", "val_ppl": "validation perplexity"}


def write_plots(report: Report, out: Path) -> list[Path]:
    paths = [plot_metric_vs_x(report, out / f"{safe_name(report.metric)}_vs_{safe_name(report.x)}.png")]
    scalars = {id(r): r.scalars() for r in report.runs}
    if any("train/loss" in s for s in scalars.values()):
        paths.append(plot_curves(report, scalars, out / "curves.png"))
    if any(t.startswith("bn_gap/") for s in scalars.values() for t in s):
        paths.append(plot_gaps(report, scalars, out / "bn_gap.png"))
    return paths


def safe_name(name: str) -> str:
    """A metric or x name as part of a file name (bn_gap/mean/tid_sigma, unit,sample)."""
    return name.replace("/", "_").replace(",", "+")


def _x_positions(report: Report):
    """Numeric x positions and the axis scale: log2 for batch-size-like integers, log10 for
    learning rates and other positive floats that span a decade, categories otherwise."""
    cols = [c for c in report.columns if c is not None]  # None: runs the variable does not apply to
    numeric = all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in cols)
    if not numeric:
        return {c: i for i, c in enumerate(cols)}, "category"
    positive = all(c > 0 for c in cols)
    if positive and all(float(c).is_integer() for c in cols) and len(cols) > 1:
        return {c: float(c) for c in cols}, "log2"
    if positive and len(cols) > 1 and max(cols) / min(cols) >= 10:
        return {c: float(c) for c in cols}, "log10"
    return {c: float(c) for c in cols}, "linear"


def _colors(n: int, cmap: str = "tab10"):
    cm = plt.get_cmap(cmap)
    return [cm(i % 10) if cmap == "tab10" else cm(i / max(1, n - 1)) for i in range(n)]


def plot_metric_vs_x(report: Report, path: Path) -> Path:
    """Final metric vs the swept variable, one line per row, error bars = std over seeds
    (the layout of the GroupNorm paper's Figure 1)."""
    pos, scale = _x_positions(report)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    failed_marks = []
    for row, color in zip(report.rows, _colors(len(report.rows)), strict=True):
        xs, means, stds = [], [], []
        reference = report.cells.get((row, None))
        if reference is not None and reference.mean is not None:
            # A norm the swept variable does not apply to (GroupNorm vs the statistics
            # batch): one horizontal line, its seed spread as a band.
            ax.axhline(reference.mean, color=color, ls="--", lw=1.4,
                       label=f"{report.row_label(row)} (no {report.x.replace('_', ' ')})")
            if reference.std:
                ax.axhspan(reference.mean - reference.std, reference.mean + reference.std,
                           color=color, alpha=0.12)
        for col in report.columns:
            cell = report.cells.get((row, col))
            if cell is None or col is None:
                continue
            if cell.mean is not None:
                xs.append(pos[col])
                means.append(cell.mean)
                stds.append(cell.std or 0.0)
            elif cell.statuses:
                failed_marks.append((pos[col], color))
        if not xs:
            continue
        # Categories (text conditions) are not a continuum: points, no connecting line.
        ax.errorbar(xs, means, yerr=stds, marker="o", ms=4, capsize=3, lw=1.6, color=color,
                    label=report.row_label(row), ls="none" if scale == "category" else "-")
    if failed_marks:  # cells where no run completed: a cross at the top edge
        top = ax.get_ylim()[1]
        for i, (x, color) in enumerate(failed_marks):
            ax.plot([x], [top], marker="x", ms=9, mew=2, color=color, ls="none",
                    label="diverged / failed" if i == 0 else None, clip_on=False)
    if scale == "log2":
        ax.set_xscale("log", base=2)
    elif scale == "log10":
        ax.set_xscale("log", base=10)
    values = [c.mean for c in report.cells.values() if c.mean is not None]
    if values and min(values) > 0 and max(values) / min(values) >= 10:
        ax.set_yscale("log")  # a gap of 0.02 beside one of 0.3: both readable
    if report.x in SHRINKING_X:  # as in the GN paper: smaller batches to the right
        ax.invert_xaxis()
    ax.set_xticks(list(pos.values()))
    ax.set_xticklabels([fmt_value(c) for c in pos])
    ax.minorticks_off()
    ax.set_xlabel(report.x.replace("_", " "))
    ax.set_ylabel(METRIC_LABELS.get(report.metric, report.metric))
    ax.set_title(f"{METRIC_LABELS.get(report.metric, report.metric)} vs "
                 f"{report.x.replace('_', ' ')} (mean ± std over seeds)", fontsize=10)
    ax.grid(True, alpha=0.3)
    return save(fig, [ax], path, dpi=120)


def save(fig, axes, path: Path, dpi: int, fontsize: float | None = None) -> Path:
    """Lay out, put one legend for all panels outside them (to the right: inside, a legend
    covers whichever lines pass under it), write the PNG and free the figure. The saved
    image is widened to hold the legend (bbox_inches='tight')."""
    fig.tight_layout()
    handles: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)  # panels repeat labels: each once
    if handles:
        boxes = [ax.get_position() for ax in axes if ax.get_visible()]
        fig.legend(list(handles.values()), list(handles), loc="upper left", frameon=False,
                   bbox_to_anchor=(max(b.x1 for b in boxes) + 0.01, max(b.y1 for b in boxes)),
                   fontsize=fontsize, borderaxespad=0.0)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path


def _progress(run: Run, steps: np.ndarray) -> np.ndarray:
    total = run.summary.get("total_steps") or run.summary.get("steps") or (
        steps.max() if len(steps) else 1)
    return steps / max(1, float(total))


def _mean_curve(runs: list[Run], scalars: dict, tag_fn):
    """Average a per-run curve over seeds, on the steps all of them logged."""
    curves = [(r, tag_fn(scalars[id(r)])) for r in runs]
    curves = [(r, c) for r, c in curves if c is not None and len(c[0])]
    if not curves:
        return None
    common = set(curves[0][1][0].tolist())
    for _, (steps, _) in curves[1:]:
        common &= set(steps.tolist())
    steps = np.array(sorted(common))
    if not len(steps):
        return None
    values = np.mean([[dict(zip(s.tolist(), v.tolist(), strict=True))[k] for k in steps]
                      for _, (s, v) in curves], axis=0)
    return _progress(curves[0][0], steps), values


def _grid(n: int):
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False,
                             sharey=True)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def _runs_by(report: Report, row, col, completed: bool) -> list[Run]:
    return [r for r in report.runs
            if tuple(r.get(k) for k in report.row_keys) == row and r.get(report.x) == col
            and (r.status == "completed") == completed]


def plot_curves(report: Report, scalars: dict, path: Path) -> Path:
    """Training loss over training: one panel per row, one line per x value (mean over the
    seeds that completed); runs that diverged or failed are dotted, ending in a cross."""
    fig, axes = _grid(len(report.rows))
    colors = _colors(len(report.columns), "viridis")
    for ax, row in zip(axes, report.rows, strict=False):
        for col, color in zip(report.columns, colors, strict=True):
            label = f"{report.x}={fmt_value(col)}"
            mean = _mean_curve(_runs_by(report, row, col, True), scalars,
                               lambda s: s.get("train/loss"))
            if mean is not None:
                ax.plot(*mean, color=color, lw=1.4, label=label)
                label = None
            for r in _runs_by(report, row, col, False):
                curve = scalars[id(r)].get("train/loss")
                if curve is None or not len(curve[0]):
                    continue
                x, y = _progress(r, curve[0]), curve[1]
                ok = np.isfinite(y)
                ax.plot(x[ok], y[ok], color=color, lw=1, ls=":", label=label)
                if ok.any():
                    ax.plot(x[ok][-1], y[ok][-1], marker="x", color="red", ms=7, mew=2)
        ax.set_title(report.row_label(row))
        ax.set_xlabel("fraction of training")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("training loss")
    return save(fig, axes, path, dpi=110, fontsize=8)


def _layer_mean(scalars: dict, prefix: str):
    """A run's gap averaged over its BN layers, step by step."""
    tags = [t for t in scalars if t.startswith(prefix)]
    if not tags:
        return None
    steps = scalars[tags[0]][0]
    rows = [scalars[t][1] for t in tags if len(scalars[t][1]) == len(steps)]
    return steps, np.mean(rows, axis=0)


def plot_gaps(report: Report, scalars: dict, path: Path) -> Path:
    """BatchNorm's batch-vs-running gaps over training (PowerNorm, Shen et al. 2020, Fig. 2):
    ||mu_B - mu|| / d and ||sigma2_B - sigma2|| / d averaged over the BN layers, one line per
    row and x value that has BN layers (mean over completed seeds)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    curves = {}  # (row, x value) -> {prefix: (progress, gap)}, only where there are BN layers
    for row in report.rows:
        for col in report.columns:
            runs = _runs_by(report, row, col, True)
            found = {p: _mean_curve(runs, scalars, lambda s, p=p: _layer_mean(s, p))
                     for p in ("bn_gap/dmu/", "bn_gap/dvar/")}
            if any(c is not None for c in found.values()):
                curves[(row, col)] = found
    # One row (e.g. batch size sweep): a colour ramp along x; several rows: distinct colours.
    one_row = len({row for row, _ in curves}) == 1
    colors = _colors(len(curves), "viridis" if one_row or len(curves) > 10 else "tab10")
    for ((row, col), found), color in zip(curves.items(), colors, strict=True):
        label = report.row_label(row) + (
            f", {report.x}={fmt_value(col)}" if len(report.columns) > 1 else "")
        for ax, prefix in zip(axes, ("bn_gap/dmu/", "bn_gap/dvar/"), strict=True):
            if found[prefix] is not None:
                ax.plot(*found[prefix], color=color, lw=1.3, label=label)
    for ax, name in zip(axes, ("gap of means  ||μ_B − μ|| / d", "gap of variances  "
                               "||σ²_B − σ²|| / d"), strict=True):
        ax.set_title(name)
        ax.set_xlabel("fraction of training")
        if ax.has_data() and all(
                min(line.get_ydata()) > 0 for line in ax.get_lines() if len(line.get_ydata())):
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("mean over BatchNorm layers")
    return save(fig, axes, path, dpi=110, fontsize=8)
