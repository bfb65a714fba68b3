"""A word when a command trains a dataset at another dataset's scale without saying so.

A setup (conf/setup/) is a study's data and model scale, and presets pick one: the
statistics-batch and batch-size presets train ResNet-8 on 16 px images (setup=shapes_small).
A dataset typed on the command line replaces the setup's dataset but keeps its sizes, which
is by design (setup=shapes_small on CIFAR-10 is the small study on real images), and also
what `experiment=stats_batch_sweep dataset=imagefolder dataset.root=DIR` does when the user
meant the folder's own setup=imagefolder. Only the user knows which was meant, so this is a
warning, not a refusal: it names both setups and what differs between them.
"""

from __future__ import annotations

from normbench.config.compose import Job, compose_sweep
from normbench.config.tree import config_options

SHOWN = 4  # differing keys named in the warning; the rest are counted


def _typed(overrides: list[str], key: str) -> bool:
    return any(o.split("=", 1)[0].lstrip("+~") == key for o in overrides if "=" in o)


def _flat(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _show(value) -> str:
    return "null" if value is None else str(value)  # as the user would type it


def mismatched_setup(overrides: list[str], jobs: list[Job]) -> str | None:
    """The warning line, or None: when the command typed dataset= but no setup=, the setup
    in force (a preset's) is made for another dataset, and the dataset's own setup
    (conf/setup/<dataset>.yaml) would train at a different scale."""
    if not _typed(overrides, "dataset") or _typed(overrides, "setup"):
        return None
    for job in jobs:
        setup, dataset = job.choices.get("setup"), job.choices.get("dataset")
        if setup in (None, dataset) or dataset not in config_options("setup"):
            continue
        if compose_sweep([f"setup={setup}"], False).jobs[0].choices["dataset"] == dataset:
            continue  # the preset's setup is made for this dataset (shapes_small: shapes)
        own = compose_sweep([*job.overrides, f"setup={dataset}"], False).jobs[0].config
        ours, theirs = _flat(job.config), _flat(own)
        differ = [k for k in theirs if k != "run_name" and ours.get(k) != theirs[k]]
        if not differ:  # the setups agree (setup=text is setup=tinyshakespeare on a file)
            continue
        shown = ", ".join(f"{k}={_show(ours.get(k))} (setup={dataset}: {_show(theirs[k])})"
                          for k in differ[:SHOWN])
        more = f" and {len(differ) - SHOWN} more" if len(differ) > SHOWN else ""
        return (f"dataset={dataset} trains at the scale of setup={setup}, which the command's "
                f"preset picks: {shown}{more}; add setup={dataset} for {dataset}'s own "
                f"scale, or setup={setup} to keep this one and silence this warning")
    return None
