"""The BatchNorm family, one class per layout (registered as norm `batch`):

| layout | class              | statistics per channel over                          |
|--------|--------------------|------------------------------------------------------|
| images | `GhostBatchNorm2d` | N,H,W (real pixels only when a mask is given)        |
| tokens | `TokenBatchNorm`   | the real (non-padding) tokens of the batch            |
| steps  | `TimeBatchNorm`    | the real rows of one time step, separately for each t |

- Ghost BatchNorm (`stats_batch=k`): in training the batch is split into groups of k
  consecutive samples and each group is normalized with its own statistics, as each of
  N/k devices would do with its own slice of the batch (Hoffer et al. 2017; the "batch size"
  of Wu & He 2018 is k). Every class here takes the option.
- Without a mask and without ghost groups, image BN is exactly torch's BatchNorm2d.
- Per time step (Cooijmans et al. 2016; the container is `normbench.norms.steps`): step
  t < T_max has its own statistics (a child `StepBatchNorm` named `tNN`); steps beyond
  reuse those of step T_max - 1. The scale gamma is shared across time and starts at 0.1
  (a unit scale saturates the LSTM's gates).

Momentum follows PyTorch: ``running = (1 - momentum) * running + momentum * batch`` with
0.1 by default. Keras/TensorFlow write the same update as ``running = m * running +
(1 - m) * batch``, so Keras' ``momentum=0.99`` is PyTorch's ``momentum=0.01``.

The statistics themselves live in `normbench.norms.stats`. Group g has n_g real entries per
channel, mean mu_g and biased variance v_g.

Degenerate groups. A group with fewer than 2 real entries has no variance (PyTorch refuses
such a batch). It is normalized with the moments pooled over all real entries of the whole
batch (what the other groups jointly see) when that pool has >= 2 entries; when even the
whole batch has fewer than 2 real entries, with the running statistics, as in eval (such a
group holds at most one real row; its padding is irrelevant). A degenerate group never
enters the running update. Nothing branches on tensor values: the choice is `torch.where`.

Running update, one per training forward (PyTorch momentum m), over the full groups with
>= 2 real entries, weighted by their real counts:

    running_mean = (1 - m) * running_mean + m * sum n_g mu_g / sum n_g
    running_var  = (1 - m) * running_var  + m * sum n_g v_g / sum (n_g - 1)

(the pooled within-group variance; with k equal to the batch and no mask, torch's update).
A batch without such a group leaves the running statistics and num_batches_tracked as they
are. An uneven tail group (an evaluation batch) never enters the update.

Collapsed channels. A channel whose variance in a group is negligible (<= 1e-4 eps,
`stats.COLLAPSE_RATIO`) normalizes to |x_hat| < 0.01 anyway: the layer outputs its
shift beta whatever the value. Such a group-channel is normalized to x_hat = 0 exactly
(1/sigma taken as 0): the output differs from the textbook formula by < 0.01 gamma, and the
backward pass no longer multiplies per-row gradients by 1/sqrt(eps), which in a recurrence
compounds over every step two rows share (groups of 2 rows with a common prefix).
In eval, the running variance of such a channel has decayed towards 0 while its running
mean lags the drifting constant, so eval would multiply that lag by 1/sqrt(eps).
`TokenBatchNorm` (and the per-step LSTM layers) therefore keep a boolean buffer
`collapsed`, set by each training batch with a valid group from its update target, and
in eval map a collapsed channel to x_hat = 0 (output beta): what training produced for it.
`GhostBatchNorm2d` keeps torch's eval path, and plain image BN stays torch's own forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from normbench.norms.options import AffineOptions, EpsOptions, option
from normbench.norms.registry import (
    Norm,
    NormSpec,
    drop_affine_parts,
    has_affine,
    register,
)
from normbench.norms.stats import (
    GroupStats,
    UpdateTarget,
    collapsed_channels,
    group_stats,
    per_channel,
    pooled_moments,
    update_target,
)
from normbench.norms.steps import PerStepNorm, SharedAffineStep
from normbench.norms.sync import synced_group_stats, synchronizing


@dataclass
class BatchNormOptions(EpsOptions, AffineOptions):
    """norm=batch (conf/norm/batch.yaml); norm=batch_renorm adds its clips."""

    momentum: float | None = option(
        0.1, "running = (1 - m) * running + m * batch, PyTorch's convention (Keras' momentum "
        "0.99 is 0.01 here); null: a cumulative average", low=0, high=1,
        why="; running = (1 - momentum) * running + momentum * batch, and null is a "
            "cumulative average")
    track_running_stats: bool = option(True, "keep running statistics for eval; false: eval "
                                             "normalizes with the batch's own")
    # No declared range: its check needs batch_size (config/checks.py, check_stats_batch).
    stats_batch: int | None = option(None, "ghost BN: statistics from groups of k samples (k "
                                           "divides batch_size); null: the whole batch")
    sync: bool = option(False, "several processes: statistics of the global batch "
                               "(synchronized BN); false: per device", unset_ok=True)


class _GhostStats:
    """Shared by the BatchNorm variants here: grouped training statistics and their update."""

    stats_batch: int | None
    sync: bool = False
    channel_dim: int

    def _uses_batch_stats(self) -> bool:
        return self.training or not self.track_running_stats

    def _ghosted(self, n: int) -> bool:
        return bool(self.stats_batch) and n > self.stats_batch and self._uses_batch_stats()

    def _group_size(self, n: int) -> int:
        return self.stats_batch if self._ghosted(n) else n

    def _synced(self) -> bool:
        """Training statistics pooled over every rank (`normbench.norms.sync`)."""
        return self.sync and self.training and synchronizing()

    def moments(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        """Population moments of all real entries of the batch, whatever the grouping:
        mean, biased variance (per channel) and the number of real entries N (0-d)."""
        with torch.no_grad():
            gs = group_stats(x.detach(), mask, x.shape[0], self.channel_dim)
            return per_channel(*pooled_moments(gs))

    def training_stats(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> UpdateTarget:
        """What this batch's running update moves towards (its valid groups, by counts)."""
        with torch.no_grad():
            gs = group_stats(x.detach(), mask, self._group_size(x.shape[0]), self.channel_dim)
            return update_target(gs)

    def _running_fallback(self, pool_mean, pool_var):
        """Mean, variance and a per-channel 'x_hat = 0' flag for a batch with < 2 real
        entries: the running statistics as eval uses them, or the pool without them."""
        if not self.track_running_stats or self.running_mean is None:
            return pool_mean, pool_var, torch.zeros_like(pool_mean, dtype=torch.bool)
        shape = pool_mean.shape
        collapsed = getattr(self, "collapsed", None)
        if collapsed is None:
            collapsed = torch.zeros_like(self.running_mean, dtype=torch.bool)
        return (self.running_mean.to(pool_mean.dtype).reshape(shape),
                self.running_var.to(pool_var.dtype).reshape(shape), collapsed.reshape(shape))

    def _group_moments(self, gs: GroupStats):
        """Mean, variance and a 'collapsed' flag per group (keepdim shapes): its own, else
        the batch's pool, else the running statistics."""
        pool_mean, pool_var, total = pooled_moments(gs)
        run_mean, run_var, run_collapsed = self._running_fallback(pool_mean, pool_var)
        pool_ok = total >= 2
        valid = gs.valid
        mean = torch.where(valid, gs.mean, torch.where(pool_ok, pool_mean, run_mean))
        var = torch.where(valid, gs.var, torch.where(pool_ok, pool_var, run_var))
        uses_running = ~valid & ~pool_ok
        collapsed = torch.where(uses_running, run_collapsed,
                                collapsed_channels(var, self.eps, mean))
        return mean, var, collapsed

    def _correction(self, mean, var, collapsed):
        """(r, d) with x_hat = (x - mean) / sigma * r + d, or None: plain BatchNorm. Called
        before the running update (Batch Renormalization overrides it)."""
        return None

    def _normalize(self, x: torch.Tensor, mask: torch.Tensor | None, k: int,
                   update: bool) -> torch.Tensor:
        gs = (synced_group_stats(x, mask, self.channel_dim) if self._synced()
              else group_stats(x, mask, k, self.channel_dim))
        mean, var, collapsed = self._group_moments(gs)
        # A collapsed channel gives x_hat = 0 exactly, without the 1/sqrt(eps) Jacobian that
        # would otherwise amplify the per-row gradients (module docstring).
        x_hat = (gs.xg - mean) * torch.where(collapsed, 0.0, torch.rsqrt(var + self.eps))
        correction = self._correction(mean, var, collapsed)
        if correction is not None:
            x_hat = x_hat * correction[0] + correction[1]
        if update:  # after the normalizers: a group that falls back on the running
            # statistics has no valid group beside it, so the update would be a no-op anyway
            with torch.no_grad():
                self._update_running(update_target(gs))
        return self._affine(gs.ungroup(x_hat).to(x.dtype))

    def _affine(self, y: torch.Tensor) -> torch.Tensor:
        shape = [1] * y.dim()
        shape[self.channel_dim] = -1
        # In the input's dtype (bf16 under autocast), as torch's own BatchNorm returns.
        if self.weight is not None:
            y = (y * self.weight.reshape(shape)).to(y.dtype)
        if self.bias is not None:
            y = (y + self.bias.reshape(shape)).to(y.dtype)
        return y

    @torch.no_grad()
    def _update_running(self, target: UpdateTarget) -> None:
        """One EMA step towards `target`, weighted by whether any group was valid (a weight
        of 0 leaves the buffers bit for bit as they were)."""
        valid = target.valid
        self.num_batches_tracked.add_(valid.to(self.num_batches_tracked.dtype))
        weight = valid.to(self.running_mean.dtype)
        if self.momentum is None:  # cumulative moving average, as in PyTorch
            weight = weight / self.num_batches_tracked.clamp(min=1)
        else:
            weight = weight * self.momentum
        self.running_mean.lerp_(target.mean.to(self.running_mean.dtype), weight)
        self.running_var.lerp_(target.unbiased_var.to(self.running_var.dtype), weight)
        collapsed = getattr(self, "collapsed", None)
        if collapsed is not None:
            collapsed.copy_(torch.where(valid, collapsed_channels(target.var, self.eps, target.mean),
                                        collapsed))


def _bn_options(spec: NormSpec) -> dict:
    return dict(eps=spec.eps, momentum=spec.momentum, affine=has_affine(spec),
                track_running_stats=spec.track_running_stats, stats_batch=spec.stats_batch,
                sync=bool(spec.sync))


class _BatchNormFamily(Norm):
    Options = BatchNormOptions

    @classmethod
    def build(cls, spec: NormSpec, num_features: int, *, t_max=None) -> nn.Module:
        return drop_affine_parts(cls(num_features, **_bn_options(spec)), spec)


@register("batch", "images")
class GhostBatchNorm2d(_BatchNormFamily, _GhostStats, nn.BatchNorm2d):
    """BatchNorm2d whose training statistics come from groups of `stats_batch` images, and
    from the real pixels (`mask`, (N,H,W)) when given; otherwise exactly torch's layer."""

    channel_dim = 1

    def __init__(self, num_features: int, stats_batch: int | None = None, sync: bool = False,
                 **kwargs):
        super().__init__(num_features, **kwargs)
        self.stats_batch, self.sync = stats_batch, sync

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if not self._uses_batch_stats() or (mask is None and not self._ghosted(x.shape[0])
                                            and not self._synced()):
            return super().forward(x)  # exactly torch's BatchNorm2d
        return self._normalize(x, mask, self._group_size(x.shape[0]),
                               self.training and self.track_running_stats)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, stats_batch={self.stats_batch}, sync={self.sync}"


@register("batch", "tokens")
class TokenBatchNorm(_BatchNormFamily, _GhostStats, nn.BatchNorm1d):
    """BatchNorm over channels-last input (N, ..., D) whose statistics come from real entries.

    ``mask`` has the shape of x without D, True where the entry is real: (N,T) for tokens,
    (N,) for the rows of one LSTM step. Padding positions are normalized with the same
    statistics (so the output is defined everywhere) but never contribute to them. Masked
    sums rather than boolean indexing: nothing waits on the host. With `stats_batch=k`,
    groups of k sequences, each over its own real tokens. Degenerate groups and collapsed
    channels as in the module docstring.
    """

    channel_dim = -1

    def __init__(self, num_features: int, stats_batch: int | None = None, sync: bool = False,
                 **kwargs):
        super().__init__(num_features, **kwargs)
        self.stats_batch, self.sync = stats_batch, sync
        if self.track_running_stats:
            self.register_buffer("collapsed", torch.zeros(num_features, dtype=torch.bool))
        else:
            self.collapsed = None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self._uses_batch_stats():
            return self._normalize(x, mask, self._group_size(x.shape[0]),
                                   self.training and self.track_running_stats)
        return self._eval_normalize(x)

    def _eval_normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Running statistics; a collapsed channel gives x_hat = 0 (its output is beta)."""
        inv_std = torch.rsqrt(self.running_var + self.eps)
        inv_std = torch.where(self.collapsed, torch.zeros_like(inv_std), inv_std)
        return self._affine((x - self.running_mean) * inv_std)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before `collapsed` existed: no channel is known collapsed.
        key = prefix + "collapsed"
        if self.collapsed is not None and key not in state_dict:
            state_dict[key] = torch.zeros_like(self.collapsed)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, stats_batch={self.stats_batch}, sync={self.sync}"


class StepBatchNorm(SharedAffineStep, TokenBatchNorm):
    """BatchNorm over the (N, D) rows of one time step; `mask` (N,) marks the real rows.

    Inside a `TimeBatchNorm` (its `owner`) the affine transform is the owner's, shared
    across time steps and applied here, after this step's normalization (the step's own
    affine is off), so that hooks on this layer see its real output.
    """


@register("batch", "steps")
class TimeBatchNorm(PerStepNorm):
    """Per-time-step BatchNorm statistics with one affine transform shared across time
    (`normbench.norms.steps`): step t < T_max has its own `StepBatchNorm` child `tNN`."""

    Options = BatchNormOptions
    step_class = StepBatchNorm
