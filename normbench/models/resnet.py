"""CIFAR ResNet (He et al. 2016, section 4.2): 6n+2 layers in three stages of n blocks.

Widths are 16, 32, 64 times `width`; the first block of stages 2 and 3 halves the
resolution. The norm arrives as a factory `make_norm(channels)` for the images layout,
resolved once by the caller, and is passed down unchanged (torchvision's `norm_layer`
pattern). `conv_bias` is the factory's `not recentres`: a norm that re-centres its input
cancels any bias of the conv in front of it. A norm that ends in an activation of its own
(FRN's TLU, the factory's `activates`) takes the place of the ReLU right after it; the ReLU
after each residual addition stays.

`residual_init` is how each block's residual branch (conv-norm-relu-conv-norm) starts:

- `default`: every layer initialized alike (He et al. 2015 for the convs, gamma 1), the
  branches at full scale from the start.
- `zero`: the branch computes zero at initialization, so every block starts as its
  shortcut and the network as a shallow one (Goyal et al. 2017; torchvision's
  `zero_init_residual`; De & Smith 2020). Where the branch's last norm learns a scale
  gamma, that gamma starts at 0; where it has none (norm=none, norm=weight, affine=false or
  scale=false) the branch is multiplied by a learned scalar gate that starts at 0 (SkipInit,
  De & Smith 2020). It keeps norm=none and norm=weight finite at the default lr, where the
  sum of 3n unnormalized full-scale branches blows up within a few steps; the branches
  then open slowly, so a short run learns less than with `default` (not the default).
- `skipinit`: the scalar gate at 0 on every branch, whatever the norm, its gamma left at 1:
  the same parameters under every norm.

A gate is skipped, not zeroed, where a gamma does the job, so `zero` adds no parameter to a
model whose norm learns a scale. Zeroing the branch's last conv instead would stall under
weight normalization (w = g v / ||v|| has no direction at v = 0), hence the gate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from normbench.errors import UserError
from normbench.norms import NormFactory

RESIDUAL_INITS = ("default", "zero", "skipinit")


def conv3x3(cin: int, cout: int, stride: int, bias: bool) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=bias)


def relu_after(make_norm: NormFactory, inplace: bool = False) -> nn.Module:
    """The ReLU that follows a norm, or nothing where the norm's own activation replaces it
    (FRN + TLU in place of BN + ReLU, as in the FRN paper)."""
    return nn.Identity() if make_norm.activates else nn.ReLU(inplace=inplace)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, make_norm: NormFactory,
                 conv_bias: bool, shortcut: str, residual_init: str):
        super().__init__()
        self.conv1 = conv3x3(cin, cout, stride, conv_bias)
        self.norm1 = make_norm(cout)
        self.act1 = relu_after(make_norm)
        self.conv2 = conv3x3(cout, cout, 1, conv_bias)
        self.norm2 = make_norm(cout)
        self.shortcut = None
        self.pad_channels = 0
        if stride != 1 or cin != cout:
            if shortcut == "conv":  # option B: 1x1 projection
                self.shortcut = nn.Sequential(
                    nn.Conv2d(cin, cout, 1, stride=stride, bias=conv_bias), make_norm(cout))
            else:  # option A, the paper's CIFAR choice: subsample, zero-pad channels
                self.pad_channels = cout - cin
        self.stride = stride
        # The branch's scale at initialization: a scalar gate where there is no gamma to
        # zero (or everywhere, for skipinit); None keeps the block as He et al. wrote it.
        no_gamma = getattr(self.norm2, "weight", None) is None
        gated = residual_init == "skipinit" or (residual_init == "zero" and no_gamma)
        self.gate = nn.Parameter(torch.zeros(())) if gated else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        if self.gate is not None:
            out = out * self.gate
        if self.shortcut is not None:
            identity = self.shortcut(x)
        elif self.stride != 1 or self.pad_channels:
            identity = x[:, :, :: self.stride, :: self.stride]
            half = self.pad_channels // 2
            identity = F.pad(identity, (0, 0, 0, 0, half, self.pad_channels - half))
        else:
            identity = x
        return F.relu(out + identity)


class CifarResNet(nn.Module):
    def __init__(self, make_norm: NormFactory, *, depth: int, width: int, num_classes: int,
                 in_channels: int, conv_bias: bool, shortcut: str, residual_init: str):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise UserError(f"model.depth={depth} is not of the form 6n+2",
                            "use 20, 32, 44, 56, 110 or any 6n+2 >= 8")
        if width < 1:
            raise UserError(f"model.width={width} must be >= 1", "use model.width=1 or more")
        if shortcut not in ("pad", "conv"):
            raise UserError(f"model.shortcut={shortcut} is not known", "use pad or conv")
        if residual_init not in RESIDUAL_INITS:
            raise UserError(f"model.residual_init={residual_init} is not known",
                            f"use {', '.join(RESIDUAL_INITS)}")
        n = (depth - 2) // 6
        widths = [16 * width, 32 * width, 64 * width]
        self.stem = nn.Sequential(conv3x3(in_channels, widths[0], 1, conv_bias),
                                  make_norm(widths[0]), relu_after(make_norm, inplace=True))
        blocks, cin = [], widths[0]
        for stage, cout in enumerate(widths):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(cin, cout, stride, make_norm, conv_bias, shortcut,
                                         residual_init))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, num_classes)
        self._init_weights(residual_init)

    def _init_weights(self, residual_init: str):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if residual_init == "zero":
            # Each residual branch starts as zero, so the network starts shallow (Goyal et
            # al. 2017; the GroupNorm paper does the same for BN and GN alike); a gated
            # block's gate is already 0.
            for block in self.blocks:
                if block.gate is None:
                    nn.init.zeros_(block.norm2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, classes)
        x = self.blocks(self.stem(x))
        return self.head(x.mean(dim=(2, 3)))
