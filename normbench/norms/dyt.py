"""DyT (Zhu et al. 2025, "Transformers without Normalization"): y = gamma * tanh(alpha x) +
beta, alpha one learned scalar per layer starting at `alpha_init`; no statistics at all, so
train and eval agree and the batch never matters. No mean is subtracted (`recentres =
False`): the layer in front keeps its bias."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from normbench.norms.affine import add_affine, apply_affine
from normbench.norms.options import AffineOptions, option
from normbench.norms.registry import (
    Norm,
    NormSpec,
    affine_flags,
    register,
)


@dataclass
class DyTOptions(AffineOptions):
    """norm=dyt (conf/norm/dyt.yaml)."""

    alpha_init: float = option(0.5, "the learned scalar alpha starts here", low=0,
                               low_open=True)


class _DynamicTanh(Norm, nn.Module):
    """gamma * tanh(alpha x) + beta, gamma and beta per channel on `channel_axis`."""

    Options = DyTOptions
    recentres = False
    channel_axis = -1

    def __init__(self, num_features: int, *, alpha_init: float, scale: bool = True,
                 center: bool = True):
        super().__init__()
        self.num_features = num_features
        self.alpha = nn.Parameter(torch.full((1,), float(alpha_init)))  # one per layer
        add_affine(self, num_features, scale, center)

    @classmethod
    def build(cls, spec: NormSpec, num_features: int, *, t_max=None) -> nn.Module:
        scale, center = affine_flags(spec)
        return cls(num_features, alpha_init=spec.alpha_init, scale=scale, center=center)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return apply_affine(torch.tanh(self.alpha * x).to(x.dtype), self, self.channel_axis)

    def extra_repr(self) -> str:
        return f"{self.num_features}, channel_axis={self.channel_axis}"


@register("dyt", "images")
class ImageDynamicTanh(_DynamicTanh):
    channel_axis = 1


@register("dyt", "tokens", "steps")
class FeatureDynamicTanh(_DynamicTanh):
    channel_axis = -1
