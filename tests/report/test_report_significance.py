"""What `normbench report` says about noise: seeds per cell, the differences between
neighbouring cells and against the reference norm, the findings paragraph, the legends.

The constructed grid (validation error in points, 3 seeds a cell unless said):

    batch_size     2               8               32
    batch      [30, 31, 32]    [22, 23, 24]    [20, 21, 22]
    group      [21, 22, 23]    [21, 22, 23]    [22, 23, 24]
    none       [40] (1 seed)   [35]            [33]

Every pair of 3-seed cells with unit sample variance has se = sqrt(2/3) and df = 4, so the
95% half-width is t_{0.975,4} * sqrt(2/3) = 2.2670 and the p-value depends on the
difference alone: 10 -> 2.552e-4, 9 -> 3.851e-4, 8 -> 6.082e-4, 2 -> 0.0705, 1 -> 0.2879
(two-sided, from the t distribution with 4 degrees of freedom).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from normbench.errors import UserError
from normbench.report import plots
from normbench.report.command import report_command
from normbench.report.differences import (
    against_reference,
    along_x,
    choose_reference,
    difference_rows,
    mark,
)
from normbench.report.findings import PREAMBLE, findings
from normbench.report.grid import build_report
from normbench.report.runs import find_runs
from tests.helpers.runs import fake_run

GRID = {
    "batch": {2: [30, 31, 32], 8: [22, 23, 24], 32: [20, 21, 22]},
    "group": {2: [21, 22, 23], 8: [21, 22, 23], 32: [22, 23, 24]},
    "none": {2: [40], 8: [35], 32: [33]},
}


def make_grid(root: Path, grid: dict = GRID, x: str = "batch_size") -> Path:
    for norm, cells in grid.items():
        for value, errs in cells.items():
            for seed, err in enumerate(errs):
                fake_run(root, f"{norm}_{value}_{seed}", norm=norm, seed=seed,
                         val_acc=1 - err / 100, **{x: value})
    return root


@pytest.fixture
def report(tmp_path):
    return build_report(find_runs([make_grid(tmp_path)]))


def test_cells_show_the_number_of_seeds(report):
    assert report.cells[(("batch",), 2)].text() == "31.00 ± 1.00 (3)"
    assert report.cells[(("none",), 8)].text() == "35.00 (1)"


def test_neighbouring_cells_along_x(report):
    diffs = {(d.b[0][0], d.a[1], d.b[1]): d.test for d in along_x(report)}
    assert set(diffs) == {(n, a, b) for n in GRID for a, b in ((2, 8), (8, 32))}
    step = diffs[("batch", 2, 8)]  # 23 - 31
    assert step.diff == pytest.approx(-8.0) and step.df == pytest.approx(4.0)
    assert step.p == pytest.approx(6.082e-4, rel=1e-3)
    assert step.interval == pytest.approx((-8 - 2.2670, -8 + 2.2670), abs=1e-4)
    assert mark(step) == "*"
    noise = diffs[("batch", 8, 32)]  # 21 - 23: within noise
    assert noise.p == pytest.approx(0.0705, abs=1e-4) and mark(noise) == "≈"
    assert mark(diffs[("none", 2, 8)]) == "–" and diffs[("none", 2, 8)].p is None


def test_the_reference_is_group_by_default_and_can_be_chosen_or_turned_off(report):
    assert choose_reference(report) == "group"
    assert choose_reference(report, "off") is None
    assert choose_reference(report, "none") == "none"  # the norm, not the switch
    assert choose_reference(report, "batch") == "batch"
    with pytest.raises(UserError, match="no row of this report has layer.*norm=batch, group, none"):
        choose_reference(report, "layer")


def test_no_batch_independent_norm_means_no_reference(tmp_path):
    grid = {"batch": GRID["batch"], "none": GRID["none"]}
    assert choose_reference(build_report(find_runs([make_grid(tmp_path, grid)]))) is None


def test_findings_for_the_constructed_grid(report):
    text = findings(report, "group")
    assert text.startswith(PREAMBLE)
    assert "± is the half-width of the 95% confidence interval" in PREAMBLE
    sentences = [
        # Largest significant change along x: 2 vs 32 (10 points), not 2 vs 8 (8 points).
        "batch at batch_size 2 is 10.00 ± 2.27 points worse than at 32 (3 seeds, p=2.6e-04).",
        # group's largest difference, 1 point (2 vs 32), has p = 0.288.
        "group is flat within noise along batch_size (largest difference 1.00 ± 2.27 points, "
        "between 2 and 32, 3 seeds, p=0.288).",
        "none: no test along batch_size (each cell has fewer than 2 seeds).",
        # batch - group: +9 at 2 (p = 3.9e-4), +1 at 8, -2 at 32 (p = 0.070).
        "batch vs group (reference): worse at batch_size 2 (by 9.00 ± 2.27 points, 3 seeds, "
        "p=3.9e-04); within noise at batch_size 8, 32.",
        "none vs group (reference): no test at batch_size 2, 8, 32 (fewer than 2 seeds in a "
        "cell).",
    ]
    assert text == " ".join([PREAMBLE, *sentences])


def test_better_than_the_reference_and_higher_is_better_metrics(tmp_path):
    grid = {"batch": {2: [30, 31, 32], 8: [10, 11, 12]}, "layer": {2: [20, 21, 22],
                                                                    8: [20, 21, 22]}}
    make_grid(tmp_path, grid)
    runs = find_runs([tmp_path])
    text = findings(build_report(runs), "layer")
    assert ("batch vs layer (reference): worse at batch_size 2 (by 10.00 ± 2.27 points, 3 seeds, "
            "p=2.6e-04); better at batch_size 8 (by 10.00 ± 2.27 points") in text
    # Accuracy: the same runs, where higher is better (worse = lower); differences in 0..1.
    acc = findings(build_report(runs, metric="val_acc"), "layer")
    assert "batch at batch_size 2 is 0.2 ± 0.0227 (val_acc) worse than at 8" in acc
    assert "worse at batch_size 2" in acc and "better at batch_size 8" in acc


def test_a_reference_without_x_is_compared_with_every_x(tmp_path):
    # The statistics-batch study: GroupNorm has no stats_batch (one cell under n/a).
    grid = {"batch": {2: [30, 31, 32], 32: [20, 21, 22]}, "group": {None: [21, 22, 23]}}
    make_grid(tmp_path, grid, x="stats_batch")
    report = build_report(find_runs([tmp_path]), x="stats_batch")
    assert choose_reference(report) == "group"
    text = findings(report, "group")
    assert "group has no stats_batch (one cell, 3 seeds)." in text
    # 31 - 22 = +9 at k = 2; 21 - 22 = -1 at k = 32 (p = 0.288).
    assert text.endswith("batch vs group (reference): worse at stats_batch 2 (by 9.00 ± 2.27 "
                         "points, 3 seeds, p=3.9e-04); within noise at stats_batch 32.")
    rows = difference_rows(report, against_reference(report, "group"))
    assert [r[:2] for r in rows] == [["batch − group", "2 (vs n/a column)"],
                                     ["batch − group", "32 (vs n/a column)"]]


def test_report_md_marks_significance_and_writes_the_findings(tmp_path):
    make_grid(tmp_path / "runs")
    assert report_command([str(tmp_path / "runs"), "--out", str(tmp_path / "out"),
                           "--no-plots"]) == 0
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| batch | 31.00 ± 1.00 (3) | 23.00 ± 1.00 (3) | 21.00 ± 1.00 (3) |" in md
    assert "## Findings" in md and "batch at batch_size 2 is 10.00 ± 2.27 points worse" in md
    assert "### Along batch_size (neighbouring values)" in md
    assert "| batch | 2 → 8 | -8.00 | [-10.27, -5.73] | 6.1e-04 | 3, 3 | * |" in md
    assert "| batch | 8 → 32 | -2.00 | [-4.27, 0.27] | 0.070 | 3, 3 | ≈ |" in md
    assert "| none | 2 → 8 | -5.00 |  | n=1, no test | 1, 1 | – |" in md
    assert "### Against the reference (group)" in md
    assert "| batch − group | 2 | +9.00 | [6.73, 11.27] | 3.9e-04 | 3, 3 | * |" in md
    assert "| none − group | 8 | +13.00 |  | n=1, no test | 1, 3 | – |" in md  # row's seeds first
    assert report_command([str(tmp_path / "runs"), "--out", str(tmp_path / "off"),
                           "--no-plots", "--reference", "off"]) == 0
    assert "Against the reference" not in (tmp_path / "off" / "report.md").read_text()


@pytest.mark.slow
def test_reference_that_is_not_in_the_report_is_one_line_exit_2(cli, tmp_path):
    make_grid(tmp_path / "runs", {"batch": GRID["batch"]})
    result = cli("report", "runs", "--no-plots", "--reference", "layer")
    assert result.returncode == 2
    assert result.stderr.strip() == ("normbench: error: --reference layer: no row of this "
                                     "report has layer. Fix: use a norm or another row's value "
                                     "(norm=batch; KEY=VALUE picks the key), or off.")


def _legend_clear_of_the_axes(fig) -> None:
    renderer = fig.canvas.get_renderer()
    (legend,) = fig.legends
    box = legend.get_window_extent(renderer)
    assert box.width > 0 and legend.get_texts()
    for ax in fig.axes:
        if ax.get_visible():
            assert not box.overlaps(ax.get_window_extent(renderer)), ax.get_title()


def test_legends_are_placed_outside_the_axes(tmp_path, report, monkeypatch):
    figures = []
    monkeypatch.setattr(plots.plt, "close", figures.append)  # keep them to inspect
    plots.plot_metric_vs_x(report, tmp_path / "x.png")
    steps = np.arange(0, 10)
    scalars = {id(r): {"train/loss": (steps, np.linspace(2, 1, 10) + r.get("seed")),
                       "bn_gap/dmu/stem.1": (steps, np.linspace(1, 0.1, 10)),
                       "bn_gap/dvar/stem.1": (steps, np.linspace(1, 0.2, 10))}
               for r in report.runs}
    plots.plot_curves(report, scalars, tmp_path / "curves.png")
    plots.plot_gaps(report, scalars, tmp_path / "gaps.png")
    assert len(figures) == 3
    for fig in figures:
        _legend_clear_of_the_axes(fig)
    # One legend entry per x value in the curves, not one per panel.
    assert [t.get_text() for t in figures[1].legends[0].get_texts()] == [
        "batch_size=2", "batch_size=8", "batch_size=32"]


def test_findings_for_a_metric_without_a_better_side_say_higher_and_lower(tmp_path):
    from tests.helpers.runs import fake_run, write_scalars

    for norm, values in {"batch": [0.10, 0.11, 0.12], "group": [0.30, 0.31, 0.32]}.items():
        for seed, value in enumerate(values):
            run = fake_run(tmp_path, f"{norm}{seed}", norm=norm, seed=seed, steps=10)
            write_scalars(run, "grad/global_norm", [(10, value)])
    assert report_command([str(tmp_path), "--metric", "grad/global_norm", "--no-plots"]) == 0
    md = (tmp_path / "report.md").read_text()
    assert "batch vs group (reference): lower at batch_size 32 (by 0.2 ± 0.0227 " in md
    assert "worse" not in md and "better" not in md


def test_a_model_as_the_reference_is_compared_with_every_condition(tmp_path):
    # The stat_gap layout: a ResNet on images (one cell, no text condition) against text
    # models under two conditions, on another dataset: --reference resnet.
    from tests.helpers.runs import fake_run

    values = {("transformer", "window"): [0.10, 0.11, 0.12], ("transformer", "line"): [0.40, 0.41, 0.42],
              ("resnet", None): [0.40, 0.41, 0.42]}
    for (model, sample), accs in values.items():
        for seed, acc in enumerate(accs):
            extra = {"sample": sample, "dataset": "text"} if sample else {}
            fake_run(tmp_path, f"{model}{sample}{seed}", model=model, seed=seed, val_acc=acc,
                     **extra)
    assert report_command([str(tmp_path), "--x", "sample", "--reference", "resnet",
                           "--no-plots"]) == 0
    md = (tmp_path / "report.md").read_text()
    # val_err: resnet 59 points, transformer 89 at window (30 worse), 59 at line (same).
    assert "transformer text batch vs resnet (reference): worse at sample window (by 30.00 ± " in md
    assert "within noise at sample line" in md
    with pytest.raises(UserError, match=r"no row of this report has vgg.*model=resnet, "
                                         r"transformer"):
        report_command([str(tmp_path), "--x", "sample", "--reference", "vgg", "--no-plots"])
    # KEY=VALUE names the key; a second ResNet norm (power) is each power row's reference.
    for seed, acc in enumerate([0.20, 0.21, 0.22]):
        fake_run(tmp_path, f"resnetpower{seed}", model="resnet", norm="power", seed=seed,
                 val_acc=acc)
        fake_run(tmp_path, f"transformerpower{seed}", model="transformer", norm="power",
                 seed=seed, val_acc=acc, sample="window", dataset="text")
    assert report_command([str(tmp_path), "--x", "sample", "--reference", "model=resnet",
                           "--no-plots"]) == 0
    md = (tmp_path / "report.md").read_text()
    assert "transformer text batch vs model=resnet (reference): worse at sample window" in md
    assert "transformer text power vs model=resnet (reference): within noise at sample window" in md


def test_findings_and_the_differences_table_write_a_p_value_alike():
    from normbench.report.differences import Difference, fmt_p
    from normbench.report.findings import _evidence
    from normbench.report.significance import welch

    for a, b in [([10, 11, 12], [20, 21, 22]), ([20.0, 22.0, 21.0], [21.0, 23.0, 21.5])]:
        test = welch(a, b)
        d = Difference("along", (("batch",), 2), (("batch",), 4), test)
        assert _evidence(d).endswith(f"p={fmt_p(test)}")
    assert fmt_p(welch([10, 11, 12], [20, 21, 22])) == "2.6e-04"
