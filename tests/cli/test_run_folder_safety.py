"""A command that is refused never changes a run folder: every byte of a finished run stays
as it was, no file is added, and a single run's new folder is not even created. A resumed
run keeps the record and the numbers of the run it continues until it has newer ones."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers.common import TINY, run_cli, run_with_fault

pytestmark = pytest.mark.slow

RUN = [*(o for o in TINY if not o.startswith("steps=")), "steps=4"]
# TINY without its dataset sizes, for the datasets that have none (text files).
NO_SIZES = [o for o in RUN if not o.startswith(("dataset.n_train", "dataset.n_val"))]


def fingerprint(folder: Path) -> dict[str, str]:
    """Every file under `folder` (hidden ones included) and its SHA-256."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("finished")
    result = run_cli("train", *RUN, "hydra.run.dir=runs/done", cwd=cwd)
    assert result.returncode == 0, result.stderr
    return cwd / "runs" / "done"


# Commands that must be refused in a finished run's folder (resume=true unless the case is
# about resume itself): the arguments after `normbench train`; {tmp} is the test's folder.
REFUSALS = {
    "another norm": ["norm=group"],
    "another model and dataset": ["model=transformer", "dataset=synthetic_text"],
    "another depth": ["model.depth=14"],
    "another optimizer": ["optim=adamw"],
    "fewer steps than the checkpoint": ["steps=2"],
    "cifar offline": ["dataset=cifar10", "dataset.root={tmp}/empty", "dataset.download=false"],
    "tinyshakespeare offline": [*NO_SIZES, "dataset=tinyshakespeare", "dataset.root={tmp}/empty",
                                "dataset.download=false"],
    "text file missing": [*NO_SIZES, "dataset=text", "dataset.path={tmp}/no.txt"],
    "image folder missing": ["dataset=imagefolder", "dataset.root={tmp}/nowhere"],
    "image folder without splits": ["dataset=imagefolder", "dataset.root={tmp}/empty"],
    "cuda without a GPU": ["device=cuda"],
    "negative lr": ["lr=-1"],
    "unknown norm": ["norm=nope"],
    "unknown key": ["nope=1"],
    "bad resume mode": ["resume=maybe"],
}


@pytest.mark.parametrize("case", [*REFUSALS, "a fresh start in the folder"])
def test_a_refused_command_leaves_a_finished_run_byte_for_byte(finished, tmp_path, case):
    if case == "cuda without a GPU" and torch.cuda.is_available():
        pytest.skip("there is a GPU here")
    (tmp_path / "empty").mkdir()
    # resume=false (the default) in a folder that holds checkpoints is refused too
    args = RUN if case not in REFUSALS else [*RUN, "resume=true", *REFUSALS[case]]
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    before = fingerprint(finished)
    assert json.loads((finished / "summary.json").read_text())["status"] == "completed"
    assert ".hydra/config.yaml" in before
    result = run_cli("train", *args, f"hydra.run.dir={finished}", cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("normbench: error:"), lines
    assert fingerprint(finished) == before


def test_a_config_that_does_not_fit_names_the_checkpoints_setting(finished, tmp_path):
    result = run_cli("train", *RUN, "resume=true", "norm=group", f"hydra.run.dir={finished}",
                     cwd=tmp_path)
    assert result.returncode == 2
    assert "was saved with norm=batch and does not fit this configuration (norm=group)" \
        in result.stderr
    assert "Fix: resume with norm=batch" in result.stderr


def test_an_error_inside_a_single_run_leaves_no_new_folder(tmp_path):
    target = tmp_path / "not" / "there" / "run"
    result = run_cli("train", *RUN, "dataset=imagefolder", f"dataset.root={tmp_path / 'x'}",
                     f"hydra.run.dir={target}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "dataset.root" in result.stderr or str(tmp_path / "x") in result.stderr
    assert not (tmp_path / "not").exists()


def test_resuming_a_completed_run_with_nothing_left_to_do_changes_nothing(finished, tmp_path):
    before = fingerprint(finished)
    result = run_cli("train", *RUN, "resume=true", f"hydra.run.dir={finished}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "nothing to do" in result.stdout
    assert fingerprint(finished) == before


def test_a_resumed_run_keeps_the_record_and_the_numbers_it_continues(finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    record = {name: (run / ".hydra" / name).read_bytes()
              for name in ("config.yaml", "hydra.yaml", "overrides.yaml")}
    previous = json.loads((run / "summary.json").read_text())
    # Killed one step into the continuation: what is on disk is what the resume wrote first.
    result = run_with_fault("kill", 1, "train", *RUN, "steps=8", "resume=true",
                            f"hydra.run.dir={run}", cwd=tmp_path)
    assert result.returncode == -9, result.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final"] == previous["final"] and summary["final"]["val_acc"] >= 0
    assert (summary["steps"], summary["resumed_from_step"]) == (4, 4)
    for name, content in record.items():  # the first run's record, untouched
        assert (run / ".hydra" / name).read_bytes() == content, name
    (attempt,) = (run / ".hydra").glob("resume_*")
    assert "steps=8" in (attempt / "overrides.yaml").read_text()
    assert "resume=true" in (attempt / "overrides.yaml").read_text()
    # ... and it continues from there.
    result = run_cli("train", *RUN, "steps=8", "resume=true", f"hydra.run.dir={run}",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["status"], summary["steps"]) == ("completed", 8)
    assert len(list((run / ".hydra").glob("resume_*"))) == 2


def test_output_that_goes_away_does_not_end_the_run(tmp_path):
    """`normbench train | head -1`: the reader leaves after one line; the run carries on to
    its end with its console output dropped, and exits 0 with its summary written."""
    import os
    import subprocess
    import sys

    from tests.helpers.common import REPO

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("NORMBENCH_STAMP", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "normbench", "train", *RUN, "steps=12", "eval_every=1",
         "precise_bn_batches=0", "hydra.run.dir=run"], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = process.stdout.readline()
    assert first  # the run had started printing
    process.stdout.close()  # the reader goes away
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err.decode()
    assert b"Traceback" not in err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["status"], summary["steps"]) == ("completed", 12)


@pytest.mark.parametrize("resume", ["false", "auto"])
def test_a_finished_run_whose_checkpoints_are_gone_is_not_started_over(finished, tmp_path,
                                                                       resume):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    shutil.rmtree(run / "checkpoints")
    before = fingerprint(run)
    result = run_cli("train", *RUN, f"resume={resume}", f"hydra.run.dir={run}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "holds a completed run (summary.json) and no checkpoint" in result.stderr
    assert fingerprint(run) == before
