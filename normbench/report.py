"""`normbench report DIR...`: compare finished runs in a table, a CSV, Markdown and plots.

A report reads each run's summary.json and resolved config (config.json, see
`normbench.runs`) and groups the runs into a grid (`normbench.grid`): one row per norm
(plus the model and dataset when they vary, and the learning rate when it was swept
independently of the x variable), one column per value of the swept variable (`--x`,
batch size by default), one cell per group of seeds holding the mean ± standard deviation
of the metric over the completed runs. Runs that diverged or failed do not enter a cell's
mean; the cell says how many there were.

The default metric is the validation error in percent, `val_err` = 100 * (1 - val_acc):
the quantity of the GroupNorm paper's Figure 1 (Wu & He 2018), lower is better. Any key of
summary.json's `final` block works as well (val_acc, val_loss, train_loss, val_bpc, ...).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from normbench.errors import UserError
from normbench.grid import AUTO_X, Report, build_report, fmt_value, sort_key
from normbench.runs import find_runs

# ----------------------------------------------------------------------------- outputs


def print_table(report: Report, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    # Cells never wrap: wide enough for the table even when stdout is a file or a pipe.
    console = console or Console(width=None if sys.stdout.isatty() else 200)
    direction = "higher" if report.higher_is_better else "lower"
    table = Table(title=f"{report.metric} ({direction} is better), mean ± std over seeds",
                  header_style="bold")
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
                          f"({report.metric} {value:.2f})")
    bad = [r for r in report.runs if r.status != "completed"]
    for r in bad:
        console.print(f"[red]{r.status}[/red]: {r.path}"
                      + (f" ({r.summary['error']})" if r.summary.get("error") else ""),
                      soft_wrap=True)


def write_csv(report: Report, path: Path) -> None:
    """One line per cell (row x value): the long format spreadsheets and pandas expect."""
    statuses = ("diverged", "failed", "interrupted", "running")
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*report.row_keys, report.x, "metric", "mean", "std", "n_completed",
                         *(f"n_{s}" for s in statuses), "seeds"])
        for row in report.rows:
            for col in report.columns:
                cell = report.cells.get((row, col))
                if cell is None:
                    continue
                writer.writerow([
                    *map(fmt_value, row), fmt_value(col), report.metric,
                    "" if cell.mean is None else f"{cell.mean:.6g}",
                    "" if cell.std is None else f"{cell.std:.6g}", len(cell.values),
                    *(cell.statuses.get(s, 0) for s in statuses),
                    " ".join(map(str, sorted(cell.seeds, key=sort_key)))])


def write_markdown(report: Report, path: Path, plots: list[Path]) -> None:
    direction = "higher" if report.higher_is_better else "lower"
    lines = [f"# normbench report: {report.metric} vs {report.x}", "",
             f"{len(report.runs)} runs; cells are the mean ± std of `{report.metric}` "
             f"({direction} is better) over the seeds of completed runs; runs that diverged "
             "or failed are counted in the cell and left out of its mean.", "",
             "| " + " / ".join(report.row_keys) + f" \\ {report.x} | "
             + " | ".join(map(fmt_value, report.columns)) + " |",
             "|---" * (len(report.columns) + 1) + "|"]
    for row in report.rows:
        texts = [(c.text() if (c := report.cells.get((row, col))) else "")
                 for col in report.columns]
        lines.append(f"| {report.row_label(row)} | " + " | ".join(texts) + " |")
    if report.best_lr:
        lines += ["", "## Best learning rate", "",
                  "| " + " / ".join(k for k in report.row_keys if k != "lr")
                  + f" | lr | {report.metric} |", "|---|---|---|"]
        for row, (lr, value) in sorted(report.best_lr.items(),
                                       key=lambda kv: tuple(map(sort_key, kv[0]))):
            lines.append(f"| {' '.join(map(fmt_value, row))} | {fmt_value(lr)} | {value:.2f} |")
    bad = [r for r in report.runs if r.status != "completed"]
    if bad:
        lines += ["", "## Runs that did not complete", ""]
        lines += [f"- `{r.path}`: **{r.status}**"
                  + (f" — {r.summary['error']}" if r.summary.get("error") else "")
                  + (f" (at step {r.summary['diverged_at_step']})"
                     if r.summary.get("diverged_at_step") else "") for r in bad]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    path.write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- command


def parse_args(args: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="normbench report",
        description="Tables and plots from run folders and sweep folders.")
    parser.add_argument("dirs", nargs="+", metavar="DIR",
                        help="run folders or sweep folders (searched recursively)")
    parser.add_argument("--x", default="auto",
                        help="the swept variable: a summary or config key (batch_size, "
                             "stats_batch, lr, ...); auto: the first of "
                             f"{', '.join(AUTO_X)} that varies")
    parser.add_argument("--metric", default="val_err",
                        help="a key of summary.json's final block, or val_err = 100*(1-val_acc) "
                             "(the default, as in the GroupNorm paper's Figure 1)")
    parser.add_argument("--out", default=None,
                        help="folder for report.md, report.csv and the plots (default: the "
                             "first DIR)")
    parser.add_argument("--no-plots", action="store_true", help="only the table, CSV and Markdown")
    try:
        return parser.parse_args(args)
    except SystemExit as e:
        if e.code == 0:  # --help
            raise
        raise UserError(f"bad arguments to 'normbench report': {' '.join(args) or '(none)'}",
                        "run 'normbench report --help'") from None


def report_command(args: list[str]) -> int:
    opts = parse_args(args)
    runs = find_runs(opts.dirs)
    report = build_report(runs, x=opts.x, metric=opts.metric)
    out = Path(opts.out or opts.dirs[0])
    if out.is_file():
        raise UserError(f"--out {out} is a file", "pass a folder")
    out.mkdir(parents=True, exist_ok=True)
    plots: list[Path] = []
    if not opts.no_plots:
        from normbench.plots import write_plots

        plots = write_plots(report, out)
    print_table(report)
    write_csv(report, out / "report.csv")
    write_markdown(report, out / "report.md", plots)
    written = ", ".join(p.name for p in [out / "report.md", out / "report.csv", *plots])
    print(f"normbench: report written to {out}: {written}")
    return 0
