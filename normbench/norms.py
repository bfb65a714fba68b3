"""The norm registry: a norm *name* and a tensor *layout* resolve to a factory `make(num_features)`.

Models resolve the name once, at their top, and hand the factory down; blocks never see the
name (as torchvision's `norm_layer`, timm's `create_norm`). What each norm reduces over,
per layout:

| name  | image (N,C,H,W)             | tokens (N,T,D)                      | features (N,D)        |
|-------|-----------------------------|-------------------------------------|-----------------------|
| batch | N,H,W per channel           | real (non-padding) tokens per feature | N per feature       |
| layer | C,H,W per sample            | D per token                         | D per sample          |
| group | C/G channels x H,W per group | D/G features per token and group   | D/G per sample, group |
| none  | identity                    | identity                            | identity              |

Momentum follows PyTorch: ``running = (1 - momentum) * running + momentum * batch`` with
0.1 by default. Keras/TensorFlow write the same update as ``running = m * running +
(1 - m) * batch``, so Keras' ``momentum=0.99`` is PyTorch's ``momentum=0.01``.
BatchNorm normalizes with the *biased* batch variance but stores the *unbiased* one in
``running_var`` (PyTorch's choice; probes undo it where they compare the two).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from normbench.batchnorm import GhostBatchNorm2d, TokenBatchNorm
from normbench.errors import UserError

NORMS = ("batch", "layer", "group", "none")
LAYOUTS = ("image", "tokens", "features")
# Norms that re-centre their input: a conv/linear in front of one needs no bias.
RECENTRING = ("batch", "layer", "group")

NormFactory = Callable[[int], nn.Module]


@dataclass(frozen=True)
class NormSpec:
    """Everything a factory needs; plain values so that models stay Hydra-free."""

    name: str = "batch"
    eps: float = 1e-5
    momentum: float | None = 0.1
    affine: bool = True
    num_groups: int = 32
    track_running_stats: bool = True
    stats_batch: int | None = None  # ghost BatchNorm: statistics from groups of k samples

    @property
    def recentres(self) -> bool:
        return self.name in RECENTRING


# ----------------------------------------------------------------------------- token layout


class TokenLayerNorm(nn.LayerNorm):
    """LayerNorm over D per token; takes (and ignores) the padding mask."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x)


class TokenGroupNorm(nn.GroupNorm):
    """GroupNorm over D/G features per token and group; takes (and ignores) the mask."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        shape = x.shape
        return super().forward(x.reshape(-1, shape[-1])).reshape(shape)


class TokenIdentity(nn.Identity):
    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return x


# ----------------------------------------------------------------------------- group checks


class InvalidGroupNorm(nn.Module):
    """Stands where a GroupNorm cannot: `check_norms` names its place in the model.

    Building the model first and checking afterwards is what lets the error say *which*
    layer failed, by its path in the module tree, without threading names through blocks.
    """

    def __init__(self, num_channels: int, num_groups: int):
        super().__init__()
        self.num_channels = num_channels
        self.num_groups = num_groups

    def forward(self, *args, **kwargs):
        raise RuntimeError("InvalidGroupNorm reached forward; call check_norms(model) first")


def check_norms(model: nn.Module) -> None:
    """Raise a UserError naming the first layer whose channels num_groups does not divide."""
    bad = [(name, m) for name, m in model.named_modules() if isinstance(m, InvalidGroupNorm)]
    if not bad:
        return
    name, m = bad[0]
    widths = sorted({m2.num_channels for _, m2 in model.named_modules()
                     if isinstance(m2, (InvalidGroupNorm, nn.GroupNorm))})
    common = math.gcd(*widths)
    divisors = [g for g in range(1, common + 1) if common % g == 0]
    raise UserError(
        f"norm.num_groups={m.num_groups} does not divide the {m.num_channels} channels of "
        f"layer '{name}' (layer widths here: {', '.join(map(str, widths))})",
        f"choose norm.num_groups from {divisors}",
    )


# ----------------------------------------------------------------------------- the registry


def _group_or_invalid(cls, num_groups: int, num_features: int, spec: NormSpec) -> nn.Module:
    if num_features % num_groups:
        return InvalidGroupNorm(num_features, num_groups)
    return cls(num_groups, num_features, eps=spec.eps, affine=spec.affine)


def norm_factory(spec: NormSpec, layout: str) -> NormFactory:
    """Resolve a norm name and layout into `make(num_features) -> nn.Module`."""
    if spec.name not in NORMS:
        raise UserError(f"unknown norm '{spec.name}'", f"use one of: {', '.join(NORMS)}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    bn_kwargs = dict(eps=spec.eps, momentum=spec.momentum, affine=spec.affine,
                     track_running_stats=spec.track_running_stats)
    name = spec.name

    if name == "none":
        return (lambda d: TokenIdentity()) if layout == "tokens" else (lambda d: nn.Identity())

    if layout == "image":
        if name == "batch":
            if spec.stats_batch:
                return lambda c: GhostBatchNorm2d(c, stats_batch=spec.stats_batch, **bn_kwargs)
            return lambda c: nn.BatchNorm2d(c, **bn_kwargs)
        if name == "layer":
            # LN on images as in the GN paper: one group holding all of C,H,W, affine per channel.
            return lambda c: nn.GroupNorm(1, c, eps=spec.eps, affine=spec.affine)
        return lambda c: _group_or_invalid(nn.GroupNorm, spec.num_groups, c, spec)

    if layout == "tokens":
        if name == "batch":
            return lambda d: TokenBatchNorm(d, stats_batch=spec.stats_batch, **bn_kwargs)
        if name == "layer":
            return lambda d: TokenLayerNorm(d, eps=spec.eps, elementwise_affine=spec.affine)
        return lambda d: _group_or_invalid(TokenGroupNorm, spec.num_groups, d, spec)

    # features: (N, D), as inside a recurrent cell
    if name == "batch":
        if spec.stats_batch:
            return lambda d: TokenBatchNorm(d, stats_batch=spec.stats_batch, **bn_kwargs)
        return lambda d: nn.BatchNorm1d(d, **bn_kwargs)
    if name == "layer":
        return lambda d: nn.LayerNorm(d, eps=spec.eps, elementwise_affine=spec.affine)
    return lambda d: _group_or_invalid(nn.GroupNorm, spec.num_groups, d, spec)


# ----------------------------------------------------------------------------- statistics


def is_batchnorm(module: nn.Module) -> bool:
    """BatchNorm-like layers: the ones with batch statistics and running buffers."""
    return isinstance(module, _BatchNorm) and module.track_running_stats


def _plain_moments(x: torch.Tensor):
    """Biased mean/variance over every axis but the channel axis (1), and the count."""
    x = x.detach()
    dims = [0] + list(range(2, x.dim()))
    var, mean = torch.var_mean(x, dim=dims, correction=0)
    count = torch.tensor(float(x.numel() // x.shape[1]), device=x.device)
    return mean, var, count


def batch_moments(module: nn.Module, x: torch.Tensor, mask: torch.Tensor | None = None):
    """Population moments of the real entries of a BatchNorm layer's input `x`: biased mean
    and variance per channel, and the number of entries N (0-d).

    Under ghost BN these are the moments of the whole batch (within- plus between-group
    variance), not the groups' average: what PreciseBN pools and ``act/in_*`` reports.
    """
    if hasattr(module, "moments"):  # masked or ghost variants know their own statistics
        return module.moments(x, mask)
    return _plain_moments(x)


def bn_training_stats(module: nn.Module, x: torch.Tensor, mask: torch.Tensor | None = None):
    """What a BatchNorm layer's running update moves towards for batch `x`: mean, biased
    variance, entries per group and a 0-d bool `valid` (False: the layer skips the update,
    as for a step whose groups all have fewer than 2 real entries)."""
    if hasattr(module, "training_stats"):
        t = module.training_stats(x, mask)
        return t.mean, t.var, t.count, t.valid
    mean, var, count = _plain_moments(x)
    return mean, var, count, count >= 2


def bn_stat_gaps(module: _BatchNorm, mean_b, var_b, count):
    """Gaps between batch and running statistics, as 0-d tensors:
    ``dmu = ||mu_B - mu_run||_2 / d`` and ``dvar = ||var_B - var_run (n-1)/n||_2 / d``.

    `running_var` holds the EMA of *unbiased* batch variances; rescaling it by (n-1)/n
    puts it on the biased scale that BatchNorm normalizes with, so a layer whose batches
    all have the same statistics shows a gap of zero, whatever n is. (n is clamped to 2 so
    that a batch without a valid group, whose gaps the probes discard, stays finite.)
    """
    d = mean_b.numel()
    count = count.clamp(min=2)
    running_var = module.running_var * (count - 1) / count
    dmu = torch.linalg.vector_norm(mean_b - module.running_mean) / d
    dvar = torch.linalg.vector_norm(var_b - running_var) / d
    return dmu, dvar


def make_spec(**kwargs) -> NormSpec:
    """NormSpec from a config mapping, ignoring keys that are not norm options."""
    fields = NormSpec.__dataclass_fields__
    return NormSpec(**{k: v for k, v in kwargs.items() if k in fields})
