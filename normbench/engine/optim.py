"""Optimizers and learning-rate schedules from plain options.

Each optimizer and each schedule is one function whose parameters are the options it
reads; their values (defaults included) come from conf/optim/ and conf/sched/, their types
from normbench/config/schema.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from normbench.errors import UserError


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices and kernels only, not on norm scales/shifts or biases.

    Decaying a norm's scale changes what the norm does, which would confound a comparison
    between norms; matrices and kernels are decayed alike under every norm. Weight
    normalization's scale g (w = g v / ||v||, torch's `original0`) is a norm scale too,
    although it keeps the kernel's number of dimensions; its direction v is decayed.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            scale = p.dim() < 2 or name.endswith("parametrizations.weight.original0")
            (no_decay if scale else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def sgd(groups: list[dict], lr: float, momentum: float, nesterov: bool,
        **implementation) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov, **implementation)


def adamw(groups: list[dict], lr: float, betas: tuple[float, float],
          **implementation) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), **implementation)


# optim.implementation -> the optimizer's keyword arguments. `auto` takes the fastest that
# measured fastest: one fused kernel per step on CUDA; on CPU the multi-tensor (foreach)
# path, which ran ResNet-20's SGD step ~2x faster than the fused CPU kernel here.
IMPLEMENTATIONS = {"fused": {"fused": True}, "foreach": {"foreach": True},
                   "for_loop": {"foreach": False}}


def resolve_implementation(implementation: str, device: torch.device) -> str:
    """The implementation `auto` stands for on `device` (any other name is itself)."""
    if implementation != "auto":
        return implementation
    return "fused" if device.type == "cuda" else "foreach"


# name (conf/optim/<name>.yaml) -> function
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {"sgd": sgd, "adamw": adamw}


def _unknown(what: str, name: str, group: str) -> UserError:
    from normbench.config.tree import config_options

    return UserError(f"unknown {what} '{name}'", f"use one of: {', '.join(config_options(group))}")


def optimizer_function(name: str) -> Callable[..., torch.optim.Optimizer]:
    if name not in OPTIMIZERS:
        raise _unknown("optimizer", name, "optim")
    return OPTIMIZERS[name]


def build_optimizer(model: nn.Module, lr: float, name: str, weight_decay: float,
                    implementation: str = "auto", default_lr: float | None = None,
                    **options) -> torch.optim.Optimizer:
    """`options` are the named optimizer's own (e.g. sgd: momentum, nesterov). The
    implementation changes the speed and the rounding of the update, not the rule.
    `default_lr` is the config's top-level lr where none is given: `lr` is what counts."""
    device = next(model.parameters()).device
    kwargs = IMPLEMENTATIONS[resolve_implementation(implementation, device)]
    return optimizer_function(name)(param_groups(model, weight_decay), lr, **options, **kwargs)


def constant(total_steps: int, warmup_frac: float) -> Callable[[int], float]:
    warmup = int(round(warmup_frac * total_steps))
    return lambda step: (step + 1) / warmup if step < warmup else 1.0


def cosine(total_steps: int, warmup_frac: float,
           final_lr_frac: float) -> Callable[[int], float]:
    warmup = int(round(warmup_frac * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return final_lr_frac + (1 - final_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def step(total_steps: int, warmup_frac: float, milestones: list[float],
         gamma: float) -> Callable[[int], float]:
    """Step decay (Goyal et al. 2017): the rate times `gamma` from each milestone on, a
    milestone being a fraction of the steps (30/90 of them: the first step of epoch 31 of 90),
    times the linear warm-up while it lasts."""
    warmup = int(round(warmup_frac * total_steps))
    starts = [int(round(m * total_steps)) for m in milestones]

    def factor(step: int) -> float:
        warm = (step + 1) / warmup if step < warmup else 1.0
        return warm * gamma ** sum(step >= start for start in starts)

    return factor


# name (conf/sched/<name>.yaml) -> function
SCHEDULES: dict[str, Callable[..., Callable[[int], float]]] = {"cosine": cosine,
                                                               "constant": constant,
                                                               "step": step}


def schedule_function(name: str) -> Callable[..., Callable[[int], float]]:
    if name not in SCHEDULES:
        raise _unknown("schedule", name, "sched")
    return SCHEDULES[name]


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, name: str,
                    **options) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup_frac` of the steps, then cosine decay, a constant rate or
    step decay at milestones."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer,
                                             schedule_function(name)(total_steps, **options))
