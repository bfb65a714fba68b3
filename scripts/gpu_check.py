"""The CUDA path end to end, in one command that fits a short lease of one GPU.

    python scripts/gpu_check.py OUT                # on a machine with one CUDA GPU (< 8 min)
    python scripts/gpu_check.py OUT --dry-run      # the same steps on the CPU at tiny sizes
    python scripts/gpu_check.py OUT --only train,sweep

Steps, each a subprocess with its own timeout (their sum is the budget, so the whole stays
under 8 minutes), run in this order whatever happens to the ones before:

    env        torch, CUDA, the GPU, hydra/omegaconf and the joblib launcher as found
    pytest     `pytest -m gpu` on tests/engine/test_gpu.py and tests/engine/test_gpu_distributed.py
    train      the default `normbench train device=cuda`: wall time, val acc
    bench_resnet       scripts/bench.py, ResNet-20 at batch 512 on 50k shapes of 32 px
                       (CIFAR's size): fp32, bf16, bf16 + channels_last, + compile; img/s,
                       one 50k-image epoch, peak CUDA memory, probes on and off, bare loop
    bench_transformer  the same for the Transformer on synthetic_text: tokens/s
    sweep      a 4-job sweep through the joblib launcher, n_jobs=4, on the one GPU
    torchrun   `torchrun --nproc_per_node=1 ... norm.sync=true` on CUDA

Written into OUT (at most the four files below, none in subfolders, each well under 16 MiB,
so that they are quick to copy back from a short GPU session): summary.md (a table of every step and figure),
figures.json (the same figures, machine-readable), log.txt (each step's command and output)
and runs.tar.gz (the run folders' summaries, configs and event files, no checkpoints).
summary.md and figures.json are rewritten after every step, so a session that ends early
still returns the steps done. A step that fails is recorded and the next one runs; the exit
status is 1 if any step did not pass, else 0.

--dry-run runs every command on the CPU with tiny sizes (compile=false: compiling alone
takes 20-50 s on 2 cores), so that a typo in a command or an override shows here and not
on the GPU. tests/scripts/test_gpu_check.py runs it.

How to run it on a GPU machine without PyPI: scripts/gpu_wheels.sh (its header has the command).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOG_TAIL_BYTES = 1_500_000  # per step in log.txt: 7 steps stay well under 16 MiB
TAR_LIMIT_BYTES = 15 * 2**20  # a returned file may not exceed 16 MiB
MIN_STEP_S = 10  # a step given less than this is skipped, not started to be killed at once

# The ResNet variants of the issue; the Transformer's leave out channels_last (text models
# ignore it). The compile variant comes last: it is the slowest, and if the step's timeout
# ends it, the rows written before it stay.
RESNET_VARIANTS = ["precision=fp32 channels_last=false", "precision=bf16 channels_last=false",
                   "precision=bf16 channels_last=true", "precision=bf16 channels_last=true compile=true"]
TRANSFORMER_VARIANTS = ["precision=fp32", "precision=bf16", "precision=bf16 compile=true"]
BENCH_LOOPS = "normbench,no-probes,bare"  # no DataLoader: writing 50k PNG files takes minutes
SWEEP_JOBS = {"gpu": 4, "dry": 2}

ENV_PROBE = r"""
import json, os, platform, shutil, subprocess, importlib.metadata as md, importlib.util as iu
import torch
info = {"python": platform.python_version(), "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        "device_count": torch.cuda.device_count() if torch.cuda.is_available() else 0}
info["cpus"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
try:  # what failed here is worth a line, not the loss of every other figure
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", gpu_mem_gib=round(p.total_memory / 2**30, 1),
                cudnn=torch.backends.cudnn.version(), nccl=".".join(map(str, torch.cuda.nccl.version())))
except Exception as e:
    info["cuda_error"] = f"{type(e).__name__}: {e}"
for name in ("hydra-core", "omegaconf", "antlr4-python3-runtime", "hydra-joblib-launcher", "joblib",
             "tensorboard", "rich", "pytest", "pytest-xdist"):
    try:
        info[name] = md.version(name)
    except md.PackageNotFoundError:
        info[name] = None
info["joblib_launcher_importable"] = iu.find_spec("hydra_plugins.hydra_joblib_launcher") is not None
if shutil.which("nvidia-smi"):
    q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                        "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    info["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
print("ENV " + json.dumps(info))
"""


@dataclass
class Step:
    name: str
    what: str  # one line for summary.md
    timeout_s: int  # on the GPU; the dry run gets DRY_TIMEOUT_S
    command: object  # (Context) -> argv
    figures: object  # (Context, log text) -> dict; raises StepFailed when the output says so


class StepFailed(Exception):
    """The command ran, but its output shows it did not do what the step checks; `figures`
    holds what it measured all the same."""

    def __init__(self, message: str, figures: dict | None = None):
        super().__init__(message)
        self.figures = figures or {}


@dataclass
class Context:
    dry: bool
    scratch: Path  # run folders and bench JSON: outside OUT, packed into runs.tar.gz
    python: str = sys.executable

    @property
    def device(self) -> str:
        return "cpu" if self.dry else "cuda"

    def small(self, *overrides: str) -> list[str]:
        """Overrides that make a run tiny in the dry run (one torch thread: the CPU
        machine's cores are shared), none on the GPU."""
        return [*overrides, "threads=1"] if self.dry else []


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise StepFailed(f"{path.name} unreadable ({type(e).__name__}: {e})") from None


def run_figures(summary: dict) -> dict:
    final = summary.get("final", {})
    return {"status": summary.get("status"), "device": summary.get("device"),
            "steps": summary.get("steps"), "run_elapsed_s": summary.get("elapsed_s"),
            "val_acc": final.get("val_acc"), "val_loss": final.get("val_loss"),
            "world_size": summary.get("world_size"), "precision": summary.get("precision"),
            "batch_size": summary.get("batch_size"), "stats_batch": summary.get("stats_batch")}


def completed_run(path: Path) -> dict:
    figures = run_figures(read_json(path / "summary.json"))
    if figures["status"] != "completed":
        raise StepFailed(f"run status {figures['status']!r}", figures)
    return figures


# ----------------------------------------------------------------------------- the steps


def env_command(ctx: Context) -> list[str]:
    return [ctx.python, "-c", ENV_PROBE]


def env_figures(ctx: Context, log: str) -> dict:
    line = next((x for x in log.splitlines() if x.startswith("ENV ")), None)
    if line is None:
        raise StepFailed("no ENV line in the output")
    info = json.loads(line[4:])
    if not ctx.dry and "gpu" not in info:
        raise StepFailed(f"torch sees no CUDA device ({info.get('cuda_error', 'none')}): "
                         "the other steps will fail")
    if not info["joblib_launcher_importable"]:
        raise StepFailed("hydra_plugins.hydra_joblib_launcher is not importable (wheels?)")
    return info


def pytest_command(ctx: Context) -> list[str]:
    # -n 0: a handful of tests, each process would start its own CUDA context; -vv against
    # pyproject's -q: one line per test; -rfEs: failures, errors and skips (with reasons) in
    # the short summary; no cache provider: nothing written into the checkout
    return [ctx.python, "-m", "pytest", "-m", "gpu", "-n", "0", "-p", "no:cacheprovider",
            "-vv", "-rfEs", "tests/engine/test_gpu.py", "tests/engine/test_gpu_distributed.py"]


def pytest_figures(ctx: Context, log: str) -> dict:
    counts = {k: 0 for k in ("passed", "failed", "skipped", "error", "errors", "xfailed",
                             "deselected")}
    # pytest's last line, e.g. "=== 7 passed, 2 skipped in 31.2s ==="
    last = [x for x in log.splitlines() if re.match(r"=+ .* in [\d.]+s", x)]
    for number, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|deselected)",
                                   last[-1] if last else ""):
        counts[word] += int(number)
    counts["error"] += counts.pop("errors")
    counts["failed_tests"] = re.findall(r"^FAILED (\S+)", log, re.M)
    if not ctx.dry and counts["passed"] == 0:
        raise StepFailed("no CUDA test ran")
    return counts


def train_command(ctx: Context) -> list[str]:
    return [ctx.python, "-m", "normbench", "train", f"device={ctx.device}",
            *ctx.small("debug=tiny"), f"hydra.run.dir={ctx.scratch / 'train'}"]


def train_figures(ctx: Context, log: str) -> dict:
    return completed_run(ctx.scratch / "train")


def bench_command(ctx: Context, model: str, variants: list[str], common: list[str],
                  dry_common: list[str]) -> list[str]:
    variants = [v.replace("compile=true", "compile=false") if ctx.dry else v for v in variants]
    # GPU: one round of 200 steps (about two 50k epochs at batch 512): a round costs mostly
    # its setup and final evaluation, so longer rounds are cheap and more rounds are not
    sizes = ["--steps", "4", "--warmup", "1"] if ctx.dry else ["--steps", "200", "--warmup", "20"]
    return [ctx.python, "scripts/bench.py", "--models", model, "--loops", BENCH_LOOPS,
            "--rounds", "1", *sizes, *(x for v in variants for x in ("--variant", v)),
            "--json", str(ctx.scratch / f"bench_{model}.json"), "--",
            f"device={ctx.device}", *common, *(ctx.small(*dry_common))]


def bench_figures(ctx: Context, model: str, variants: list[str]) -> dict:
    path = ctx.scratch / f"bench_{model}.json"
    if not path.exists():
        raise StepFailed("bench wrote no rows")
    data = read_json(path)
    want = len(variants) * len(BENCH_LOOPS.split(","))
    figures = {"torch": data["torch"], "cuda_device": data["cuda_device"], "rows": data["rows"]}
    if len(data["rows"]) < want:
        figures["missing"] = f"{want - len(data['rows'])} of {want} rows"
        raise StepFailed(f"missing {figures['missing']}", figures)
    return figures


RESNET_COMMON = ["batch_size=512", "dataset.n_train=50000", "dataset.image_size=32", "model.depth=20"]
RESNET_DRY = ["batch_size=32", "dataset.n_train=256", "dataset.n_val=32", "model.depth=8",
              "log_every=2"]
TEXT_COMMON = ["dataset=synthetic_text", "batch_size=512"]
TEXT_DRY = ["batch_size=32", "dataset.n_train=256", "dataset.n_val=32", "log_every=2"]


def sweep_command(ctx: Context) -> list[str]:
    if ctx.dry:  # joblib runs n_jobs=1 in this process: its worker processes would cost
        # 5 s of CPU each here, and tests/report/test_report.py already runs a 2-worker sweep
        grid, n_jobs, length = ["norm=batch", "batch_size=16,32"], 1, ctx.small("debug=tiny")
    else:  # one epoch of setup=shapes_small (2000 images at 16 px): seconds per job
        grid, n_jobs, length = ["norm=batch,group", "batch_size=16,32"], 4, ["epochs=1"]
    return [ctx.python, "-m", "normbench", "train", "-m", "experiment=batch_size_sweep",
            "setup=shapes_small", *grid, "seed=0", *length, f"device={ctx.device}",
            "hydra/launcher=joblib", f"hydra.launcher.n_jobs={n_jobs}",
            f"hydra.sweep.dir={ctx.scratch / 'sweep'}"]


def sweep_figures(ctx: Context, log: str) -> dict:
    jobs = {}
    for path in sorted((ctx.scratch / "sweep").glob("*/summary.json")):
        jobs[path.parent.name] = run_figures(read_json(path))
    want = SWEEP_JOBS["dry" if ctx.dry else "gpu"]  # the grid's size in sweep_command
    done = sum(job["status"] == "completed" for job in jobs.values())
    figures = {"n_jobs": want, "completed": done, "jobs": jobs}
    if done != want:
        raise StepFailed(f"{done} of {want} jobs completed", figures)
    return figures


def torchrun_command(ctx: Context) -> list[str]:
    # torch.distributed.run rather than a `torchrun` on the PATH, which may be missing;
    # --standalone: a free local port, whatever else runs on the machine
    return [ctx.python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
            "-m", "normbench", "train", f"device={ctx.device}", "norm.sync=true",
            *ctx.small("debug=tiny"), f"hydra.run.dir={ctx.scratch / 'torchrun'}"]


def torchrun_figures(ctx: Context, log: str) -> dict:
    figures = completed_run(ctx.scratch / "torchrun")
    # normbench joins a process group only when WORLD_SIZE > 1 (normbench/engine/distributed.py):
    # with one process this checks the launch under torchrun, not NCCL itself, which
    # pytest's one-rank NCCL test (tests/engine/test_gpu_distributed.py) covers
    figures["process_group"] = "none (world size 1)" if figures["world_size"] == 1 else "joined"
    return figures


STEPS = [
    Step("env", "torch, CUDA and the carried packages", 20, env_command, env_figures),
    Step("pytest", "pytest -m gpu (tests/engine/test_gpu.py, tests/engine/test_gpu_distributed.py)", 70,
         pytest_command, pytest_figures),
    Step("train", "default normbench train on CUDA", 45, train_command, train_figures),
    Step("bench_resnet", "bench.py, ResNet-20, batch 512, 50k x 32 px shapes", 170,
         lambda ctx: bench_command(ctx, "resnet", RESNET_VARIANTS, RESNET_COMMON, RESNET_DRY),
         lambda ctx, log: bench_figures(ctx, "resnet", RESNET_VARIANTS)),
    Step("bench_transformer", "bench.py, Transformer, batch 512, synthetic_text", 75,
         lambda ctx: bench_command(ctx, "transformer", TRANSFORMER_VARIANTS, TEXT_COMMON,
                                   TEXT_DRY),
         lambda ctx, log: bench_figures(ctx, "transformer", TRANSFORMER_VARIANTS)),
    Step("sweep", "4-job sweep, hydra/launcher=joblib n_jobs=4, one GPU", 50, sweep_command,
         sweep_figures),
    Step("torchrun", "torchrun --nproc_per_node=1, norm.sync=true, on CUDA", 35,
         torchrun_command, torchrun_figures),
]
BUDGET_S = sum(step.timeout_s for step in STEPS)  # 465 s: under 8 minutes with the start
DRY_TIMEOUT_S = 120  # per step in the dry run: only a hang should reach it


# ----------------------------------------------------------------------------- running


def cpu_seconds_of_children() -> float:
    """User + system CPU of the finished children and the descendants they waited for: what
    a step costs the CPU machine in the dry run, where the cores are shared."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class Runner:
    """Runs the steps one after another; a step's process group is ended on its timeout
    (torchrun and the joblib workers are its children) and when this driver is stopped."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.current: subprocess.Popen | None = None
        self.results: dict[str, dict] = {}
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "1",
                    # the checkout importable without installing it (`python -m normbench`)
                    "PYTHONPATH": os.pathsep.join(
                        x for x in (str(REPO), os.environ.get("PYTHONPATH")) if x)}
        self.env.pop("NORMBENCH_STAMP", None)
        if ctx.dry:
            self.env["OMP_NUM_THREADS"] = "1"

    def stop_current(self) -> None:
        if self.current is not None and self.current.poll() is None:
            # SIGTERM first: normbench saves a checkpoint and writes summary.json (a second
            # or two), so the run folder says how far it got
            for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 3)):
                try:
                    os.killpg(self.current.pid, sig)
                except ProcessLookupError:
                    return
                try:
                    self.current.wait(wait)
                    return
                except subprocess.TimeoutExpired:
                    continue

    def run(self, step: Step, timeout: float) -> dict:
        argv = step.command(self.ctx)
        log_path = self.ctx.scratch / f"{step.name}.log"
        start = time.monotonic()
        cpu_before = cpu_seconds_of_children()
        rc, status, error = None, "ok", None
        with open(log_path, "w") as log:
            self.current = subprocess.Popen(argv, cwd=REPO, env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = self.current.wait(timeout)
            except subprocess.TimeoutExpired:
                status, error = "timeout", f"stopped after {timeout:.0f} s"
                self.stop_current()
        wall = time.monotonic() - start
        cpu = cpu_seconds_of_children() - cpu_before
        text = log_path.read_text(errors="replace")
        if status == "ok" and rc != 0:
            status, error = "failed", f"exit status {rc}"
        figures = {}
        try:  # figures even from a failed or stopped step: what it measured before
            figures = step.figures(self.ctx, text)
        except StepFailed as e:
            figures = e.figures
            if status == "ok":
                status, error = "failed", str(e)
        except Exception as e:  # noqa: BLE001 - a parse bug must not cost the other steps
            if status == "ok":
                status, error = "failed", f"reading its output: {type(e).__name__}: {e}"
        return {"status": status, "what": step.what, "wall_s": round(wall, 1),
                "cpu_s": round(cpu, 1), "timeout_s": round(timeout), "rc": rc, "error": error,
                "command": shlex.join(argv if step.name != "env" else argv[:2] + ["<probe>"]),
                "figures": figures, "log": text}


def run_all(out: Path, dry: bool, only: set[str] | None, budget: float) -> int:
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    ctx = Context(dry=dry, scratch=scratch)
    runner = Runner(ctx)
    signal.signal(signal.SIGTERM, lambda *_: (runner.stop_current(), sys.exit(143)))
    started = datetime.datetime.now(datetime.timezone.utc)
    deadline = time.monotonic() + budget
    (out / "log.txt").write_text("")
    for step in STEPS:
        if only and step.name not in only:
            continue
        left = deadline - time.monotonic()
        timeout = min(DRY_TIMEOUT_S if dry else step.timeout_s, left)
        print(f"[gpu_check] {step.name}: {step.what} (timeout {timeout:.0f} s)", flush=True)
        if timeout < MIN_STEP_S:
            result = {"status": "skipped", "what": step.what, "wall_s": 0, "cpu_s": 0,
                      "timeout_s": 0, "rc": None, "command": "", "figures": {}, "log": "",
                      "error": f"{left:.0f} s left of the {budget:.0f} s budget"}
        else:
            result = runner.run(step, timeout)
        print(f"[gpu_check] {step.name}: {result['status']} in {result['wall_s']} s"
              + (f" ({result['error']})" if result["error"] else ""), flush=True)
        append_log(out / "log.txt", step.name, result)
        runner.results[step.name] = {k: v for k, v in result.items() if k != "log"}
        runner.results[step.name]["log_tail"] = result["log"].splitlines()[-25:]
        write_reports(out, runner.results, dry, started, budget)
    pack_runs(scratch, out / "runs.tar.gz")
    shutil.rmtree(scratch, ignore_errors=True)
    summary = write_reports(out, runner.results, dry, started, budget)
    print(summary, flush=True)
    failed = [name for name, r in runner.results.items() if r["status"] != "ok"]
    return 1 if failed else 0


def append_log(path: Path, name: str, result: dict) -> None:
    text = result["log"]
    if len(text.encode()) > LOG_TAIL_BYTES:
        text = "[... earlier output left out ...]\n" + text.encode()[-LOG_TAIL_BYTES:].decode(
            errors="replace")
    with open(path, "a") as f:
        f.write(f"{'=' * 78}\n== {name}: {result['status']}, {result['wall_s']} s"
                f" (timeout {result['timeout_s']} s)\n$ {result['command']}\n{'=' * 78}\n"
                f"{text}\n")


def pack_runs(scratch: Path, target: Path) -> None:
    """The run folders and bench rows, without checkpoints (the step logs are in log.txt);
    without the event files too if that would not come back from the lease."""
    def add(with_events: bool) -> None:
        with tarfile.open(target, "w:gz") as tar:
            for path in sorted(scratch.rglob("*")):
                if (not path.is_file() or path.suffix == ".pt"
                        or (path.suffix == ".log" and path.parent == scratch)
                        or (not with_events and "tfevents" in path.name)):
                    continue
                tar.add(path, arcname=str(path.relative_to(scratch)))

    add(with_events=True)
    if target.stat().st_size > TAR_LIMIT_BYTES:
        add(with_events=False)


# ----------------------------------------------------------------------------- reports


def write_reports(out: Path, results: dict, dry: bool, started, budget: float) -> str:
    total = sum(r["wall_s"] for r in results.values())
    cpu = sum(r["cpu_s"] for r in results.values())
    ok = all(r["status"] == "ok" for r in results.values())
    env = results.get("env", {}).get("figures", {})
    figures = {"mode": "dry-run (CPU, tiny sizes)" if dry else "gpu",
               "started_utc": started.isoformat(timespec="seconds"), "budget_s": budget,
               "total_wall_s": round(total, 1), "total_cpu_s": round(cpu, 1), "all_ok": ok, "env": env,
               "steps": {name: {k: v for k, v in r.items() if k != "log_tail"}
                         for name, r in results.items()}}
    (out / "figures.json").write_text(json.dumps(figures, indent=1, default=str))
    text = summary_markdown(figures, results)
    (out / "summary.md").write_text(text)
    return text


def fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def step_line(name: str, r: dict) -> str:
    f = r["figures"]
    if not f:
        return ""
    if name == "env":
        keys = ("gpu", "torch", "torch_cuda", "nccl", "hydra-core", "omegaconf")
        return ", ".join(f"{k} {f[k]}" for k in keys if f.get(k))
    if name == "pytest":
        return ", ".join(f"{f[k]} {k}" for k in ("passed", "failed", "skipped", "error")
                         if f.get(k)) + (f"; failed: {', '.join(f['failed_tests'])}"
                                         if f.get("failed_tests") else "")
    if name in ("train", "torchrun"):
        line = (f"val acc {fmt(f.get('val_acc'), 3)}, run {fmt(f.get('run_elapsed_s'))} s of "
                f"{r['wall_s']} s wall, {f.get('steps')} steps on {f.get('device')}")
        return line + (f", process group: {f['process_group']}" if "process_group" in f else "")
    if name.startswith("bench"):
        rows = f.get("rows", [])
        return f"{len(rows)} rows (table below)" + (f"; missing {f['missing']}"
                                                   if f.get("missing") else "")
    if name == "sweep":
        return f"{f.get('completed')} of {f.get('n_jobs')} jobs completed in {r['wall_s']} s"
    return ""


def summary_markdown(figures: dict, results: dict) -> str:
    lines = [f"# normbench GPU check: {figures['mode']}", "",
             f"Started {figures['started_utc']}; {figures['total_wall_s']} s of steps "
             f"({figures['total_cpu_s']} s of CPU) "
             f"(budget {figures['budget_s']:.0f} s). "
             f"{'Every step passed.' if figures['all_ok'] else 'NOT every step passed.'}", "",
             "| step | status | wall s | CPU s | timeout s | figures |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        status = r["status"] + (f" ({r['error']})" if r["error"] else "")
        lines.append(f"| {name} | {status} | {r['wall_s']} | {r['cpu_s']} | {r['timeout_s']} | "
                     f"{step_line(name, r).replace('|', '/')} |")
    for name in ("bench_resnet", "bench_transformer"):
        rows = results.get(name, {}).get("figures", {}).get("rows", [])
        if not rows:
            continue
        lines += ["", f"## {name}", "",
                  "| variant | loop | rate | unit | epoch s | peak MiB | x bare |",
                  "|---|---|---|---|---|---|---|"]
        for row in rows:
            lines.append(f"| {row['variant']} | {row['loop']} | {fmt(row['rate'])} | "
                         f"{row['unit']} | {fmt(row['epoch_s'], 2)} | {fmt(row['peak_mib'], 0)} "
                         f"| {fmt(row['vs_bare'], 2)} |")
        first = rows[0]
        lines += ["", f"Batch {first['batch_size']}, {first['n_train']} training samples "
                      f"(an epoch: n_train / samples per s, evaluations left out), "
                      f"device {first['device']}, one round per loop."]
    jobs = results.get("sweep", {}).get("figures", {}).get("jobs", {})
    if jobs:
        lines += ["", "## sweep jobs", "", "| job | status | run s | val acc | device |",
                  "|---|---|---|---|---|"]
        for job, f in jobs.items():
            lines.append(f"| {job} | {f['status']} | {fmt(f['run_elapsed_s'])} | "
                         f"{fmt(f['val_acc'], 3)} | {f['device']} |")
    failed = {n: r for n, r in results.items() if r["status"] in ("failed", "timeout")}
    for name, r in failed.items():
        lines += ["", f"## {name}: {r['status']}", "", f"`{r['command']}`", "", "```",
                  *r["log_tail"], "```"]
    if "torchrun" in results:
        lines += ["", "torchrun: with one process normbench starts no process group (it joins one "
                      "at WORLD_SIZE > 1), so this step checks the launch under torchrun; NCCL "
                      "itself runs in pytest's one-rank test of synchronized statistics "
                      "(tests/engine/test_gpu_distributed.py)."]
    lines += ["", "Each step's full output is in log.txt; run folders in runs.tar.gz.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for summary.md, figures.json, log.txt, "
                                               "runs.tar.gz")
    parser.add_argument("--dry-run", action="store_true",
                        help="every step on the CPU at tiny sizes (checks the commands)")
    parser.add_argument("--only", default=None, help=f"comma-separated subset of "
                                                     f"{','.join(s.name for s in STEPS)}")
    parser.add_argument("--budget", type=float, default=None,
                        help=f"seconds for all steps (default {BUDGET_S} on the GPU, "
                             f"{DRY_TIMEOUT_S * len(STEPS)} in the dry run)")
    args = parser.parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    unknown = (only or set()) - {s.name for s in STEPS}
    if unknown:
        parser.error(f"unknown step(s): {', '.join(sorted(unknown))}")
    budget = args.budget or (DRY_TIMEOUT_S * len(STEPS) if args.dry_run else BUDGET_S)
    return run_all(args.out, args.dry_run, only, budget)


if __name__ == "__main__":
    sys.exit(main())
