"""Every BatchNorm statistic in one place: what the layers normalize with, what their running
update moves towards, and what the probes and PreciseBN measure.

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
- the layer's own normalization (in `normbench.norms.batch`): each valid group with its own
  (mu_g, v_g).

On top of these, per layer: `batch_moments` and `bn_training_stats` (the two questions
above asked of any BatchNorm layer, torch's own included), `bn_stat_gaps` and `bn_tid` (the
batch vs the running statistics), `pooled_stats` (a whole tensor's mean/std from per-channel
moments) and `Population` (PreciseBN's accumulated statistics). A norm with running
statistics that is no torch BatchNorm (PowerNorm) answers the same questions through the
`RunningStats` protocol; `BatchStatsSwitch` makes a layer normalize with batch statistics
where its training forward would not.

Momentum follows PyTorch: ``running = (1 - momentum) * running + momentum * batch``.
BatchNorm normalizes with the *biased* batch variance but stores the *unbiased* one in
``running_var`` (PyTorch's choice); the gaps and TID put it back on the biased scale.

Everything is computed with masked sums and `torch.where`, never boolean indexing or
`.item()`: no step waits on the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

# A channel whose batch variance is at most COLLAPSE_RATIO * eps is normalized in training
# to |x_hat| = |x - mu| / sqrt(var + eps) <= sqrt(COLLAPSE_RATIO) * |x - mu| / sigma, i.e.
# under 0.01 of a standard deviation: BatchNorm outputs its shift beta there and the channel
# is constant as far as the layer can tell. Constant inputs (every row of a text batch
# starts with the same character) land at ~1e-14, far below; real features sit far above.
COLLAPSE_RATIO = 1e-4
# The variance of a constant channel is not exactly 0 in floating point: the mean carries a
# rounding error of a few ulps of |mean|, so a large constant (|mean| ~ 1e3) shows a
# variance of ~1e-7 in float32. Anything under (ROUNDING_ULPS ulps of the mean)^2 is such
# rounding, not a spread of the data.
ROUNDING_ULPS = 16


@dataclass
class GroupStats:
    """Per-group statistics in the grouped view (G, k, ...) of the batch, with keepdim shapes:
    `count` and `updates` (G, 1, ..., 1), `mean` and `ss` (G, 1, .., C, .., 1)."""

    xg: torch.Tensor  # the batch as (G, k, ...), zero-padded to G * k samples, masked entries 0
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


def real_weights(x: torch.Tensor, mask: torch.Tensor | None, pad: int, dtype,
                  channel_dim: int):
    """Entry weights (1 real, 0 padding) of x's shape with a channel axis of 1, followed by
    `pad` padded samples; None when every entry is real and nothing is padded."""
    if mask is not None:  # the channel axis put back with size 1
        m = mask.to(dtype).unsqueeze(channel_dim % x.dim())
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

    `mask` (x.shape without the channel axis) marks real entries; None: every entry is
    real. A last, shorter group is zero-padded to k samples whose weights are 0, so that
    every group is a slice of one (G, k, ...) view.
    """
    n = x.shape[0]
    groups = -(-n // k)
    pad = groups * k - n
    dtype = stats_dtype(x)
    xs = x.to(dtype)
    m = real_weights(x, mask, pad, dtype, channel_dim)
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
        # Padding is replaced by 0, not only weighted by 0: an inf or NaN there (0 * inf =
        # NaN) must reach neither the statistics of the real entries nor their gradients
        # (the gradients of the variance and of gamma sum upstream * x_hat over every entry,
        # with 0 upstream at the padding). Padded outputs are those of a 0 input: finite.
        xg = torch.where(mg > 0, xg, 0.0)
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


def collapsed_channels(var: torch.Tensor, eps: float, mean: torch.Tensor) -> torch.Tensor:
    """Channels whose (biased) batch variance is negligible against eps (COLLAPSE_RATIO), or
    no larger than the rounding error of their mean (ROUNDING_ULPS)."""
    ulp = torch.finfo(var.dtype).eps
    return var <= COLLAPSE_RATIO * eps + (ROUNDING_ULPS * ulp * mean).square()


# ----------------------------------------------------------------------------- per layer


class BatchStatsSwitch:
    """`use_batch_stats = True` makes a norm whose training forward is not plain batch
    normalization (Batch Renorm's r and d, PowerNorm's running psi^2 after its warm-up)
    normalize with each batch's own statistics. The evaluation contexts that ask for batch
    statistics (val_batchstats, PreciseBN) set it, and restore it on exit; training mode
    alone would not do (it means r, d and the running psi^2)."""

    use_batch_stats: bool = False


class RunningStats(BatchStatsSwitch):
    """A norm with running statistics that is not a torch BatchNorm (PowerNorm's psi^2):
    what the probes, PreciseBN and val_batchstats ask of it. Torch's BatchNorm layers (and
    the BN family built on them) are read through running_mean and the unbiased running_var
    instead; every function below takes either.

    - `moments(x, mask)`: (mean, biased variance, count) of the real entries of an input
      (``act/in_*``; PreciseBN pools them into a `Population`);
    - `training_stats(x, mask)`: the `UpdateTarget` of this batch, on the statistic's own
      scale (the gaps and TID compare it with `running_moments()`);
    - `running_moments()`: the running statistics on that scale, as (mean, var);
    - `stored()`: the running buffers themselves by name ("mu", "var": the gap tags);
    - `population(pop)`: a PreciseBN `Population` in the form `stored()` holds it;
    - `centred`: whether a mean is subtracted (if not, there is no mean gap to report).
    """

    centred: ClassVar[bool] = False
    eps: float

    def moments(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        raise NotImplementedError

    def training_stats(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> UpdateTarget:
        raise NotImplementedError

    def running_moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def stored(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def population(self, pop: Population) -> dict[str, torch.Tensor]:
        raise NotImplementedError


def is_batchnorm(module: nn.Module) -> bool:
    """BatchNorm-like layers: the ones with batch statistics and running buffers."""
    if isinstance(module, RunningStats):
        return True
    return isinstance(module, _BatchNorm) and module.track_running_stats


def is_centred(module: nn.Module) -> bool:
    """Whether a BatchNorm-like layer subtracts a mean (the mean gaps mean something)."""
    return not isinstance(module, RunningStats) or module.centred


def running_moments(module: nn.Module, count: torch.Tensor):
    """The running statistics on the scale of a batch's biased ones: BatchNorm's
    running_var, the EMA of *unbiased* batch variances, times (n-1)/n (n clamped to 2 so
    that a batch without a valid group, whose gaps the probes discard, stays finite)."""
    if isinstance(module, RunningStats):
        return module.running_moments()
    count = count.clamp(min=2)
    return module.running_mean, module.running_var * (count - 1) / count


def stored_statistics(module: nn.Module) -> dict[str, torch.Tensor]:
    """The running buffers of a BatchNorm-like layer by name ("mu", "var")."""
    if isinstance(module, RunningStats):
        return module.stored()
    return {"mu": module.running_mean, "var": module.running_var}


def _plain_moments(x: torch.Tensor):
    """Biased mean/variance over every axis but the channel axis (1), and the count."""
    x = x.detach().to(stats_dtype(x))  # fp32 statistics of a bf16 activation
    dims = [0] + list(range(2, x.dim()))
    var, mean = torch.var_mean(x, dim=dims, correction=0)
    count = torch.tensor(float(x.numel() // x.shape[1]), device=x.device)
    return mean, var, count


def batch_moments(module: nn.Module, x: torch.Tensor, mask: torch.Tensor | None = None):
    """Population moments of the real entries of a BatchNorm layer's input `x`: biased mean
    and variance per channel, and the number of entries N (0-d).

    Under ghost BN these are the moments of the whole batch (within- plus between-group
    variance), not the groups' average: what PreciseBN pools and ``act/in_*`` reports.
    """
    if hasattr(module, "moments"):  # masked or ghost variants know their own statistics
        return module.moments(x, mask)
    return _plain_moments(x)


def bn_training_stats(module: nn.Module, x: torch.Tensor, mask: torch.Tensor | None = None):
    """What a BatchNorm layer's running update moves towards for batch `x`: mean, biased
    variance, entries per group and a 0-d bool `valid` (False: the layer skips the update,
    as for a step whose groups all have fewer than 2 real entries)."""
    if hasattr(module, "training_stats"):
        t = module.training_stats(x, mask)
        return t.mean, t.var, t.count, t.valid
    mean, var, count = _plain_moments(x)
    return mean, var, count, count >= 2


def bn_stat_gaps(module: nn.Module, mean_b, var_b, count):
    """Gaps between batch and running statistics, as 0-d tensors:
    ``dmu = ||mu_B - mu_run||_2 / d`` and ``dvar = ||var_B - var_run (n-1)/n||_2 / d``.

    `running_var` holds the EMA of *unbiased* batch variances; rescaling it by (n-1)/n
    puts it on the biased scale that BatchNorm normalizes with, so a layer whose batches
    all have the same statistics shows a gap of zero, whatever n is (`running_moments`;
    PowerNorm's psi^2 needs no rescale).
    """
    d = mean_b.numel()
    running_mean, running_var = running_moments(module, count)
    dmu = torch.linalg.vector_norm(mean_b - running_mean) / d
    dvar = torch.linalg.vector_norm(var_b - running_var) / d
    return dmu, dvar


def bn_tid(module: nn.Module, mean_b: torch.Tensor, var_b: torch.Tensor, count: torch.Tensor):
    """Training-inference discrepancy (Wang et al. 2022), as 0-d tensors, and its weight.

    ``tid_mu = mean_c |mu - mu_B| / sigma_B`` and ``tid_sigma = mean_c |sigma / sigma_B - 1|``
    with mu, sigma^2 the running statistics and mu_B, sigma_B^2 the biased batch statistics.
    Both sigmas include the layer's eps. The running variance is put on the biased scale of
    this batch (x (n-1)/n, as in `bn_stat_gaps`), so that identical batches give a gap of 0;
    eval mode divides by sqrt(running_var + eps) on the unbiased scale, larger by
    sqrt(n/(n-1)): negligible at thousands of entries, 1.22 at n = 3.
    The mean runs over live channels: a collapsed one (counted by ``bn_gap/degenerate``)
    outputs beta in training and eval alike, and its sigma_B = sqrt(eps) would turn any
    lag into a ratio of hundreds. The weight is 0 when every channel is collapsed.
    """
    running_mean, running_var = running_moments(module, count)
    sigma_b = torch.sqrt(var_b + module.eps)
    sigma = torch.sqrt(running_var + module.eps)
    live = (~collapsed_channels(var_b, module.eps, mean_b)).float()
    n_live = live.sum().clamp(min=1)
    tid_mu = ((running_mean - mean_b).abs() / sigma_b * live).sum() / n_live
    tid_sigma = ((sigma / sigma_b - 1).abs() * live).sum() / n_live
    return tid_mu, tid_sigma, live.sum() > 0


def bn_gap_values(module: nn.Module, x: torch.Tensor, mask: torch.Tensor | None = None):
    """``bn_gap/<stat>`` of one training call of a BatchNorm-like layer: {stat: (value,
    weight)}, the weight 0 where the call has nothing to measure (no valid group; no live
    channel for TID; no mean for dmu and tid_mu, as in PowerNorm)."""
    mean, var, count, valid = bn_training_stats(module, x, mask)
    dmu, dvar = bn_stat_gaps(module, mean, var, count)
    tid_mu, tid_sigma, any_live = bn_tid(module, mean, var, count)
    degenerate = collapsed_channels(var, module.eps, mean).sum()
    centred = is_centred(module)
    return {"dmu": (dmu, valid & centred), "dvar": (dvar, valid),
            "degenerate": (degenerate, valid), "tid_mu": (tid_mu, valid & any_live & centred),
            "tid_sigma": (tid_sigma, valid & any_live)}


def pooled_stats(mean_c: torch.Tensor, var_c: torch.Tensor) -> list[torch.Tensor]:
    """[mean, std] over all entries from per-channel biased moments of equal counts (what a
    BN hook has already computed, so a BN layer's input costs nothing more)."""
    mean = mean_c.mean()
    var = (var_c + mean_c.square()).mean() - mean.square()
    return [mean, var.clamp(min=0).sqrt()]


@dataclass
class Population:
    """PreciseBN statistics of one BN layer: mean, biased variance, number of entries."""

    mean: torch.Tensor
    var: torch.Tensor
    count: float

    @property
    def unbiased_var(self) -> torch.Tensor:
        """The variance on running_var's (unbiased) scale."""
        return self.var * self.count / max(self.count - 1, 1)
