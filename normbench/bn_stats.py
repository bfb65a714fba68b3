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
    """Per-group statistics; `count` and `updates` are (G, 1), `mean` and `ss` (G, C)."""

    count: torch.Tensor  # real entries per group (the same for every channel)
    mean: torch.Tensor  # biased mean (0 for a group without real entries)
    ss: torch.Tensor  # sum of squared deviations from the group's mean
    updates: torch.Tensor  # bool: a full group with >= 2 real entries (enters the update)
    k: int  # samples per group (the last group may be shorter)

    @property
    def valid(self) -> torch.Tensor:
        return self.count >= 2

    @property
    def var(self) -> torch.Tensor:
        """Biased variance SS_g / n_g (0 for a group without real entries)."""
        return self.ss / self.count.clamp(min=1)


@dataclass
class UpdateTarget:
    """What one training batch's running update moves towards (all 0-d or (C,) tensors)."""

    mean: torch.Tensor  # sum n_g mu_g / sum n_g over the updating groups
    var: torch.Tensor  # biased scale: sum SS_g / sum n_g
    unbiased_var: torch.Tensor  # sum SS_g / sum (n_g - 1)
    count: torch.Tensor  # mean real entries per updating group: var * c / (c - 1) = unbiased
    valid: torch.Tensor  # bool: at least one group updates


def reduced_dims(x: torch.Tensor, channel_dim: int) -> tuple[int, ...]:
    """The axes a BatchNorm reduces over besides the batch axis."""
    cdim = channel_dim % x.dim()
    return tuple(d for d in range(1, x.dim()) if d != cdim)


def per_sample_view(t: torch.Tensor, x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """(N, C) values reshaped to broadcast against x (channel axis at `channel_dim`)."""
    shape = [1] * x.dim()
    shape[0] = t.shape[0]
    shape[channel_dim % x.dim()] = t.shape[1]
    return t.reshape(shape)


def group_sum(s: torch.Tensor, k: int) -> torch.Tensor:
    """(N, C) per-sample sums -> (G, C) per-group sums; a tail of N mod k is one group."""
    n = s.shape[0]
    full = n - n % k
    head = s[:full].reshape(full // k, k, s.shape[1]).sum(1)
    if full == n:
        return head
    return torch.cat([head, s[full:].sum(0, keepdim=True)])


def expand_groups(g: torch.Tensor, k: int, n: int) -> torch.Tensor:
    """(G, C) per-group values -> (N, C): each sample gets its group's value."""
    full = n - n % k
    head = g[:full // k].repeat_interleave(k, dim=0)
    if full == n:
        return head
    return torch.cat([head, g[full // k:].expand(n - full, g.shape[1])])


def stats_dtype(x: torch.Tensor) -> torch.dtype:
    """At least float32 for sums over many entries."""
    return torch.promote_types(x.dtype, torch.float32)


def group_stats(x: torch.Tensor, mask: torch.Tensor | None, k: int,
                channel_dim: int) -> GroupStats:
    """Statistics of groups of k samples of `x` over their real entries (two passes).

    `mask` (x.shape without the channel axis; channels-last layouts only) marks real entries;
    None: every entry is real.
    """
    n = x.shape[0]
    dims = reduced_dims(x, channel_dim)
    dtype = stats_dtype(x)
    xs = x.to(dtype)
    if mask is None:
        m = None
        per_sample = xs[0].numel() / xs.shape[channel_dim % x.dim()]
        count_s = torch.full((n, 1), per_sample, dtype=dtype, device=x.device)
        sum_s = xs.sum(dims) if dims else xs
    else:
        m = mask.to(dtype).unsqueeze(-1)
        count_s = m.sum(dims) if dims else m
        sum_s = (xs * m).sum(dims) if dims else xs * m
    count = group_sum(count_s, k)
    mean = group_sum(sum_s, k) / count.clamp(min=1)
    dev = (xs - per_sample_view(expand_groups(mean, k, n), x, channel_dim)).square()
    if m is not None:
        dev = dev * m
    ss = group_sum(dev.sum(dims) if dims else dev, k)
    full = torch.arange(count.shape[0], device=x.device).unsqueeze(1) < n // k
    return GroupStats(count, mean, ss, (count >= 2) & full, k)


def pooled_moments(gs: GroupStats):
    """Exact population moments of all real entries: mean, biased variance (C,), and N (0-d).

    var = sum_g (SS_g + n_g (mu_g - mean)^2) / N: within-group plus between-group spread.
    With N = 0 the mean and variance are 0 (and N says so).
    """
    total = gs.count.sum()
    mean = (gs.count * gs.mean).sum(0) / total.clamp(min=1)
    between = gs.count * (gs.mean - mean).square()
    var = (gs.ss + between).sum(0) / total.clamp(min=1)
    return mean, var, total


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
    ss = (w * gs.ss).sum(0)
    mean = (w * gs.count * gs.mean).sum(0) / n.clamp(min=1)
    dof = (w * (gs.count - 1)).sum()
    return UpdateTarget(mean=mean, var=ss / n.clamp(min=1), unbiased_var=ss / dof.clamp(min=1),
                        count=n / groups.clamp(min=1), valid=groups > 0)


def collapsed_channels(var: torch.Tensor, eps: float) -> torch.Tensor:
    """Channels whose (biased) batch variance is negligible against eps (COLLAPSE_RATIO)."""
    return var <= COLLAPSE_RATIO * eps
