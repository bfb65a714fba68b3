"""Synchronized BatchNorm (`norm.sync=true`): under several processes every rank normalizes
with the statistics of the whole global batch, not of its own slice.

Per channel, two all_reduces of the ranks' sums: first the real-entry counts and sums
(the global mean), then the squared deviations from that mean (the global variance, a
two-pass computation, as exact as the one-process one). The sums travel through an
all_reduce that autograd differentiates (its backward all-reduces the gradient, as torch's
SyncBatchNorm does with its two gradient reductions), so the gradient each rank computes
is that of whole-batch BatchNorm; DDP then averages it. Masks are honoured (padding counts
nowhere), so the same code serves images, tokens and LSTM steps, on the CPU (gloo) and on
CUDA (NCCL).

Synchronization happens only inside `synchronized()`, which the training step enters:
evaluations that one rank runs alone (val_batchstats, PreciseBN) use that rank's batch, and
never wait for the others.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist

from normbench.norms.stats import GroupStats, real_weights, stats_dtype

_active = False


@contextmanager
def synchronized(on: bool = True):
    """Within this block, layers with `sync` pool their training statistics over the ranks."""
    global _active
    previous = _active
    _active = on and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    try:
        yield
    finally:
        _active = previous


def synchronizing() -> bool:
    return _active


class _SumOverRanks(torch.autograd.Function):
    """all_reduce(SUM) whose backward is all_reduce(SUM) of the gradient: each rank's input
    reaches every rank's output, so its gradient is the sum of every rank's upstream one."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def synced_group_stats(x: torch.Tensor, mask: torch.Tensor | None, channel_dim: int) -> GroupStats:
    """The statistics of the global batch (every rank's real entries) as one group, in the
    form `normbench.norms.stats.group_stats` gives them: the layer normalizes, falls back
    and updates its running statistics exactly as for one whole batch."""
    n = x.shape[0]
    dtype = stats_dtype(x)
    xg = x.to(dtype).unsqueeze(0)
    m = real_weights(x, mask, 0, dtype, channel_dim)
    cdim = channel_dim % x.dim() + 1
    dims = tuple(d for d in range(1, xg.dim()) if d != cdim)
    keep = [1] * xg.dim()
    if m is None:
        count = torch.full(keep, xg[0].numel() / xg.shape[cdim], dtype=dtype, device=x.device)
        mg = None
    else:
        mg = m.unsqueeze(0)
        # Padding is replaced by 0, as in `group_stats`: inf/NaN there reaches neither the
        # sums nor the gradients, and padded outputs are those of a 0 input.
        xg = torch.where(mg > 0, xg, 0.0)
        count = mg.sum(dims, keepdim=True)
    local_sum = xg.sum(dims, keepdim=True) if mg is None else (xg * mg).sum(dims, keepdim=True)
    channels = local_sum.numel()
    packed = _SumOverRanks.apply(torch.cat([local_sum.reshape(-1), count.reshape(-1)]))
    total = packed[channels:].reshape(keep)
    mean = (packed[:channels] / total.reshape(()).clamp(min=1)).reshape(local_sum.shape)
    deviations = (xg - mean).square()
    if mg is not None:
        deviations = deviations * mg
    ss = _SumOverRanks.apply(deviations.sum(dims, keepdim=True))
    return GroupStats(xg, total, mean, ss, total >= 2, n)
