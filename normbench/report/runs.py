"""Finished runs as data: each run folder's summary.json and resolved config, found below
the folders a report is given.

A run folder holds summary.json and, from the run's start, config.json (the resolved
config the loop trained with; see `normbench.engine.tracking`). Folders written before config.json
existed still load: their settings come from summary.json's fields alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from normbench.engine.tracking import CONFIG_FILE, SUMMARY_FILE, load_json
from normbench.errors import UserError
from normbench.paths import path_error


@dataclass
class Run:
    path: Path
    summary: dict
    config: dict = field(default_factory=dict)
    _scalars: dict | None = field(default=None, repr=False, compare=False)

    @property
    def status(self) -> str:
        return str(self.summary.get("status", "unknown"))

    def get(self, key: str):
        """A value by name: summary.json first, then the config (dotted keys, or a bare key
        found in one of its sections, e.g. `stats_batch` -> norm.stats_batch). Several
        names joined by commas (`unit,sample`) give a tuple of their values (None if the
        run has none of them)."""
        if "," in key:
            values = tuple(self._get(k.strip()) for k in key.split(","))
            return None if all(v is None for v in values) else values
        return self._get(key)

    def _get(self, key: str):
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
        """A key of summary.json's final block, val_err, or a TensorBoard scalar tag (a
        name with '/', e.g. bn_gap/mean/tid_sigma): the mean of its values logged in the
        second half of training (steps > total_steps / 2), where a run's statistics have
        settled rather than their start-up."""
        if "/" in name:
            return self.late_mean(name)
        final = self.summary.get("final") or {}
        if name == "val_err" and "val_err" not in final:
            acc = final.get("val_acc")
            return None if acc is None else 100.0 * (1.0 - float(acc))
        value = final.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None  # missing, or not a number (a hand-edited file): no metric
        return float(value)


    def scalars(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """tag -> (steps, values) from the run's TensorBoard event files (read once)."""
        if self._scalars is None:
            self._scalars = read_scalars(self.path)
        return self._scalars

    def late_mean(self, tag: str) -> float | None:
        series = self.scalars().get(tag)
        if series is None:
            return None
        steps, values = series
        total = self.summary.get("total_steps") or self.summary.get("steps") or (
            int(steps.max()) if len(steps) else 0)
        late = values[steps > total / 2]
        late = late[np.isfinite(late)]
        return float(late.mean()) if len(late) else None


def read_scalars(run_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """tag -> (steps, values) from a run folder's TensorBoard event files ({} if none)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    try:
        acc.Reload()
    except Exception:  # unreadable or missing event files: the run simply has no curves
        return {}
    out = {}
    for tag in acc.Tags().get("scalars", []):
        events = acc.Scalars(tag)
        out[tag] = (np.array([e.step for e in events]), np.array([e.value for e in events]))
    return out


def load_run(run_dir: Path, problems: list[str] | None = None) -> Run | None:
    """The run in `run_dir`; None if it has no summary.json. ValueError naming the file
    when its summary.json cannot be read (a truncated file, say). A config.json that cannot
    be read leaves the run its summary.json's settings alone, and a line in `problems`."""
    run_dir = Path(run_dir)
    summary = _load(run_dir / SUMMARY_FILE)
    if summary is None:
        return None
    try:
        config = _load(run_dir / CONFIG_FILE) or {}
    except ValueError as e:
        config = {}
        if problems is not None:
            problems.append(f"{e}: settings from its summary.json alone")
    return Run(run_dir, summary, config)


def _load(path: Path) -> dict | None:
    try:
        return load_json(path)
    except (OSError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ValueError(f"{path} ({reason})") from None


@dataclass
class Found:
    """The runs below some folders, and a line for each file of theirs that could not be
    read, naming it, why, and what became of its run."""

    runs: list[Run]
    unreadable: list[str]


def find_runs(dirs: list[str | Path]) -> list[Run]:
    """Every readable run below the given folders (a run folder holds summary.json), each once."""
    return search_runs(dirs).runs


def search_runs(dirs: list[str | Path]) -> Found:
    """Every run below the given folders, each once, and the files that cannot be read."""
    runs, unreadable, seen = [], [], set()
    for d in dirs:
        d = Path(d)
        try:
            exists = d.exists()
            found = [d] if (d / SUMMARY_FILE).is_file() else sorted(
                p.parent for p in d.rglob(SUMMARY_FILE)) if exists else []
        except OSError as e:
            raise path_error(e, "the folder", d, "pass run or sweep folders") from None
        if not exists:
            raise UserError(f"'{d}' does not exist", "pass run or sweep folders, e.g. "
                            "normbench report runs/sweeps/<stamp>")
        if not found:
            raise UserError(f"no runs in '{d}' (no {SUMMARY_FILE} in it or below it)",
                            "pass a run folder or a sweep folder such as runs/sweeps/<stamp>")
        for run_dir in found:
            key = run_dir.resolve()
            if key in seen:
                continue
            seen.add(key)
            try:
                run = load_run(run_dir, unreadable)
            except ValueError as e:
                unreadable.append(f"{e}: the run is left out")
                continue
            if run is not None:
                runs.append(run)
    return Found(runs, unreadable)
