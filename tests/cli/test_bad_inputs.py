"""Bad files, non-finite numbers, OS errors on the paths a user gives, and overrides the
shell or a typo broke: each is one line naming the file, key or override (exit status 2),
and what normbench writes is strict JSON."""

from __future__ import annotations

import csv
import dataclasses
import errno
import json
import math
import re
import shlex
import typing
from pathlib import Path

import pytest
import torch
import torchvision

from normbench.config.checks import check_config
from normbench.config.compose import compose_config, parse_overrides
from normbench.config.explain import schema_of_option
from normbench.config.schema import SCHEMAS, TrainConfig
from normbench.config.tree import config_options
from normbench.data.decoding import decoder_messages
from normbench.data.images import imagefolder_dataset
from normbench.data.text import read_text_file
from normbench.engine.tracking import read_json, write_json_atomic
from normbench.errors import UserError
from normbench.paths import check_output_dir
from tests.helpers.common import TINY
from tests.helpers.images import write_imagefolder
from tests.helpers.runs import fake_run

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


# ----------------------------------------------------------------------------- bad files


def spoil(root: Path, kind: str) -> Path:
    """One bad image file in an image folder: a corrupt PNG, an empty one, a cut JPEG."""
    if kind == "truncated-jpeg":
        bad = root / "train" / "dog" / "extra.jpg"
        torchvision.io.write_jpeg(torch.full((3, 20, 28), 90, dtype=torch.uint8), str(bad))
        bad.write_bytes(bad.read_bytes()[:150])
    else:
        bad = root / "train" / "dog" / "1.png"
        data = bad.read_bytes()
        # a PNG signature followed by a damaged header chunk: libpng prints its own error
        bad.write_bytes(b"" if kind == "empty-png" else data[:12] + b"XXXX" + data[16:])
    return bad


IMAGE_CASES = {"corrupt-png": "libpng", "empty-png": "the file is empty",
               "truncated-jpeg": "truncated"}


@pytest.mark.parametrize("kind", IMAGE_CASES)
def test_a_bad_image_is_named(tmp_path, kind):
    write_imagefolder(tmp_path)
    bad = spoil(tmp_path, kind)
    with pytest.raises(UserError, match=re.escape(f"cannot read the image {bad}: ")) as e:
        imagefolder_dataset(root=str(tmp_path), image_size=16)
    assert IMAGE_CASES[kind] in e.value.line()


def test_decoder_output_passes_through_unless_a_file_fails(capfd):
    import os

    with decoder_messages() as said:
        os.write(2, b"libpng warning: iCCP: known incorrect sRGB profile\n")
        assert "iCCP" in said()
    assert "iCCP" in capfd.readouterr().err  # a warning still reaches the terminal
    with pytest.raises(UserError), decoder_messages():
        os.write(2, b"libpng error: bad header\n")
        raise UserError("the file that failed, named in this line")
    assert capfd.readouterr().err == ""  # its message is in the line instead


@pytest.mark.slow
@pytest.mark.parametrize("kind", IMAGE_CASES)
def test_a_bad_image_through_the_cli(cli, tmp_path, kind):
    write_imagefolder(tmp_path / "images")
    bad = spoil(tmp_path / "images", kind)
    result = cli("train", *TINY, "dataset=imagefolder", f"dataset.root={tmp_path / 'images'}",
                 "dataset.n_train=null", "dataset.n_val=null", "batch_size=4", "device=cpu")
    one_error_line(result, f"cannot read the image {bad}: ", IMAGE_CASES[kind])


def test_text_that_is_not_utf8_names_the_offset_and_line(tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("first line\ncaf\u00e9\n".encode("latin-1"))
    with pytest.raises(UserError, match=re.escape(
            f"{latin1} is not UTF-8 text (undecodable byte 0xe9 at offset 14, line 2)")):
        read_text_file(latin1)
    utf16 = tmp_path / "utf16.txt"
    utf16.write_bytes("text in UTF-16\n".encode("utf-16"))  # its NUL bytes make it no binary
    with pytest.raises(UserError, match=re.escape(f"{utf16} is UTF-16 text, not UTF-8")):
        read_text_file(utf16)


@pytest.mark.slow
def test_text_that_is_not_utf8_through_the_cli(cli, tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(("x" * 500 + "\ncaf\u00e9\n").encode("latin-1"))
    result = cli("train", *NO_SIZES, "dataset=text", f"dataset.path={latin1}",
                 "dataset.seq_len=8")
    one_error_line(result, f"{latin1} is not UTF-8 text", "offset 504, line 2")


def report_runs(root: Path) -> dict[str, Path]:
    """Three runs of a sweep: one whole, one with a cut summary.json (left out), one with a
    cut config.json (read from its summary.json alone)."""
    runs = {name: fake_run(root, name, seed=seed, val_acc=0.5 + seed / 10)
            for seed, name in enumerate(["whole", "cut_summary", "cut_config"])}
    summary = runs["cut_summary"] / "summary.json"
    summary.write_text(summary.read_text()[:40])
    (runs["cut_config"] / "config.json").write_text('{"norm": {"name": "ba')
    return {"summary": summary, "config": runs["cut_config"] / "config.json"}


@pytest.mark.slow
def test_report_names_unreadable_runs_and_strict_refuses_them(cli, tmp_path):
    bad = report_runs(tmp_path / "sweep")
    result = cli("report", "sweep", "--no-plots")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.strip().splitlines()
    assert all(line.startswith("normbench: warning: ") for line in lines), lines
    assert "2 run file(s) cannot be read" in lines[0] and len(lines) == 3
    for path, fate in [(bad["summary"], "the run is left out"),
                       (bad["config"], "settings from its summary.json alone")]:
        assert any(str(path.relative_to(tmp_path)) in line and "not valid JSON" in line
                   and line.endswith(fate) for line in lines[1:]), (path, lines)
    with open(tmp_path / "sweep" / "report.csv", newline="") as f:
        assert [row["seeds"] for row in csv.DictReader(f)] == ["0 2"]
    assert "## Files that cannot be read" in (tmp_path / "sweep" / "report.md").read_text()

    before = (tmp_path / "sweep" / "report.csv").read_bytes()
    result = cli("report", "sweep", "--no-plots", "--strict")
    one_error_line(result, "2 run file(s) cannot be read (--strict)",
                   *(str(p.relative_to(tmp_path)) for p in bad.values()))
    assert (tmp_path / "sweep" / "report.csv").read_bytes() == before  # nothing rewritten


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
    lists = {"optim.betas": f"[0.9,{value}]", "sched.milestones": f"[0.5,{value}]"}
    given = lists.get(key, value)
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


# ----------------------------------------------------------------------------- OS errors


@pytest.mark.slow
@pytest.mark.parametrize("case", ["dataset.path", "dataset.root", "hydra.run.dir",
                                  "hydra.sweep.dir", "report-dir", "report-out"])
def test_a_path_too_long_is_one_line(cli, tmp_path, case):
    long = tmp_path / TOO_LONG
    args = {
        "dataset.path": ["train", *NO_SIZES, "dataset=text", f"dataset.path={long}.txt"],
        "dataset.root": ["train", *TINY, "dataset=imagefolder", f"dataset.root={long}",
                         "hydra.run.dir=run"],
        "hydra.run.dir": ["train", *TINY, f"hydra.run.dir=out/{TOO_LONG}"],
        "hydra.sweep.dir": ["train", "-m", *TINY, "norm=batch,group",
                            f"hydra.sweep.dir=out/{TOO_LONG}"],
        "report-dir": ["report", str(long)],
        "report-out": ["report", "runs", "--no-plots", "--out", f"out/{TOO_LONG}"],
    }[case]
    if case == "report-out":
        fake_run(tmp_path / "runs", "one")
    line = one_error_line(cli(*args), "File name too long", "shorten it")
    assert TOO_LONG in line
    assert not (tmp_path / "out").exists()  # refused before any folder was made


@pytest.mark.slow
def test_a_key_too_long_for_a_file_name_is_an_unknown_key(cli):
    # Hydra looks an unknown key up as a config group folder, i.e. as a path on disk
    one_error_line(cli("train", *TINY, f"{TOO_LONG}=1"),
                   f"unknown config key '{TOO_LONG[:40]}..., 300 characters'")


def refuse(path):
    raise PermissionError(errno.EACCES, "Permission denied", str(path))


def test_permission_denied_names_the_path(tmp_path, monkeypatch):
    # Root reads and writes anything: the system's refusals are simulated.
    text = tmp_path / "corpus.txt"
    text.write_text("some text\n")
    monkeypatch.setattr(Path, "read_bytes", refuse)
    with pytest.raises(UserError, match=re.escape(
            f"cannot use the text file {text}: Permission denied. Fix: check the permissions")):
        read_text_file(text)
    monkeypatch.undo()

    folder = tmp_path / "locked" / "run"
    exists = Path.exists
    monkeypatch.setattr(Path, "exists", lambda p: refuse(p) if p.name == "run" else exists(p))
    with pytest.raises(UserError, match=re.escape(
            f"cannot use the output folder {folder}: Permission denied")):
        check_output_dir(folder)
    monkeypatch.undo()

    write_imagefolder(tmp_path / "images")
    monkeypatch.setattr(torchvision.datasets.folder, "find_classes", refuse)
    with pytest.raises(UserError, match=re.escape(
            f"cannot use dataset.root {tmp_path / 'images' / 'train'}: Permission denied")):
        imagefolder_dataset(root=str(tmp_path / "images"))


# ----------------------------------------------------------------------------- overrides


@pytest.mark.slow
def test_a_path_with_a_space_says_how_to_quote_it_and_the_quoting_works(cli, tmp_path):
    path = tmp_path / "my file.txt"
    path.write_text("To be, or not to be.\n")
    head, tail = str(path).split(" ")  # what the shell passes for an unquoted path
    line = one_error_line(cli("train", *NO_SIZES, "dataset=text", f"dataset.path={head}", tail),
                          f"'{tail}' is not an override", "quote the value")
    suggestion = line.split("for the shell and for Hydra: ", 1)[1].removesuffix(".")
    (word,) = shlex.split(suggestion)  # the shell hands it over in one piece
    result = cli("train", *NO_SIZES, "dataset=text", word, "dataset.seq_len=64")
    one_error_line(result, f"{path} holds 21 characters, fewer than the context")


@pytest.mark.slow
def test_a_trailing_comma_names_the_empty_sweep_value(cli, tmp_path):
    one_error_line(cli("train", "-m", *TINY, "norm=batch,"),
                   "norm=batch, has an empty value after the last comma",
                   "Fix: remove the extra comma (norm=batch)")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("words, expected", [
    (["norm=,batch"], "norm=,batch has an empty value before the first comma"),
    (["norm=batch,,group"], "norm=batch,,group has an empty value between two commas. Fix: "
                            "remove the extra comma (norm=batch,group)"),
    (["optim.betas=[0.9,0.99],"], "optim.betas=[0.9,0.99], has an empty value after the last"),
    (["norm=batch,", "group"], "Fix: write the values without spaces: norm=batch,group"),
    (["seed=1", "dataset.path=/data/my", "long", "name.txt"],
     "'long' is not an override (key=value): the shell split the value of dataset.path at a "
     "space (dataset.path=/data/my long name.txt). Fix: quote the value, for the shell and "
     "for Hydra: 'dataset.path=\"/data/my long name.txt\"'."),
    (["norm=batch)"], "cannot parse the override norm=batch): extraneous input ')'"),
])
def test_overrides_that_do_not_parse(words, expected):
    with pytest.raises(UserError) as e:
        parse_overrides(words)
    assert expected in e.value.line()
