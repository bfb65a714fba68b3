"""BatchNorm variants the registry needs beyond torch's own layers.

- Statistics over *real* positions only (padding masked out), for tokens (N,T,D) and for
  the rows of one LSTM time step (N,D): `TokenBatchNorm`.
- Ghost BatchNorm (`stats_batch=k`): in training the batch is split into groups of k
  consecutive samples and each group is normalized with its own statistics, as each of
  N/k devices would do with its own slice of the batch (Hoffer et al. 2017; the "batch size"
  of Wu & He 2018 is k). `GhostBatchNorm2d` for images; `TokenBatchNorm` takes the same option.

Running statistics under ghost BN, one update per training forward (PyTorch momentum m):

    running_mean = (1 - m) * running_mean + m * mean_g(mu_g)
    running_var  = (1 - m) * running_var  + m * mean_g(var_g * n_g / (n_g - 1))

with mu_g, var_g the biased mean and variance of group g over its n_g entries per channel
(real tokens only). Each group's variance is unbiased with its own count, as each device
would; with k equal to the batch size this is exactly torch's update.
"""

from __future__ import annotations

import torch
from torch import nn


def grouped_moments(x: torch.Tensor, mask: torch.Tensor | None, k: int, channel_dim: int):
    """Biased per-group mean/variance of `x` split along dim 0 into groups of k samples.

    Returns the grouped view (G, k, ...) and mean, var, count broadcastable against it.
    `mask` (x.shape without the channel axis, channels-last layouts only) marks real entries.
    """
    groups = x.shape[0] // k
    xg = x.reshape(groups, k, *x.shape[1:])
    cdim = channel_dim % x.dim() + 1
    dims = tuple(d for d in range(1, xg.dim()) if d != cdim)
    if mask is None:
        var, mean = torch.var_mean(xg, dim=dims, keepdim=True, correction=0)
        count = torch.full_like(mean.select(cdim, 0).unsqueeze(cdim),
                                xg[0].numel() / xg.shape[cdim])
        return xg, mean, var, count
    m = mask.reshape(groups, k, *mask.shape[1:]).unsqueeze(-1).to(x.dtype)
    # A group with no real entry (possible only in a padded step of an LSTM) must not
    # give NaN: its count is clamped to 1 and its statistics are zero.
    count = m.sum(dim=dims, keepdim=True).clamp(min=1)
    mean = (xg * m).sum(dim=dims, keepdim=True) / count
    var = ((xg - mean).square() * m).sum(dim=dims, keepdim=True) / count
    return xg, mean, var, count


class _GhostStats:
    """Shared by the BatchNorm variants here: grouped training statistics and their update."""

    stats_batch: int | None
    channel_dim: int

    def _uses_batch_stats(self) -> bool:
        return self.training or not self.track_running_stats

    def _ghosted(self, n: int) -> bool:
        return bool(self.stats_batch) and n > self.stats_batch and self._uses_batch_stats()

    def moments(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        """The statistics this layer normalizes with in training, averaged over its groups:
        biased mean, biased variance (per channel) and the entries per group."""
        k = self.stats_batch if self._ghosted(x.shape[0]) else x.shape[0]
        k = k if x.shape[0] % k == 0 else x.shape[0]
        _, mean, var, count = grouped_moments(x, mask, k, self.channel_dim)
        c = mean.shape[self.channel_dim % x.dim() + 1]
        return (mean.reshape(-1, c).mean(0), var.reshape(-1, c).mean(0),
                count.reshape(-1).mean())

    def _normalize(self, x: torch.Tensor, mask: torch.Tensor | None, k: int,
                   update: bool) -> torch.Tensor:
        xg, mean, var, count = grouped_moments(x, mask, k, self.channel_dim)
        if update:
            c = mean.shape[self.channel_dim % x.dim() + 1]
            unbiased = var * count / (count - 1).clamp(min=1)
            self._update_running(mean.reshape(-1, c).mean(0), unbiased.reshape(-1, c).mean(0))
        y = ((xg - mean) * torch.rsqrt(var + self.eps)).reshape(x.shape)
        if self.affine:
            shape = [1] * x.dim()
            shape[self.channel_dim] = -1
            y = y * self.weight.reshape(shape) + self.bias.reshape(shape)
        return y

    def _ghost_forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        k = self.stats_batch
        n = x.shape[0]
        update = self.training and self.track_running_stats
        full = n - n % k
        if full == n:
            return self._normalize(x, mask, k, update)
        # An uneven tail (an evaluation batch; training batches are multiples of k) is a
        # group of its own and does not move the running statistics.
        tail_mask = None if mask is None else mask[full:]
        head = self._normalize(x[:full], None if mask is None else mask[:full], k, update)
        return torch.cat([head, self._normalize(x[full:], tail_mask, n - full, False)])

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        if self.momentum is None:  # cumulative moving average, as in PyTorch
            factor = 1.0 / self.num_batches_tracked.float()
        else:
            factor = self.momentum
        self.running_mean.lerp_(mean, factor)
        self.running_var.lerp_(unbiased_var, factor)


class GhostBatchNorm2d(_GhostStats, nn.BatchNorm2d):
    """BatchNorm2d whose training statistics come from groups of `stats_batch` images."""

    channel_dim = 1

    def __init__(self, num_features: int, stats_batch: int | None = None, **kwargs):
        super().__init__(num_features, **kwargs)
        self.stats_batch = stats_batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._ghosted(x.shape[0]):
            return super().forward(x)  # exactly torch's BatchNorm2d
        return self._ghost_forward(x, None)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, stats_batch={self.stats_batch}"


class TokenBatchNorm(_GhostStats, nn.BatchNorm1d):
    """BatchNorm over channels-last input (N, ..., D) whose statistics come from real entries.

    ``mask`` has the shape of x without D, True where the entry is real: (N,T) for tokens,
    (N,) for the rows of one LSTM step. Padding positions are normalized with the same
    statistics (so the output is defined everywhere) but never contribute to them. Masked
    sums rather than boolean indexing: nothing waits on the host. With `stats_batch=k`,
    groups of k sequences, each over its own real tokens.
    """

    channel_dim = -1

    def __init__(self, num_features: int, stats_batch: int | None = None, **kwargs):
        super().__init__(num_features, **kwargs)
        self.stats_batch = stats_batch

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self._ghosted(x.shape[0]):
            return self._ghost_forward(x, mask)
        if mask is None or not self._uses_batch_stats():
            # Fast path: torch's own kernel over all positions as one (M, D) batch.
            shape = x.shape
            return super().forward(x.reshape(-1, shape[-1])).reshape(shape)
        return self._normalize(x, mask, x.shape[0], self.training and self.track_running_stats)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, stats_batch={self.stats_batch}"
