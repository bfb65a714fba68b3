"""FRN (Singh & Krishnan 2020, "Filter Response Normalization Layer"): nu^2 = mean_HW x^2 per
sample and channel, y = gamma * x / sqrt(nu^2 + eps) + beta, then the thresholded linear
unit z = max(y, tau) with a learned tau per channel (init 0) when `tlu` is set.

As in the paper, FRN + TLU takes the place of norm + ReLU: the norm `activates`, and the
ResNet leaves out the ReLU right after it. Keeping that ReLU would freeze tau: at tau = 0
relu(max(y, tau)) passes no gradient to tau (relu'(0) = 0), and a tau below 0 is masked.
Every FRN layer ends in its TLU, also the last of a residual branch (before the addition)
and a projection shortcut's, where no ReLU follows (the paper's pre-activation ResNetV2
has no such norm). `tlu=false` keeps the model's ReLU: FRN + ReLU, tau fixed at 0.

Images only: a token or an LSTM row has one position per channel, where x/sqrt(x^2+eps) is
sign(x) (the paper's N=1 case). No mean is subtracted (`recentres = False`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from normbench.norms.affine import add_affine, apply_affine, channel_shaped
from normbench.norms.options import AffineOptions, EpsOptions, eps_option, option
from normbench.norms.registry import (
    Norm,
    NormSpec,
    affine_flags,
    register,
    unsupported,
)
from normbench.norms.rms import rms_scaled

unsupported("frn", "tokens", "a token has one position per channel, where x/sqrt(x^2+eps) is "
            "sign(x) (the paper's N=1 case)")
unsupported("frn", "steps", "an LSTM row has one position per channel, where x/sqrt(x^2+eps) "
            "is sign(x) (the paper's N=1 case)")


@dataclass
class FRNOptions(EpsOptions, AffineOptions):
    """norm=frn (conf/norm/frn.yaml)."""

    eps: float = eps_option(1e-6)
    tlu: bool = option(True, "thresholded linear unit max(y, tau) after the affine, in place "
                             "of the ReLU after the norm")


@register("frn", "images")
class FilterResponseNorm(Norm, nn.Module):
    """FRN over H,W of each sample and channel, then the TLU max(y, tau) if `tlu`."""

    Options = FRNOptions
    recentres = False

    def __init__(self, num_features: int, *, eps: float, tlu: bool = True, scale: bool = True,
                 center: bool = True):
        super().__init__()
        self.num_features, self.eps = num_features, eps
        add_affine(self, num_features, scale, center)
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
        y = apply_affine(rms_scaled(x, (2, 3), self.eps), self, 1)
        if self.tau is not None:
            y = torch.maximum(y, channel_shaped(self.tau, y, 1).to(y.dtype))
        return y

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, tlu={self.tau is not None}"
