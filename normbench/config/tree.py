"""The config tree on disk (conf/), and Hydra's compose API initialized on it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from normbench.config.resolvers import register_resolvers
from normbench.config.schema import register_schemas

PRIMARY = "train"  # conf/train.yaml


def conf_dir() -> Path:
    """The config tree: inside the installed package, or beside it in a source checkout."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / f"{PRIMARY}.yaml").is_file():
            return candidate
    raise RuntimeError(f"normbench's config tree (conf/) is missing next to {here}")


def config_options(group: str) -> list[str]:
    """The options of a config group: the YAML files in conf/<group>/, by name. The one list
    of datasets, models, norms, ...: `normbench list` and the 'use one of' errors read it."""
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


def register() -> None:
    """What composition needs besides conf/: the resolvers and the schemas."""
    register_resolvers()
    register_schemas()


@contextmanager
def initialized() -> Iterator[None]:
    """Hydra's compose API, initialized on conf/ (and cleared after, for the next caller)."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            yield
    finally:
        GlobalHydra.instance().clear()
