"""Each norm option is declared once, in its norm's options dataclass: for every registered
norm, the config schema, the YAML file, the composed defaults, the registry's options, the
range checks and `normbench list` all say what that declaration says."""

from __future__ import annotations

import dataclasses
import math
import typing
from functools import cache

import pytest
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from normbench import cli
from normbench.config.checks import check_ranges
from normbench.config.explain import schema_of_option
from normbench.config.norm_listing import option_rows
from normbench.config.ranges import show_value
from normbench.config.schema import SCHEMAS, schema_name
from normbench.config.tree import conf_dir, config_options, register
from normbench.errors import UserError
from normbench.models.external import NATIVE
from normbench.norms import norm_class, norm_names, norm_options, norm_options_class, registered
from normbench.norms.options import (
    NormOptions,
    allows_null,
    option_fields,
    option_help,
    option_ranges,
)
from tests.helpers.common import compose_config

NAMES = norm_names()
# Numeric options whose check is hand-written because it needs another key (batch_size).
HAND_CHECKED = {"stats_batch"}


@cache
def default_config(name: str) -> dict:
    return compose_config([f"norm={name}"])["norm"]


def declared(name: str) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in option_fields(norm_options_class(name))}


def test_every_norm_has_one_options_dataclass_of_its_own():
    classes = [norm_options_class(name) for name in NAMES]
    assert all(c is not None and issubclass(c, NormOptions) for c in classes), NAMES
    # Distinct classes: a Hydra error names the class, and the class must name one norm.
    assert len(set(classes)) == len(classes)
    for name, layout in registered():
        if name in NAMES:
            assert norm_class(name, layout).Options is norm_options_class(name), (name, layout)


def test_the_conf_files_are_the_registered_norms_and_only_name_them():
    # norm=native (a torchvision/timm/custom model's own norms) is the one unregistered name.
    assert config_options("norm") == sorted([*NAMES, NATIVE])
    for name in [*NAMES, NATIVE]:
        text = OmegaConf.load(conf_dir() / "norm" / f"{name}.yaml")
        assert set(text) == {"defaults", "name"} and text.name == name, name
        assert schema_of_option("norm", name) == name
        assert text.defaults[0] == f"/{schema_name('norm', name)}@_here_", name


def test_the_schema_of_each_norm_is_its_options_dataclass():
    register()
    schemas = {s: cls for group, s, cls in SCHEMAS if group == "norm"}
    assert schemas == {**{name: norm_options_class(name) for name in NAMES}, NATIVE: NormOptions}
    store = ConfigStore.instance()
    for name in NAMES:
        node = store.load(f"{schema_name('norm', name)}.yaml").node
        assert OmegaConf.get_type(node) is norm_options_class(name), name


@pytest.mark.parametrize("name", NAMES)
def test_the_composed_config_is_the_declared_defaults(name):
    options = norm_options_class(name)
    structured = OmegaConf.structured(options)  # interpolations resolve as in the config
    expected = OmegaConf.to_container(structured, resolve=True)
    config = default_config(name)
    assert config["name"] == name
    assert {k: v for k, v in config.items() if k != "name"} == \
        {k: v for k, v in expected.items() if k != "name"}
    assert list(config) == [f.name for f in dataclasses.fields(options)]


@pytest.mark.parametrize("name", NAMES)
def test_the_registry_reads_the_declared_options(name):
    fields = declared(name)
    shared = {f.name for f in dataclasses.fields(NormOptions)}
    layer = set(fields) - shared
    assert norm_options(name) == layer
    unset_ok = {k for k in layer if allows_null(norm_options_class(name), k)
                or fields[k].metadata.get("unset_ok")}
    for n, layout in registered():
        if n == name:
            cls = norm_class(name, layout)
            assert cls.options == layer and cls.nullable == unset_ok, (name, layout)


def outside(bounds) -> list:
    """Values just outside a range (and a non-integer for an integer one)."""
    values = [bounds.low if bounds.low_open else bounds.low - 1]
    if bounds.high != math.inf:
        values.append(bounds.high if bounds.high_open else bounds.high + 1)
    if bounds.integer:
        values.append(bounds.low + 1.5)
    return values


@pytest.mark.parametrize("name", NAMES)
def test_every_numeric_option_is_checked_against_its_declared_range(name):
    options = norm_options_class(name)
    hints = typing.get_type_hints(options)
    ranges = option_ranges(options)
    numeric = {k for k in declared(name)
               if {int, float} & {hints[k], *typing.get_args(hints[k])}}
    assert numeric - HAND_CHECKED == set(ranges), name
    config = default_config(name)
    check_ranges({"norm": config})  # the defaults are inside
    for key, bounds in ranges.items():
        assert bounds.nullable == allows_null(options, key)
        if bounds.nullable:
            check_ranges({"norm": {**config, key: None}})
        for bad in outside(bounds):
            with pytest.raises(UserError) as err:
                check_ranges({"norm": {**config, key: bad}})
            line = err.value.line()
            assert line.startswith(f"norm.{key}={show_value(bad)} must be {bounds.words()}"), \
                line
            assert "\n" not in line and f"use e.g. norm.{key}={bounds.example}" in line


def test_normbench_list_shows_every_option_with_its_default_and_help(capsys, monkeypatch):
    configs = {name: default_config(name) for name in NAMES}
    rows = option_rows(configs)
    for name in NAMES:
        ranges = option_ranges(norm_options_class(name))
        for key, field in declared(name).items():
            (row,) = [r for r in rows if r.key == key and name in r.norms]
            assert row.default == show_value(configs[name][key]), (name, key)
            assert row.help == option_help(field) and row.help, (name, key)
            assert row.bounds == (ranges[key].words() if key in ranges else ""), (name, key)
    monkeypatch.setenv("COLUMNS", "400")  # one line per row: each text appears whole
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for row in rows:
        assert f"{row.key}={row.default}" in out and row.help in out, row.key
