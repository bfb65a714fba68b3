"""Killed, interrupted, corrupted and diverging runs, end to end through the CLI.

One uninterrupted reference run (10 steps, a checkpoint every 4 and at the end) is the
yardstick: every run that is broken and resumed must end bit-identical to it on CPU, in
its final metrics, its weights and optimizer state, and its TensorBoard curve.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from normbench.engine.train import run_experiment
from tests.helpers.common import TINY, compose_config, read_scalars, run_cli, run_with_fault

pytestmark = pytest.mark.slow  # every test runs the CLI or a whole training

STEPS = 10
RUN = [*(o for o in TINY if not o.startswith("steps=")), f"steps={STEPS}",
       "checkpoint_every=4", "keep_checkpoints=2"]


def summary_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def checkpoint_names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("*.pt"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("reference")
    result = run_cli("train", *RUN, "hydra.run.dir=runs/ref", cwd=cwd)
    assert result.returncode == 0, result.stderr
    return cwd / "runs" / "ref"


def assert_same_as_reference(run_dir: Path, reference: Path) -> None:
    got, want = summary_of(run_dir), summary_of(reference)
    assert got["status"] == want["status"] == "completed"
    assert got["steps"] == want["steps"] == STEPS
    assert got["final"] == want["final"]  # exact float equality
    name = f"step_{STEPS:08d}.pt"
    a = torch.load(run_dir / "checkpoints" / name, weights_only=True)
    b = torch.load(reference / "checkpoints" / name, weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(),
                      strict=True):
        assert torch.equal(pa["momentum_buffer"], pb["momentum_buffer"])
    # One continuous curve: no step logged twice, every value as in the reference.
    got_curves, want_curves = read_scalars(run_dir), read_scalars(reference)
    for tag in ("train/loss", "train/acc", "val/loss"):
        assert got_curves[tag] == want_curves[tag], tag


def test_reference_run_keeps_the_last_two_checkpoints(reference):
    assert checkpoint_names(reference) == ["step_00000008.pt", "step_00000010.pt"]
    assert [s for s, _ in read_scalars(reference)["train/loss"]] == [2, 4, 6, 8, 10]


def test_sigkill_then_resume_matches_the_uninterrupted_run(tmp_path, reference):
    killed = run_with_fault("kill", 7, "train", *RUN, "hydra.run.dir=runs/r", cwd=tmp_path)
    run_dir = tmp_path / "runs" / "r"
    assert killed.returncode == -9
    assert checkpoint_names(run_dir) == ["step_00000004.pt"]
    assert summary_of(run_dir)["status"] == "running"  # nothing could run after SIGKILL

    resumed = run_cli("train", *RUN, "hydra.run.dir=runs/r", "resume=true", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout and "step_00000004.pt" in resumed.stdout
    assert summary_of(run_dir)["resumed_from_step"] == 4
    assert_same_as_reference(run_dir, reference)


def test_truncated_newest_checkpoint_falls_back_to_the_previous(tmp_path, reference):
    run_dir = tmp_path / "runs" / "r"
    shutil.copytree(reference, run_dir)
    newest = run_dir / "checkpoints" / "step_00000010.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])

    resumed = run_cli("train", *RUN, "hydra.run.dir=runs/r", "resume=true", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    warnings = [line for line in resumed.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1
    assert "step_00000010.pt is unreadable" in warnings[0]
    assert "trying step_00000008.pt" in warnings[0]
    assert summary_of(run_dir)["resumed_from_step"] == 8
    assert_same_as_reference(run_dir, reference)


def test_sigterm_saves_a_checkpoint_ends_interrupted_and_resumes(tmp_path, reference):
    stopped = run_with_fault("term", 6, "train", *RUN, "hydra.run.dir=runs/r", cwd=tmp_path)
    run_dir = tmp_path / "runs" / "r"
    assert stopped.returncode == 143, stopped.stderr  # 128 + SIGTERM
    assert "Traceback" not in stopped.stderr
    summary = summary_of(run_dir)
    assert (summary["status"], summary["signal"], summary["steps"]) == ("interrupted", "SIGTERM", 6)
    assert checkpoint_names(run_dir) == ["step_00000004.pt", "step_00000006.pt"]

    resumed = run_cli("train", *RUN, "hydra.run.dir=runs/r", "resume=true", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_as_reference(run_dir, reference)


def test_a_nan_loss_ends_diverged_with_the_first_bad_step(tmp_path):
    # NaN at step 3; the device flag is read on the next logging step (4).
    result = run_with_fault("nan", 3, "train", *RUN, "hydra.run.dir=runs/r", cwd=tmp_path)
    run_dir = tmp_path / "runs" / "r"
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    summary = summary_of(run_dir)
    assert (summary["status"], summary["diverged_at_step"], summary["steps"]) == ("diverged", 3, 4)
    assert not (run_dir / "checkpoints").exists()  # a diverged state is never checkpointed


class InfiniteGradient(torch.autograd.Function):
    """Identity forward; backward makes every gradient infinite (the loss stays finite)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def test_an_infinite_gradient_norm_with_a_finite_loss_ends_diverged(tmp_path, monkeypatch):
    import normbench.engine.train as train

    original, calls = train.loss_and_counts, []

    def blow_up_at_step_5(logits, batch):
        calls.append(1)
        loss, correct, count = original(logits, batch)
        return (InfiniteGradient.apply(loss) if len(calls) == 5 else loss), correct, count

    monkeypatch.setattr(train, "loss_and_counts", blow_up_at_step_5)
    config = compose_config([*RUN, "log_every=3"])
    summary = run_experiment(config, tmp_path, live=False)
    assert summary["status"] == "diverged"
    assert summary["diverged_at_step"] == 5 and summary["steps"] == 6


@pytest.fixture
def deterministic_mode_restored():
    yield
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.benchmark = True  # what a run without deterministic=true sets


def test_deterministic_runs_with_the_same_seed_are_identical(tmp_path,
                                                              deterministic_mode_restored):
    config = compose_config([*RUN, "deterministic=true", "seed=3", "eval_every=5"])
    first = run_experiment(config, tmp_path / "a", live=False)
    second = run_experiment(config, tmp_path / "b", live=False)
    assert torch.are_deterministic_algorithms_enabled()
    assert not torch.backends.cudnn.benchmark  # no timing-based choice of kernels
    assert first["status"] == second["status"] == "completed"
    assert first["final"] == second["final"]
    assert read_scalars(tmp_path / "a")["train/loss"] == read_scalars(tmp_path / "b")["train/loss"]


def test_resuming_with_another_model_is_a_user_error_and_other_changes_are_named(tmp_path,
                                                                                 capsys):
    from normbench.errors import UserError

    run_experiment(compose_config([*RUN, "steps=2"]), tmp_path, live=False)
    with pytest.raises(UserError, match="does not fit this configuration"):
        run_experiment(compose_config([*RUN, "steps=2", "model.depth=14", "resume=true"]),
                       tmp_path, live=False)
    capsys.readouterr()
    summary = run_experiment(compose_config([*RUN, "steps=3", "lr=0.05", "resume=true"]),
                             tmp_path, live=False)
    warning = capsys.readouterr().err.strip()
    assert warning.startswith("normbench: warning: resuming with a config that differs")
    assert "differs from the checkpoint's in lr, steps:" in warning
    assert summary["status"] == "completed"
    assert (summary["resumed_from_step"], summary["steps"]) == (2, 3)


def histogram_steps(run_dir: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"histograms": 0})
    acc.Reload()
    return [e.step for e in acc.Histograms(tag)]


def test_a_stop_between_logging_steps_resumes_with_the_same_means_and_cadence(tmp_path,
                                                                            monkeypatch):
    import signal

    import normbench.engine.train as train

    # Logging steps 3, 6, 9, 10 and histograms on every 2nd of them (steps 3 and 9); the
    # stop at step 5 leaves steps 4 and 5 in the running sums, not yet logged.
    config = compose_config([*RUN, "log_every=3", "hist_every=2"])
    reference = run_experiment(config, tmp_path / "ref", live=False)
    original, calls = train.loss_and_counts, []

    def stop_at_step_5(logits, batch):
        calls.append(1)
        if len(calls) == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(logits, batch)

    monkeypatch.setattr(train, "loss_and_counts", stop_at_step_5)
    stopped = run_experiment(config, tmp_path / "r", live=False)
    assert (stopped["status"], stopped["steps"]) == ("interrupted", 5)
    state = torch.load(tmp_path / "r" / "checkpoints" / "step_00000005.pt", weights_only=True)
    assert float(state["running"]["count"]) == 2 * 32  # steps 4 and 5 of batch_size 32

    monkeypatch.setattr(train, "loss_and_counts", original)
    resumed = run_experiment({**config, "resume": True}, tmp_path / "r", live=False)
    assert resumed["final"] == reference["final"]
    got, want = read_scalars(tmp_path / "r"), read_scalars(tmp_path / "ref")
    assert [s for s, _ in want["train/loss"]] == [3, 6, 9, 10]
    assert got["train/loss"] == want["train/loss"] and got["train/acc"] == want["train/acc"]
    tag = "grad/hist/head.weight"
    assert histogram_steps(tmp_path / "r", tag) == histogram_steps(tmp_path / "ref", tag) == [3, 9]


@pytest.fixture
def one_thread_restored():
    yield
    torch.set_num_threads(1)


def test_a_resumed_run_keeps_the_thread_count_of_its_checkpoint(tmp_path, capsys,
                                                                one_thread_restored):
    # A sweep job ran with threads=2; resumed on its own (threads=null) it would get
    # torch's default, and CPU reductions would round differently.
    run_experiment(compose_config([*RUN, "steps=2", "threads=2"]), tmp_path, live=False)
    # As if it had been stopped after its last checkpoint (a completed run is left alone).
    summary_path = tmp_path / "summary.json"
    summary_path.write_text(summary_path.read_text().replace('"completed"', '"interrupted"'))
    torch.set_num_threads(1)
    capsys.readouterr()
    summary = run_experiment(compose_config([*RUN, "steps=2", "resume=true"]), tmp_path,
                             live=False)
    assert summary["resumed_from_step"] == 2
    assert torch.get_num_threads() == 2
    assert "differs" not in capsys.readouterr().err
