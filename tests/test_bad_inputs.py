"""Bad files, non-finite numbers, OS errors on the paths a user gives, and overrides the
shell or a typo broke: each is one line naming the file, key or override (exit status 2),
and what normbench writes is strict JSON."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import typing

import pytest

from normbench.checks import check_config
from normbench.config.compose import compose_config
from normbench.config.explain import schema_of_option
from normbench.config.schema import SCHEMAS, TrainConfig
from normbench.config.tree import config_options
from normbench.errors import UserError
from normbench.tracking import read_json, write_json_atomic
from tests.conftest import TINY

# TINY without its dataset sizes, for datasets that do not read them (text files).
NO_SIZES = [o for o in TINY if not o.startswith("dataset.")]
TOO_LONG = "a" * 300  # over the 255 bytes a file or folder name may have


def one_error_line(result, *words: str) -> str:
    """The single `normbench: error:` line of a refused command, holding every word."""
    assert result.returncode == 2, (result.stdout[-2000:], result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("normbench: error: ") and "Fix: " in lines[0], lines[0]
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def strict_loads(text: str):
    def refuse(token):
        raise ValueError(f"{token} is not JSON")

    return json.loads(text, parse_constant=refuse)


# ----------------------------------------------------------------------------- numbers


def float_options() -> list:
    """(overrides selecting an option, dotted key) for every float of every schema."""
    def floats(cls):
        for f in dataclasses.fields(cls):
            hint = typing.get_type_hints(cls)[f.name]
            args = typing.get_args(hint)
            if hint is float or float in args or (typing.get_origin(hint) is list):
                yield f.name

    out = [pytest.param([], name, id=name) for name in floats(TrainConfig)]
    for group, schema, cls in SCHEMAS:
        option = next(o for o in config_options(group) if schema_of_option(group, o) == schema)
        out += [pytest.param([f"{group}={option}"], f"{group}.{name}", id=f"{option}-{name}")
                for name in floats(cls)]
    return out


@pytest.mark.parametrize("select, key", float_options())
@pytest.mark.parametrize("value", ["inf", "nan"])
def test_every_float_option_refuses_non_finite_values(select, key, value):
    given = "[0.9,inf]" if key == "optim.betas" else value
    config = compose_config([*select, f"{key}={given}"])
    with pytest.raises(UserError, match="finite") as e:
        check_config(config)
    assert e.value.line().startswith(key), e.value.line()


def test_json_files_are_strict_and_record_what_was_not_finite(tmp_path):
    data = {"lr": 0.1, "final": {"train_loss": float("nan"), "val_loss": 2.5},
            "curve": [1.0, float("inf")], "gaps": [{"low": float("-inf")}]}
    write_json_atomic(tmp_path / "summary.json", data)
    written = strict_loads((tmp_path / "summary.json").read_text())
    assert written["final"] == {"train_loss": None, "val_loss": 2.5}
    assert written["curve"] == [1.0, None] and written["gaps"] == [{"low": None}]
    assert written["nonfinite"] == {"final.train_loss": "nan", "curve[1]": "inf",
                                    "gaps[0].low": "-inf"}
    back = read_json(tmp_path / "summary.json")  # what the report and resume read
    assert math.isnan(back["final"]["train_loss"]) and back["curve"][1] == math.inf
    assert back["gaps"][0]["low"] == -math.inf and "nonfinite" not in back
    write_json_atomic(tmp_path / "again.json", back)  # a summary read and written again
    assert strict_loads((tmp_path / "again.json").read_text()) == written


@pytest.mark.slow
def test_lr_inf_is_refused_through_the_cli(cli):
    one_error_line(cli("train", *TINY, "lr=inf"), "lr=inf must be a finite positive number")


@pytest.mark.slow
def test_diverged_and_overflowing_runs_write_strict_json_and_csv(cli, tmp_path):
    # lr=1e6 diverges; at lr=10 BatchNorm trains, but its fp16 evaluation overflows (val_loss nan)
    result = cli("train", "-m", *TINY, "device=cpu", "precision=fp16", "norm=batch,none",
                 "lr=10,1e6", "hydra.sweep.dir=sweep")
    assert result.returncode == 1, result.stderr[-2000:]  # some jobs diverged
    summaries = {}
    for path in sorted((tmp_path / "sweep").glob("*/*.json")):
        data = strict_loads(path.read_text())
        for key in data.get("nonfinite", {}):  # each named value is null where it was
            node = data
            for part in key.split("."):
                node = node[part]
            assert node is None, (path, key)
        if path.name == "summary.json":
            summaries[path.parent.name] = data
    assert len(summaries) == 4 and "diverged" in {s["status"] for s in summaries.values()}
    assert cli("report", "sweep", "--no-plots", "--metric", "val_loss").returncode == 0
    with open(tmp_path / "sweep" / "report.csv", newline="") as f:
        for row in csv.reader(f):
            for field in row:
                try:
                    number = float(field)
                except ValueError:
                    continue
                assert math.isfinite(number), row
