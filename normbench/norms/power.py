"""PowerNorm (Shen et al. 2020, "PowerNorm: Rethinking Batch Normalization in Transformers",
ICML; Algorithm 1), registered as norm `power` for images, tokens and LSTM steps.

No mean is subtracted. Per channel, the quadratic mean of the batch's real entries (N,H,W
for images; the real tokens; the real rows of one LSTM time step):

    psi_B^2 = mean(x^2)

Training step t, with PyTorch's momentum m (the paper's alpha = 1 - m):

    x_hat   = x / sqrt(psi_{t-1}^2 + eps)            the running statistic, not the batch's
    y       = gamma * x_hat + beta
    psi_t^2 = (1 - m) psi_{t-1}^2 + m psi_B^2

Backward, the approximate backpropagation through the running statistics, with
g = dL/dx_hat:

    g~    = g - nu_{t-1} * x_hat
    dL/dx = g~ / sqrt(psi_{t-1}^2 + eps)
    nu_t  = nu_{t-1} (1 - m Gamma) + m Lambda,   Gamma = mean(x_hat^2), Lambda = mean(g x_hat)

(means per channel over the batch's real entries; nu is a buffer, starting at 0). Eval:
x / sqrt(psi^2 + eps), then gamma and beta. psi^2 starts at 1.

Choices, and where the authors' code (github.com/sIncerass/powernorm) differs; Algorithm 1
is the reference here:
- Warm-up: the first `warmup_steps` training batches are normalized with their own psi_B^2,
  as the authors' code does. Their gradient is the exact gradient of x / sqrt(psi_B^2 +
  eps), which is the formula above with nu_{t-1} replaced by the batch's own Lambda; nu is
  updated meanwhile (as in the code), so it is warm when the running statistic takes over.
- The code's backward divides by the batch's sqrt(psi_B^2 + eps); Algorithm 1 by the
  running sqrt(psi_{t-1}^2 + eps) the forward used, as here.
- The code stores nu / (1 - alpha) (its g~ = g - (1 - alpha) nu' x_hat and nu' += mean(g~
  x_hat)): the same recursion.
- The code first divides each token by the quadratic mean of its own feature groups
  (GroupScaling1D); that is no part of Algorithm 1 and is left out.
- Padding: psi_B^2, Gamma and Lambda come from real entries only (masked sums); padding
  outputs are normalized alike but carry no nu term back, since nothing real depends on
  them. A batch without real entries is normalized with the running statistic and updates
  nothing.
- No ghost groups (`stats_batch`): the running statistic, not the batch, normalizes.

A layer called several times in one training forward (the last LSTM step past T_max)
updates psi^2 and nu once per call. For the probes, PreciseBN and val_batchstats the layer
is a `RunningStats` (`normbench.norms.stats`): the statistic is psi^2 with the mean fixed
at 0, and `use_batch_stats` normalizes with psi_B^2 whatever the mode.
"""

from __future__ import annotations

import math
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
    Population,
    RunningStats,
    UpdateTarget,
    group_stats,
    per_channel,
    pooled_moments,
    real_weights,
    stats_dtype,
)
from normbench.norms.steps import PerStepNorm, SharedAffineStep


@dataclass
class PowerNormOptions(EpsOptions, AffineOptions):
    """norm=power (conf/norm/power.yaml)."""

    momentum: float = option(0.1, "psi2 = (1 - m) * psi2 + m * psi2_B, PyTorch's convention "
                                  "(the paper's alpha = 1 - m)", low=0, high=1,
                             why="; psi2 = (1 - momentum) * psi2 + momentum * psi2_B")
    warmup_steps: int = option(100, "training batches normalized with their own statistics "
                                    "first", low=0)


class _ApproxBackprop(torch.autograd.Function):
    """x -> x_hat = x * inv, with the backward of Algorithm 1 (module docstring).

    `weights` (x's shape with a channel axis of 1; None: all real) mark real entries,
    `own` (0-d bool) says x was normalized with its own psi_B^2 (exact gradient), `nu` is
    the layer's buffer, updated in place when `update` (training).
    """

    @staticmethod
    def forward(ctx, x, inv, weights, own, nu, momentum: float, update: bool, dims):
        x_hat = x * inv
        ctx.save_for_backward(x_hat, inv, weights, own)
        ctx.nu, ctx.momentum, ctx.update, ctx.dims = nu, momentum, update, dims
        return x_hat

    @staticmethod
    def backward(ctx, g):
        x_hat, inv, weights, own = ctx.saved_tensors
        dims = ctx.dims
        if weights is None:
            real, g_real, count = x_hat, g, math.prod(x_hat.shape[d] for d in dims)
        else:  # padding (whatever it holds) never reaches Gamma or Lambda
            real = torch.where(weights > 0, x_hat, 0.0)
            g_real = torch.where(weights > 0, g, 0.0)
            count = weights.sum().clamp(min=1)
        lam = (g_real * real).sum(dims, keepdim=True) / count
        gam = real.square().sum(dims, keepdim=True) / count
        nu = ctx.nu.to(g.dtype).reshape(lam.shape)
        coef = torch.where(own, lam, nu)  # warm-up: the exact gradient through psi_B^2
        dx = (g - coef * real) * inv
        if ctx.update:
            m = ctx.momentum
            ctx.nu.mul_(1 - m * gam.reshape(-1)).add_(m * lam.reshape(-1))
        return dx, None, None, None, None, None, None, None


class _PowerNorm(RunningStats, Norm, nn.Module):
    """PowerNorm over the channel axis `channel_dim` of its input."""

    Options = PowerNormOptions
    recentres = False
    channel_dim: int

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1,
                 warmup_steps: int = 0, affine: bool = True):
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.warmup_steps = warmup_steps
        self.weight = nn.Parameter(torch.ones(num_features)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_features)) if affine else None
        self.register_buffer("running_psi2", torch.ones(num_features))
        self.register_buffer("nu", torch.zeros(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    @classmethod
    def build(cls, spec: NormSpec, num_features: int, *, t_max=None) -> nn.Module:
        module = cls(num_features, eps=spec.eps, momentum=spec.momentum,
                     warmup_steps=spec.warmup_steps, affine=has_affine(spec))
        return drop_affine_parts(module, spec)

    def _shape(self, x: torch.Tensor) -> list[int]:
        shape = [1] * x.dim()
        shape[self.channel_dim] = -1
        return shape

    def _dims(self, x: torch.Tensor) -> tuple[int, ...]:
        return tuple(d for d in range(x.dim()) if d != self.channel_dim % x.dim())

    def quadratic_mean(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        """psi_B^2 per channel over the real entries, and their number (0-d)."""
        dtype = stats_dtype(x)
        xs, dims = x.detach().to(dtype), self._dims(x)
        weights = real_weights(x, mask, 0, dtype, self.channel_dim)
        if weights is None:
            count = torch.full((), xs.numel() / xs.shape[self.channel_dim], dtype=dtype,
                               device=x.device)
            return xs.square().mean(dims), count
        count = weights.sum()
        real = torch.where(weights > 0, xs, 0.0)  # an inf in the padding stays out
        return (real.square() * weights).sum(dims) / count.clamp(min=1), count

    # -- forward ------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.training or self.use_batch_stats:
            x_hat = self._batch_normalize(x, mask)
        else:
            inv = torch.rsqrt(self.running_psi2 + self.eps).reshape(self._shape(x))
            x_hat = (x * inv).to(x.dtype)
        shape = self._shape(x)
        if self.weight is not None:
            x_hat = x_hat * self.weight.reshape(shape)
        if self.bias is not None:
            x_hat = x_hat + self.bias.reshape(shape)
        return x_hat.to(x.dtype)

    def _batch_normalize(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        with torch.no_grad():
            psi2_b, count = self.quadratic_mean(x, mask)
            valid = count > 0
            own = valid if self.use_batch_stats else \
                valid & (self.num_batches_tracked < self.warmup_steps)
            psi2 = torch.where(own, psi2_b, self.running_psi2.to(psi2_b.dtype))
            inv = torch.rsqrt(psi2 + self.eps).reshape(self._shape(x))
        dtype = stats_dtype(x)
        weights = real_weights(x, mask, 0, dtype, self.channel_dim)
        x_hat = _ApproxBackprop.apply(x.to(dtype), inv, weights, own, self.nu, self.momentum,
                                      self.training, self._dims(x))
        if self.training:  # after normalizing: the forward uses psi_{t-1}^2
            with torch.no_grad():
                self.running_psi2.lerp_(psi2_b.to(self.running_psi2.dtype),
                                        valid.to(self.running_psi2.dtype) * self.momentum)
                self.num_batches_tracked.add_(valid.to(self.num_batches_tracked.dtype))
        return x_hat.to(x.dtype)

    # -- RunningStats: what the probes, PreciseBN and val_batchstats read --------------------

    def moments(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        """The input's real mean and biased variance (``act/in_*``; PreciseBN pools them
        and `population` turns them into the quadratic mean)."""
        with torch.no_grad():
            gs = group_stats(x.detach(), mask, x.shape[0], self.channel_dim)
            return per_channel(*pooled_moments(gs))

    def training_stats(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> UpdateTarget:
        psi2_b, count = self.quadratic_mean(x, mask)
        return UpdateTarget(mean=torch.zeros_like(psi2_b), var=psi2_b, unbiased_var=psi2_b,
                            count=count, valid=count > 0)

    def running_moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros_like(self.running_psi2), self.running_psi2

    def stored(self) -> dict[str, torch.Tensor]:
        return {"var": self.running_psi2}

    def population(self, pop: Population) -> dict[str, torch.Tensor]:
        # mean(x^2) = var + mean^2 over all the entries pooled; no (n-1)/n: not a variance
        return {"var": pop.var + pop.mean.square()}

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"warmup_steps={self.warmup_steps}")


@register("power", "images")
class PowerNorm2d(_PowerNorm):
    """PowerNorm on (N, C, H, W): psi_B^2 over N,H,W (real pixels when masked)."""

    channel_dim = 1


@register("power", "tokens")
class TokenPowerNorm(_PowerNorm):
    """PowerNorm over channels-last input (N, ..., D): psi_B^2 over the real entries."""

    channel_dim = -1


class StepPowerNorm(SharedAffineStep, TokenPowerNorm):
    """PowerNorm over the (N, D) rows of one time step (the owner's affine after it)."""


@register("power", "steps")
class TimePowerNorm(PerStepNorm):
    """Per-time-step PowerNorm: one `StepPowerNorm` per step, one shared affine."""

    Options = PowerNormOptions
    recentres = False
    step_class = StepPowerNorm
