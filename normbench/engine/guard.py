"""What ends a run early and cleanly: a stop signal, or a loss that stopped being a number.

`StopSignals` turns SIGINT/SIGTERM (and SIGUSR2, which SLURM sends through submitit before
a time limit or preemption) into a flag the loop reads between steps, so the run can save
a checkpoint and stop. `DivergenceWatch` keeps, on the device, the first step whose loss or
gradient norm was not finite: no host sync per step, one read when the loop asks.
"""

from __future__ import annotations

import signal
import threading

import torch


class StopSignals:
    """Within this block, the first SIGINT/SIGTERM/SIGUSR2 sets `received` instead of killing.

    After the first signal the previous handlers are back, so a second Ctrl-C stops the
    process at once. Under submitit (which handles SIGTERM and SIGUSR2 in Python) SIGTERM
    is left to submitit, and SIGUSR2 is taken over and, once the checkpoint is written,
    handed on by `forward()` to submitit, which requeues the job.
    """

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}
        self._handed_over = None  # the handler SIGUSR2 had before us, once it arrived

    @property
    def requested(self) -> bool:
        return self.received is not None

    @property
    def name(self) -> str | None:
        return signal.Signals(self.received).name if self.received is not None else None

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            return self  # only the main thread may set handlers; runs there stay killable
        wanted = [signal.SIGINT]
        # submitit installs a Python handler that ignores SIGTERM on purpose (SLURM sends it
        # ahead of the USR2 that triggers the requeue): leave such a handler in place.
        if not callable(signal.getsignal(signal.SIGTERM)):
            wanted.append(signal.SIGTERM)
        usr2 = getattr(signal, "SIGUSR2", None)
        if usr2 is not None and callable(signal.getsignal(usr2)):
            wanted.append(usr2)
        for sig in wanted:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum
            self._handed_over = self._previous.get(signum)
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __exit__(self, *exc) -> None:
        self._restore()

    def forward(self) -> None:
        """Pass a received SIGUSR2 on to the handler that was there before (submitit's)."""
        if self.received == getattr(signal, "SIGUSR2", None) and callable(self._handed_over):
            self._handed_over(self.received, None)


class DivergenceWatch:
    """The first step at which the loss or the gradient norm was NaN or infinite (0: none)."""

    def __init__(self, device: torch.device):
        self.first_bad = torch.zeros((), dtype=torch.long, device=device)

    def observe(self, step: int, *values: torch.Tensor) -> None:
        stacked = torch.stack([v.detach().float().reshape(()) for v in values])
        bad = stacked.isfinite().logical_not().any()
        # Device-side: record `step` only if nothing was recorded before.
        self.first_bad.masked_fill_(bad & (self.first_bad == 0), step)

    def first_bad_step(self) -> int:
        """Reads the device flag: the one host sync, to be called on logging/checkpoint steps."""
        return int(self.first_bad.item())

    def state_dict(self) -> dict:
        return {"first_bad": self.first_bad.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.first_bad.copy_(state["first_bad"])


def grad_norm(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """Global L2 norm of the gradients, on the device (no sync)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads)
