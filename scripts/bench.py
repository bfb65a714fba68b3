"""Training throughput of normbench against the loops people write by hand, in one process.

    python scripts/bench.py                                  # ResNet-20 on shapes, fp32 + bf16
    python scripts/bench.py --norms batch,group --precisions fp32 --rounds 5
    python scripts/bench.py --models transformer,lstm -- dataset=synthetic_text
    python scripts/bench.py --memory 10                      # peak RSS at 1x and 10x the steps
    python scripts/bench.py --mode resnet18                  # torchvision ResNet-18, ~2 min
    python scripts/bench.py --mode resnet18 --rounds 9 --clock cpu
    python scripts/bench.py --loops normbench,no-probes,bare --variant "precision=fp32" \
        --variant "precision=bf16 compile=true" --json bench.json -- device=cuda batch_size=512

An image folder streamed from disk (dataset=imagefolder dataset.stream=true) is measured by
scripts/bench_stream.py, against torchvision's ImageFolder + DataLoader.

For each model x norm x precision, four loops train the same network from the same config,
alternating round by round so that drifting machine load hits them alike:

- `normbench`: the real loop (`run_experiment`), probes at the default interval; its rate
  is read from its own perf/samples_per_sec intervals (the first one, warm-up, left out;
  evaluations happen outside the intervals);
- `normbench, probes=false`: the same without probes;
- `bare`: the model and optimizer alone on tensors in memory: one indexed gather for a
  batch, batched random crop + flip for images, nothing else;
- `DataLoader` (images): torchvision's ImageFolder over the same images written as PNG
  files, per-image RandomCrop + RandomHorizontalFlip + ToTensor + Normalize, and a
  DataLoader with 2 worker processes, as most training scripts do.

`--mode resnet18`: torchvision's ResNet-18 (`model=torchvision`, its ImageNet stem) on 32 px
shapes, batch 64, fp32, one torch thread, against the bare loop only (normbench with its
default probes and log_every, and with probes=false): 60 steps per loop and round (40
timed), 3 rounds, 250 validation images (the normbench loops evaluate once, untimed), in
about 2-3 minutes on 2 cores; `--rounds 9` for figures to keep. 32 px images keep its
steps short (~0.2 s on one core), where a per-step cost of normbench's would show most;
`-- model.cifar_stem=true` measures setup=cifar10_resnet18's model instead (about 14x the
work per image). The target is normbench at >= 0.95x the bare loop. Options given on the
command line win over the mode's.

`--clock cpu` (CPU runs) times every loop in CPU seconds of this process (time.process_time)
rather than wall seconds: on a machine that other jobs share, a loop that is descheduled for
a while is not charged for it. With one torch thread (threads=1, as `--mode resnet18` sets)
it measures the work each loop does; it does not see a loop waiting on something else (a
GPU, DataLoader workers).

`--estimator median` (CPU runs) rates each loop and round from per-step times rather than
from the total over its timed steps: the bare loop's median step; normbench's median step,
plus the median logging step (the one the probes watch) and the median log write once per
log_every steps, which is how often a run pays them. A step that another process delayed
moves a median little and a total a lot: on a shared machine, single rounds of the same
loop spread by ±20 % in total, much less in median.

With `-- compile=true`, every loop's model is compiled (the hand loops' too, unless
`--eager-baselines`), and the first steps, which compile, are left out of the rates.

`--variant "k=v k=v"` (repeatable) measures each set of overrides in turn instead of the
`--precisions` list (fp32 against bf16 + channels_last + compile, say); `--loops` keeps some
of the four loops (leaving out `dataloader` also skips writing the images as PNG files,
minutes at 50k images); `--json PATH` writes the rows, rewritten after every measurement so
that a run stopped by a timeout keeps what it measured. Each row also gives the time of one
epoch of the training set at that rate (evaluations left out).

Printed: the median rate over rounds (images/s, or tokens/s on text), its ratio to the
bare loop and to the DataLoader loop, and each loop's peak memory (resident set size
high-water mark on CPU, reset before each loop through /proc/self/clear_refs; max allocated
on CUDA; the dataset, built once per process and shared by the loops, is on the device in
every loop and counts in each).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: writing 5 resets the peak RSS (VmHWM) of the process
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# What the loops are timed with (--clock): wall seconds, or this process's CPU seconds.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def units_per_sample(batch) -> int:
    """1 image, or the real tokens of a text row."""
    if batch.mask is not None:
        return float(batch.mask.sum()) / batch.x.shape[0]
    return batch.x.shape[1] if batch.x.dim() == 2 else 1


def record_steps(times: dict[str, list[float]], warmup: int):
    """Time normbench's train_step and log_step (with --clock) after step `warmup`, into
    times["step"], ["logging"] (the steps that log, and probe) and ["log"]; returns undo."""
    import normbench.engine.train as train

    step_fn, log_fn = train.train_step, train.log_step

    def train_step(exp, step, log_now):
        start = clock()
        out = step_fn(exp, step, log_now)
        if step > warmup:
            times["logging" if log_now else "step"].append(clock() - start)
        return out

    def log_step(exp, step, *args):
        start = clock()
        out = log_fn(exp, step, *args)
        if step > warmup:
            times["log"].append(clock() - start)
        return out

    train.train_step, train.log_step = train_step, log_step

    def undo() -> None:
        train.train_step, train.log_step = step_fn, log_fn
    return undo


def normbench_rate(config: dict, run_dir: Path, estimator: str = "mean") -> float:
    """Samples/s of the real loop (warm-up interval left out): from its own logging
    intervals, or (estimator "median") from the median step, logging step and log write,
    one of each of the last two per log_every steps."""
    from rich.console import Console
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from normbench.engine import meters
    from normbench.engine.train import run_experiment

    every = int(config["log_every"])
    times: dict[str, list[float]] = {"step": [], "logging": [], "log": []}
    undo = record_steps(times, every) if estimator == "median" else (lambda: None)
    # perf/samples_per_sec is timed by meters.Throughput with time.time(): --clock's instead
    meters.time = SimpleNamespace(time=clock)
    try:
        run_experiment(config, run_dir, console=Console(file=open("/dev/null", "w")), live=False)  # noqa: SIM115
    finally:
        meters.time = time
        undo()
    if estimator == "median":
        if not all(times.values()):
            raise SystemExit("too few logging intervals: raise --steps or lower log_every")
        med = {key: statistics.median(values) for key, values in times.items()}
        return config["batch_size"] * every / ((every - 1) * med["step"] + med["logging"]
                                               + med["log"])
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    points = [(e.step, e.value) for e in acc.Scalars("perf/samples_per_sec")]
    samples = seconds = 0.0
    for (prev, _), (step, rate) in zip(points, points[1:], strict=False):
        n = (step - prev) * config["batch_size"]
        samples += n
        seconds += n / rate
    if not seconds:
        raise SystemExit("too few logging intervals: raise --steps or lower log_every")
    return samples / seconds


def model_and_optimizer(config: dict, data, device):
    from normbench.engine.optim import build_optimizer
    from normbench.engine.precision import to_memory_format
    from normbench.models import build_model
    from normbench.norms import make_spec

    torch.manual_seed(config["seed"])
    model = build_model(config["model"], make_spec(**config["norm"]), data.info).to(device)
    model = to_memory_format(model, config["channels_last"])
    optimizer = build_optimizer(model, config["lr"], **config["optim"])
    return torch.compile(model) if config["compile"] else model, optimizer


def timed_loop(config: dict, model, optimizer, batches, steps: int, warmup: int,
               device, estimator: str = "mean") -> float:
    """Samples/s of a plain forward/backward/step loop over `batches` (an iterator): over
    all its timed steps, or (estimator "median") from its median step (CPU runs)."""
    from normbench.engine.evaluation import forward, loss_and_counts
    from normbench.engine.precision import autocast, prepare_input

    model.train()
    start = None
    each = []
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            start = clock()
        begun = clock()
        batch = next(batches)
        batch = type(batch)(prepare_input(batch.x, config["channels_last"]), batch.y, batch.mask)
        with autocast(device, config["precision"]):
            logits = forward(model, batch)
        loss, _, _ = loss_and_counts(logits, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i >= warmup:
            each.append(clock() - begun)
    sync(device)
    if estimator == "median":
        return config["batch_size"] / statistics.median(each)
    return steps * config["batch_size"] / (clock() - start)


def bare_batches(data, batch_size: int, device):
    """Random batches gathered from the in-memory tensors (images: crop + flip, batched)."""
    from normbench.data.images import ImageDataset, random_crop_flip

    g = torch.Generator().manual_seed(0)
    if isinstance(data, ImageDataset):
        Batch = type(next(iter(data.val_batches(2))))
        while True:
            idx = torch.randint(data.n_train, (batch_size,), generator=g).to(device)
            x = random_crop_flip(data.train_x[idx], data.crop_pad, g)
            yield Batch(data.normalize(x), data.train_y[idx])
    # text: the dataset's own batches, drawn once and cycled (no per-step work at all)
    loader = data.train_loader(batch_size, seed=0)
    yield from itertools.cycle([next(loader) for _ in range(32)])


def write_image_folder(data, root: Path) -> None:
    from PIL import Image

    x, y = data.train_x.cpu(), data.train_y.cpu()
    for i in range(x.shape[0]):
        folder = root / f"class{int(y[i]):03d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i].permute(1, 2, 0).numpy()).save(folder / f"{i:06d}.png")


def dataloader_batches(data, root: Path, batch_size: int, device, workers: int):
    """torchvision ImageFolder + per-image transforms + DataLoader, endlessly."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    size = data.info.image_size
    tf = transforms.Compose([transforms.RandomCrop(size, padding=data.crop_pad),
                             transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                             transforms.Normalize(data.mean.tolist(), data.std.tolist())])
    loader = DataLoader(datasets.ImageFolder(str(root), transform=tf), batch_size=batch_size,
                        shuffle=True, num_workers=workers, drop_last=True,
                        persistent_workers=workers > 0)
    Batch = type(next(iter(data.val_batches(2))))
    while True:
        for x, y in loader:
            yield Batch(x.to(device, non_blocking=True), y.to(device, non_blocking=True))


# --mode NAME: a measurement's defaults (the options' own names), and its Hydra overrides
MODES = {"resnet18": {"models": "torchvision", "precisions": "fp32",
                      "loops": "normbench,no-probes,bare", "steps": 60, "warmup": 20, "rounds": 3,
                      "overrides": ["model.arch=resnet18", "batch_size=64", "threads=1",
                                    "dataset.n_val=250"],
                      "target": 0.95}}

# --loops names -> the loops' names in the table
LOOPS = {"normbench": "normbench", "no-probes": "normbench, probes=false", "bare": "bare",
         "dataloader": "DataLoader"}
_DATASETS: dict[str, object] = {}


def shared_dataset(**options):
    """One dataset per set of options in this process, for every loop and round: rendering
    50k shapes takes seconds to a minute, and none of it is inside a timed interval. The
    normbench loops get it too (main() puts this in place of experiment.build_dataset);
    nothing in a run modifies a dataset, and `.to(device)` is a no-op after the first."""
    from normbench.data import build_dataset

    key = json.dumps(options, sort_keys=True, default=str)
    if key not in _DATASETS:
        _DATASETS[key] = build_dataset(**options)
    return _DATASETS[key]


def bench(overrides: list[str], args, tmp: Path, variant: str = "", emit=None) -> list[dict]:
    """The rows of one model x norm x precision (or variant); `emit(rows)` is called with the
    rows measured so far after every loop's round."""
    from normbench.config.compose import compose_config
    from normbench.engine.experiment import select_device

    # Evaluations and checkpoints are not timed: none until the end, and no PreciseBN.
    base = [f"steps={args.steps}", "eval_every=0", "precise_bn_batches=0", "checkpoint_every=0",
            *overrides]
    config = compose_config(base)
    device = select_device(config["device"])
    if config["threads"]:
        torch.set_num_threads(config["threads"])
    data = shared_dataset(**config["dataset"]).to(device)
    images = data.info.kind == "image"
    loops = [LOOPS[key] for key in args.loops.split(",") if key != "dataloader" or images]
    folder = tmp / f"folder-{config['dataset']['name']}-{data.n_train}"
    if "DataLoader" in loops and not folder.exists():
        write_image_folder(data, folder)
    probe = next(data.train_loader(config["batch_size"], seed=0))
    unit = units_per_sample(probe)
    rates = {name: [] for name in loops}
    memory = {name: 0.0 for name in loops}
    for r in range(args.rounds):
        for name in loops:
            reset_peak_memory(device)
            if name.startswith("normbench"):
                # the config composed above, rather than composing again with probes=false
                # (nothing interpolates `probes`; a composition costs about 0.5 s); a copy,
                # since a run may write into it
                run_config = copy.deepcopy(config)
                if "probes=false" in name:
                    run_config["probes"] = False
                rate = normbench_rate(run_config, tmp / f"run-{len(list(tmp.iterdir()))}",
                                      args.estimator)
            else:
                hand = {**config, "compile": False} if args.eager_baselines else config
                model, optimizer = model_and_optimizer(hand, data, device)
                batches = (bare_batches(data, config["batch_size"], device) if name == "bare"
                           else dataloader_batches(data, folder, config["batch_size"], device,
                                                   args.workers))
                rate = timed_loop(config, model, optimizer, batches, args.steps - args.warmup,
                                  args.warmup, device, args.estimator)
                del batches  # ends DataLoader workers
            rates[name].append(rate * unit)
            memory[name] = max(memory[name], peak_memory_mib(device))
            print(f"  round {r + 1} {name:<24} {rate * unit:10.1f}", flush=True)
            if emit:
                emit(summarize(config, data, unit, device, variant, rates, memory))
    return summarize(config, data, unit, device, variant, rates, memory)


def summarize(config: dict, data, unit: float, device, variant: str, rates: dict,
              memory: dict) -> list[dict]:
    """One row per loop measured so far: median rate over its rounds, ratios, epoch time."""
    images = data.info.kind == "image"
    median = {name: statistics.median(values) for name, values in rates.items() if values}
    bare, dl = median.get("bare"), median.get("DataLoader")
    rows = []
    for name, rate in median.items():
        samples_per_s = rate / unit
        rows.append({"model": config["model"].get("arch") or config["model"]["name"],
                     "norm": config["norm"]["name"],
                     "precision": config["precision"], "channels_last": config["channels_last"],
                     "compile": config["compile"], "variant": variant, "loop": name,
                     "rate": rate, "unit": "img/s" if images else "tok/s",
                     "rounds": len(rates[name]), "samples_per_s": samples_per_s,
                     "epoch_s": data.n_train / samples_per_s, "n_train": data.n_train,
                     "batch_size": config["batch_size"], "device": str(device),
                     "peak_mib": memory[name], "vs_bare": rate / bare if bare else None,
                     "vs_dataloader": rate / dl if dl else None})
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"\n{'model':<12}{'norm':<14}{'prec':<6}{'loop':<26}{'rate':>10}  unit "
          f"{'x bare':>8}{'x DataLoader':>14}{'peak MiB':>10}{'epoch s':>9}  variant")
    for r in rows:
        bare = f"{r['vs_bare']:.2f}" if r["vs_bare"] else "-"
        dl = f"{r['vs_dataloader']:.2f}" if r["vs_dataloader"] else "-"
        print(f"{r['model']:<12}{r['norm']:<14}{r['precision']:<6}{r['loop']:<26}"
              f"{r['rate']:>10.1f}  {r['unit']} {bare:>8}{dl:>14}{r['peak_mib']:>10.0f}"
              f"{r['epoch_s']:>9.2f}  {r['variant']}")


def print_ratios(rows: list[dict], target: float | None) -> None:
    """normbench's loops against the bare loop of the same row group, and the target."""
    for r in rows:
        if r["loop"].startswith("normbench") and r["vs_bare"]:
            verdict = ("" if target is None else
                       f"  (target >= {target:.2f}x: {'met' if r['vs_bare'] >= target else 'MISSED'})")
            print(f"{r['model']} {r['precision']} {r['variant']}".rstrip()
                  + f": {r['loop']} / bare = {r['vs_bare']:.3f}x{verdict}")


def apply_mode(parser: argparse.ArgumentParser, argv: list[str] | None = None):
    """The arguments, with --mode's values where the command line gives none."""
    known, _ = parser.parse_known_args(argv)
    mode = dict(MODES.get(known.mode) or {})
    extra = mode.pop("overrides", [])
    mode.pop("target", None)
    parser.set_defaults(**mode)
    args = parser.parse_args(argv)
    given = {o.split("=", 1)[0].lstrip("+~") for o in args.overrides}
    args.overrides = [o for o in extra if o.split("=", 1)[0] not in given] + args.overrides
    return args


def resnet20(model: str, args) -> list[str]:
    """ResNet-20 on 5000 shapes of 32 px at batch 128 (setup=shapes), what the figures in
    docs/performance.md measure, unless a mode or the command line picks a setup or a size:
    the plain run's ResNet-8 at 16 px is too small to time a training loop by."""
    given = {o.split("=", 1)[0].lstrip("+~") for o in args.overrides}
    if model != "resnet" or args.mode or given & {"setup", "batch_size", "model.depth"}:
        return []
    return ["setup=shapes", "batch_size=128"]


def memory_check(factor: int, overrides: list[str], tmp: Path) -> None:
    """Peak RSS of the default run and of one `factor` times longer, in fresh processes."""
    import subprocess

    from normbench.config.compose import compose_config

    steps = compose_config(overrides)["steps"]
    for n in (steps, factor * steps):
        code = ("import resource, sys; from normbench.cli import main; rc = main(sys.argv[1:]); "
                "print('peak_rss_mib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024)")
        out = subprocess.run([sys.executable, "-c", code, "train", f"steps={n}", *overrides,
                              f"hydra.run.dir={tmp}/mem-{n}"], capture_output=True, text=True,
                             cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
        line = [x for x in out.stdout.splitlines() if x.startswith("peak_rss_mib")]
        print(f"steps={n}: {line[0] if line else out.stderr[-300:]}")




def write_json(path: Path, rows: list[dict], args) -> None:
    """The rows and what they were measured on, replaced atomically (a reader, or a run
    stopped by a timeout, never sees half a file)."""
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "args": vars(args)}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({**meta, "rows": rows}, indent=1, default=str))
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=sorted(MODES), default=None,
                        help="a prepared measurement (see the module's docstring)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="time the loops in wall seconds or in this process's CPU seconds")
    parser.add_argument("--estimator", choices=("mean", "median"), default="mean",
                        help="a loop's rate from all its timed steps, or from its median step "
                             "(normbench: plus its logging step and log write once per "
                             "log_every steps)")
    parser.add_argument("--models", default="resnet")
    parser.add_argument("--norms", default="batch")
    parser.add_argument("--precisions", default=None,
                        help="default fp32,bf16; with --variant, each variant's own")
    parser.add_argument("--variant", action="append", default=[], metavar='"K=V K=V"',
                        help="a set of overrides measured on its own (repeatable)")
    parser.add_argument("--loops", default=",".join(LOOPS),
                        help=f"which of {','.join(LOOPS)} to run")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--steps", type=int, default=100, help="per loop and round")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps of the hand loops")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--eager-baselines", action="store_true",
                        help="with compile=true: the bare and DataLoader loops stay eager, as "
                             "hand-written loops usually are")
    parser.add_argument("--memory", type=int, default=0,
                        help="instead: peak RSS of the default run and of one N times longer")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every loop")
    args = apply_mode(parser)
    global clock
    clock = CLOCKS[args.clock]
    unknown = set(args.loops.split(",")) - set(LOOPS)
    if unknown:
        parser.error(f"unknown loop(s) {', '.join(sorted(unknown))}: use {','.join(LOOPS)}")
    import normbench.engine.experiment

    normbench.engine.experiment.build_dataset = shared_dataset  # see shared_dataset
    with tempfile.TemporaryDirectory() as tmp:
        if args.memory:
            memory_check(args.memory, args.overrides, Path(tmp))
            return
        if args.precisions:
            precisions = args.precisions.split(",")
        else:  # a variant says its precision (or keeps the config's)
            precisions = [None] if args.variant else ["fp32", "bf16"]
        rows: list[dict] = []

        def emit(current: list[dict]) -> None:
            if args.json:
                write_json(args.json, rows + current, args)

        for model, norm, precision, variant in itertools.product(
                args.models.split(","), args.norms.split(","), precisions, args.variant or [""]):
            print(f"model={model} norm={norm}" + (f" precision={precision}" if precision else "")
                  + (f" {variant}" if variant else ""), flush=True)
            # the variant last: its values win over the ones given for every loop
            overrides = [f"model={model}", f"norm={norm}", *resnet20(model, args),
                         *([f"precision={precision}"] if precision else []), *args.overrides,
                         *variant.split()]
            rows += bench(overrides, args, Path(tmp), variant, emit)
            emit([])
        print(f"\n{torch.__version__}, {torch.get_num_threads()} threads, "
              f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}, "
              f"{args.clock} clock")
        print_table(rows)
        print_ratios(rows, MODES.get(args.mode, {}).get("target"))


if __name__ == "__main__":
    main()
