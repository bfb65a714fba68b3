"""What each preset costs at each setup, from one measured epoch per batch size.

    python scripts/budget.py                          # shapes_small, shapes, text_char
    python scripts/budget.py --setups shapes,tinyshakespeare --jobs 2

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
norm (GroupNorm and LayerNorm cost a little more on CPU); the CIFAR setups are the setup
`shapes` (the same ResNet-20 at 32 px) scaled by images per epoch. Printed as a table in
minutes of wall time.
"""

from __future__ import annotations

import argparse
import json
import os
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
# Setups measured through another one: the same model and image size, more images.
SCALED = {"cifar10": ("shapes", 50_000 / 5_000), "cifar100": ("shapes", 50_000 / 5_000)}


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setups", default="shapes_small,shapes,text_char,tinyshakespeare")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="jobs side by side, as hydra.launcher.n_jobs")
    parser.add_argument("--scaled", default="cifar10",
                        help=f"setups priced through a measured one ({', '.join(SCALED)})")
    opts = parser.parse_args()
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
            rows[f"{setup} (= {base} x {factor:g})"] = preset_minutes(setup, costs, opts.jobs)
    width = max(len(r) for r in rows)
    print(f"\nminutes of wall time, {opts.jobs} jobs at a time on {os.cpu_count()} cores")
    print(f"{'setup':<{width}}  " + "  ".join(f"{p:>22}" for p in PRESETS))
    for name, minutes in rows.items():
        print(f"{name:<{width}}  " + "  ".join(f"{minutes[p]:>22.1f}" for p in PRESETS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
