"""Checks of a resolved config (a plain dict) that catch user errors before any work starts.

Each failure is a UserError: one line naming the problem and the fix. The same checks run
in the CLI's pre-flight (for every job of a sweep, before the first starts) and at the top
of each job.
"""

from __future__ import annotations

import contextlib
import math
import re
from numbers import Integral, Real
from pathlib import Path

import torch

from normbench.config.ranges import Range, check_milestones
from normbench.config.ranges import show_value as _show
from normbench.config.why_options import check_why_options
from normbench.data import DataInfo
from normbench.engine.checkpoint import check_resume, normalize_resume
from normbench.engine.distributed import world_from_env
from normbench.errors import UserError
from normbench.paths import check_output_dir


def _positive_int(config: dict, key: str, allow_none: bool = False) -> None:
    value = config.get(key)
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, Integral) or value <= 0:
        raise UserError(f"{key}={value} must be a positive integer", f"set {key} to 1 or more")


def _positive_number(config: dict, key: str, allow_none: bool = False) -> None:
    value = config.get(key)
    if value is None and allow_none:
        return
    finite = "finite " if isinstance(value, float) and not math.isfinite(value) else ""
    if isinstance(value, bool) or not isinstance(value, Real) or not value > 0 or finite:
        raise UserError(f"{key}={value} must be a {finite}positive number",
                        f"set {key} above 0, e.g. {key}=0.1")


def check_finite(node, key: str = "") -> None:
    """Every float is finite, in options no range check covers too (inf or nan trains nonsense)."""
    if isinstance(node, dict | list | tuple):
        for k, v in node.items() if isinstance(node, dict) else enumerate(node):
            check_finite(v, f"{key}[{k}]" if isinstance(k, int) else f"{key}.{k}" if key else k)
    elif isinstance(node, float) and not math.isfinite(node):
        raise UserError(f"{key}={_show(node)} is not a finite number",
                        f"give {key.split('[')[0]} a finite value ('normbench train --cfg job' "
                        "shows the default)")


def check_config(config: dict) -> None:
    """Raise UserError on the first problem found in a resolved config dict.

    Keys and types were checked when the config was composed (normbench/config/schema.py);
    these are the values and the combinations that a type cannot express.
    """
    _positive_int(config, "batch_size")
    # The optimizer's default first: lr is often it, and the line should name the key given.
    _in_range(config.get("optim") or {}, "default_lr", "optim.default_lr", low=0,
              low_open=True, example="0.002")
    _positive_number(config, "lr")
    if config.get("epochs") is None and config.get("steps") is None:
        raise UserError("steps and epochs are both null: nothing says how long to train",
                        "set one of them, e.g. steps=2232 or epochs=36")
    if config.get("epochs") is None:
        _positive_int(config, "steps")
    else:
        _positive_number(config, "epochs")
    _positive_int(config, "log_every")
    _positive_int(config, "eval_batch_size")
    # threads: beyond 1024 torch's thread pool can fail in native code (a segfault at 100000)
    _in_range(config, "threads", "threads", low=1, high=1024, kind=_INTEGER, allow_none=True,
              example="4")
    _in_range(config, "seed", "seed", low=0, high=2**32 - 1, kind=_INTEGER, example="0",
              why=" (NumPy's seeds)")
    _count(config, "eval_every", "eval_every", "0 (only at the end)")
    _count(config, "overfit_batches", "overfit_batches", "1 (or 0: the whole training set)")
    _execution(config)
    _probe_options(config)
    check_ranges(config)
    check_finite(config)
    _batch_fits_training_set(config)
    _norm_combinations(config["norm"], config["batch_size"])
    _positive_int(config, "keep_checkpoints")
    _count(config, "checkpoint_every", "checkpoint_every", "100 (or 0: only at the end)")
    normalize_resume(config["resume"])
    dataset = config["dataset"]
    if dataset.get("kind") == "text" and dataset.get("path"):
        check_text_file(dataset["path"], text_context(config))
    if dataset.get("name") == "imagefolder" and dataset.get("root"):
        from normbench.data.images import check_image_folder

        check_image_folder(dataset["root"])
    check_model_builds(config)


def _batch_fits_training_set(config: dict) -> None:
    """Every step takes a full batch: a batch larger than an explicit training-set size fails
    at the first step (a size left null is checked once the data is loaded)."""
    n_train = (config.get("dataset") or {}).get("n_train")
    world = world_from_env()
    if isinstance(n_train, Integral) and config["batch_size"] * world > n_train:
        ranks = f" x {world} processes" if world > 1 else ""
        raise UserError(f"batch_size={config['batch_size']}{ranks} is larger than dataset.n_train="
                        f"{n_train} (every step takes a full batch of training samples)",
                        f"use batch_size={n_train // world} or less, or a larger dataset.n_train")


def _count(section: dict, key: str, label: str, example: str) -> None:
    """A whole number >= 0."""
    value = section[key]
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
        raise UserError(f"{label}={_show(value)} must be a whole number >= 0",
                        f"use e.g. {label}={example}")


def _probe_options(config: dict) -> None:
    _positive_int(config, "hist_every", allow_none=True)
    _count(config, "precise_bn_batches", "precise_bn_batches", "20 (or 0 to skip PreciseBN)")


def text_context(config: dict) -> int:
    """The context length (characters per training sequence) a text config asks for, when
    its training samples are windows of characters; 0 otherwise: word counts and lines are
    known only once the file is split, and the dataset checks them then (data/corpus.py)."""
    dataset = config.get("dataset") or {}
    if dataset.get("unit", "char") != "char" or dataset.get("sample", "window") != "window":
        return 0
    value = dataset.get("seq_len")
    return int(value) if isinstance(value, Integral) and value > 0 else 1


def check_text_file(path: str | Path, context: int) -> None:
    """A text corpus must exist, be UTF-8 text, and hold at least context+1 characters (one
    input sequence and its next-character targets)."""
    from normbench.data.text import read_text_file

    path = Path(path).expanduser()
    text = read_text_file(path)
    if len(text) < context + 1:
        raise UserError(f"{path} holds {len(text)} characters, fewer than the context of "
                        f"{context} + 1", "use a longer file or a shorter dataset.seq_len")


def check_run_dir(run_dir: Path, resume) -> None:
    """The single run's folder is writable, and resume= matches what is in it."""
    if str(run_dir) in ("", "."):
        raise UserError("hydra.run.dir is empty: the run would be written into the current "
                        "folder, among other files", "give the run its own folder, e.g. "
                        "hydra.run.dir=runs/my_run, or leave hydra.run.dir out")
    check_output_dir(run_dir)
    check_resume(run_dir, resume)


def check_stats_batch(k, batch_size: int) -> None:
    """Ghost BatchNorm's statistics batch: at least 2 samples, and a divisor of the batch."""
    if isinstance(k, bool) or not isinstance(k, Integral) or k < 2:
        raise UserError(f"norm.stats_batch={k} must be an integer >= 2 (BatchNorm needs two "
                        "samples per statistics batch)", "use norm.stats_batch=2 or more, or "
                        "null for the whole batch")
    if batch_size % k:
        divisors = [d for d in range(2, batch_size + 1) if batch_size % d == 0]
        raise UserError(f"norm.stats_batch={k} does not divide batch_size={batch_size}",
                        f"choose norm.stats_batch from {divisors}")


def _execution(config: dict) -> None:
    """precision, the device under several processes, channels_last, compile and the
    optimizer's implementation."""
    from normbench.engine.precision import DTYPES

    if config["precision"] not in DTYPES:
        raise UserError(f"precision={config['precision']} is not known",
                        f"use one of: {', '.join(DTYPES)}")
    device = str(config["device"])
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", device):
        raise UserError(f"device={device} is not a device normbench trains on",
                        "use device=auto (CUDA when there is one), cpu, cuda or cuda:N")
    if world_from_env() > 1 and device.startswith("cuda:"):
        raise UserError(f"device={device} with {world_from_env()} processes: each process "
                        "uses the GPU of its LOCAL_RANK", "use device=cuda or device=auto")
    from normbench.engine.optim import IMPLEMENTATIONS

    implementation = config["optim"]["implementation"]
    if implementation not in ("auto", *IMPLEMENTATIONS):
        raise UserError(f"optim.implementation={implementation} is not known",
                        f"use one of: auto, {', '.join(IMPLEMENTATIONS)}")
    if config["compile"] and config["model"]["name"] == "lstm":
        raise UserError("compile=true with model=lstm: torch.compile unrolls the LSTM's loop "
                        "over time steps into one graph, which took over 10 minutes to compile "
                        "for even the debug=tiny run", "leave compile=false with the LSTM")


def _norm_combinations(norm: dict, batch_size: int) -> None:
    name = norm.get("name")
    # The BatchNorm family (batch, batch_renorm) is the one with a statistics batch.
    if "stats_batch" in norm and batch_size == 1:
        raise UserError(f"norm={name} with batch_size=1: it needs at least 2 samples per "
                        "device to compute training statistics",
                        "use batch_size=2 or more, or a per-sample norm (norm=group or norm=layer)")
    if norm.get("stats_batch") is not None:
        if norm.get("sync"):
            raise UserError(f"norm.sync=true with norm.stats_batch={norm['stats_batch']}: "
                            "synchronized statistics come from the whole global batch, ghost "
                            f"statistics from groups of {norm['stats_batch']} samples",
                            "keep one: norm.stats_batch=null (synchronized BN) or "
                            "norm.sync=false (ghost BN)")
        check_stats_batch(norm["stats_batch"], batch_size)
    if name == "group":
        _group_count(norm)
    if name == "weight" and not norm.get("weight_norm"):
        raise UserError("norm=weight with norm.weight_norm=false would be no normalization at all",
                        "use norm=none for that, or leave norm.weight_norm=true")
    if name == "batch_renorm" and not norm.get("track_running_stats"):
        raise UserError("norm=batch_renorm with norm.track_running_stats=false: its r and d "
                        "are measured against the running statistics",
                        "leave norm.track_running_stats=true, or use norm=batch")
    if norm.get("r_max_by", 0) < norm.get("relax_from", 0) or \
            norm.get("d_max_by", 0) < norm.get("relax_from", 0):
        raise UserError(f"norm.r_max_by={norm['r_max_by']} and norm.d_max_by="
                        f"{norm['d_max_by']} must not come before norm.relax_from="
                        f"{norm['relax_from']}", "make both at least norm.relax_from")


def _group_count(norm: dict) -> None:
    """GroupNorm: exactly one of num_groups and group_size (whether each divides every
    layer's width is checked when the model is built, naming the layers)."""
    given = {k: norm.get(k) for k in ("num_groups", "group_size") if norm.get(k) is not None}
    if len(given) == 2:
        raise UserError(f"norm.num_groups={given['num_groups']} and norm.group_size="
                        f"{given['group_size']} are both set (groups per layer, and channels "
                        "per group: one decides the other)",
                        "set one of them and null the other, e.g. norm.num_groups=null "
                        f"norm.group_size={given['group_size']}")
    if not given:
        raise UserError("norm=group with neither norm.num_groups nor norm.group_size",
                        "set one of them, e.g. norm.num_groups=8 or norm.group_size=16")
    (key,) = given
    _positive_int(norm, key)


def placeholder_info(dataset: dict) -> DataInfo:
    """What a model needs to be built, guessed from the dataset config without loading it."""
    return DataInfo(kind=dataset.get("kind", "image"), num_classes=dataset.get("num_classes", 10),
                    in_channels=3, image_size=dataset.get("image_size", 32),
                    seq_len=dataset.get("seq_len", 0))


def check_model_builds(config: dict, info: DataInfo | None = None) -> None:
    """Build the model on the meta device (no memory, no compute): catches impossible pairs,
    bad depths and group counts that do not divide some layer, naming that layer. A model
    built elsewhere (torchvision, timm, custom) is built on the CPU: its builder may read its
    own tensors (RegNet's widths), and where the norm goes depends on the values the builder
    gave its norms' gammas."""
    from normbench.models import build_model
    from normbench.models.external import EXTERNAL
    from normbench.norms import make_spec

    info = info or placeholder_info(config["dataset"])
    external = config["model"]["name"] in EXTERNAL
    with contextlib.nullcontext() if external else torch.device("meta"):
        build_model(config["model"], make_spec(**config["norm"]), info)


def check_sweep_dir(sweep_dir: Path, resume) -> None:
    """The sweep folder is writable; without resume= it must not hold earlier jobs' checkpoints
    (each job would refuse its folder, or mix its files with the earlier job's)."""
    from normbench.engine.checkpoint import list_checkpoints

    check_output_dir(sweep_dir)
    if (Path(sweep_dir) / "summary.json").exists():
        raise UserError(f"hydra.sweep.dir={sweep_dir} is the folder of a run (it holds "
                        "summary.json): the sweep's jobs would be written inside it",
                        "choose another hydra.sweep.dir")
    if normalize_resume(resume) == "false" and Path(sweep_dir).is_dir():
        if any(list_checkpoints(job) for job in Path(sweep_dir).iterdir() if job.is_dir()):
            raise UserError(f"the sweep folder {sweep_dir} already holds runs with checkpoints",
                            "add resume=auto to continue them, or choose another hydra.sweep.dir")


# ----------------------------------------------------------------------------- ranges

_NUMBER = "number"
_INTEGER = "integer"


def _in_range(section: dict, key: str, label: str, *, low: float, high: float = float("inf"),
              low_open: bool = False, high_open: bool = False, kind: str = _NUMBER,
              allow_none: bool = False, example: str, why: str = "") -> None:
    """`section[key]` (when present) is a number in the interval; one UserError line if not."""
    if key in section:
        Range(low, high, low_open, high_open, kind == _INTEGER, allow_none, example,
              why).check(label, section[key])


def check_ranges(config: dict) -> None:
    """Numeric options whose values outside a range would crash a run or mean nothing."""
    _norm_ranges(config.get("norm") or {})
    _optim_ranges(config.get("optim") or {}, config.get("sched") or {})
    _dataset_ranges(config.get("dataset") or {})
    check_why_options(config.get("why") or {}, (config.get("norm") or {}).get("name"))


def _norm_ranges(norm: dict) -> None:
    """The ranges the chosen norm's options declare (normbench/norms/options.py)."""
    from normbench.norms import norm_options_class
    from normbench.norms.options import option_ranges

    options = norm_options_class(norm.get("name"))
    for key, bounds in option_ranges(options).items() if options else ():
        if key in norm:
            bounds.check(f"norm.{key}", norm[key])


def _optim_ranges(optim: dict, sched: dict) -> None:
    _in_range(optim, "weight_decay", "optim.weight_decay", low=0, example="5e-4")
    _in_range(optim, "momentum", "optim.momentum", low=0, high=1, high_open=True, example="0.9")
    if "betas" in optim:
        betas = optim["betas"]
        if not isinstance(betas, list | tuple) or len(betas) != 2:
            raise UserError(f"optim.betas={_show(betas)} must be two numbers",
                            "use e.g. optim.betas=[0.9,0.999]")
        for i, beta in enumerate(betas):
            _in_range({"beta": beta}, "beta", f"optim.betas[{i}]", low=0, high=1,
                      high_open=True, example="[0.9,0.999]")
    for key in ("warmup_frac", "final_lr_frac"):
        _in_range(sched, key, f"sched.{key}", low=0, high=1, example="0.05")
    _in_range(sched, "gamma", "sched.gamma", low=0, high=1, low_open=True, example="0.1")
    if "milestones" in sched:
        check_milestones(sched["milestones"])


def _dataset_ranges(dataset: dict) -> None:
    for key in ("n_train", "n_val"):
        # null (all of them) reaches here only where the dataset's schema allows it
        _in_range(dataset, key, f"dataset.{key}", low=1, kind=_INTEGER, allow_none=True,
                  example="1000")
    _in_range(dataset, "image_size", "dataset.image_size", low=1, kind=_INTEGER, example="32")
    _in_range(dataset, "seq_len", "dataset.seq_len", low=2, kind=_INTEGER, example="128")
    _in_range(dataset, "val_fraction", "dataset.val_fraction", low=0, high=1, low_open=True,
              high_open=True, example="0.1")
    _in_range(dataset, "noise", "dataset.noise", low=0, example="0.05")
    _in_range(dataset, "memory_budget_gb", "dataset.memory_budget_gb", low=0, example="4")
    _in_range(dataset, "workers", "dataset.workers", low=0, kind=_INTEGER, allow_none=True,
              example="8")
    _in_range(dataset, "prefetch", "dataset.prefetch", low=1, kind=_INTEGER, example="4")
    _in_range(dataset, "max_depth", "dataset.max_depth", low=0, kind=_INTEGER, example="2")
    if "unit" in dataset:  # the text files' condition: unit, sample, vocab_size
        from normbench.data.corpus import check_condition

        check_condition(dataset["unit"], dataset["sample"], dataset["vocab_size"])


# Keys no part of the run reads except through an interpolation (the setups' and lr_sweep's
# lr), so a literal value of that interpolation's key leaves them without effect.
INTERPOLATION_INPUTS = ("lr_factor", "base_lr", "base_batch_size")


def check_sweep_varies(jobs: list) -> None:
    """Refuse a swept key whose values give identical jobs: another value fixes what it
    sets (lr=0.1 beside experiment=lr_sweep's lr_factor grid), and the sweep would train
    the same job several times under different names."""
    def setting(overrides: list[str]) -> dict[str, str]:
        return dict(o.lstrip("+~").split("=", 1) for o in overrides if "=" in o)

    def without(config: dict, key: str) -> dict:
        config = {k: v for k, v in config.items() if k not in ("swept", "run_name")}
        head, _, rest = key.partition(".")
        if head in config:
            config[head] = without(config[head], rest) if rest and isinstance(
                config[head], dict) else None
        return config

    settings = [setting(job.overrides) for job in jobs]
    keys = {k for s in settings for k in s
            if k in INTERPOLATION_INPUTS and len({t.get(k) for t in settings}) > 1}
    for key in sorted(keys):
        seen: dict[str, tuple] = {}
        for job, s in zip(jobs, settings, strict=True):
            others = repr(sorted((k, v) for k, v in s.items() if k != key))
            config = repr(without(job.config, key))
            if others in seen and seen[others][0] == config and seen[others][1] != s.get(key):
                raise UserError(
                    f"{key}={seen[others][1]} and {key}={s.get(key)} give the same job: "
                    f"nothing reads {key} here (lr is set directly, or no setup= computes "
                    f"lr from it)", f"sweep lr_factor=... with experiment=lr_sweep or "
                    f"base_lr=... with a setup=, and leave lr off the command line; or give "
                    f"{key} one value")
            seen.setdefault(others, (config, s.get(key)))
