"""Checkpoint files, RNG capture, resume modes, the divergence flag and stop signals, in-process."""

from __future__ import annotations

import os
import random
import signal

import numpy as np
import pytest
import torch

from normbench.engine import checkpoint as ckpt
from normbench.engine.guard import DivergenceWatch, StopSignals, grad_norm
from normbench.errors import UserError


def small_state(step: int) -> dict:
    model = torch.nn.Linear(3, 2)
    return {"model": model.state_dict(), "marker": torch.full((4,), float(step))}


def test_save_keeps_newest_k_and_leaves_no_temporary_files(tmp_path):
    for step in (5, 10, 15, 20):
        ckpt.save_checkpoint(tmp_path, step, small_state(step), keep=2)
    names = [p.name for p in ckpt.list_checkpoints(tmp_path)]
    assert names == ["step_00000020.pt", "step_00000015.pt"]
    assert sorted(p.name for p in ckpt.checkpoint_dir(tmp_path).iterdir()) == sorted(names)
    state = ckpt.load_checkpoint(ckpt.list_checkpoints(tmp_path)[0])
    assert state["step"] == 20 and torch.equal(state["marker"], torch.full((4,), 20.0))


def test_failed_write_keeps_the_previous_checkpoints_intact(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, 1, small_state(1), keep=3)
    before = ckpt.list_checkpoints(tmp_path)[0].read_bytes()

    def broken_save(obj, f):
        f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(tmp_path, 2, small_state(2), keep=3)
    files = list(ckpt.checkpoint_dir(tmp_path).iterdir())
    assert [p.name for p in files] == ["step_00000001.pt"]  # no step 2, no temporary left
    assert files[0].read_bytes() == before


def test_rng_states_round_trip_through_a_weights_only_load(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached Gaussian in NumPy's state
    state = ckpt.rng_state()
    path = ckpt.save_checkpoint(tmp_path, 1, {"rng": state}, keep=1)
    expected = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3))

    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    loaded = torch.load(path, weights_only=True)  # the safe loader accepts it as is
    ckpt.set_rng_state(loaded["rng"])
    got = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_and_says_so(tmp_path):
    ckpt.save_checkpoint(tmp_path, 4, small_state(4), keep=3)
    newest = ckpt.save_checkpoint(tmp_path, 8, small_state(8), keep=3)
    newest.write_bytes(newest.read_bytes()[:100])  # truncated, as by a full disk
    warnings: list[str] = []
    state, path = ckpt.load_newest(tmp_path, warnings.append)
    assert state["step"] == 4 and path.name == "step_00000004.pt"
    assert len(warnings) == 1 and "step_00000008.pt is unreadable" in warnings[0]
    assert "trying step_00000004.pt" in warnings[0] and "\n" not in warnings[0]


def test_all_checkpoints_unreadable_is_a_user_error(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 4, small_state(4), keep=3)
    path.write_bytes(b"not a zip file")
    warnings: list[str] = []
    with pytest.raises(UserError, match="none of the 1 checkpoint") as refused:
        ckpt.load_newest(tmp_path, warnings.append)
    # the refusal is one line, naming the newest checkpoint and why it cannot be read
    assert not warnings and "step_00000004.pt:" in refused.value.line()


class Arbitrary:
    """Any class outside the allowlist: weights_only refuses to build it."""


def test_a_pickled_object_is_refused_by_the_safe_loader(tmp_path):
    folder = ckpt.checkpoint_dir(tmp_path)
    folder.mkdir()
    torch.save({"format": ckpt.FORMAT, "step": 3, "x": Arbitrary()}, folder / "step_00000003.pt")
    warnings: list[str] = []
    with pytest.raises(UserError) as refused:
        ckpt.load_newest(tmp_path, warnings.append)
    line = refused.value.line()  # the only checkpoint: the refusal itself says why
    assert not warnings and ("Unpickl" in line or "weights_only" in line)


@pytest.mark.parametrize("resume, has_checkpoint, outcome", [
    (False, False, "false"), (False, True, "already holds the checkpoints"),
    (True, False, "holds no checkpoint"), (True, True, "true"),
    ("auto", False, "auto"), ("auto", True, "auto"), ("maybe", False, "not a resume mode"),
])
def test_resume_modes(tmp_path, resume, has_checkpoint, outcome):
    if has_checkpoint:
        ckpt.save_checkpoint(tmp_path, 1, small_state(1), keep=1)
    if outcome in ("false", "true", "auto"):
        assert ckpt.check_resume(tmp_path, resume) == outcome
    else:
        with pytest.raises(UserError, match=outcome):
            ckpt.check_resume(tmp_path, resume)


def test_divergence_watch_keeps_the_first_bad_step():
    watch = DivergenceWatch(torch.device("cpu"))
    one = torch.tensor(1.0)
    for step, value in [(1, 0.5), (2, 0.3), (3, float("nan")), (4, float("inf")), (5, 0.1)]:
        watch.observe(step, torch.tensor(value), one)
    assert watch.first_bad_step() == 3
    fresh = DivergenceWatch(torch.device("cpu"))
    fresh.observe(7, one, torch.tensor(float("-inf")))  # the second value: a gradient norm
    assert fresh.first_bad_step() == 7
    restored = DivergenceWatch(torch.device("cpu"))
    restored.load_state_dict(watch.state_dict())
    assert restored.first_bad_step() == 3


def test_grad_norm_matches_the_direct_formula():
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))
    a.grad, b.grad = torch.tensor([1.0, 2.0, 2.0]), torch.tensor([[4.0, 0.0], [0.0, 0.0]])
    assert grad_norm([a, b]).item() == pytest.approx((1 + 4 + 4 + 16) ** 0.5)


def test_stop_signals_turn_sigterm_into_a_flag_then_restore_the_handler():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.name == "SIGTERM"
        assert signal.getsignal(signal.SIGTERM) == before  # a second signal acts as usual
    assert signal.getsignal(signal.SIGTERM) == before


def test_sigusr2_is_handed_on_to_the_previous_handler_after_the_checkpoint():
    calls: list[int] = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    try:
        with StopSignals() as stop:
            os.kill(os.getpid(), signal.SIGUSR2)
            assert stop.requested and calls == []  # held back until the loop has saved
        stop.forward()
        assert calls == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_a_requeued_slurm_job_resumes_even_with_resume_false(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, 1, small_state(1), keep=1)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert ckpt.check_resume(tmp_path, False) == "auto"
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")  # first start: a used folder is refused
    with pytest.raises(UserError, match="already holds"):
        ckpt.check_resume(tmp_path, False)


def test_a_python_sigterm_handler_such_as_submitits_is_left_in_place():
    bypass = lambda signum, frame: None  # noqa: E731
    previous = signal.signal(signal.SIGTERM, bypass)
    try:
        with StopSignals():
            assert signal.getsignal(signal.SIGTERM) is bypass
            assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, previous)
