"""Per-sample norms: statistics from each sample alone, so the rest of the batch and any
padding never matter (the mask is accepted and ignored). What each reduces over:

| name  | images (N,C,H,W)              | tokens (N,T,D) and steps (N,D) rows |
|-------|-------------------------------|-------------------------------------|
| layer | C,H,W per sample              | D per token / row                   |
| group | C/G channels x H,W per group  | D/G features per token / row, group |
| none  | identity                      | identity                            |

LayerNorm on images follows the GroupNorm paper: one group holding all of C,H,W, with an
affine transform per channel. In the steps layout these norms have no per-step state, so
`at(t)` is the norm itself and a whole (N,T,D) sequence can be normalized in one call.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from normbench.errors import UserError
from normbench.norms.registry import (
    AFFINE_OPTIONS,
    Norm,
    NormSpec,
    UnbuildableNorm,
    drop_affine_parts,
    has_affine,
    register,
)


@register("layer", "images")
class ImageLayerNorm(Norm, nn.GroupNorm):
    options = frozenset({"eps"}) | AFFINE_OPTIONS
    nullable = AFFINE_OPTIONS

    @classmethod
    def build(cls, spec: NormSpec, num_features: int, *, t_max=None) -> nn.Module:
        return drop_affine_parts(cls(1, num_features, eps=spec.eps, affine=has_affine(spec)),
                                 spec)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x)


@register("layer", "tokens", "steps")
class FeatureLayerNorm(Norm, nn.LayerNorm):
    """LayerNorm over the last axis D, for (..., D)."""

    options = frozenset({"eps"}) | AFFINE_OPTIONS
    nullable = AFFINE_OPTIONS

    @classmethod
    def build(cls, spec: NormSpec, num_features: int, *, t_max=None) -> nn.Module:
        return drop_affine_parts(cls(num_features, eps=spec.eps,
                                     elementwise_affine=has_affine(spec)), spec)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x)


class InvalidGroupNorm(UnbuildableNorm):
    """A GroupNorm whose num_groups does not divide its channels."""

    def __init__(self, num_features: int, num_groups: int):
        super().__init__(num_features)
        self.num_channels = num_features
        self.num_groups = num_groups

    def user_error(self, path: str, model: nn.Module) -> UserError:
        widths = sorted({m.num_channels for m in model.modules()
                         if isinstance(m, (InvalidGroupNorm, nn.GroupNorm))})
        common = math.gcd(*widths)
        divisors = [g for g in range(1, common + 1) if common % g == 0]
        return UserError(
            f"norm.num_groups={self.num_groups} does not divide the {self.num_channels} "
            f"channels of layer '{path}' (layer widths here: {', '.join(map(str, widths))})",
            f"choose norm.num_groups from {divisors}",
        )


class _GroupNormBuild(Norm):
    options = frozenset({"num_groups", "eps"}) | AFFINE_OPTIONS
    nullable = AFFINE_OPTIONS

    @classmethod
    def build(cls, spec: NormSpec, num_features: int, *, t_max=None) -> nn.Module:
        if num_features % spec.num_groups:
            return InvalidGroupNorm(num_features, spec.num_groups)
        return drop_affine_parts(cls(spec.num_groups, num_features, eps=spec.eps,
                                     affine=has_affine(spec)), spec)


@register("group", "images")
class ImageGroupNorm(_GroupNormBuild, nn.GroupNorm):
    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x)


@register("group", "tokens", "steps")
class FeatureGroupNorm(_GroupNormBuild, nn.GroupNorm):
    """GroupNorm over D/G features of each (..., D) row and group."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        shape = x.shape
        return super().forward(x.reshape(-1, shape[-1])).reshape(shape)


@register("none", "images", "tokens", "steps")
class Identity(Norm, nn.Module):
    """norm=none: the input unchanged; the layer in front keeps its bias."""

    recentres = False
    probed = False

    @classmethod
    def build(cls, spec: NormSpec, num_features: int, *, t_max=None) -> nn.Module:
        return cls()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return x
