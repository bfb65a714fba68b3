"""What each preset costs at each setup, from one measured epoch per batch size.

    python scripts/budget.py        # every measured setup (+ the ones priced through them)
    python scripts/budget.py --setups shapes,tinyshakespeare --jobs 2
    python scripts/budget.py --setups shapes_resnet18 --scaled cifar10_resnet18  # those rows only
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
are priced through a measured setup with the same model at 32 px (`shapes` for ResNet-20,
`shapes_resnet18` for ResNet-18) scaled by images per epoch, with their own epochs. An epoch
of the setups in SAMPLED takes too long to time at every batch size on a CPU: for them each
job trains a few logging intervals (256 samples each in batch_size_sweep), and an epoch is
priced from the rate (perf/samples_per_sec) over all of them but the first (warm-up).

The result, in minutes of wall time, is written into docs/budgets.md (--out), the one place
the budgets are kept: the setup and preset headers and the docs link to it. The file
carries its figures in a trailing comment, so that a new measurement keeps the GPU
estimates and the whole-sweep checks of the previous one (they are not measured here), and
a measurement of some setups keeps the other rows, each with where and when it was measured.
A row's estimates are `gpu` (one GPU) and `node` (one 8-GPU node, for the setups no CPU
runs, such as setup=imagenet, whose row has no `cpu` figures); `gpu_basis` and `node_basis`
say how they were derived. They are written into the trailing comment's figures by hand
and the file regenerated with --from-json.
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
SCALED = {"cifar10": ("shapes", 50_000 / 5_000), "imagefolder": ("shapes", 10_000 / 5_000),
          "cifar10_resnet18": ("shapes_resnet18", 50_000 / 5_000)}
# Setups timed over this many logging intervals per batch size (after one of warm-up)
# rather than over a whole epoch: ResNet-18 trains at ~10-20 images/s on one CPU core.
SAMPLED = {"shapes_resnet18": 2}
# Setups that cost what another costs, and what the row says about them.
ALIASES = {"cifar10": ["cifar100"], "tinyshakespeare": ["text"]}
NOTES = {"cifar10": "`shapes` × 10 images, 15 epochs", "imagefolder": "per 10k images at 32 px: "
         "`shapes` × 2 images, 15 epochs", "tinyshakespeare": "`text`: per 1.1 MB of text",
         "cifar10_resnet18": "`shapes_resnet18` × 10 images, 30 epochs",
         "imagenet": "ResNet-50, 1.28M images at 224 px, 90 epochs"}
MEASURED_SETUPS = "shapes_small,shapes,text_char,tinyshakespeare,shapes_resnet18"
OUT = REPO / "docs" / "budgets.md"
# The sections of estimates: (row key, basis key, heading).
ESTIMATES = (("gpu", "gpu_basis", "On one GPU (estimates)"),
             ("node", "node_basis", "On one 8-GPU node (estimates)"))
DATA_MARK = "<!-- budget.py figures: "


def sampled_length(setup: str, intervals: int) -> list[str]:
    """Overrides that train each job of batch_size_sweep for `intervals` + 1 logging
    intervals (its log_every is a fixed number of samples at every batch size)."""
    grid = compose_jobs(["experiment=batch_size_sweep", f"setup={setup}"], multirun=True)
    (samples,) = {job["log_every"] * job["batch_size"] for job in grid}
    # quoted: Hydra's override grammar takes a nested interpolation only inside a string
    return ["epochs=null", f"steps='${{nb_idiv:{(intervals + 1) * samples},${{batch_size}}}}'"]


def timed_rate(scalars: dict) -> float:
    """Training samples per second over every logging interval but the first (warm-up)."""
    steps, rates = scalars["perf/samples_per_sec"]
    if len(steps) < 3:
        raise SystemExit("too few logging intervals to time: raise SAMPLED's count")
    # Each interval's steps over their seconds (the batch size, the same in all, cancels).
    done = steps[-1] - steps[0]
    return float(done / sum((step - prev) / rate for prev, step, rate
                            in zip(steps[:-1], steps[1:], rates[1:], strict=True)))


def epoch_costs(setup: str, jobs: int, extra: list[str],
                intervals: int | None = None) -> dict[int, tuple[float, float]]:
    """Batch size -> (seconds of one BN epoch of training, seconds of the job's final
    evaluations: validation, batch statistics, PreciseBN), jobs side by side. With
    `intervals`, the epoch is priced from that many logging intervals (sampled_length)."""
    length = sampled_length(setup, intervals) if intervals else ["epochs=1"]
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "normbench", "train", "-m",
                   "experiment=batch_size_sweep", f"setup={setup}", "norm=batch", "seed=0",
                   *length, "hydra/launcher=joblib", f"hydra.launcher.n_jobs={jobs}",
                   f"hydra.sweep.dir={tmp}/sweep", *extra]
        subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
        costs = {}
        for path in Path(tmp, "sweep").glob("*/summary.json"):
            summary = json.loads(path.read_text())
            scalars = read_scalars(path.parent)
            final = sum(float(scalars[tag][1][-1]) for tag in EVALUATIONS if tag in scalars)
            epoch = (summary["n_train"] / timed_rate(scalars) if intervals
                     else summary["elapsed_s"] - final)
            costs[summary["batch_size"]] = (epoch, final)
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
    "rows": [{"setup", "cpu": {preset: minutes} (absent: a setup no CPU runs), optional
    "gpu", "node", optional "measured", "machine", "jobs" where the row's differ from the
    file's, optional "basis"}], optional "gpu_basis", "node_basis", optional "checks":
    {"setup", "sweeps": {preset: minutes of a whole sweep}}}.
    The figures themselves end the file in a comment, for the next run to read back."""
    presets = [p for p in PRESETS if any(p in row.get(key, {}) for row in figures["rows"]
                                         for key in ("cpu", "gpu", "node"))]
    cpu_rows = [row for row in figures["rows"] if "cpu" in row]
    counts = figures.get("jobs_per_preset", {})
    footnotes = row_footnotes(figures)

    def head(p):
        return f"`{p}` ({counts[p]} jobs)" if p in counts else f"`{p}`"

    def name(row, marked=True):
        setups = [row["setup"], *ALIASES.get(row["setup"], [])]
        note = NOTES.get(row["setup"])
        mark = footnotes.get(row["setup"], ("",))[0] if marked else ""
        return (", ".join(f"`{s}`" for s in setups) + (f" ({note})" if note else "")
                + (f" {mark}" if mark else ""))

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
        "the script trains BatchNorm for one epoch (or, in the rows that say so, a few logging "
        "intervals) at every batch size of "
        "`experiment=batch_size_sweep` and prices every preset's jobs from those epochs and "
        "their final evaluations. BatchNorm stands for every norm (GroupNorm and LayerNorm cost "
        "a little more on CPU). Setups noted `×` are priced through the setup they name (the "
        "same model at 32 px) scaled by their images per epoch, with their own epochs. "
        "Durations: s seconds, m minutes, h hours.",
        "",
        "## On CPU",
        "",
        "| `setup=` | " + " | ".join(head(p) for p in presets) + " |",
        "|---|" + "---|" * len(presets),
    ]
    for row in cpu_rows:
        lines.append(f"| {name(row)} | "
                     + " | ".join(duration(row["cpu"].get(p)) for p in presets) + " |")
    seen = []
    for mark, text in footnotes.values():
        if mark not in seen:
            seen.append(mark)
            lines += ["", f"{mark} {text}"]
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
    for key, basis_key, heading in ESTIMATES:
        if not any(row.get(key) for row in figures["rows"]):
            continue
        # One GPU: every row of the CPU table (a dash where none was estimated); a node:
        # the setups estimated for it.
        rows = [row for row in figures["rows"]
                if row.get(key) or (key == "gpu" and "cpu" in row)]
        lines += ["", f"## {heading}", "", figures.get(basis_key, "Estimates, not measured."),
                  "", "| `setup=` | " + " | ".join(head(p) for p in presets) + " |",
                  "|---|" + "---|" * len(presets)]
        for row in rows:
            lines.append(f"| {name(row, marked=False)} | "
                         + " | ".join(duration(row.get(key, {}).get(p)) for p in presets) + " |")
    for note in figures.get("notes", []):
        lines += ["", note]
    lines += ["", DATA_MARK + json.dumps(figures, sort_keys=True) + " -->", ""]
    return "\n".join(lines)


MARKS = "¹²³⁴⁵⁶⁷⁸⁹"


def row_footnotes(figures: dict) -> dict[str, tuple[str, str]]:
    """setup -> (mark, footnote) for the rows measured elsewhere or otherwise than the
    file's header says; rows that share a footnote share its mark."""
    texts: dict[str, str] = {}
    out = {}
    for row in figures["rows"]:
        parts = []
        if any(key in row for key in ("measured", "machine", "jobs")):
            parts.append(f"Measured on {row.get('measured', figures['measured'])}, "
                         f"{row.get('machine', figures['machine'])}, "
                         f"{row.get('jobs', figures['jobs'])} jobs side by side")
        if row.get("basis"):
            parts.append(row["basis"])
        if parts:
            text = "; ".join(parts) + "."
            text = text[0].upper() + text[1:]
            texts.setdefault(text, MARKS[len(texts)])
            out[row["setup"]] = (texts[text], text)
    return out


def read_figures(path: Path) -> dict | None:
    """The figures a previous run left at the end of `path`, or None."""
    if not path.exists():
        return None
    found = re.search(re.escape(DATA_MARK) + r"(.*) -->", path.read_text())
    return json.loads(found.group(1)) if found else None


def machine() -> str:
    """`2 cores of an AMD EPYC, torch 2.14.1, CPU only`: what the table was measured on."""
    import torch

    name = platform.processor() or platform.machine()
    try:
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        name = found.group(1).strip() if found else name
    except OSError:
        pass
    where = f"CUDA {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "CPU only"
    article = "an" if name[:1].upper() in "AEIOU" else "a"
    return (f"{os.cpu_count()} cores of {article} {name}, torch {torch.__version__.split('+')[0]}, "
            f"{where}")


def basis(setup: str) -> str | None:
    """How a row's epochs were timed, where not as the header says (SAMPLED setups and
    the setups priced through them, which say so in their name)."""
    base = SCALED.get(setup, (setup,))[0]
    if base not in SAMPLED:
        return None
    return (f"an epoch priced from {SAMPLED[base]} logging intervals of BatchNorm training per "
            "batch size (after one of warm-up), not a whole epoch")


def measure(opts) -> dict:
    """Measure the setups and price every preset; the figures for budget_markdown."""
    rows = {}
    measured = {}
    for setup in [s for s in opts.setups.split(",") if s]:
        costs = epoch_costs(setup, opts.jobs, [], SAMPLED.get(setup))
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
    today = datetime.date.today().isoformat()
    figures = {"generated": today, "measured": today, "machine": machine(),
               "jobs": opts.jobs, "jobs_per_preset": counts, "rows": []}
    for setup, minutes in rows.items():
        row = {"setup": setup, "cpu": minutes}
        how = "; ".join(filter(None, [basis(setup), opts.remark]))
        if how:
            row["basis"] = how
        figures["rows"].append(row)
    return figures


def merge(figures: dict, previous: dict) -> dict:
    """`figures` (this measurement) completed from `previous` (the file's): its GPU and
    node estimates, whole-sweep checks and notes, and the rows of the setups not measured
    now, which keep their own date and machine."""
    for key in ("gpu_basis", "node_basis", "checks", "notes"):
        if key in previous:
            figures[key] = previous[key]
    before = {row["setup"]: row for row in previous.get("rows", [])}
    for row in figures["rows"]:
        for key, _, _ in ESTIMATES:
            if before.get(row["setup"], {}).get(key):
                row[key] = before[row["setup"]][key]
    new = {row["setup"]: row for row in figures["rows"]}
    kept = [row for row in previous.get("rows", []) if row["setup"] not in new]
    if not any("cpu" in row for row in kept):
        # Rows of estimates alone (a setup no CPU runs) stay; no measurement is kept.
        figures["rows"] += kept
        return figures
    # The header keeps describing the rows kept; the new rows say where they differ.
    here = {key: figures[key] for key in ("measured", "machine", "jobs")}
    for key in here:
        figures[key] = previous[key]
    for row in new.values():
        row.update({key: value for key, value in here.items() if value != figures[key]})
    figures["rows"] = [new.pop(row["setup"], row) for row in previous["rows"]] + list(new.values())
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setups", default=MEASURED_SETUPS,
                        help="setups to measure; the file's other rows are kept as they are")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="jobs side by side, as hydra.launcher.n_jobs")
    parser.add_argument("--scaled", default="cifar10,imagefolder,cifar10_resnet18",
                        help=f"setups priced through a measured one ({', '.join(SCALED)})")
    parser.add_argument("--out", type=Path, default=OUT, help="the Markdown file to write")
    parser.add_argument("--remark", default="",
                        help="said of the rows measured now, e.g. what else the machine ran")
    parser.add_argument("--from-json", type=Path, default=None,
                        help="write --out from these figures instead of measuring")
    opts = parser.parse_args()
    if opts.from_json:
        figures = json.loads(opts.from_json.read_text())
        figures.setdefault("generated", datetime.date.today().isoformat())
    else:
        figures = merge(measure(opts), read_figures(opts.out) or {})
    text = budget_markdown(figures)
    opts.out.write_text(text)
    print(text[:text.index(DATA_MARK)], end="")
    print(f"written to {opts.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
