"""Batch statistics of masked and grouped (ghost) BatchNorm, shared by the layers, the probes
and PreciseBN.

The batch (N samples) is split along dim 0 into groups of k consecutive samples (a last,
shorter group when k does not divide N). Group g has n_g real entries per channel (padding
masked out), biased mean mu_g, sum of squared deviations SS_g and biased variance
v_g = SS_g / n_g. A group is *valid* when n_g >= 2: a variance needs two values.

Three different questions have three different answers:

- `pooled_moments`: the population moments of all real entries of the batch (PreciseBN,
  ``act/in_*``), within-group plus between-group variance:
      N = sum n_g,  mean = sum n_g mu_g / N,  var = sum (SS_g + n_g (mu_g - mean)^2) / N.
- `update_target`: what the running statistics move towards (valid full groups only):
      mean = sum n_g mu_g / sum n_g,  unbiased var = sum SS_g / sum (n_g - 1),
  and the matching biased variance sum SS_g / sum n_g with the mean group size as count.
- the layer's own normalization (in `normbench.batchnorm`): each valid group with its own
  (mu_g, v_g).

Everything is computed with masked sums and `torch.where`, never boolean indexing or
`.item()`: no step waits on the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# A channel whose batch variance is at most COLLAPSE_RATIO * eps is normalized in training
# to |x_hat| = |x - mu| / sqrt(var + eps) <= sqrt(COLLAPSE_RATIO) * |x - mu| / sigma, i.e.
# under 0.01 of a standard deviation: BatchNorm outputs its shift beta there and the channel
# is constant as far as the layer can tell. Constant inputs (every row of a text batch
# starts with the same character) land at ~1e-14, far below; real features sit far above.
COLLAPSE_RATIO = 1e-4


@dataclass
class GroupStats:
    """Per-group statistics in the grouped view (G, k, ...) of the batch, with keepdim shapes:
    `count` and `updates` (G, 1, ..., 1), `mean` and `ss` (G, 1, .., C, .., 1)."""

    xg: torch.Tensor  # the batch as (G, k, ...), zero-padded to G * k samples
    count: torch.Tensor  # real entries per group (the same for every channel)
    mean: torch.Tensor  # biased mean (0 for a group without real entries)
    ss: torch.Tensor  # sum of squared deviations from the group's mean
    updates: torch.Tensor  # bool: a full group with >= 2 real entries (enters the update)
    n: int  # samples in the batch (before padding)

    @property
    def valid(self) -> torch.Tensor:
        return self.count >= 2

    @property
    def var(self) -> torch.Tensor:
        """Biased variance SS_g / n_g (0 for a group without real entries)."""
        return self.ss / self.count.clamp(min=1)

    def ungroup(self, y: torch.Tensor) -> torch.Tensor:
        """(G, k, ...) back to the batch's (N, ...), padding dropped."""
        return y.reshape(-1, *y.shape[2:])[:self.n]


@dataclass
class UpdateTarget:
    """What one training batch's running update moves towards ((C,) or 0-d tensors)."""

    mean: torch.Tensor  # sum n_g mu_g / sum n_g over the updating groups
    var: torch.Tensor  # biased scale: sum SS_g / sum n_g
    unbiased_var: torch.Tensor  # sum SS_g / sum (n_g - 1)
    count: torch.Tensor  # mean real entries per updating group: var * c / (c - 1) = unbiased
    valid: torch.Tensor  # bool: at least one group updates


def stats_dtype(x: torch.Tensor) -> torch.dtype:
    """At least float32 for sums over many entries."""
    return torch.promote_types(x.dtype, torch.float32)


def _real_weights(x: torch.Tensor, mask: torch.Tensor | None, pad: int, dtype,
                  channel_dim: int):
    """Entry weights (1 real, 0 padding) of x's shape with a channel axis of 1, followed by
    `pad` padded samples; None when every entry is real and nothing is padded."""
    if mask is not None:  # channels-last: (N, ..., 1)
        m = mask.to(dtype).unsqueeze(-1)
    elif pad:
        shape = list(x.shape)
        shape[channel_dim % x.dim()] = 1
        m = torch.ones(shape, dtype=dtype, device=x.device)
    else:
        return None
    if pad:
        m = torch.cat([m, m.new_zeros((pad,) + m.shape[1:])])
    return m


def group_stats(x: torch.Tensor, mask: torch.Tensor | None, k: int,
                channel_dim: int) -> GroupStats:
    """Statistics of groups of k samples of `x` over their real entries (two passes).

    `mask` (x.shape without the channel axis; channels-last layouts only) marks real entries;
    None: every entry is real. A last, shorter group is zero-padded to k samples whose
    weights are 0, so that every group is a slice of one (G, k, ...) view.
    """
    n = x.shape[0]
    groups = -(-n // k)
    pad = groups * k - n
    dtype = stats_dtype(x)
    xs = x.to(dtype)
    m = _real_weights(x, mask, pad, dtype, channel_dim)
    if pad:
        xs = torch.cat([xs, xs.new_zeros((pad,) + xs.shape[1:])])
    xg = xs.reshape(groups, k, *xs.shape[1:])
    cdim = channel_dim % x.dim() + 1
    dims = tuple(d for d in range(1, xg.dim()) if d != cdim)
    if m is None:
        per_group = xg[0].numel() / xg.shape[cdim]
        count = torch.full((groups,) + (1,) * (xg.dim() - 1), per_group, dtype=dtype,
                           device=x.device)
        mean = xg.mean(dims, keepdim=True)
        ss = (xg - mean).square().sum(dims, keepdim=True)
    else:
        mg = m.reshape(groups, k, *m.shape[1:])
        count = mg.sum(dims, keepdim=True)
        mean = (xg * mg).sum(dims, keepdim=True) / count.clamp(min=1)
        ss = ((xg - mean).square() * mg).sum(dims, keepdim=True)
    full = torch.arange(groups, device=x.device).reshape(count.shape) < n // k
    return GroupStats(xg, count, mean, ss, (count >= 2) & full, n)


def pooled_moments(gs: GroupStats):
    """Exact population moments of all real entries: mean, biased variance and N, with
    keepdim shapes (1, 1, .., C, ..) and (1, .., 1) (`per_channel` flattens them).

    var = sum_g (SS_g + n_g (mu_g - mean)^2) / N: within-group plus between-group spread.
    With N = 0 the mean and variance are 0 (and N says so).
    """
    if gs.count.shape[0] == 1:  # one group: it is the pool
        return gs.mean, gs.var, gs.count
    total = gs.count.sum(0, keepdim=True)
    mean = (gs.count * gs.mean).sum(0, keepdim=True) / total.clamp(min=1)
    between = gs.count * (gs.mean - mean).square()
    var = (gs.ss + between).sum(0, keepdim=True) / total.clamp(min=1)
    return mean, var, total


def per_channel(mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor):
    """Keepdim moments as (C,), (C,) and a 0-d count."""
    return mean.reshape(-1), var.reshape(-1), count.reshape(())


def update_target(gs: GroupStats) -> UpdateTarget:
    """The running-update target of one batch from its updating groups, by real counts.

    The variance is the pooled within-group estimator sum SS_g / sum (n_g - 1) rather than
    the count-weighted mean of each group's unbiased variance: SS_g / sigma^2 is chi^2 with
    n_g - 1 degrees of freedom, so weighting by degrees of freedom is the unbiased
    combination with the least variance, and a group of 2 real rows (one degree of
    freedom) does not count as much as a full one. With one group (k = batch, no mask) it
    is SS / (n - 1), torch's update.
    """
    w = gs.updates.to(gs.count.dtype)
    n = (w * gs.count).sum()
    groups = w.sum()
    ss = (w * gs.ss).sum(0).reshape(-1)
    mean = ((w * gs.count * gs.mean).sum(0) / n.clamp(min=1)).reshape(-1)
    dof = (w * (gs.count - 1)).sum()
    return UpdateTarget(mean=mean, var=ss / n.clamp(min=1), unbiased_var=ss / dof.clamp(min=1),
                        count=n / groups.clamp(min=1), valid=groups > 0)


def collapsed_channels(var: torch.Tensor, eps: float) -> torch.Tensor:
    """Channels whose (biased) batch variance is negligible against eps (COLLAPSE_RATIO)."""
    return var <= COLLAPSE_RATIO * eps
