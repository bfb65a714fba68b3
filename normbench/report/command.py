"""`normbench report DIR...`: compare finished runs in a table, a CSV, Markdown and plots.

A report reads each run's summary.json and resolved config (config.json, see
`normbench.report.runs`) and groups the runs into a grid (`normbench.report.grid`): one row per norm
(plus the model and dataset when they vary, and the learning rate when it was swept
independently of the x variable), one column per value of the swept variable (`--x`,
batch size by default), one cell per group of seeds holding the mean ± standard deviation
of the metric over the completed runs. Runs that diverged or failed do not enter a cell's
mean; the cell says how many there were.

Below the table, the report says which differences are more than seed noise: Welch's t-test
between neighbouring x values in each row and between each row and a reference norm's row
(`normbench.report.differences`, `--reference`), each with its difference, 95% confidence interval,
p-value and a mark, and a findings paragraph in words (`normbench.report.findings`).

The default metric is the validation error in percent, `val_err` = 100 * (1 - val_acc):
the quantity of the GroupNorm paper's Figure 1 (Wu & He 2018), lower is better. Any key of
summary.json's `final` block works as well (val_acc, val_loss, train_loss, val_bpc, ...), and
so does any TensorBoard scalar the runs logged (`bn_gap/mean/tid_sigma`: BatchNorm's
batch-vs-running gap averaged over layers), averaged over the second half of training. `--x`
takes several keys joined by commas (`dataset.unit,dataset.sample`), one column per
combination.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from normbench.engine.tracking import warn
from normbench.errors import UserError
from normbench.paths import nearest_existing, path_error
from normbench.report.differences import (
    REFERENCE_NORMS,
    Difference,
    against_reference,
    along_x,
    choose_reference,
    difference_rows,
)
from normbench.report.findings import findings
from normbench.report.grid import AUTO_X, Report, build_report, fmt_value, sort_key
from normbench.report.runs import search_runs

DIFFERENCE_COLUMNS = ("compared", "at", "difference", "95% CI", "p", "seeds", "")
MARKS = ("* p < 0.05 (significant), ≈ within noise (p ≥ 0.05), – no test (a cell with fewer "
         "than 2 seeds)")

# ----------------------------------------------------------------------------- outputs


@dataclass
class Significance:
    """What the report says about noise: the reference norm, the differences, the findings."""

    reference: str | None
    along: list[Difference]
    against: list[Difference]
    text: str


def significance(report: Report, reference: str = "auto") -> Significance:
    ref = choose_reference(report, reference)
    return Significance(ref, along_x(report), against_reference(report, ref),
                        findings(report, ref))


def print_table(report: Report, console=None, sig: Significance | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    # Cells never wrap: wide enough for the table even when stdout is a file or a pipe.
    console = console or Console(width=None if sys.stdout.isatty() else 200)
    direction = f" ({report.direction_note})" if report.directed else ""
    table = Table(title=f"{report.metric}{direction}, mean ± std over seeds "
                        "(number of seeds)", header_style="bold")
    table.add_column(" / ".join(report.row_keys) + f" \\ {report.x}")
    for col in report.columns:
        table.add_column(fmt_value(col), justify="right", no_wrap=True)
    for row in report.rows:
        texts = []
        for col in report.columns:
            cell = report.cells.get((row, col))
            text = cell.text() if cell else ""
            if cell and cell.statuses:
                text = f"[red]{text}[/red]"
            texts.append(text)
        table.add_row(report.row_label(row), *texts)
    console.print(table)
    if report.best_lr:
        console.print("Best learning rate per " + " / ".join(
            k for k in report.row_keys if k != "lr") + ":")
        for row, (lr, value) in sorted(report.best_lr.items(),
                                       key=lambda kv: tuple(map(sort_key, kv[0]))):
            console.print(f"  {' '.join(map(fmt_value, row))}: lr={fmt_value(lr)} "
                          f"({report.metric} {value:.4g})")
    if sig is not None:
        print_differences(report, sig, console)
    bad = [r for r in report.runs if r.status != "completed"]
    for r in bad:
        console.print(f"[red]{r.status}[/red]: {r.path}"
                      + (f" ({r.summary['error']})" if r.summary.get("error") else ""),
                      soft_wrap=True)


def print_differences(report: Report, sig: Significance, console) -> None:
    """The differences as one table (along x, then against the reference), then the findings."""
    from rich.table import Table

    if not sig.along and not sig.against:
        return
    table = Table(title=f"differences in {report.metric} (Welch; second minus first)",
                  header_style="bold", caption=MARKS)
    for name in DIFFERENCE_COLUMNS:
        table.add_column(name, no_wrap=True, justify="left" if name in ("compared", "at")
                         else "right")
    for i, diffs in enumerate((sig.along, sig.against)):
        for cells in difference_rows(report, diffs):
            style = "bold" if cells[-1] == "*" else "dim" if cells[-1] == "–" else None
            table.add_row(*cells, style=style)
        if i == 0 and sig.along and sig.against:
            table.add_section()
    console.print(table)
    console.print(sig.text, soft_wrap=False)


def csv_number(value: float | None) -> str:
    """A number for report.csv; empty where there is none or it is not finite (no nan or
    inf tokens, which some readers take for text)."""
    return "" if value is None or not math.isfinite(value) else f"{value:.6g}"


def write_csv(report: Report, path: Path) -> None:
    """One line per cell (row x value): the long format spreadsheets and pandas expect."""
    statuses = ("diverged", "failed", "interrupted", "running", "no metric")
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*report.row_keys, report.x, "metric", "mean", "std", "n_completed",
                         *(f"n_{s.replace(' ', '_')}" for s in statuses), "seeds"])
        for row in report.rows:
            for col in report.columns:
                cell = report.cells.get((row, col))
                if cell is None:
                    continue
                writer.writerow([
                    *map(fmt_value, row), fmt_value(col), report.metric,
                    csv_number(cell.mean), csv_number(cell.std), len(cell.values),
                    *(cell.statuses.get(s, 0) for s in statuses),
                    " ".join(map(str, sorted(cell.seeds, key=sort_key)))])


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|---" * len(header) + "|",
            *("| " + " | ".join(cells) + " |" for cells in rows)]


def markdown_differences(report: Report, sig: Significance) -> list[str]:
    lines = ["", "## Findings", "", sig.text]
    if not sig.along and not sig.against:
        return lines
    lines += ["", "## Differences", "",
              f"Welch's t-test over seeds: the difference is the second cell's mean minus the "
              f"first's, in `{report.metric}`, with its 95% confidence interval and two-sided "
              f"p-value; {MARKS}."]
    x = report.x
    if sig.along:
        lines += ["", f"### Along {x} (neighbouring values)", ""]
        lines += markdown_table(["row", x, *DIFFERENCE_COLUMNS[2:]],
                                difference_rows(report, sig.along))
    if sig.against:
        lines += ["", f"### Against the reference ({sig.reference})", ""]
        lines += markdown_table(["row − reference", x, *DIFFERENCE_COLUMNS[2:]],
                                difference_rows(report, sig.against))
    return lines


def write_markdown(report: Report, path: Path, plots: list[Path],
                   sig: Significance | None = None, unreadable: list[str] = ()) -> None:
    direction = f"({report.direction_note}) " if report.directed else ""
    lines = [f"# normbench report: {report.metric} vs {report.x}", "",
             f"{len(report.runs)} runs; cells are the mean ± std of `{report.metric}` "
             + ("(each run's mean over the second half of training) " if "/" in report.metric
                else "")
             + f"{direction}over the seeds of completed runs, with the number of "
             "seeds in brackets; runs that diverged or failed are counted in the cell and left "
             "out of its mean.", "",
             "| " + " / ".join(report.row_keys) + f" \\ {report.x} | "
             + " | ".join(map(fmt_value, report.columns)) + " |",
             "|---" * (len(report.columns) + 1) + "|"]
    for row in report.rows:
        texts = [(c.text() if (c := report.cells.get((row, col))) else "")
                 for col in report.columns]
        lines.append(f"| {report.row_label(row)} | " + " | ".join(texts) + " |")
    if sig is not None:
        lines += markdown_differences(report, sig)
    if report.best_lr:
        lines += ["", "## Best learning rate", "",
                  "| " + " / ".join(k for k in report.row_keys if k != "lr")
                  + f" | lr | {report.metric} |", "|---|---|---|"]
        for row, (lr, value) in sorted(report.best_lr.items(),
                                       key=lambda kv: tuple(map(sort_key, kv[0]))):
            lines.append(f"| {' '.join(map(fmt_value, row))} | {fmt_value(lr)} | {value:.4g} |")
    bad = [r for r in report.runs if r.status != "completed"]
    if bad:
        lines += ["", "## Runs that did not complete", ""]
        lines += [f"- `{r.path}`: **{r.status}**"
                  + (f" — {r.summary['error']}" if r.summary.get("error") else "")
                  + (f" (at step {r.summary['diverged_at_step']})"
                     if r.summary.get("diverged_at_step") else "") for r in bad]
    if unreadable:
        lines += ["", "## Files that cannot be read", ""]
        lines += [f"- `{line}`" for line in unreadable]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    path.write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- command


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument as normbench's one line, without its usage block."""

    def error(self, message: str):
        raise UserError(f"normbench report: {message}", "run 'normbench report --help'")


def parse_args(args: list[str]) -> argparse.Namespace:
    parser = _Parser(
        prog="normbench report",
        description="Tables and plots from run folders and sweep folders: norms x values of "
                    "the swept variable, each cell the mean ± std over seeds (number of seeds); "
                    "then which differences are beyond seed noise: Welch's t-test between "
                    "neighbouring x values in a row and against the reference norm's row, "
                    "with the difference, its 95% confidence interval, the p-value and a mark "
                    "(* p < 0.05, ≈ within noise, – no test: a cell with one seed), and a "
                    "findings paragraph in words. Writes report.md, report.csv and PNG plots.")
    parser.add_argument("dirs", nargs="+", metavar="DIR",
                        help="run folders or sweep folders (searched recursively)")
    parser.add_argument("--x", default="auto",
                        help="the swept variable: a summary or config key (batch_size, "
                             "stats_batch, lr, ...), or several joined by commas "
                             "(dataset.unit,dataset.sample: one column per combination); "
                             "auto: the first of "
                             f"{', '.join(AUTO_X)} that varies")
    parser.add_argument("--metric", default="val_err",
                        help="a key of summary.json's final block, val_err = 100*(1-val_acc) "
                             "(the default, as in the GroupNorm paper's Figure 1), or a "
                             "TensorBoard scalar tag such as bn_gap/mean/tid_sigma: its mean "
                             "over the second half of training")
    parser.add_argument("--out", default=None,
                        help="folder for report.md, report.csv and the plots (default: the "
                             "first DIR)")
    parser.add_argument("--reference", default="auto", metavar="NORM",
                        help="the norm whose row every other row is compared with, x value by "
                             "x value (Welch's t-test, 95%% CI), or another row key's value "
                             "(--reference resnet: the model); auto: the first of "
                             f"{', '.join(REFERENCE_NORMS)} present; off: no such comparison "
                             "(neighbouring x values are always compared)")
    parser.add_argument("--only", action="append", default=[], metavar="KEY=VALUE",
                        help="keep only the runs whose KEY (as for --x) has this value, e.g. "
                             "--only norm=batch; repeat for several conditions")
    parser.add_argument("--no-plots", action="store_true", help="only the table, CSV and Markdown")
    parser.add_argument("--strict", action="store_true",
                        help="refuse to report when a run's summary.json or config.json cannot "
                             "be read (truncated, not JSON); without it such runs are left out "
                             "with a warning naming each file")
    return parser.parse_args(args)


def select(runs: list, only: list[str]) -> list:
    """The runs matching every KEY=VALUE of --only (values compared as the report prints them)."""
    for condition in only:
        key, sep, value = condition.partition("=")
        if not sep or not key:
            raise UserError(f"--only {condition}: expected KEY=VALUE", "e.g. --only norm=batch")
        kept = [r for r in runs if fmt_value(r.get(key)) == value]
        if not kept:
            seen = sorted({fmt_value(r.get(key)) for r in runs})
            raise UserError(f"--only {condition}: no run has {key}={value}",
                            f"the runs have {key} = {', '.join(seen)}")
        runs = kept
    return runs


def readable_runs(dirs: list[str], strict: bool) -> tuple[list, list[str]]:
    """The runs below `dirs`, and a line for each of their files that cannot be read: a
    warning, or under --strict (or when no run is left) a UserError."""
    found = search_runs(dirs)
    bad = found.unreadable
    if bad and (strict or not found.runs):
        why = "--strict" if strict else "no run is left to report"
        raise UserError(f"{len(bad)} run file(s) cannot be read ({why}): {'; '.join(bad)}",
                        "rerun or delete those runs, or repair the files")
    if bad:
        warn(f"{len(bad)} run file(s) cannot be read (--strict makes this an error):")
        for line in bad:
            warn(f"  {line}")
    return found.runs, bad


def report_command(args: list[str]) -> int:
    opts = parse_args(args)
    runs, unreadable = readable_runs(opts.dirs, opts.strict)
    runs = select(runs, opts.only)
    report = build_report(runs, x=opts.x, metric=opts.metric)
    sig = significance(report, opts.reference)
    out = Path(opts.out or opts.dirs[0])
    try:
        nearest_existing(out.absolute())  # a name too long fails before mkdir makes any parent
        if out.is_file():
            raise UserError(f"--out {out} is a file", "pass a folder")
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise path_error(e, "--out", out, "pass a folder that can be written") from None
    plots: list[Path] = []
    if not opts.no_plots:
        from normbench.report.plots import write_plots

        plots = write_plots(report, out)
    print_table(report, sig=sig)
    write_csv(report, out / "report.csv")
    write_markdown(report, out / "report.md", plots, sig, unreadable)
    written = ", ".join(p.name for p in [out / "report.md", out / "report.csv", *plots])
    print(f"normbench: report written to {out}: {written}")
    return 0
