"""The `normbench` command. The only module that knows Hydra.

`normbench train [overrides]` composes conf/train.yaml through Hydra (multirun, --cfg, --help
and launchers included). Before Hydra starts any job, a pre-flight composes every job's
config and checks it, so that a typo in a sweep costs a second and one line, not a traceback
halfway through.
"""

from __future__ import annotations

import difflib
import os
import re
import secrets
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from normbench.errors import UserError

SUBCOMMANDS = {
    "train": "train one configuration, or a sweep with -m (Hydra overrides: key=value)",
    "list": "list the datasets, models, norms and presets in the config tree",
    "report": "tables and plots from run or sweep folders (normbench report DIR... --help)",
}
EXIT_USER_ERROR = 2
EXIT_RUN_FAILED = 1
EXIT_SIGNAL_BASE = 128  # interrupted by signal N: exit status 128 + N, as the shell reports it
STAMP_ENV = "NORMBENCH_STAMP"


def conf_dir() -> Path:
    """The config tree: inside the installed package, or beside it in a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise RuntimeError(f"normbench's config tree (conf/) is missing next to {here}")


def _stamp() -> str:
    # Inherited by launcher worker processes, so every job of a sweep resolves the same folder.
    if STAMP_ENV not in os.environ:
        os.environ[STAMP_ENV] = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    return os.environ[STAMP_ENV]


def _product(*factors: float) -> float:
    """`${nb_mul:a,b,...}`: presets scale a value (lr with batch size) without eval."""
    value = 1.0
    for f in factors:
        value *= float(f)
    return float(f"{value:.10g}")  # 0.1*3 -> 0.3, not 0.30000000000000004 (folder names)


def _quotient(a: float, b: float) -> float:
    """`${nb_div:a,b}`."""
    return float(f"{float(a) / float(b):.10g}")


def _floor_quotient(a: int, b: int) -> int:
    """`${nb_idiv:a,b}`: integer a // b, at least 1 (e.g. log every N samples, not steps).

    b <= 0 gives 1, so that a bad batch_size is reported by the config checks by name."""
    return max(1, int(a) // int(b)) if int(b) > 0 else 1


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("nb_stamp"):
        OmegaConf.register_new_resolver("nb_stamp", _stamp)
    if not OmegaConf.has_resolver("nb_mul"):
        OmegaConf.register_new_resolver("nb_mul", _product)
    if not OmegaConf.has_resolver("nb_div"):
        OmegaConf.register_new_resolver("nb_div", _quotient)
    if not OmegaConf.has_resolver("nb_idiv"):
        OmegaConf.register_new_resolver("nb_idiv", _floor_quotient)


register_resolvers()


def fail(message: str) -> int:
    print(f"normbench: error: {message}", file=sys.stderr)
    return EXIT_USER_ERROR


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
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
            from normbench.report import report_command

            return report_command(rest)
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
                  "  normbench train --help      (config groups and every key)")


# ----------------------------------------------------------------------------- list


def list_command(args: list[str]) -> int:
    from rich.console import Console
    from rich.table import Table

    if args:
        return fail(f"'normbench list' takes no arguments (got {' '.join(args)}). "
                    "Fix: run 'normbench list'.")
    console = Console()
    root = conf_dir()
    for group in ("dataset", "model", "norm", "optim", "sched", "experiment"):
        files = sorted((root / group).glob("*.yaml"))
        if not files:
            continue
        table = Table(title=f"{group}=", title_justify="left", show_header=False, box=None,
                      padding=(0, 2))
        for f in files:
            table.add_row(f"[bold]{f.stem}[/bold]", describe(f))
        console.print(table)
    console.print("Pick with e.g. 'normbench train dataset=shapes model=resnet norm=group'.")
    return 0


def describe(path: Path) -> str:
    """A config's one-line description: its first comment line."""
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("#") and not line.startswith("# @package"):
            return line.lstrip("#").strip()
    return ""


# ----------------------------------------------------------------------------- train

_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-name", "-cn", "--config-dir",
                "-cd", "--experimental-rerun"}
_INFO_FLAGS = {"-h", "--help", "--hydra-help", "--info", "-i", "--version", "--shell-completion",
               "-sc"}


def split_args(args: list[str]) -> tuple[list[str], list[str], bool, bool]:
    """(Hydra flags, overrides, multirun?, info-only?) from the words after `train`."""
    flags, overrides, multirun, info_only = [], [], False, False
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("-m", "--multirun"):
            multirun = True
            flags.append(a)
        elif a in _VALUE_FLAGS:
            flags.extend(args[i:i + 2])
            i += 1
        elif a.split("=")[0] in _INFO_FLAGS or a.startswith("-"):
            flags.append(a)
            info_only = info_only or a.split("=")[0] in _INFO_FLAGS
        else:
            overrides.append(a)
        i += 1
    return flags, overrides, multirun, info_only


def train_command(args: list[str]) -> int:
    os.environ.pop(STAMP_ENV, None)  # a fresh stamp for this invocation
    _stamp()
    flags, overrides, multirun, info_only = split_args(args)
    sweep_dir = None
    if not info_only:
        sweep_dir = preflight(overrides, multirun)
    sys.argv = ["normbench train", *args]
    import hydra

    hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="train")(_task)()
    if multirun and sweep_dir is not None:
        return report_sweep(sweep_dir)
    return 0


def _task(cfg) -> None:
    """One job, inside Hydra: resolve the config to a plain dict and hand it to the loop."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from normbench.checks import check_config
    from normbench.tracking import write_failed_summary

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    config = OmegaConf.to_container(cfg, resolve=True)
    if config.get("threads") is None and multirun:
        config["threads"] = threads_per_job(hydra_cfg.launcher)
    if multirun:  # the values this job was given, as in its folder name: HParams, run name
        from normbench.dashboards import swept_settings

        config["swept"] = swept_settings(list(hydra_cfg.overrides.task),
                                         list(hydra_cfg.job.config.override_dirname.exclude_keys))
        config["run_name"] = f"{config['run_name']}_{hydra_cfg.job.override_dirname}"
    try:
        check_config(config, key_origin(list(hydra_cfg.overrides.task),
                                         OmegaConf.to_container(hydra_cfg.runtime.choices)),
                     top_level_settings(cfg))
        from normbench.train import run_experiment

        summary = run_experiment(config, run_dir, live=not multirun)
    except UserError as e:
        write_failed_summary(run_dir, config, e.line())
        if multirun:
            print(f"normbench: job {hydra_cfg.job.num} failed: {e.line()}", file=sys.stderr)
            return
        print(f"normbench: error: {e.line()}", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR) from None
    except Exception as e:
        write_failed_summary(run_dir, config, f"{type(e).__name__}: {e}")
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
    from normbench.tracking import read_summary

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


def preflight(overrides: list[str], multirun: bool) -> Path | None:
    """Compose and check every job's config; raise UserError on the first problem.

    Returns the sweep folder in multirun mode.
    """
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException, OverrideParseException
    from omegaconf.errors import InterpolationResolutionError

    from normbench.checks import check_run_dir, check_sweep_dir

    parser = OverridesParser.create()
    try:
        parser.parse_overrides(overrides)
    except OverrideParseException as e:
        raise UserError(f"cannot parse the override(s) {' '.join(overrides)}: "
                        f"{str(e).splitlines()[0]}", "write overrides as key=value") from None

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        try:
            if not multirun:
                jobs = [overrides]
                sweep_dir = None
            else:
                first = [o for o in overrides if "," not in o.split("=", 1)[-1]]
                base = compose("train", overrides=first, return_hydra_config=True)
                sweep_dir = Path(str(base.hydra.sweep.dir))
                params = base.hydra.sweeper.get("params")
                params = OmegaConf.to_container(params) if params is not None else {}
                combined = [f"{k}={v}" for k, v in params.items()] + overrides
                batches = BasicSweeper.split_arguments(parser.parse_overrides(combined), None)
                jobs = batches[0] if batches else [combined]
            for job in jobs:
                cfg = check_job(compose("train", overrides=list(job), return_hydra_config=True),
                                list(job))
            if not multirun:
                full = compose("train", overrides=overrides, return_hydra_config=True)
                check_run_dir(Path(str(full.hydra.run.dir)), cfg.get("resume"))
            else:
                check_sweep_dir(sweep_dir, base.get("resume"))
        except HydraException as e:
            raise UserError(*explain_hydra_error(e, overrides)) from None
        except InterpolationResolutionError as e:  # e.g. a preset's ${nb_div:...} by zero
            cause = e
            while (inner := cause.__cause__ or cause.__context__) is not None:
                cause = inner  # nested interpolations wrap the real error
            raise UserError(f"cannot compute {e.full_key}: {type(cause).__name__}: {cause}",
                            "check the values it is computed from") from None
    GlobalHydra.instance().clear()
    return sweep_dir


def check_job(full_cfg, overrides: list[str]):
    """Check one job's config, composed with its `hydra` node (for the config choices), as
    the job itself will receive it; returns the job's config."""
    from normbench.checks import check_config

    choices = OmegaConf.to_container(full_cfg.hydra.runtime.choices)
    cfg = OmegaConf.masked_copy(full_cfg, [k for k in full_cfg if k != "hydra"])
    check_config(OmegaConf.to_container(cfg, resolve=True), key_origin(overrides, choices),
                 top_level_settings(cfg))
    return cfg


def top_level_settings(cfg) -> set[str]:
    """The top-level keys that are settings: those conf/train.yaml declares, and those that
    other values are computed from (a preset's base_lr in `lr: ${nb_mul:${base_lr},...}`)."""
    declared = OmegaConf.to_container(OmegaConf.load(conf_dir() / "train.yaml"), resolve=False)
    written = OmegaConf.to_yaml(cfg)  # unresolved: interpolations appear as written
    referenced = {ref.split(".")[0] for ref in re.findall(r"\$\{([A-Za-z_][\w.]*)\}", written)}
    return (set(declared) - {"defaults", "hydra"}) | referenced


def key_origin(overrides: list[str], choices: dict):
    """A function naming where a dotted config key was set: the command line, a preset
    (experiment=...), or the chosen file of its group (conf/<group>/<option>.yaml)."""

    def origin(key: str) -> str:
        if any(o.lstrip("+~").split("=", 1)[0] == key for o in overrides):
            return "the command line"
        # Presets (all `@package _global_`) are merged after the group files and win; the
        # later a preset group is merged (conf/train.yaml's defaults), the earlier it is asked.
        for group in ("debug", "experiment", "gap_setup", "setup"):
            option = choices.get(group)
            if option and _declares(group, option, key):
                return f"the preset {group}={option}"
        section, _, rest = key.partition(".")
        if rest and choices.get(section) and _declares(section, choices[section], rest):
            return f"conf/{section}/{choices[section]}.yaml"
        return "the composed config"

    return origin


def _folder(group: str) -> str:
    return group.split("@")[0]  # experiment/gap_setup@_global_ -> experiment/gap_setup


def _declares(group: str, option: str, key: str) -> bool:
    """Whether conf/<group>/<option>.yaml sets the dotted `key` (read as written)."""
    path = conf_dir() / _folder(group) / f"{option}.yaml"
    if not path.is_file():
        return False
    node = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def explain_hydra_error(error: Exception, overrides: list[str]) -> tuple[str, str]:
    """Turn Hydra's multi-line composition errors into (problem, fix) for one line."""
    from hydra.errors import MissingConfigException

    text = str(error)
    if isinstance(error, MissingConfigException) and getattr(error, "options", None) is not None:
        group = (getattr(error, "missing_cfg_file", "") or "").split("/")[0]
        match = re.search(r"'([\w/]+)/([^']+)'", text)
        choice = match.group(2) if match else "?"
        group = match.group(1) if match else group
        options = ", ".join(sorted(error.options))
        close = difflib.get_close_matches(choice, error.options, n=1)
        hint = f"did you mean {group}={close[0]}? " if close else ""
        return f"unknown {group} '{choice}'", f"{hint}use one of: {options}"
    match = re.search(r"Could not override '([^']+)'", text) or re.search(
        r"Key '([^']+)' is not in struct", text)
    if match:
        key = match.group(1)
        # The key may exist under another group option (dataset.n_train is shapes', not cifar's).
        close = [k for k in difflib.get_close_matches(key, known_keys(), n=2) if k != key][:1]
        hint = f"did you mean {close[0]}? " if close else ""
        return (f"unknown config key '{key}'",
                f"{hint}'normbench train --cfg job' prints every key (add a new one with +{key}=...)")
    if "Ambiguous value for argument" in text:
        return ("a sweep (comma-separated values) needs multirun mode",
                "add -m, e.g. normbench train -m " + " ".join(overrides))
    first = next((line for line in text.splitlines() if line.strip()), text)
    return first, "check the override against 'normbench train --cfg job'"


def known_keys() -> list[str]:
    """Every dotted key of the default config (for 'did you mean')."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = OmegaConf.to_container(compose("train"), resolve=False)
    keys: list[str] = []

    def walk(node, prefix):
        for k, v in node.items():
            keys.append(prefix + k)
            if isinstance(v, dict):
                walk(v, prefix + k + ".")

    walk(cfg, "")
    return keys
