"""RMSNorm (Zhang & Sennrich 2019, "Root Mean Square Layer Normalization"): LayerNorm without
the mean, x / sqrt(mean x^2 + eps), then gamma (no beta).

| layout | mean of x^2 over |
|--------|------------------|
| images (N,C,H,W) | C,H,W per sample, gamma per channel (normbench's LayerNorm convention) |
| tokens (N,T,D), steps rows (N,D) | D per token / row (torch's nn.RMSNorm) |

It does not subtract a mean (`recentres = False`): the conv/linear in front keeps its bias.
Statistics are computed in at least float32; the output has the input's dtype."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from normbench.norms.affine import add_affine, apply_affine
from normbench.norms.options import EpsOptions, option
from normbench.norms.registry import (
    Norm,
    NormSpec,
    affine_flags,
    register,
)
from normbench.norms.stats import stats_dtype


@dataclass
class RMSNormOptions(EpsOptions):
    """norm=rms (conf/norm/rms.yaml). RMSNorm has no beta, so no `center`: `affine` is the
    shorthand for `scale` alone."""

    affine: bool = option(True, "shorthand for scale (RMSNorm has no beta)", unset_ok=True)
    scale: bool = option(True, "the scale gamma", unset_ok=True)


def rms_scaled(x: torch.Tensor, dims: tuple[int, ...], eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2 over dims) + eps), reduced in at least float32 (a bf16 sum of
    squares over C*H*W entries loses most of its digits), returned in x's dtype."""
    xf = x.to(stats_dtype(x))
    return (xf * torch.rsqrt(xf.square().mean(dim=dims, keepdim=True) + eps)).to(x.dtype)


class _RMSBuild(Norm):
    Options = RMSNormOptions
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
        add_affine(self, num_features, scale, center=False)

    @classmethod
    def build(cls, spec: NormSpec, num_features: int, *, t_max=None) -> nn.Module:
        return cls(num_features, eps=spec.eps, scale=affine_flags(spec)[0])

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return apply_affine(rms_scaled(x, tuple(range(1, x.dim())), self.eps), self, 1)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, scale={self.weight is not None}"
