"""Per-sample norms beyond layer/group: instance norm, and three that rescale without
re-centring (RMSNorm, FRN, DyT). No statistic crosses samples, so the rest of the batch and
any padding never matter (the mask is accepted and ignored).

| name     | images (N,C,H,W)                      | tokens (N,T,D) / steps (N,D) rows |
|----------|---------------------------------------|-----------------------------------|
| instance | (x - mean_HW) / sqrt(var_HW + eps)    | refused                           |
| rms      | x / sqrt(mean_CHW x^2 + eps)          | x / sqrt(mean_D x^2 + eps)        |
| frn      | x / sqrt(mean_HW x^2 + eps), then TLU | refused                           |
| dyt      | tanh(alpha x)                         | tanh(alpha x)                     |

each followed by gamma * y + beta per channel (RMSNorm: gamma only).

- InstanceNorm (Ulyanov et al. 2016, "Instance Normalization: The Missing Ingredient for
  Fast Stylization"): torch's InstanceNorm2d without running statistics, as the GroupNorm
  paper compares it (GN with one channel per group).
- RMSNorm (Zhang & Sennrich 2019, "Root Mean Square Layer Normalization"): LayerNorm
  without the mean. On images it reduces over C,H,W with gamma per channel, the convention
  of normbench's LayerNorm on images (GroupNorm paper).
- FRN (Singh & Krishnan 2020, "Filter Response Normalization Layer"): nu^2 = mean_HW x^2
  per sample and channel, y = gamma * x / sqrt(nu^2 + eps) + beta, then the thresholded
  linear unit z = max(y, tau) with a learned tau per channel (init 0) when `tlu` is set.
  As in the paper, FRN + TLU takes the place of norm + ReLU: the norm `activates`, and the
  ResNet leaves out the ReLU right after it. Keeping that ReLU would freeze tau: at tau = 0
  relu(max(y, tau)) passes no gradient to tau (relu'(0) = 0), and a tau below 0 is masked.
  Every FRN layer ends in its TLU, also the last of a residual branch (before the addition)
  and a projection shortcut's, where no ReLU follows (the paper's pre-activation ResNetV2
  has no such norm). `tlu=false` keeps the model's ReLU: FRN + ReLU, tau fixed at 0.
- DyT (Zhu et al. 2025, "Transformers without Normalization"): y = gamma * tanh(alpha x) +
  beta, alpha one learned scalar per layer starting at `alpha_init`; no statistics at all.

RMSNorm, FRN and DyT do not subtract a mean (`recentres = False`): the conv/linear in front
keeps its bias. Statistics are computed in at least float32; the output has the input's dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from normbench.norms.registry import (
    AFFINE_OPTIONS,
    Norm,
    NormSpec,
    affine_flags,
    drop_affine_parts,
    has_affine,
    register,
    unsupported,
)
from normbench.norms.stats import stats_dtype

unsupported("instance", "tokens", "it would normalize each feature over the positions of a "
            "sequence, so a causal model would see later tokens and the padding")
unsupported("instance", "steps", "an LSTM row has a single position per feature, nothing to "
            "normalize over")
unsupported("frn", "tokens", "a token has one position per channel, where x/sqrt(x^2+eps) is "
            "sign(x) (the paper's N=1 case)")
unsupported("frn", "steps", "an LSTM row has one position per channel, where x/sqrt(x^2+eps) "
            "is sign(x) (the paper's N=1 case)")


def _add_affine(module: nn.Module, num_features: int, scale: bool, center: bool) -> None:
    """gamma (`weight`, ones) and beta (`bias`, zeros) per channel; one switched off is None,
    not a frozen tensor, so that parameter counts say what is learned."""
    module.register_parameter("weight", nn.Parameter(torch.ones(num_features)) if scale else None)
    module.register_parameter("bias", nn.Parameter(torch.zeros(num_features)) if center else None)


def _per_channel(p: torch.Tensor, x: torch.Tensor, channel_axis: int) -> torch.Tensor:
    """A (C,) parameter shaped to broadcast over x's channel axis (1, or -1 for the last)."""
    return p if channel_axis == -1 else p.reshape(-1, *([1] * (x.dim() - 2)))


def _affine(y: torch.Tensor, module: nn.Module, channel_axis: int) -> torch.Tensor:
    """gamma * y + beta, in y's dtype (bf16 stays bf16, as torch's own norms return)."""
    if module.weight is not None:
        y = (y * _per_channel(module.weight, y, channel_axis)).to(y.dtype)
    if module.bias is not None:
        y = (y + _per_channel(module.bias, y, channel_axis)).to(y.dtype)
    return y


def _rms_scaled(x: torch.Tensor, dims: tuple[int, ...], eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2 over dims) + eps), reduced in at least float32 (a bf16 sum of
    squares over C*H*W entries loses most of its digits), returned in x's dtype."""
    xf = x.to(stats_dtype(x))
    return (xf * torch.rsqrt(xf.square().mean(dim=dims, keepdim=True) + eps)).to(x.dtype)


# ----------------------------------------------------------------------------- instance


@register("instance", "images")
class ImageInstanceNorm(Norm, nn.InstanceNorm2d):
    """Statistics over H,W per sample and channel; no running statistics (train = eval)."""

    options = frozenset({"eps"}) | AFFINE_OPTIONS
    nullable = AFFINE_OPTIONS

    @classmethod
    def build(cls, spec: NormSpec, num_features: int, *, t_max=None) -> nn.Module:
        return drop_affine_parts(cls(num_features, eps=spec.eps, affine=has_affine(spec),
                                     track_running_stats=False), spec)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x)


# ----------------------------------------------------------------------------- rms


class _RMSBuild(Norm):
    # RMSNorm has no beta, so no `center`: `affine` is the shorthand for `scale` alone.
    options = frozenset({"eps", "affine", "scale"})
    nullable = frozenset({"affine", "scale"})
    recentres = False


@register("rms", "tokens", "steps")
class FeatureRMSNorm(_RMSBuild, nn.RMSNorm):
    """torch's RMSNorm over the last axis D, for (..., D)."""

    @classmethod
    def build(cls, spec: NormSpec, num_features: int, *, t_max=None) -> nn.Module:
        return cls(num_features, eps=spec.eps, elementwise_affine=affine_flags(spec)[0])

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x)


@register("rms", "images")
class ImageRMSNorm(_RMSBuild, nn.Module):
    """RMS over C,H,W of each sample, gamma per channel."""

    def __init__(self, num_features: int, *, eps: float, scale: bool = True):
        super().__init__()
        self.num_features, self.eps = num_features, eps
        _add_affine(self, num_features, scale, center=False)

    @classmethod
    def build(cls, spec: NormSpec, num_features: int, *, t_max=None) -> nn.Module:
        return cls(num_features, eps=spec.eps, scale=affine_flags(spec)[0])

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return _affine(_rms_scaled(x, tuple(range(1, x.dim())), self.eps), self, 1)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, scale={self.weight is not None}"


# ----------------------------------------------------------------------------- frn


@register("frn", "images")
class FilterResponseNorm(Norm, nn.Module):
    """FRN over H,W of each sample and channel, then the TLU max(y, tau) if `tlu`."""

    options = frozenset({"eps", "tlu"}) | AFFINE_OPTIONS
    nullable = AFFINE_OPTIONS
    recentres = False

    def __init__(self, num_features: int, *, eps: float, tlu: bool = True, scale: bool = True,
                 center: bool = True):
        super().__init__()
        self.num_features, self.eps = num_features, eps
        _add_affine(self, num_features, scale, center)
        # tau starts at 0: max(y, 0), the ReLU the TLU generalizes.
        self.register_parameter("tau", nn.Parameter(torch.zeros(num_features)) if tlu else None)

    @classmethod
    def build(cls, spec: NormSpec, num_features: int, *, t_max=None) -> nn.Module:
        scale, center = affine_flags(spec)
        return cls(num_features, eps=spec.eps, tlu=spec.tlu, scale=scale, center=center)

    @classmethod
    def activates(cls, spec: NormSpec) -> bool:
        return bool(spec.tlu)  # the TLU replaces the ReLU after the norm

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        y = _affine(_rms_scaled(x, (2, 3), self.eps), self, 1)
        if self.tau is not None:
            y = torch.maximum(y, _per_channel(self.tau, y, 1).to(y.dtype))
        return y

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, tlu={self.tau is not None}"


# ----------------------------------------------------------------------------- dyt


class _DynamicTanh(Norm, nn.Module):
    """gamma * tanh(alpha x) + beta, gamma and beta per channel on `channel_axis`."""

    options = frozenset({"alpha_init"}) | AFFINE_OPTIONS
    nullable = AFFINE_OPTIONS
    recentres = False
    channel_axis = -1

    def __init__(self, num_features: int, *, alpha_init: float, scale: bool = True,
                 center: bool = True):
        super().__init__()
        self.num_features = num_features
        self.alpha = nn.Parameter(torch.full((1,), float(alpha_init)))  # one per layer
        _add_affine(self, num_features, scale, center)

    @classmethod
    def build(cls, spec: NormSpec, num_features: int, *, t_max=None) -> nn.Module:
        scale, center = affine_flags(spec)
        return cls(num_features, alpha_init=spec.alpha_init, scale=scale, center=center)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return _affine(torch.tanh(self.alpha * x).to(x.dtype), self, self.channel_axis)

    def extra_repr(self) -> str:
        return f"{self.num_features}, channel_axis={self.channel_axis}"


@register("dyt", "images")
class ImageDynamicTanh(_DynamicTanh):
    channel_axis = 1


@register("dyt", "tokens", "steps")
class FeatureDynamicTanh(_DynamicTanh):
    channel_axis = -1
