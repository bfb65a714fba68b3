"""Composing configs the way `normbench train` does: one job, or every job of a sweep.

`compose_jobs` is the one way to get a job's config outside Hydra's own entry point: the
CLI's pre-flight, the tests and the scripts all use it. Sweeps are expanded with Hydra's
override parser, in the order of Hydra's basic sweeper, so the pre-flight checks exactly
the jobs that Hydra will run.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from normbench.config.explain import (
    explain_hydra_error,
    explain_lookup_error,
    explain_parse_error,
    refuse_keys_outside_schema,
)
from normbench.config.tree import PRIMARY, initialized
from normbench.errors import UserError


@dataclass
class Job:
    """One job: its overrides and its config as the job receives it."""

    overrides: list[str]
    config: dict  # resolved, without the `hydra` node
    run_dir: Path | None = None  # the single run's folder (hydra.run.dir)
    choices: dict = field(default_factory=dict)  # each config group's option, e.g. setup


def compose_jobs(overrides: list[str] = (), multirun: bool = False) -> list[dict]:
    """The resolved config of every job `normbench train [-m] OVERRIDES` would run."""
    return [job.config for job in compose_sweep(list(overrides), multirun).jobs]


def compose_config(overrides: list[str] = ()) -> dict:
    """The resolved config of the single job `normbench train OVERRIDES` would run."""
    (config,) = compose_jobs(overrides)
    return config


@dataclass
class Sweep:
    """What `normbench train [-m] OVERRIDES` runs, and how to hand it to Hydra."""

    jobs: list[Job]
    dir: Path | None  # the sweep folder (None without multirun)
    hydra_overrides: list[str]  # the command line's overrides as Hydra must receive them


def compose_sweep(overrides: list[str], multirun: bool) -> Sweep:
    """Every job, composed and resolved, and the sweep folder.

    Raises UserError (one line) for anything Hydra refuses: a bad override, an unknown
    option or key, a value of the wrong type, an interpolation that cannot be computed."""
    from hydra import compose
    from hydra.errors import HydraException
    from omegaconf.errors import InterpolationResolutionError

    parsed = parse_overrides(overrides)
    hydra_overrides = list(overrides)
    try:
        with initialized():
            if not multirun:
                job_overrides, sweep_dir = [list(overrides)], None
            else:
                base, deferred = sweep_base(parsed)
                sweep_dir = Path(str(base.hydra.sweep.dir))
                job_overrides = expand_sweep(overrides, base)
                if not job_overrides:  # glob(zzz*) that matches nothing, range(1,0), ...
                    raise UserError(f"the sweep {' '.join(overrides)} has no job: a swept key "
                                    "has no value", "check each swept key's values (a glob "
                                    "that matches no option, an empty range)")
                hydra_overrides = [as_one_value_sweep(o) if o.input_line in deferred
                                   else o.input_line for o in parsed]
            jobs = []
            for job in job_overrides:
                cfg = compose(PRIMARY, overrides=job, return_hydra_config=True)
                refuse_keys_outside_schema(cfg, job, overrides)
                jobs.append(make_job(cfg, job, single=not multirun))
    except HydraException as e:  # explained outside: the explanation composes the defaults
        raise UserError(*explain_hydra_error(e, overrides)) from None
    except OSError as e:  # Hydra looks a key up as a config group, i.e. a path on disk
        raise UserError(*explain_lookup_error(e, overrides)) from None
    except InterpolationResolutionError as e:  # e.g. a preset's ${nb_div:...} by zero
        cause = e
        while (inner := cause.__cause__ or cause.__context__) is not None:
            cause = inner  # nested interpolations wrap the real error
        raise UserError(f"cannot compute {e.full_key}: {type(cause).__name__}: {cause}",
                        "check the values it is computed from") from None
    return Sweep(jobs, sweep_dir, hydra_overrides)


def sweep_base(parsed: list) -> tuple[DictConfig, list[str]]:
    """The base config of a sweep, and the plain overrides it had to leave out.

    Hydra composes a sweep's base from the command line without its sweeps: the default
    options of the swept groups. A plain key that only the swept options have
    (dataset.root with gap_setup=a,b, a and b reading files but the default not) cannot
    compose there. Such overrides are left out of the base, one by one as Hydra names
    them, and each job still receives them (and fails with the usual error where its
    option lacks the key)."""
    from hydra import compose
    from hydra.errors import ConfigCompositionException

    plain = [o for o in parsed if not o.is_sweep_override()]
    deferred: list[str] = []
    while True:
        try:
            return compose(PRIMARY, overrides=[o.input_line for o in plain
                                               if o.input_line not in deferred],
                           return_hydra_config=True), deferred
        except ConfigCompositionException as e:
            key = re.search(r"full_key: (\S+)", f"{e}\n{e.__cause__ or ''}")
            culprit = [o.input_line for o in plain if key and not o.is_hydra_override()
                       and o.get_key_element() == key.group(1)
                       and o.input_line not in deferred]
            if not culprit:
                raise
            deferred += culprit


def as_one_value_sweep(override) -> str:
    """key=value as key=choice(value): Hydra applies it per job, not to the sweep's base."""
    value = override.get_value_element_as_str()
    return f"{override.get_key_element()}=choice({value or repr('')})"  # key= is choice('')


def make_job(cfg: DictConfig, overrides: list[str], single: bool) -> Job:
    config = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    return Job(overrides=list(overrides), config=OmegaConf.to_container(config, resolve=True),
               run_dir=Path(str(cfg.hydra.run.dir)) if single else None,
               choices=OmegaConf.to_container(cfg.hydra.runtime.choices))


def parse_overrides(overrides: list[str]) -> list:
    """Hydra's parse of the overrides; a syntax error is one line."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    try:
        return parser.parse_overrides(list(overrides))
    except OverrideParseException as e:
        raise UserError(*explain_parse_error(overrides, e, parser)) from None


def expand_sweep(overrides: list[str], base: DictConfig) -> list[list[str]]:
    """The overrides of every job of a sweep, as Hydra's basic sweeper makes them.

    The preset's `hydra.sweeper.params` come first and the command line after; a key given
    twice keeps its first place and its last value (the command line wins). Choice sweeps
    (a,b), ranges (range(2,9,2)) and group globs (glob(*)) expand to their values; the jobs
    are the cartesian product, the last key varying fastest."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = base.hydra.sweeper.get("params")
    params = OmegaConf.to_container(params) if params is not None else {}
    combined = [f"{k}={v}" for k, v in params.items()] + list(overrides)
    parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
    values: dict[str, list[str]] = {}  # insertion order kept on reassignment, as Hydra's
    for override in parser.parse_overrides(combined):
        key = override.get_key_element()
        if not override.is_sweep_override():
            values[key] = [f"{key}={override.get_value_element_as_str()}"]
        elif override.is_discrete_sweep():
            values[key] = [f"{key}={v}" for v in override.sweep_string_iterator()]
        else:
            raise UserError(f"{override.input_line}: an interval sweep needs a sweeper that "
                            "samples (e.g. Optuna); the basic sweeper runs a grid",
                            f"list the values, e.g. {key}=0.1,0.2,0.4, or use range(...)")
    return [list(job) for job in itertools.product(*values.values())]
