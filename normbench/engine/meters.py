"""What the loop accumulates between two logging steps: the running training loss and
accuracy (on the device, checkpointed with the run) and the throughput (wall clock)."""

from __future__ import annotations

import time

import torch


class RunningMeans:
    """Sums of the training loss (weighted by targets), correct predictions and targets since
    the last logging step.

    They stay on the device, so adding a step costs no host sync; `means()` returns 0-d
    tensors that the probes' one transfer per logging step brings to the host. The sums are
    part of a checkpoint: a run resumed between two logging steps logs the same means as one
    that was never stopped.
    """

    FIELDS = ("loss", "correct", "count")

    def __init__(self, device: torch.device | str = "cpu"):
        self.loss = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device)
        self.count = torch.zeros((), device=device)

    def add(self, loss: torch.Tensor, correct: torch.Tensor, count: torch.Tensor) -> None:
        """One step: `loss` is the mean over its `count` targets, `correct` their hits."""
        self.loss += loss.detach() * count
        self.correct += correct
        self.count += count

    def means(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean loss and accuracy since the last reset (0-d tensors on the device)."""
        return self.loss / self.count, self.correct / self.count

    def reset(self) -> None:
        for name in self.FIELDS:
            getattr(self, name).zero_()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name).detach().cpu().clone() for name in self.FIELDS}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name in self.FIELDS:
            getattr(self, name).copy_(state[name])


class Throughput:
    """Training samples per second between two logging steps (wall clock, host side)."""

    def __init__(self, step: int):
        self.time, self.step = time.time(), step

    def rate(self, step: int, batch_size: int) -> float:
        """Samples per second since the previous call (or since the run started/resumed)."""
        now = time.time()
        rate = (step - self.step) * batch_size / max(now - self.time, 1e-9)
        self.time, self.step = now, step
        return rate
