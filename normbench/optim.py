"""Optimizers and learning-rate schedules from plain options."""

from __future__ import annotations

import math

import torch
from torch import nn

from normbench.errors import UserError

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "constant")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices and kernels only, not on norm scales/shifts or biases.

    Decaying a norm's scale changes what the norm does, which would confound a comparison
    between norms; matrices and kernels are decayed alike under every norm.
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, lr: float, name: str = "sgd", weight_decay: float = 0.0,
                    momentum: float = 0.9, nesterov: bool = False,
                    betas: tuple[float, float] = (0.9, 0.999), **_ignored) -> torch.optim.Optimizer:
    groups = param_groups(model, weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas))
    raise UserError(f"unknown optimizer '{name}'", f"use one of: {', '.join(OPTIMIZERS)}")


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, name: str = "cosine",
                    warmup_frac: float = 0.0, final_lr_frac: float = 0.0,
                    **_ignored) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup_frac` of the steps, then cosine decay or a constant rate."""
    if name not in SCHEDULES:
        raise UserError(f"unknown schedule '{name}'", f"use one of: {', '.join(SCHEDULES)}")
    warmup = int(round(warmup_frac * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if name == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return final_lr_frac + (1 - final_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
