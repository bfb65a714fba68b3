"""gamma and beta for the norms torch has no layer for (RMSNorm on images, FRN, DyT): per
channel, each one switched off is None rather than a frozen tensor, so that parameter
counts say what is learned."""

from __future__ import annotations

import torch
from torch import nn


def add_affine(module: nn.Module, num_features: int, scale: bool, center: bool) -> None:
    """gamma (`weight`, ones) and beta (`bias`, zeros) per channel; one switched off is None,
    not a frozen tensor, so that parameter counts say what is learned."""
    module.register_parameter("weight", nn.Parameter(torch.ones(num_features)) if scale else None)
    module.register_parameter("bias", nn.Parameter(torch.zeros(num_features)) if center else None)


def channel_shaped(p: torch.Tensor, x: torch.Tensor, channel_axis: int) -> torch.Tensor:
    """A (C,) parameter shaped to broadcast over x's channel axis (1, or -1 for the last)."""
    return p if channel_axis == -1 else p.reshape(-1, *([1] * (x.dim() - 2)))


def apply_affine(y: torch.Tensor, module: nn.Module, channel_axis: int) -> torch.Tensor:
    """gamma * y + beta, in y's dtype (bf16 stays bf16, as torch's own norms return)."""
    if module.weight is not None:
        y = (y * channel_shaped(module.weight, y, channel_axis)).to(y.dtype)
    if module.bias is not None:
        y = (y + channel_shaped(module.bias, y, channel_axis)).to(y.dtype)
    return y
