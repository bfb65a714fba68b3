"""Bad input through the CLI: one line naming the problem and the fix, exit status 2, no
traceback, and the files of another run in the same place left byte-identical."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from normbench.checks import check_output_dir, check_text_file
from normbench.cli import conf_dir
from normbench.errors import UserError
from tests.conftest import TINY, run_cli

# Where the download of a dataset would go: a closed local port, i.e. no network.
OFFLINE = {key: "http://127.0.0.1:9" for key in
           ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")}


def text_dataset(path: Path, context: int = 64) -> list[str]:
    """Overrides selecting a text dataset read from `path` with a given context length."""
    text_yaml = conf_dir() / "dataset" / "text.yaml"
    if text_yaml.is_file():
        plus = "" if "\nseq_len:" in "\n" + text_yaml.read_text() else "+"
        return ["dataset=text", f"dataset.path={path}", f"{plus}dataset.seq_len={context}"]
    # Without the text dataset, the same config keys on the default dataset reach the checks.
    return ["dataset.kind=text", f"+dataset.path={path}", f"+dataset.seq_len={context}"]


def make_files(root: Path) -> dict[str, Path]:
    files = {"empty": root / "empty.txt", "binary": root / "blob.bin",
             "short": root / "short.txt", "a_file": root / "a_file"}
    files["empty"].write_bytes(b"")
    files["binary"].write_bytes(bytes(range(256)) * 8)
    files["short"].write_text("To be, or not to be.\n")
    files["a_file"].write_text("a plain file, where a folder would have to be")
    (root / "no_cifar_here").mkdir()
    return files


# id, overrides (with {placeholders} filled from the files above), words the line must hold
CASES = [
    ("unknown-dataset", ["dataset=cifar11"], ["unknown dataset 'cifar11'", "cifar10, cifar100"]),
    ("unknown-model", ["model=resnett"], ["unknown model 'resnett'", "resnet"]),
    ("unknown-norm", ["norm=btach"], ["unknown norm 'btach'", "did you mean norm=batch"]),
    ("misspelled-key", ["batch_szie=4"], ["unknown config key 'batch_szie'", "batch_size"]),
    ("batch-size-zero", ["batch_size=0"], ["batch_size=0 must be a positive integer"]),
    ("lr-negative", ["lr=-0.1"], ["lr=-0.1 must be a positive number"]),
    ("batchnorm-batch-1", ["norm=batch", "batch_size=1"],
     ["norm=batch with batch_size=1", "norm=group"]),
    ("groups-do-not-divide", ["norm=group", "norm.num_groups=3"],
     ["num_groups=3 does not divide", "layer 'stem.1'", "[1, 2, 4, 8, 16]"]),
    ("cifar-offline", ["dataset=cifar10", "dataset.root={no_cifar_here}"],
     ["cifar10 is not in", "could not be downloaded", "cifar-10-python.tar.gz"]),
    ("text-empty", ["TEXT:{empty}"], ["is empty", "dataset.path"]),
    ("text-binary", ["TEXT:{binary}"], ["is a binary file"]),
    ("text-shorter-than-context", ["TEXT:{short}"],
     ["holds 21 characters, fewer than the context of 64"]),
    ("unwritable-output", ["hydra.run.dir={a_file}/run"],
     ["cannot create the output folder", "is a file", "hydra.run.dir"]),
    ("resume-without-checkpoint", ["hydra.run.dir=runs/fresh", "resume=true"],
     ["resume=true but", "holds no checkpoint"]),
    ("another-runs-folder", ["hydra.run.dir=runs/sibling"],
     ["already holds the checkpoints of a run", "resume=true"]),
    ("sweep-folder-with-checkpoints", ["-m", "norm=batch,group", "hydra.sweep.dir=old_sweep"],
     ["the sweep folder old_sweep already holds runs with checkpoints", "resume=auto"]),
    ("impossible-pair", ["dataset.kind=text"], ["model=resnet cannot read text data"]),
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A folder holding a finished run (the sibling every case must leave alone)."""
    root = tmp_path_factory.mktemp("errors")
    result = run_cli("train", *TINY, "steps=2", "hydra.run.dir=runs/sibling", cwd=root)
    assert result.returncode == 0, result.stderr
    shutil.copytree(root / "runs" / "sibling", root / "old_sweep" / "0_job")
    return root, make_files(root)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def expand(overrides: list[str], files: dict[str, Path]) -> list[str]:
    """TINY settings plus the case's overrides; TINY's dataset.* keys belong to the default
    dataset, so they are left out where a case picks another."""
    picks_dataset = any(o.startswith(("dataset=", "TEXT:")) for o in overrides)
    out = [o for o in TINY if not (picks_dataset and o.startswith("dataset."))]
    for item in overrides:
        filled = item.format(**files, no_cifar_here=files["a_file"].parent / "no_cifar_here")
        out.extend(text_dataset(Path(filled[5:])) if filled.startswith("TEXT:") else [filled])
    return out


@pytest.mark.parametrize("overrides, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_ends_with_one_line_and_exit_2(workspace, overrides, expected):
    root, files = workspace
    sibling = root / "runs" / "sibling"
    before = snapshot(sibling)
    assert "checkpoints/step_00000002.pt" in before and "summary.json" in before

    result = run_cli("train", *expand(overrides, files), cwd=root, env=OFFLINE)

    assert result.returncode == 2, (result.stdout[-2000:], result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("normbench: error: ") and "Fix: " in lines[0]
    for words in expected:
        assert words in lines[0], lines[0]
    assert snapshot(sibling) == before
    assert not (root / "runs" / "fresh").exists()  # refused before any folder was made


def test_read_only_output_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):  # root writes anywhere: nothing to refuse
            pytest.skip("a read-only mode does not stop this user from writing")
        with pytest.raises(UserError, match="is not writable"):
            check_output_dir(folder / "run")
    finally:
        folder.chmod(0o755)


def test_text_file_checks(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("ab\u00e9cd")  # 5 characters in 6 bytes
    check_text_file(good, context=4)  # 4 inputs + 1 target: exactly enough
    with pytest.raises(UserError, match="holds 5 characters, fewer than the context of 5"):
        check_text_file(good, context=5)
    with pytest.raises(UserError, match="does not exist"):
        check_text_file(tmp_path / "missing.txt", context=4)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9 ".encode("latin-1") * 100)
    with pytest.raises(UserError, match="is not UTF-8 text"):
        check_text_file(latin1, context=4)
    nul = tmp_path / "nul.txt"
    nul.write_bytes(b"text with a \x00 inside")
    with pytest.raises(UserError, match="binary"):
        check_text_file(nul, context=4)


def test_a_long_file_may_be_cut_inside_a_multibyte_character(tmp_path):
    # The check reads the first megabyte; a character split at that edge is not an error.
    path = tmp_path / "long.txt"
    path.write_text("\u00e9" * (1 << 20))  # 2 MB of 2-byte characters, split at 1 MB + odd
    path.write_bytes(b"x" + path.read_bytes())
    check_text_file(path, context=1000)
