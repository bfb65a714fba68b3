"""What each preset costs at each setup, from one measured epoch per batch size.

    python scripts/budget.py        # shapes_small, shapes, text_char, tinyshakespeare (+ scaled)
    python scripts/budget.py --setups shapes,tinyshakespeare --jobs 2
    python scripts/budget.py --from-json FIGURES.json   # no measurement: the file from figures

For each setup, one sweep trains BatchNorm for one epoch at every batch size of
experiment=batch_size_sweep (2..32), jobs side by side as a study runs them
(hydra/launcher=joblib, --jobs at a time, cores/jobs torch threads each). Each job's
elapsed time (summary.json) less its final evaluations (perf/eval_seconds,
val_batchstats_seconds, precise_bn_seconds) is the cost of one epoch at that batch size;
the evaluations are paid once per job. A preset's budget is then its jobs' epochs at their
batch sizes plus their evaluations, summed and divided by the jobs that run at once:

    batch_size_sweep        norms x seeds x sum over b of (epochs x epoch(b) + eval(b))
    stats_batch_sweep       k values x seeds x (epochs x epoch(32) + eval(32))  (ghost BN)
    stats_batch_references  norms x seeds x (epochs x epoch(32) + eval(32))
    lr_sweep                norms x factors x seeds x (epochs x epoch(32) + eval(32))

The grid sizes and epochs are read from the composed presets. BatchNorm stands for every
norm (GroupNorm and LayerNorm cost a little more on CPU); the CIFAR and image-folder setups
are the setup `shapes` (the same ResNet-20 at 32 px) scaled by images per epoch, with their
own epochs. The result, in minutes of wall time, is written into docs/budgets.md (--out),
the one place the budgets are kept: the setup and preset headers and the docs link to it.
The file carries its figures in a trailing comment, so that a new measurement keeps the GPU
estimates and the whole-sweep checks of the previous one (they are not measured here).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from normbench.config.compose import compose_jobs  # noqa: E402
from normbench.report.runs import read_scalars  # noqa: E402

EVALUATIONS = ("perf/eval_seconds", "perf/val_batchstats_seconds", "perf/precise_bn_seconds")

PRESETS = ("batch_size_sweep", "stats_batch_sweep", "stats_batch_references", "lr_sweep")
# Setups measured through another one: the same model and image size, more images (their
# own recipe, epochs included, comes from composing the setup).
SCALED = {"cifar10": ("shapes", 50_000 / 5_000), "imagefolder": ("shapes", 10_000 / 5_000)}
# Setups that cost what another costs, and what the row says about them.
ALIASES = {"cifar10": ["cifar100"], "tinyshakespeare": ["text"]}
NOTES = {"cifar10": "`shapes` × 10 images, 15 epochs", "imagefolder": "per 10k images at 32 px: "
         "`shapes` × 2 images, 15 epochs", "tinyshakespeare": "`text`: per 1.1 MB of text"}
OUT = REPO / "docs" / "budgets.md"
DATA_MARK = "<!-- budget.py figures: "


def epoch_costs(setup: str, jobs: int, extra: list[str]) -> dict[int, tuple[float, float]]:
    """Batch size -> (seconds of one BN epoch of training, seconds of the job's final
    evaluations: validation, batch statistics, PreciseBN), jobs side by side."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "normbench", "train", "-m",
                   "experiment=batch_size_sweep", f"setup={setup}", "norm=batch", "seed=0",
                   "epochs=1", "hydra/launcher=joblib", f"hydra.launcher.n_jobs={jobs}",
                   f"hydra.sweep.dir={tmp}/sweep", *extra]
        subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
        costs = {}
        for path in Path(tmp, "sweep").glob("*/summary.json"):
            summary = json.loads(path.read_text())
            scalars = read_scalars(path.parent)
            final = sum(float(scalars[tag][1][-1]) for tag in EVALUATIONS if tag in scalars)
            costs[summary["batch_size"]] = (summary["elapsed_s"] - final, final)
    return dict(sorted(costs.items()))


def preset_minutes(setup: str, costs: dict[int, tuple[float, float]],
                   jobs: int) -> dict[str, float]:
    out = {}
    for preset in PRESETS:
        grid = compose_jobs([f"experiment={preset}", f"setup={setup}"], multirun=True)
        seconds = sum(job["epochs"] * costs[job["batch_size"]][0] + costs[job["batch_size"]][1]
                      for job in grid)  # the presets evaluate once, at the end
        out[preset] = seconds / jobs / 60
    return out


def duration(minutes: float | None) -> str:
    """Minutes as the tables write them: `45 s`, `2.6 m`, `26 m`, `1.3 h`, `20 h`."""
    if minutes is None:
        return "–"
    if minutes < 1:
        return f"{minutes * 60:.0f} s"
    if minutes < 10:
        return f"{minutes:.1f}".rstrip("0").rstrip(".") + " m"
    if minutes < 60:
        return f"{minutes:.0f} m"
    hours = minutes / 60
    return f"{hours:.1f} h" if hours < 10 else f"{hours:.0f} h"


def budget_markdown(figures: dict) -> str:
    """docs/budgets.md from `figures`: {"generated", "measured", "machine", "jobs",
    "rows": [{"setup", "cpu": {preset: minutes}, optional "gpu"}], optional "gpu_basis",
    optional "checks": {"setup", "sweeps": {preset: minutes of a whole sweep}}}. The figures
    themselves end the file in a comment, for the next run to read back."""
    presets = [p for p in PRESETS if any(p in row["cpu"] for row in figures["rows"])]
    counts = figures.get("jobs_per_preset", {})

    def head(p):
        return f"`{p}` ({counts[p]} jobs)" if p in counts else f"`{p}`"

    def name(row):
        setups = [row["setup"], *ALIASES.get(row["setup"], [])]
        note = NOTES.get(row["setup"])
        return ", ".join(f"`{s}`" for s in setups) + (f" ({note})" if note else "")

    gpu = any(row.get("gpu") for row in figures["rows"])
    lines = [
        f"<!-- generated by scripts/budget.py on {figures['generated']}; do not edit -->",
        "# Budgets",
        "",
        f"Generated by `python scripts/budget.py` on {figures['generated']}; do not edit: run the "
        "script again after a change that moves training speed.",
        "",
        f"Wall time of each preset's sweep (`normbench train -m experiment=PRESET setup=SETUP "
        f"hydra/launcher=joblib`) per setup. CPU: measured on {figures['measured']}, "
        f"{figures['machine']}, {figures['jobs']} jobs side by side with one torch thread each: "
        "the script trains BatchNorm for one epoch at every batch size of "
        "`experiment=batch_size_sweep` and prices every preset's jobs from those epochs and "
        "their final evaluations. BatchNorm stands for every norm (GroupNorm and LayerNorm cost "
        "a little more on CPU). Setups noted `×` are priced through `shapes` (the same ResNet-20 "
        "at 32 px) scaled by their images per epoch, with their own epochs. Durations: s seconds, "
        "m minutes, h hours.",
        "",
        "## On CPU",
        "",
        "| `setup=` | " + " | ".join(head(p) for p in presets) + " |",
        "|---|" + "---|" * len(presets),
    ]
    for row in figures["rows"]:
        lines.append(f"| {name(row)} | "
                     + " | ".join(duration(row["cpu"].get(p)) for p in presets) + " |")
    checks = figures.get("checks")
    if checks:
        measured = next((r for r in figures["rows"] if r["setup"] == checks["setup"]), None)
        lines += ["", "## Against whole sweeps", "",
                  f"Whole sweeps of each preset at `setup={checks['setup']}` (the presets' "
                  f"default), timed end to end on {checks.get('date', figures['measured'])}, "
                  "against the table's figure for them. Read the table as ±40 %: the "
                  "statistics-batch sweep logs more often and splits its batches into ghost "
                  "groups, which one BatchNorm epoch does not price.", "",
                  "| preset | budget | whole sweep |", "|---|---|---|"]
        for p in presets:
            if p in checks["sweeps"]:
                predicted = measured["cpu"].get(p) if measured else None
                lines.append(f"| `{p}` | " + (f"{predicted:.1f} min" if predicted else "–")
                             + f" | {checks['sweeps'][p]:.1f} min |")
    if gpu:
        lines += ["", "## On one GPU (estimates)", "",
                  figures.get("gpu_basis", "Estimates, not measured."), "",
                  "| `setup=` | " + " | ".join(head(p) for p in presets) + " |",
                  "|---|" + "---|" * len(presets)]
        for row in figures["rows"]:
            lines.append(f"| {name(row)} | "
                         + " | ".join(duration(row.get("gpu", {}).get(p)) for p in presets) + " |")
    for note in figures.get("notes", []):
        lines += ["", note]
    lines += ["", DATA_MARK + json.dumps(figures, sort_keys=True) + " -->", ""]
    return "\n".join(lines)


def read_figures(path: Path) -> dict | None:
    """The figures a previous run left at the end of `path`, or None."""
    if not path.exists():
        return None
    found = re.search(re.escape(DATA_MARK) + r"(.*) -->", path.read_text())
    return json.loads(found.group(1)) if found else None


def measure(opts) -> dict:
    """Measure the setups and price every preset; the figures for budget_markdown."""
    rows = {}
    measured = {}
    for setup in [s for s in opts.setups.split(",") if s]:
        costs = epoch_costs(setup, opts.jobs, [])
        measured[setup] = costs
        print(f"{setup}: seconds of one BN epoch + the final evaluations, by batch size: "
              + ", ".join(f"{b}: {c:.1f} + {e:.1f}" for b, (c, e) in costs.items()), flush=True)
        rows[setup] = preset_minutes(setup, costs, opts.jobs)
    for setup in [s for s in opts.scaled.split(",") if s]:
        base, factor = SCALED[setup]
        if base in measured:
            costs = {b: (c * factor, e * factor) for b, (c, e) in measured[base].items()}
            rows[setup] = preset_minutes(setup, costs, opts.jobs)
    counts = {p: len(compose_jobs([f"experiment={p}"], multirun=True)) for p in PRESETS}
    return {"generated": datetime.date.today().isoformat(),
            "measured": datetime.date.today().isoformat(),
            "machine": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}",
            "jobs": opts.jobs, "jobs_per_preset": counts,
            "rows": [{"setup": s, "cpu": m} for s, m in rows.items()]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setups", default="shapes_small,shapes,text_char,tinyshakespeare")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="jobs side by side, as hydra.launcher.n_jobs")
    parser.add_argument("--scaled", default="cifar10,imagefolder",
                        help=f"setups priced through a measured one ({', '.join(SCALED)})")
    parser.add_argument("--out", type=Path, default=OUT, help="the Markdown file to write")
    parser.add_argument("--from-json", type=Path, default=None,
                        help="write --out from these figures instead of measuring")
    opts = parser.parse_args()
    if opts.from_json:
        figures = json.loads(opts.from_json.read_text())
        figures.setdefault("generated", datetime.date.today().isoformat())
    else:
        figures = measure(opts)
        previous = read_figures(opts.out) or {}
        # Kept from the previous file: what this script does not measure.
        for key in ("gpu_basis", "checks", "notes"):
            if key in previous:
                figures[key] = previous[key]
        before = {row["setup"]: row for row in previous.get("rows", [])}
        for row in figures["rows"]:
            if before.get(row["setup"], {}).get("gpu"):
                row["gpu"] = before[row["setup"]]["gpu"]
    text = budget_markdown(figures)
    opts.out.write_text(text)
    print(text[:text.index(DATA_MARK)], end="")
    print(f"written to {opts.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
