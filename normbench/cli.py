"""The `normbench` command. Hydra is known here and in normbench.config (composition, schema,
error explanations) only: other packages never import it and receive configs as plain dicts.

`normbench train [overrides]` composes conf/train.yaml through Hydra (multirun, --cfg, --help
and launchers included). Before Hydra starts any job, a pre-flight composes every job's
config and checks it, so that a typo in a sweep costs a second and one line, not a traceback
halfway through. `normbench inspect [overrides]` composes and checks the same way, then
lists the model's norm layers (normbench/models/inspection.py).
"""

from __future__ import annotations

import difflib
import os
import sys
from pathlib import Path

from omegaconf import OmegaConf

from normbench.config.arguments import split_args, take_output_subdir
from normbench.config.resolvers import STAMP_ENV, register_resolvers, stamp
from normbench.config.tree import conf_dir, config_options, register
from normbench.console_streams import keep_running_without_reader
from normbench.engine import distributed
from normbench.errors import UserError

SUBCOMMANDS = {
    "train": "train one configuration, or a sweep with -m (Hydra overrides: key=value)",
    "list": "list the datasets, models, norms and presets in the config tree",
    "report": "tables and plots from run or sweep folders (normbench report DIR... --help)",
    "inspect": "the model's norm layers: where, how wide, what they see, what stood there",
}
EXIT_USER_ERROR = 2
EXIT_RUN_FAILED = 1
EXIT_SIGNAL_BASE = 128  # interrupted by signal N: exit status 128 + N, as the shell reports it
# The groups `normbench list` shows first; any other folder of conf/ follows.
LIST_ORDER = ("dataset", "model", "norm", "optim", "sched", "experiment")

# At import: Hydra's entry point, and launcher workers that unpickle the task, compose with them.
register()
__all__ = ["conf_dir", "main", "register_resolvers"]


def fail(message: str) -> int:
    if distributed.is_main():  # several processes fail alike: rank 0 says it once
        print(f"normbench: error: {message}", file=sys.stderr)
    return EXIT_USER_ERROR


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    keep_running_without_reader()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print_usage()
        return 0
    command, rest = argv[0], argv[1:]
    try:
        if command == "train":
            return train_command(rest)
        if command == "list":
            return list_command(rest)
        if command == "report":
            from normbench.report.command import report_command

            return report_command(rest)
        if command == "inspect":
            from normbench.models.inspection import inspect_command

            return inspect_command(rest)
    except UserError as e:
        return fail(e.line())
    close = difflib.get_close_matches(command, SUBCOMMANDS, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return fail(f"unknown command '{command}'. Fix: {hint}use one of: {', '.join(SUBCOMMANDS)}.")


def print_usage() -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print("[bold]normbench[/bold]: compare normalization layers in deep networks.\n")
    console.print("Usage: normbench COMMAND [ARGS]\n")
    table = Table(show_header=False, box=None, padding=(0, 2))
    for name, text in SUBCOMMANDS.items():
        table.add_row(f"[bold]{name}[/bold]", text)
    console.print(table)
    console.print("\nExamples:\n  normbench train norm=group\n"
                  "  normbench train -m norm=batch,group batch_size=2,8,32\n"
                  "  normbench train -m experiment=batch_size_sweep hydra/launcher=joblib\n"
                  "  normbench report runs/sweeps/<stamp>\n"
                  "  normbench inspect model=torchvision model.arch=resnet18 norm=group\n"
                  "  normbench train --help      (config groups and every key)")


# ----------------------------------------------------------------------------- list


def list_command(args: list[str]) -> int:
    from rich.console import Console
    from rich.table import Table

    if args:
        return fail(f"'normbench list' takes no arguments (got {' '.join(args)}). "
                    "Fix: run 'normbench list'.")
    console = Console()
    folders = sorted(d.name for d in conf_dir().iterdir() if d.is_dir())
    for group in [*(g for g in LIST_ORDER if g in folders), *(g for g in folders
                                                             if g not in LIST_ORDER)]:
        options = config_options(group)
        if not options:
            continue
        table = Table(title=f"{group}=", title_justify="left", show_header=False, box=None,
                      padding=(0, 2))
        for option in options:
            table.add_row(f"[bold]{option}[/bold]", describe(conf_dir() / group / f"{option}.yaml"))
        console.print(table)
        if group == "norm":
            from normbench.config.norm_listing import norm_tables
            from normbench.norms import norm_names

            # norm=native has no options nor counts of its own: the model's norms decide.
            for part in norm_tables([name for name in options if name in norm_names()]):
                console.print(part)
    console.print("Pick with e.g. 'normbench train dataset=shapes model=resnet norm=group'.")
    return 0


def describe(path: Path) -> str:
    """A config's one-line description: its first comment line."""
    for line in path.read_text().splitlines():
        if line.startswith("#") and not line.startswith("# @package"):
            return line.lstrip("#").strip()
    return ""


# ----------------------------------------------------------------------------- train

def train_command(args: list[str]) -> int:
    os.environ.pop(STAMP_ENV, None)  # a fresh stamp for this invocation
    flags, overrides, multirun, info_only = split_args(args)
    shown = [f for f in flags if f.split("=")[0] in ("--cfg", "-c", "--info", "-i")]
    if multirun and shown:
        raise UserError(f"-m with {shown[0]}: Hydra shows the config of one job, not of a sweep",
                        "leave out -m and give each swept key one value (e.g. norm=batch "
                        "seed=0) to see that job's config")
    quiet = []
    if distributed.requested() and not info_only:
        quiet = join_process_group(multirun)
    stamp()
    sweep_dir, hydra_overrides = None, overrides
    if not info_only:
        sweep_dir, hydra_overrides = preflight(overrides, multirun)
        # Hydra would write .hydra/ before the job can refuse to run (and over the record of
        # the run a resume continues): the job writes it once it starts (`write_record`).
        global _RECORD_SUBDIR
        _RECORD_SUBDIR, hydra_overrides = take_output_subdir(hydra_overrides)
        quiet = [q for q in quiet if not q.startswith("hydra.output_subdir=")]
        hydra_overrides = [*hydra_overrides, "hydra.output_subdir=null"]
    sys.argv = ["normbench train", *flags, *hydra_overrides, *quiet]
    import hydra

    try:
        hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="train")(_task)()
    finally:
        distributed.shutdown()
    if multirun and sweep_dir is not None:
        return report_sweep(sweep_dir)
    return 0


def join_process_group(multirun: bool) -> list[str]:
    """Under torchrun: join the other processes, take rank 0's run stamp (every rank must
    resolve the same run folder), and return the Hydra overrides that keep ranks > 0 from
    writing into it (its .hydra/ folder and log are rank 0's)."""
    if multirun:
        raise UserError("-m under torchrun: the processes of one torchrun train one job "
                        "together", "sweep multi-device jobs with the submitit launcher and "
                        "hydra.launcher.tasks_per_node=<devices> (docs/distributed.md), or run "
                        "one torchrun per job")
    distributed.init()
    os.environ[STAMP_ENV] = distributed.broadcast_object(
        stamp() if distributed.is_main() else None)
    if distributed.is_main():
        return []
    return ["hydra.output_subdir=null", "hydra/job_logging=none", "hydra/hydra_logging=none"]


# Where each job writes Hydra's record of its config (hydra.output_subdir; None: nowhere),
# and, for a single run, the nearest folder on its path that existed before the command.
_RECORD_SUBDIR: str | None = ".hydra"
_EXISTING_ANCESTOR: Path | None = None


def write_record(cfg, run_dir: Path) -> None:
    """Hydra's record of the job (config.yaml, hydra.yaml, overrides.yaml), as Hydra itself
    writes it, except that the record of a run already in the folder is never overwritten:
    a resumed run's record goes beside it, in .hydra/resume_<stamp>/."""
    from hydra.core.hydra_config import HydraConfig

    if _RECORD_SUBDIR is None or not distributed.is_main():
        return
    folder = run_dir / _RECORD_SUBDIR
    if (folder / "config.yaml").exists():
        folder = folder / f"resume_{stamp()}"
    folder.mkdir(parents=True, exist_ok=True)
    hydra_cfg = OmegaConf.create({"hydra": OmegaConf.to_container(HydraConfig.get())})
    hydra_cfg.hydra.output_subdir = str(folder.relative_to(run_dir))
    OmegaConf.save(cfg, folder / "config.yaml")
    OmegaConf.save(hydra_cfg, folder / "hydra.yaml")
    OmegaConf.save(OmegaConf.create(list(HydraConfig.get().overrides.task)),
                   folder / "overrides.yaml")


def remove_created(run_dir: Path) -> None:
    """Remove the empty folders this command created on the way to `run_dir` (Hydra makes
    the run folder before the job can refuse to run in it)."""
    if _EXISTING_ANCESTOR is None:
        return
    folder = run_dir.absolute()
    while folder != _EXISTING_ANCESTOR and _EXISTING_ANCESTOR in folder.parents:
        try:
            folder.rmdir()  # only if empty
        except OSError:
            return
        folder = folder.parent


def _task(cfg) -> None:
    """One job, inside Hydra: resolve the config to a plain dict and hand it to the loop.

    A job that fails before its run starts writing leaves an existing folder as it was; a
    single run's new folder is removed again, a sweep job's new folder records the failure
    (the sweep's report counts it)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from normbench.config.checks import check_config
    from normbench.engine.tracking import write_failed_summary

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    fresh = not any(run_dir.iterdir()) if run_dir.is_dir() else True
    started = False

    def on_start() -> None:
        nonlocal started
        started = True
        write_record(cfg, run_dir)

    def record_failure(line: str) -> None:
        if not main:
            return
        if started or (fresh and multirun):
            write_failed_summary(run_dir, config, line)
            distributed.failure_recorded()  # the other ranks, left alone, need not write it
        elif fresh:
            remove_created(run_dir)

    config = OmegaConf.to_container(cfg, resolve=True)
    if config.get("threads") is None and multirun:
        config["threads"] = threads_per_job(hydra_cfg.launcher)
    if multirun:  # the values this job was given, as in its folder name: HParams, run name
        from normbench.engine.dashboards import swept_settings

        config["swept"] = swept_settings(list(hydra_cfg.overrides.task),
                                         list(hydra_cfg.job.config.override_dirname.exclude_keys))
        config["run_name"] = f"{config['run_name']}_{hydra_cfg.job.override_dirname}"
    if distributed.env_from_slurm():  # a task of a multi-task SLURM job (submitit)
        distributed.init()
    main = distributed.is_main()
    try:
        check_config(config)
        from normbench.engine.train import run_experiment

        summary = run_experiment(config, run_dir, live=not multirun, on_start=on_start)
    except distributed.PeerLost as e:  # summary.json already says failed, with this line
        print(f"normbench: error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_RUN_FAILED) from None
    except UserError as e:
        record_failure(e.line())
        if multirun:
            print(f"normbench: job {hydra_cfg.job.num} failed: {e.line()}", file=sys.stderr)
            return
        if main:
            print(f"normbench: error: {e.line()}", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR) from None
    except Exception as e:
        record_failure(f"{type(e).__name__}: {e}")
        if multirun:  # isolate the failure: the other jobs still run
            import traceback

            traceback.print_exc()
            return
        raise
    if summary["status"] == "interrupted":  # stop here, sweep included: 130 (SIGINT), 143 (SIGTERM)
        import signal

        raise SystemExit(EXIT_SIGNAL_BASE + signal.Signals[summary["signal"]].value)
    if summary["status"] == "diverged" and not multirun:  # a sweep goes on; it reports at the end
        raise SystemExit(EXIT_RUN_FAILED)


def threads_per_job(launcher) -> int | None:
    """Torch CPU threads for one job of a local parallel sweep: the cores shared out among
    the launcher's concurrent jobs, so that n_jobs x threads does not oversubscribe them.

    None (torch's default) for launchers that run one job at a time or on other machines.
    """
    if "joblib" not in str(launcher.get("_target_", "")).lower():
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    n_jobs = int(launcher.get("n_jobs") or -1)
    if n_jobs < 0:  # joblib's convention: -1 all cores, -2 all but one, ...
        n_jobs = max(1, cores + 1 + n_jobs)
    return max(1, cores // n_jobs)


def report_sweep(sweep_dir: Path) -> int:
    """After a sweep: one line per unsuccessful job, and the exit status for the whole sweep."""
    from normbench.engine.tracking import read_summary

    statuses = {}
    for summary_path in sorted(Path(sweep_dir).glob("*/summary.json")):
        summary = read_summary(summary_path.parent) or {}
        statuses[summary_path.parent.name] = summary.get("status", "unknown")
    bad = {k: v for k, v in statuses.items() if v != "completed"}
    print(f"normbench: sweep finished: {len(statuses)} jobs, {len(statuses) - len(bad)} completed"
          f"{', ' + str(len(bad)) + ' not completed' if bad else ''}; folder {sweep_dir}",
          file=sys.stderr)
    for name, status in bad.items():
        print(f"normbench:   {name}: {status}", file=sys.stderr)
    return EXIT_RUN_FAILED if bad or not statuses else 0


# ----------------------------------------------------------------------------- pre-flight


def preflight(overrides: list[str], multirun: bool) -> tuple[Path | None, list[str]]:
    """Compose and check every job's config (UserError on the first problem); returns the
    sweep folder in multirun mode, and the overrides to hand to Hydra."""
    from normbench.config.checks import check_config, check_run_dir, check_sweep_dir, check_sweep_varies
    from normbench.config.compose import compose_sweep
    from normbench.config.scale import mismatched_setup

    sweep = compose_sweep(overrides, multirun)
    for job in sweep.jobs:
        check_config(job.config)
    if (line := mismatched_setup(overrides, sweep.jobs)) and distributed.is_main():
        print(f"normbench: warning: {line}", file=sys.stderr)
    if multirun:
        check_sweep_varies(sweep.jobs)
        check_sweep_dir(sweep.dir, sweep.jobs[0].config["resume"] if sweep.jobs else False)
    else:
        check_run_dir(sweep.jobs[0].run_dir, sweep.jobs[0].config["resume"])
        global _EXISTING_ANCESTOR
        _EXISTING_ANCESTOR = existing_ancestor(sweep.jobs[0].run_dir)
    return sweep.dir, sweep.hydra_overrides


def existing_ancestor(folder: Path) -> Path:
    """`folder` itself if it exists, else its nearest existing parent (absolute)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder
