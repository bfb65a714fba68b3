"""Where results go: TensorBoard event files, the rich terminal, summary.json, the run's
resolved config (config.json) and one-line warnings on stderr."""

from __future__ import annotations

import json
import math
import os
import re
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from normbench.engine import distributed

SUMMARY_FILE = "summary.json"
# The resolved config a run was trained with: what `normbench report` reads, so that it
# needs neither Hydra nor the CLI to know a run's settings.
CONFIG_FILE = "config.json"


def warn(message: str) -> None:
    if not distributed.is_main():  # several processes: rank 0 speaks for them
        return
    print(f"normbench: warning: {message}", file=sys.stderr, flush=True)


# JSON has no NaN or infinity (Python's NaN/Infinity tokens break strict parsers): such a
# value is written as null, and this top-level map names it, {"final.val_loss": "nan"}.
NONFINITE_KEY = "nonfinite"


def strict_json(data: dict) -> dict:
    """`data` with every non-finite float replaced by None and listed, by its dotted path
    ("final.val_loss", "optim.betas[1]"), in a NONFINITE_KEY map: "nan", "inf" or "-inf"."""
    found: dict[str, str] = {}

    def clean(value, key: str):
        if isinstance(value, float) and not math.isfinite(value):
            found[key] = str(value)
            return None
        if isinstance(value, dict):
            return {k: clean(v, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [clean(v, f"{key}[{i}]") for i, v in enumerate(value)]
        return value

    out = clean({k: v for k, v in data.items() if k != NONFINITE_KEY}, "")
    if found:
        out[NONFINITE_KEY] = found
    return out


def _restore_nonfinite(data: dict) -> dict:
    """The inverse of `strict_json`: the recorded NaN and infinities back in their places."""
    marks = data.pop(NONFINITE_KEY, None)
    if not isinstance(marks, dict):
        return data
    for path, text in marks.items():
        parts = re.findall(r"[^.\[\]]+|\[\d+\]", path)
        node = data
        try:
            for part in parts[:-1]:
                node = node[int(part[1:-1])] if part.startswith("[") else node[part]
            last = parts[-1]
            node[int(last[1:-1]) if last.startswith("[") else last] = float(text)
        except (KeyError, IndexError, TypeError, ValueError):  # a map edited by hand
            continue
    return data


def write_json_atomic(path: Path, data: dict) -> None:
    """Write strict JSON (`strict_json`) to a temporary file in the same folder, then
    rename: never a half file."""
    path = Path(path)
    text = json.dumps(strict_json(data), indent=2, sort_keys=True, default=str, allow_nan=False)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_json(path: Path) -> dict | None:
    """A JSON object from `path` (NaN and infinities restored, see `strict_json`); None if
    the file is missing. OSError or ValueError, with the reason, if it cannot be read, is
    not JSON (truncated, say) or holds no object."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None
    if not text.strip():
        raise ValueError("the file is empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return _restore_nonfinite(data)


def read_json(path: Path) -> dict | None:
    """A JSON object from `path`; None if the file is missing, unreadable or not an object."""
    try:
        return load_json(path)
    except (OSError, ValueError):
        return None


def read_summary(run_dir: Path) -> dict | None:
    return read_json(Path(run_dir) / SUMMARY_FILE)


def read_config(run_dir: Path) -> dict | None:
    return read_json(Path(run_dir) / CONFIG_FILE)


class _NoWriter:
    """A SummaryWriter that writes nothing: every attribute, call and result is itself."""

    def __getattr__(self, name):
        return self

    def __call__(self, *args, **kwargs):
        return self


class Tracker:
    """One run's outputs: a SummaryWriter in the run folder, a console, summary.json.

    Nothing is written before `start`: a run that is refused while it is being set up (a
    checkpoint that does not fit, data that cannot be read) leaves its folder as it was.
    `writes=False` (every process but rank 0 of a multi-process run) keeps the interface and
    writes and prints nothing: one run folder, one event file, one summary."""

    def __init__(self, run_dir: Path, console: Console | None = None, live: bool = True,
                 writes: bool = True):
        self.run_dir = Path(run_dir)
        self.writes = writes
        self.writer = _NoWriter()
        self.console = (console or Console()) if writes else Console(quiet=True)
        self.live = live and writes and self.console.is_terminal

    def start(self, purge_step: int | None = None) -> None:
        """Create the run folder and its event file: from here on the run writes."""
        if not self.writes:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir.mkdir(parents=True, exist_ok=True)
        # purge_step (on resume): TensorBoard hides this folder's events from that step on.
        self.writer = SummaryWriter(log_dir=str(self.run_dir), purge_step=purge_step)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def histograms(self, histograms: dict, step: int) -> None:
        """Histograms computed on the device (see `normbench.probes.monitor.Histogram`)."""
        for tag, h in histograms.items():
            self.writer.add_histogram_raw(tag, h.min, h.max, h.num, h.sum, h.sum_squares,
                                          h.bucket_limits, h.bucket_counts, step)

    def progress(self) -> Progress:
        return Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn(),
            console=self.console, disable=not self.live, transient=False)

    def write_summary(self, summary: dict) -> None:
        if self.writes:
            write_json_atomic(self.run_dir / SUMMARY_FILE, summary)

    def write_config(self, config: dict) -> None:
        if self.writes:
            write_json_atomic(self.run_dir / CONFIG_FILE, config)

    def print_summary(self, summary: dict) -> None:
        if not self.writes:
            return
        table = Table(title=str(summary.get("run_name") or self.run_dir.name),
                      show_header=True, header_style="bold")
        table.add_column("metric")
        table.add_column("value", justify="right")
        status = summary.get("status", "?")
        colour = {"completed": "green", "diverged": "red", "failed": "red"}.get(status, "yellow")
        table.add_row("status", f"[{colour}]{status}[/{colour}]")
        for key in ("dataset", "model", "norm", "batch_size", "lr", "seed", "steps"):
            if key in summary:
                table.add_row(key, str(summary[key]))
        for key, value in sorted(summary.get("final", {}).items()):
            table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
        if "elapsed_s" in summary:
            table.add_row("elapsed", f"{summary['elapsed_s']:.1f} s")
        self.console.print(table)
        # soft_wrap: paths and commands stay whole, for copying out of the terminal.
        self.console.print(f"Run folder: {self.run_dir}", soft_wrap=True)
        self.console.print(f"TensorBoard: tensorboard --logdir {self.run_dir.parent}  "
                           "(probe charts: Custom Scalars > normbench; sweeps: HParams)",
                           soft_wrap=True)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


def mark_failed(run_dir: Path, update: dict) -> bool:
    """Record the failure of a run whose rank 0 is gone, from another rank: `update` (status
    failed, the error line, ...) over the summary.json rank 0 last wrote, while that still
    says `running`. False where the file records an end already, or is not on this machine."""
    previous = read_summary(run_dir)
    if previous is None or previous.get("status") != "running":
        return False
    write_json_atomic(Path(run_dir) / SUMMARY_FILE, {**previous, **update})
    return True


def write_failed_summary(run_dir: Path, config: dict, error: str) -> None:
    """Record a run that ended before or during training with an error (never overwrites a
    finished run's summary)."""
    run_dir = Path(run_dir)
    previous = read_summary(run_dir) or {}
    if previous.get("status") in ("completed", "diverged", "interrupted"):
        return
    summary = {**previous, "status": "failed", "error": error}
    for key in ("batch_size", "lr", "seed"):
        summary.setdefault(key, config.get(key))
    for key in ("dataset", "model", "norm"):
        summary.setdefault(key, (config.get(key) or {}).get("name"))
    summary.setdefault("run_name", config.get("run_name"))
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / SUMMARY_FILE, summary)
    if not (run_dir / CONFIG_FILE).exists():  # the report reads a failed run's settings too
        write_json_atomic(run_dir / CONFIG_FILE, config)
