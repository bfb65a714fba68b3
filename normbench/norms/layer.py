"""LayerNorm: statistics over every feature of one sample (one token or row), so the rest
of the batch and any padding never matter (the mask is accepted and ignored).

| layout | reduces over |
|--------|--------------|
| images (N,C,H,W) | C,H,W per sample |
| tokens (N,T,D), steps rows (N,D) | D per token / row |

LayerNorm on images follows the GroupNorm paper: one group holding all of C,H,W, with an
affine transform per channel. In the steps layout it has no per-step state, so `at(t)` is
the norm itself and a whole (N,T,D) sequence can be normalized in one call.
"""

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
)


@dataclass
class LayerNormOptions(EpsOptions, AffineOptions):
    """norm=layer (conf/norm/layer.yaml)."""


@register("layer", "images")
class ImageLayerNorm(Norm, nn.GroupNorm):
    Options = LayerNormOptions

    @classmethod
    def build(cls, spec: NormSpec, num_features: int, *, t_max=None) -> nn.Module:
        return drop_affine_parts(cls(1, num_features, eps=spec.eps, affine=has_affine(spec)),
                                 spec)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x)


@register("layer", "tokens", "steps")
class FeatureLayerNorm(Norm, nn.LayerNorm):
    """LayerNorm over the last axis D, for (..., D)."""

    Options = LayerNormOptions

    @classmethod
    def build(cls, spec: NormSpec, num_features: int, *, t_max=None) -> nn.Module:
        return drop_affine_parts(cls(num_features, eps=spec.eps,
                                     elementwise_affine=has_affine(spec)), spec)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x)
