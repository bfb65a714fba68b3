"""Batch Renormalization (Ioffe 2017, "Batch Renormalization: Towards Reducing Minibatch
Dependence in Batch-Normalized Models", NeurIPS), registered as norm `batch_renorm`.

In training, per channel, with the batch's mean mu_B and sigma_B = sqrt(var_B + eps) (as
BatchNorm normalizes) and the running statistics mu, sigma = sqrt(running_var + eps) read
*before* this batch updates them:

    x_hat = (x - mu_B) / sigma_B * r + d
    r = stop_grad(clip(sigma_B / sigma, 1 / r_max, r_max))
    d = stop_grad(clip((mu_B - mu) / sigma, -d_max, d_max))
    y = gamma * x_hat + beta

Unclipped, x_hat = (x - mu) / sigma: the training output is the eval output, while the
gradient still flows through the batch statistics (scaled by r). The running update, eval
(running statistics), masks, ghost groups (`stats_batch`: each group its own mu_B, sigma_B
and so its own r, d), degenerate groups and collapsed channels are BatchNorm's
(`normbench.norms.batch`); a collapsed group-channel keeps x_hat = 0 (d = 0 there too), as
BatchNorm and its eval path give it. The classes subclass the BatchNorm ones, so the probes,
PreciseBN and the train/eval discrepancy read them as BatchNorm.

Schedule (the paper relaxes the clips gradually): with n the training batches the layer
has normalized so far (its `num_batches_tracked`, checkpointed, so a resumed run continues
the schedule exactly), r_max_t = 1 and d_max_t = 0 (plain BatchNorm) while n < relax_from,
then linear to `r_max` at n = r_max_by and to `d_max` at n = d_max_by, constant after.

With the evaluation switch `use_batch_stats` (val_batchstats, PreciseBN) r = 1 and d = 0:
the batch's own statistics, as BatchNorm. Without running statistics there is nothing to
correct towards: the layer is BatchNorm (the pre-flight refuses that configuration).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from normbench.norms.batch import (
    BatchNormOptions,
    GhostBatchNorm2d,
    TokenBatchNorm,
    _BatchNormFamily,
    _bn_options,
)
from normbench.norms.options import layer_options, option
from normbench.norms.registry import NormSpec, drop_affine_parts, register
from normbench.norms.stats import BatchStatsSwitch, collapsed_channels, stats_dtype
from normbench.norms.steps import PerStepNorm, SharedAffineStep


@dataclass
class BatchRenormOptions(BatchNormOptions):
    """norm=batch_renorm (conf/norm/batch_renorm.yaml): BatchNorm's options and the clips.
    The relaxation defaults are the paper's 5k / 40k / 25k ImageNet steps, scaled to runs of
    a few thousand steps."""

    r_max: float = option(3.0, "clip of r = sigma_B / sigma to [1/r_max, r_max]", low=1,
                          why=" (r is clipped to [1/r_max, r_max])")
    d_max: float = option(5.0, "clip of d = (mu_B - mu) / sigma to [-d_max, d_max]", low=0)
    relax_from: int = option(100, "training batches (of the layer) of plain BN (r_max 1, "
                                  "d_max 0) before the clips relax", low=0)
    r_max_by: int = option(800, "training batches by which r's clip has grown linearly to "
                                "r_max", low=0)
    d_max_by: int = option(500, "training batches by which d's clip has grown linearly to "
                                "d_max", low=0)


# The options Batch Renorm adds to BatchNorm's: what `build` passes on to the layer.
LIMITS = tuple(sorted(layer_options(BatchRenormOptions) - layer_options(BatchNormOptions)))


def _ramp(n: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """0 before `start`, 1 from `end` on, linear in between (a step at `start` if end <=
    start), as a 0-d tensor computed on the device."""
    if end <= start:
        return (n >= start).to(torch.float32)
    return ((n - start) / (end - start)).clamp(0, 1)


class _Renorm(_BatchNormFamily, BatchStatsSwitch):
    """r and d on top of a BatchNorm class of `normbench.norms.batch`."""

    Options = BatchRenormOptions

    def __init__(self, num_features: int, *, r_max: float = 1.0, d_max: float = 0.0,
                 relax_from: int = 0, r_max_by: int = 0, d_max_by: int = 0, **kwargs):
        super().__init__(num_features, **kwargs)
        self.r_max, self.d_max = float(r_max), float(d_max)
        self.relax_from, self.r_max_by, self.d_max_by = relax_from, r_max_by, d_max_by

    @classmethod
    def build(cls, spec: NormSpec, num_features: int, *, t_max=None) -> nn.Module:
        limits = {key: getattr(spec, key) for key in LIMITS}
        return drop_affine_parts(cls(num_features, **_bn_options(spec), **limits), spec)

    def _renorming(self) -> bool:
        return self.training and self.track_running_stats and not self.use_batch_stats

    def limits(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(r_max_t, d_max_t) for the next training batch, from the batches seen so far."""
        n = self.num_batches_tracked.to(torch.float32)
        r_max = 1 + (self.r_max - 1) * _ramp(n, self.relax_from, self.r_max_by)
        return r_max, self.d_max * _ramp(n, self.relax_from, self.d_max_by)

    @torch.no_grad()  # stop_grad: r and d are constants for the backward pass
    def factors(self, mean: torch.Tensor, var: torch.Tensor, shape) -> tuple[torch.Tensor,
                                                                            torch.Tensor]:
        """r and d for batch moments `mean`, biased `var` (the running statistics reshaped
        to `shape` to broadcast against them)."""
        mu = self.running_mean.to(mean.dtype).reshape(shape)
        sigma = torch.sqrt(self.running_var.to(var.dtype).reshape(shape) + self.eps)
        r_max, d_max = self.limits()
        r = torch.clamp(torch.sqrt(var + self.eps) / sigma, 1 / r_max, r_max)
        d = torch.clamp((mean - mu) / sigma, -d_max, d_max)
        return r, d

    def _correction(self, mean, var, collapsed):
        if not self._renorming():
            return None
        shape = [1] * mean.dim()  # the grouped view (G, k, ...): channels one axis later
        shape[self.channel_dim + 1 if self.channel_dim >= 0 else self.channel_dim] = -1
        r, d = self.factors(mean, var, shape)
        return r, torch.where(collapsed, 0.0, d)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, r_max={self.r_max}, d_max={self.d_max}, "
                f"relax_from={self.relax_from}, r_max_by={self.r_max_by}, "
                f"d_max_by={self.d_max_by}")


@register("batch_renorm", "images")
class BatchRenorm2d(_Renorm, GhostBatchNorm2d):
    """Batch Renorm on (N, C, H, W); plain batches go through torch's batch_norm kernel
    with r and d folded into its affine (gamma r, gamma d + beta), as BatchNorm2d does."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if (self._renorming() and mask is None and not self._ghosted(x.shape[0])
                and not self._synced()):
            return self._renorm_plain(x)
        return super().forward(x, mask)

    def _renorm_plain(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            var, mean = torch.var_mean(x.detach().to(stats_dtype(x)), dim=(0, 2, 3),
                                       correction=0)
        r, d = self.factors(mean, var, (-1,))  # before the kernel updates the buffers
        # A collapsed channel outputs beta, as on the grouped and masked paths (d = 0 there)
        d = torch.where(collapsed_channels(var, self.eps, mean), 0.0, d)
        self.num_batches_tracked.add_(1)
        # What nn.BatchNorm2d passes: momentum, or 1/n for a cumulative average (torch's own
        # forward reads the counter on the host there too).
        factor = self.momentum if self.momentum is not None else \
            1.0 / float(self.num_batches_tracked)
        gamma, beta = self.weight, self.bias
        weight = r if gamma is None else gamma * r
        bias = d if gamma is None else d * gamma
        if beta is not None:
            bias = bias + beta
        # gamma r and gamma d + beta stay in float32 under autocast, as BatchNorm2d's own
        return F.batch_norm(x, self.running_mean, self.running_var, weight, bias, True, factor,
                            self.eps)


@register("batch_renorm", "tokens")
class TokenBatchRenorm(_Renorm, TokenBatchNorm):
    """Batch Renorm over channels-last input (N, ..., D), statistics from real entries."""


class StepBatchRenorm(SharedAffineStep, TokenBatchRenorm):
    """Batch Renorm over the (N, D) rows of one time step (the owner's affine after it)."""


@register("batch_renorm", "steps")
class TimeBatchRenorm(PerStepNorm):
    """Per-time-step Batch Renorm: one `StepBatchRenorm` per step, one shared affine."""

    Options = BatchRenormOptions
    step_class = StepBatchRenorm
