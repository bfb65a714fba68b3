"""What the probes cost: training throughput of one model and dataset with probes off, on at
the default logging interval, and on at every step, and the ratios to probes off.

    python scripts/bench_probes.py                    # default ResNet on shapes, CPU
    python scripts/bench_probes.py --steps 400 --rounds 3 -- device=cuda batch_size=256
    python scripts/bench_probes.py --why              # the why-probes, each on its own

Throughput is read back from the runs' own `perf/samples_per_sec` (the time between two
logging steps, probes included); the first interval (warm-up) is left out, and so are
the evaluations, which happen outside those intervals. With several rounds the three
settings alternate, so that drifting machine load affects them alike, and the median of
the rounds is reported.

--why: the default run (its steps, log_every 20, the default probes) once without the
why-probes and once with each of them alone on every logging step (`why.<probe>.every=1`);
each probe's seconds per measurement are its own `perf/why_<probe>_seconds`, and its share
of the run is those seconds over the run's measurements, against the run without it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def throughput(run_dir: Path, batch_size: int) -> float:
    """Samples per second over every logging interval but the first."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    points = [(e.step, e.value) for e in acc.Scalars("perf/samples_per_sec")]
    samples = seconds = 0.0
    for (prev, _), (step, rate) in zip(points, points[1:], strict=False):
        n = (step - prev) * batch_size
        samples += n
        seconds += n / rate
    if not seconds:
        raise SystemExit("too few logging intervals: raise --steps")
    return samples / seconds


def why_costs(overrides: list[str]) -> None:
    """Seconds per measurement of each why-probe and its share of the default run."""
    import time

    from rich.console import Console

    from normbench.config.compose import compose_config
    from normbench.engine.train import run_experiment
    from normbench.probes.why import PROBES
    from tests.helpers.common import read_scalars

    quiet = Console(file=open("/dev/null", "w"))  # noqa: SIM115
    with tempfile.TemporaryDirectory() as tmp:
        config = compose_config(overrides)
        start = time.perf_counter()
        run_experiment(config, Path(tmp) / "base", console=quiet, live=False)
        base = time.perf_counter() - start
        print(f"model={config['model']['name']} dataset={config['dataset']['name']} "
              f"norm={config['norm']['name']} batch_size={config['batch_size']} "
              f"steps={config['steps']} log_every={config['log_every']}: {base:.1f} s "
              "without why-probes", flush=True)
        print(f"{'probe':<12}{'s/measurement':>15}{'measurements':>14}{'% of the run':>14}")
        for probe in PROBES:
            run_dir = Path(tmp) / probe
            run_experiment(compose_config([*overrides, f"why.{probe}.every=1"]), run_dir,
                           console=quiet, live=False)
            scalars = read_scalars(run_dir)
            seconds = [v for _, v in scalars[f"perf/why_{probe}_seconds"]]
            each = statistics.median(seconds)
            share = 100 * sum(seconds) / base
            print(f"{probe:<12}{each:>15.3f}{len(seconds):>14}{share:>13.1f}%", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--why", action="store_true", help="the why-probes' cost, each alone")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for all settings")
    args = parser.parse_args()
    if args.why:
        why_costs(args.overrides)
        return

    from rich.console import Console

    from normbench.config.compose import compose_config
    from normbench.engine.train import run_experiment

    base = compose_config(args.overrides)
    default_interval = int(base["log_every"])
    settings = {
        "probes off": ["probes=false"],
        f"probes every {default_interval} steps (default)": ["probes=true"],
        "probes every step": ["probes=true", "log_every=1"],
    }
    # Evaluations are not timed; a small validation set and no PreciseBN keep them short.
    common = [f"steps={args.steps}", "eval_every=0", "precise_bn_batches=0", *args.overrides]
    results: dict[str, list[float]] = {name: [] for name in settings}
    quiet = Console(file=open("/dev/null", "w"))  # noqa: SIM115
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for i, (name, extra) in enumerate(settings.items()):
                config = compose_config(common + extra)
                run_dir = Path(tmp) / f"r{r}-{i}"
                run_experiment(config, run_dir, console=quiet, live=False)
                results[name].append(throughput(run_dir, config["batch_size"]))
                print(f"round {r + 1}: {name}: {results[name][-1]:.1f} samples/s", flush=True)

    c = base
    print(f"\nmodel={c['model']['name']} dataset={c['dataset']['name']} norm={c['norm']['name']} "
          f"batch_size={c['batch_size']} steps={args.steps} rounds={args.rounds} "
          f"device={c['device']} threads={c['threads']}")
    off = statistics.median(results["probes off"])
    print(f"{'setting':<36}{'samples/s':>12}{'ratio to off':>14}")
    for name, values in results.items():
        value = statistics.median(values)
        print(f"{name:<36}{value:>12.1f}{value / off:>14.3f}")


if __name__ == "__main__":
    main()
