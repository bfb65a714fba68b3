"""Checks of a resolved config (a plain dict) that catch user errors before any work starts.

Each failure is a UserError: one line naming the problem and the fix. The same checks run
in the CLI's pre-flight (for every job of a sweep, before the first starts) and at the top
of each job.
"""

from __future__ import annotations

from numbers import Integral, Real

import torch

from normbench.data import DataInfo
from normbench.errors import UserError


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
    if isinstance(value, bool) or not isinstance(value, Real) or not value > 0:
        raise UserError(f"{key}={value} must be a positive number", f"set {key} above 0, e.g. {key}=0.1")


def check_config(config: dict) -> None:
    """Raise UserError on the first problem found in a resolved config dict."""
    _positive_int(config, "batch_size")
    _positive_number(config, "lr")
    if config.get("epochs") is None:
        _positive_int(config, "steps")
    else:
        _positive_number(config, "epochs")
    _positive_int(config, "log_every")
    _positive_int(config, "eval_batch_size")
    _probe_options(config)
    norm = config["norm"]
    if norm.get("name") == "batch" and config["batch_size"] == 1:
        raise UserError("norm=batch with batch_size=1: BatchNorm needs at least 2 samples per "
                        "device to compute training statistics",
                        "use batch_size=2 or more, or a per-sample norm (norm=group or norm=layer)")
    if norm.get("name") == "group":
        _positive_int(norm, "num_groups")
    check_model_builds(config)


def _probe_options(config: dict) -> None:
    if not isinstance(config.get("probes", True), bool):
        raise UserError(f"probes={config['probes']} must be true or false",
                        "set probes=true or probes=false")
    _positive_int(config, "hist_every", allow_none=True)
    value = config.get("precise_bn_batches", 0)
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
        raise UserError(f"precise_bn_batches={value} must be a whole number >= 0",
                        "set precise_bn_batches=20, or 0 to skip PreciseBN")


def placeholder_info(dataset: dict) -> DataInfo:
    """What a model needs to be built, guessed from the dataset config without loading it."""
    return DataInfo(kind=dataset.get("kind", "image"), num_classes=dataset.get("num_classes", 10),
                    in_channels=3, image_size=dataset.get("image_size", 32),
                    seq_len=dataset.get("seq_len", 0))


def check_model_builds(config: dict, info: DataInfo | None = None) -> None:
    """Build the model on the meta device (no memory, no compute): catches impossible pairs,
    bad depths and group counts that do not divide some layer, naming that layer."""
    from normbench.models import build_model
    from normbench.norms import make_spec

    info = info or placeholder_info(config["dataset"])
    with torch.device("meta"):
        build_model(config["model"], make_spec(**config["norm"]), info)
