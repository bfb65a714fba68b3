"""The loop's running means: accumulated on the device, checkpointed, reset per log."""

from __future__ import annotations

import io

import pytest
import torch

from normbench.engine.meters import RunningMeans, Throughput


def filled() -> RunningMeans:
    running = RunningMeans()
    # A classification step (count from y.numel()) and a masked sequence step (float count).
    running.add(torch.tensor(2.0, requires_grad=True), torch.tensor(3), torch.tensor(4))
    running.add(torch.tensor(0.5), torch.tensor(6.0), torch.tensor(8.0))
    return running


def test_means_are_weighted_by_targets():
    loss, acc = filled().means()
    assert float(loss) == pytest.approx((2.0 * 4 + 0.5 * 8) / 12)
    assert float(acc) == pytest.approx(9 / 12)
    assert not loss.requires_grad  # the graph of a step is not kept alive by the sums


def test_running_means_checkpoint_themselves_through_torch_save():
    running = filled()
    buffer = io.BytesIO()
    torch.save(running.state_dict(), buffer)
    buffer.seek(0)
    restored = RunningMeans()
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    for name in RunningMeans.FIELDS:
        assert torch.equal(getattr(restored, name), getattr(running, name)), name
    assert [float(v) for v in restored.means()] == [float(v) for v in running.means()]
    # The saved state is a copy: later steps do not change what was checkpointed.
    state = running.state_dict()
    running.add(torch.tensor(1.0), torch.tensor(1), torch.tensor(1))
    assert float(state["count"]) == 12 and float(running.count) == 13


def test_reset_starts_a_new_logging_interval():
    running = filled()
    running.reset()
    assert [float(getattr(running, n)) for n in RunningMeans.FIELDS] == [0.0, 0.0, 0.0]
    running.add(torch.tensor(1.5), torch.tensor(1), torch.tensor(2))
    assert [float(v) for v in running.means()] == [1.5, 0.5]


def test_throughput_counts_the_steps_since_the_last_call(monkeypatch):
    clock = iter([100.0, 102.0, 103.0])
    monkeypatch.setattr("normbench.engine.meters.time.time", lambda: next(clock))
    meter = Throughput(step=4)  # resumed at step 4: its first interval starts there
    assert meter.rate(step=6, batch_size=32) == pytest.approx(2 * 32 / 2.0)
    assert meter.rate(step=8, batch_size=32) == pytest.approx(2 * 32 / 1.0)
