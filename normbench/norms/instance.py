"""InstanceNorm (Ulyanov et al. 2016, "Instance Normalization: The Missing Ingredient for Fast
Stylization"): (x - mean_HW) / sqrt(var_HW + eps) per sample and channel, then gamma and
beta per channel. torch's InstanceNorm2d without running statistics, as the GroupNorm paper
compares it (GN with one channel per group). Images only: on tokens it would normalize each
feature over a sequence's positions (a causal model would see later tokens and the
padding); an LSTM row has a single position per feature."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from normbench.norms.options import AffineOptions, EpsOptions
from normbench.norms.registry import (
    Norm,
    NormSpec,
    drop_affine_parts,
    has_affine,
    register,
    unsupported,
)

unsupported("instance", "tokens", "it would normalize each feature over the positions of a "
            "sequence, so a causal model would see later tokens and the padding")
unsupported("instance", "steps", "an LSTM row has a single position per feature, nothing to "
            "normalize over")


@dataclass
class InstanceNormOptions(EpsOptions, AffineOptions):
    """norm=instance (conf/norm/instance.yaml)."""


@register("instance", "images")
class ImageInstanceNorm(Norm, nn.InstanceNorm2d):
    """Statistics over H,W per sample and channel; no running statistics (train = eval)."""

    Options = InstanceNormOptions

    @classmethod
    def build(cls, spec: NormSpec, num_features: int, *, t_max=None) -> nn.Module:
        return drop_affine_parts(cls(num_features, eps=spec.eps, affine=has_affine(spec),
                                     track_running_stats=False), spec)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x)
