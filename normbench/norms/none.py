"""norm=none: the identity, the baseline without normalization. It re-centres nothing, so the
layer in front keeps its bias, and the probes skip it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from normbench.norms.options import NormOptions
from normbench.norms.registry import Norm, NormSpec, register


@dataclass
class NoNormOptions(NormOptions):
    """norm=none (conf/norm/none.yaml): nothing but what every norm config has."""


@register("none", "images", "tokens", "steps")
class Identity(Norm, nn.Module):
    """norm=none: the input unchanged; the layer in front keeps its bias."""

    Options = NoNormOptions
    recentres = False
    probed = False

    @classmethod
    def build(cls, spec: NormSpec, num_features: int, *, t_max=None) -> nn.Module:
        return cls()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return x
