"""`normbench report DIR...`: compare finished runs in a table, a CSV, Markdown and plots.

A report reads each run's summary.json (and its resolved config in .hydra/config.yaml) and
groups the runs into a grid: one row per norm (plus the model and dataset when they vary,
and the learning rate when it was swept independently of the x variable), one column per
value of the swept variable (`--x`, batch size by default), one cell per group of seeds
holding the mean ± standard deviation of the metric over the completed runs. Runs that
diverged or failed do not enter a cell's mean; the cell says how many there were.

The default metric is the validation error in percent, `val_err` = 100 * (1 - val_acc):
the quantity of the GroupNorm paper's Figure 1 (Wu & He 2018), lower is better. Any key of
summary.json's `final` block works as well (val_acc, val_loss, train_loss, val_bpc, ...).
"""

from __future__ import annotations

import argparse
import csv
import difflib
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from normbench.errors import UserError
from normbench.tracking import SUMMARY_FILE, read_summary

# Candidates for --x auto, in order: the first that takes several values is the swept one.
AUTO_X = ("batch_size", "stats_batch", "lr", "weight_decay", "num_groups", "depth", "width")
# Metrics where a higher value is better; every other metric is minimized.
HIGHER_IS_BETTER = {"val_acc", "train_acc"}
ROW_KEYS = ("model", "dataset", "norm")


@dataclass
class Run:
    path: Path
    summary: dict
    config: dict = field(default_factory=dict)

    @property
    def status(self) -> str:
        return str(self.summary.get("status", "unknown"))

    def get(self, key: str):
        """A value by name: summary.json first, then the config (dotted keys, or a bare key
        found in one of its sections, e.g. `stats_batch` -> norm.stats_batch)."""
        if key in self.summary and not isinstance(self.summary[key], dict):
            return self.summary[key]
        node = self.config
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                node = None
                break
            node = node[part]
        if node is not None and not isinstance(node, dict):
            return node
        for section in ("norm", "model", "dataset", "optim", "sched"):
            value = (self.config.get(section) or {}).get(key)
            if value is not None and not isinstance(value, dict):
                return value
        return None

    def metric(self, name: str) -> float | None:
        final = self.summary.get("final") or {}
        if name == "val_err" and "val_err" not in final:
            acc = final.get("val_acc")
            return None if acc is None else 100.0 * (1.0 - float(acc))
        value = final.get(name)
        return None if value is None else float(value)


# ----------------------------------------------------------------------------- finding runs


def load_run(run_dir: Path) -> Run | None:
    summary = read_summary(run_dir)
    if summary is None:
        return None
    config = {}
    config_file = run_dir / ".hydra" / "config.yaml"
    if config_file.is_file():
        from omegaconf import OmegaConf

        from normbench.cli import register_resolvers

        register_resolvers()  # Hydra saves the config unresolved: ${nb_mul:...} needs these
        try:
            loaded = OmegaConf.load(config_file)
            try:
                config = OmegaConf.to_container(loaded, resolve=True)
            except Exception:  # e.g. ${hydra:...}, which needs a running Hydra
                config = OmegaConf.to_container(loaded, resolve=False)
        except Exception:  # a config we cannot parse still leaves the summary usable
            config = {}
    return Run(run_dir, summary, config)


def find_runs(dirs: list[str | Path]) -> list[Run]:
    """Every run below the given folders (a run folder holds summary.json), each once."""
    runs, seen = [], set()
    for d in dirs:
        d = Path(d)
        if not d.exists():
            raise UserError(f"'{d}' does not exist", "pass run or sweep folders, e.g. "
                            "normbench report runs/sweeps/<stamp>")
        found = [d] if (d / SUMMARY_FILE).is_file() else sorted(
            p.parent for p in d.rglob(SUMMARY_FILE))
        if not found:
            raise UserError(f"no runs in '{d}' (no {SUMMARY_FILE} in it or below it)",
                            "pass a run folder or a sweep folder such as runs/sweeps/<stamp>")
        for run_dir in found:
            key = run_dir.resolve()
            if key not in seen and (run := load_run(run_dir)) is not None:
                seen.add(key)
                runs.append(run)
    return runs


# ----------------------------------------------------------------------------- the grid


def _sort_key(value):
    # Numbers in numeric order, then everything else as text; None last.
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

    def text(self, digits: int = 2) -> str:
        parts = []
        if self.mean is not None:
            parts.append(f"{self.mean:.{digits}f}" + (
                f" ± {self.std:.{digits}f}" if self.std is not None else ""))
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
        return self.metric in HIGHER_IS_BETTER

    def row_label(self, row: tuple) -> str:
        shown = [(k, v) for k, v in zip(self.row_keys, row, strict=True)]
        return " ".join(f"{k}={fmt_value(v)}" if k == "lr" else fmt_value(v) for k, v in shown)


def build_report(runs: list[Run], x: str = "auto", metric: str = "val_err") -> Report:
    x = choose_x(runs, x)
    completed = [r for r in runs if r.status == "completed"]
    if completed and all(r.metric(metric) is None for r in completed):
        names = sorted({k for r in completed for k in (r.summary.get("final") or {})})
        if "val_acc" in names:
            names.append("val_err")
        raise UserError(f"no completed run has the metric '{metric}'",
                        f"use --metric with one of: {', '.join(names)}")
    # Rows: the norm, plus model/dataset when they vary, plus lr when it varies among runs
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
    rows = sorted({row for row, _ in cells}, key=lambda row: tuple(map(_sort_key, row)))
    columns = sorted({col for _, col in cells}, key=_sort_key)
    report = Report(x, metric, row_keys, rows, columns, cells, runs, {})
    report.best_lr = best_lrs(report)
    return report


def best_lrs(report: Report) -> dict[tuple, tuple[float, float]]:
    """Per row (without lr), the learning rate with the best mean metric over its completed
    runs — only when lr was swept (as x, or as an independent row key)."""
    if report.x != "lr" and "lr" not in report.row_keys:
        return {}
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
                                       key=lambda kv: tuple(map(_sort_key, kv[0]))):
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
                    " ".join(map(str, sorted(cell.seeds, key=_sort_key)))])


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
                                       key=lambda kv: tuple(map(_sort_key, kv[0]))):
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
