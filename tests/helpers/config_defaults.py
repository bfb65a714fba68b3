"""Model options and norm specs as conf/ defines them: models and NormSpec have no
defaults of their own, so tests that build one directly start from the config's."""

from __future__ import annotations

from functools import cache

from normbench.norms import NormSpec, make_spec
from tests.helpers.common import compose_config


@cache
def _section(group: str, name: str) -> tuple:
    return tuple(compose_config([f"{group}={name}"])[group].items())


def model_options(name: str, **overrides) -> dict:
    """The `model:` config for `name` with `overrides`, ready for `build_model`."""
    return {**dict(_section("model", name)), **overrides}


def norm_spec(name: str, **overrides) -> NormSpec:
    """The NormSpec of `norm=<name>` with `overrides` (any norm option)."""
    return make_spec(**{**dict(_section("norm", name)), **overrides})
