"""A small Transformer: a causal character decoder for text, a ViT for images.

The norm arrives as a factory for the (N,T,D) tokens layout; every norm module is called
with the padding mask (`norm(x, mask)`) so that BatchNorm can take its statistics from real
tokens only. `norm_position="pre"` (default) normalizes the input of each sub-layer and the
residual stream before the head (GPT-2); `"post"` normalizes after each residual sum (the
original Transformer), whose last norm already feeds the head.

Padding is always on the right and attention is causal, so a real token never attends to
a padding token: no key mask is needed, and padding positions affect nothing real.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from normbench.errors import UserError
from normbench.norms import NormFactory

RESIDUAL_INITS = ("default", "zero", "skipinit")


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, causal: bool):
        super().__init__()
        self.heads = heads
        self.causal = causal
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, T, D) -> (N, T, D)
        n, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        # (N, heads, T, D/heads)
        q, k, v = (z.view(n, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(y.transpose(1, 2).reshape(n, t, d))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: int, causal: bool,
                 make_norm: NormFactory, norm_position: str, gated: bool):
        super().__init__()
        self.pre = norm_position == "pre"
        self.norm1 = make_norm(width)
        self.attn = SelfAttention(width, heads, causal)
        self.norm2 = make_norm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(),
                                 nn.Linear(mlp_ratio * width, width))
        # SkipInit's gates: None keeps the branches as GPT-2 initializes them.
        self.attn_gate = nn.Parameter(torch.zeros(())) if gated else None
        self.mlp_gate = nn.Parameter(torch.zeros(())) if gated else None

    @staticmethod
    def _gated(branch: torch.Tensor, gate: nn.Parameter | None) -> torch.Tensor:
        return branch if gate is None else branch * gate

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.pre:
            x = x + self._gated(self.attn(self.norm1(x, mask)), self.attn_gate)
            return x + self._gated(self.mlp(self.norm2(x, mask)), self.mlp_gate)
        x = self.norm1(x + self._gated(self.attn(x), self.attn_gate), mask)
        return self.norm2(x + self._gated(self.mlp(x), self.mlp_gate), mask)


class Transformer(nn.Module):
    """`task="text"`: tokens (N,T) -> next-token logits (N,T,V), causal.
    `task="image"`: images (N,C,H,W) -> patches as tokens -> class logits (N,K)."""

    def __init__(self, make_norm: NormFactory, *, task: str, num_classes: int, context: int,
                 depth: int, width: int, heads: int, mlp_ratio: int, norm_position: str,
                 in_channels: int, image_size: int, patch_size: int, residual_init: str):
        super().__init__()
        if depth < 1:
            raise UserError(f"model.depth={depth} must be at least 1", "use model.depth=1 or more")
        if heads < 1 or width % heads:
            raise UserError(f"model.heads={heads} does not divide model.width={width}",
                            "choose model.heads among the divisors of model.width")
        if norm_position not in ("pre", "post"):
            raise UserError(f"model.norm_position={norm_position} is not known", "use pre or post")
        if residual_init not in RESIDUAL_INITS:
            raise UserError(f"model.residual_init={residual_init} is not known",
                            f"use {', '.join(RESIDUAL_INITS)}")
        self.task = task
        self.pre = norm_position == "pre"
        if task == "text":
            if context < 1:
                raise UserError("the Transformer needs a context length",
                                "set dataset.seq_len (or model.context) to 1 or more")
            self.embed = nn.Embedding(num_classes, width)
            n_positions = context
        else:
            if image_size % patch_size:
                raise UserError(f"model.patch_size={patch_size} does not divide the image size "
                                f"{image_size}", "choose a divisor, e.g. model.patch_size=4")
            self.embed = nn.Conv2d(in_channels, width, patch_size, stride=patch_size)
            n_positions = (image_size // patch_size) ** 2
        self.context = n_positions
        self.pos = nn.Parameter(torch.zeros(n_positions, width))
        self.blocks = nn.ModuleList(
            Block(width, heads, mlp_ratio, task == "text", make_norm, norm_position,
                  gated=residual_init != "default")
            for _ in range(depth))
        # Post-norm's last block already ends in a norm; a second one would be a no-op twin.
        self.norm_f = make_norm(width) if self.pre else None
        self.head = nn.Linear(width, num_classes)
        self._init_weights(depth)

    def _init_weights(self, depth: int):
        # GPT-2: N(0, 0.02), residual projections scaled down by sqrt(2 * depth).
        for name, p in self.named_parameters():
            if p.dim() >= 2 and "norm" not in name:
                residual = name.endswith(("proj.weight", "mlp.2.weight"))
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * depth) if residual else 0.02)
            elif name.endswith("bias") and "norm" not in name:
                nn.init.zeros_(p)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.task == "text":
            t = x.shape[1]
            if t > self.context:
                raise ValueError(f"sequence of {t} tokens exceeds the context of {self.context}")
            h = self.embed(x) + self.pos[:t]  # (N, T, D)
        else:
            h = self.embed(x).flatten(2).transpose(1, 2) + self.pos  # (N, patches, D)
        for block in self.blocks:
            h = block(h, mask)
        if self.norm_f is not None:
            h = self.norm_f(h, mask)
        if self.task == "image":
            return self.head(h.mean(dim=1))  # (N, K)
        return self.head(h)  # (N, T, V)
