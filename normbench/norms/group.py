"""GroupNorm (Wu & He 2018): statistics over groups of channels of one sample, so the rest
of the batch and any padding never matter (the mask is accepted and ignored).

| layout | reduces over |
|--------|--------------|
| images (N,C,H,W) | C/G channels x H,W per group |
| tokens (N,T,D), steps rows (N,D) | D/G features per token / row and group |

GroupNorm takes either the number of groups G (`num_groups`, the same in every layer) or
the channels per group C/G (`group_size`: each layer of C channels gets C/group_size
groups), as the GN paper's Table 3 varies both. In the steps layout it has no per-step
state, so `at(t)` is the norm itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from normbench.errors import UserError
from normbench.norms.options import AffineOptions, EpsOptions, option
from normbench.norms.registry import (
    Norm,
    NormSpec,
    UnbuildableNorm,
    drop_affine_parts,
    has_affine,
    register,
)


@dataclass
class GroupNormOptions(EpsOptions, AffineOptions):
    """norm=group (conf/norm/group.yaml). Exactly one of the two counts is in effect:
    num_groups gives way (null) to a group_size given on its own, and the config checks
    refuse both or neither."""

    num_groups: int | None = option(
        "${nb_unless:${.group_size},8}", "groups per layer, the same G in every layer (must "
        "divide every layer's width); 8 until group_size is set, then null", low=1,
        example="8")
    group_size: int | None = option(None, "channels per group: a layer of C channels gets "
                                          "C/group_size groups (must divide every width)",
                                    low=1, example="16")


def group_setting(spec: NormSpec) -> tuple[str, int]:
    """("num_groups", G) or ("group_size", C/G): the one of the two the spec sets."""
    given = [(k, getattr(spec, k)) for k in ("num_groups", "group_size")
             if getattr(spec, k) is not None]
    if len(given) != 1:  # the config checks say this to users; here it is a caller's bug
        raise ValueError(f"norm=group needs exactly one of num_groups and group_size, got {given}")
    return given[0]


def groups_for(spec: NormSpec, num_features: int) -> int | None:
    """The number of groups of a layer of `num_features` channels; None if the spec's
    setting does not divide the width."""
    key, value = group_setting(spec)
    if num_features % value:
        return None
    return value if key == "num_groups" else num_features // value


class InvalidGroupNorm(UnbuildableNorm):
    """A GroupNorm whose num_groups (or group_size) does not divide its channels."""

    def __init__(self, num_features: int, key: str, value: int):
        super().__init__(num_features)
        self.num_channels = num_features
        self.key, self.value = key, value

    @classmethod
    def user_error(cls, places: list[tuple[str, InvalidGroupNorm]], model: nn.Module) -> UserError:
        # Both settings must divide every width, so the valid choices are the divisors of
        # the widths' greatest common divisor (the same list for num_groups and group_size).
        widths = sorted({m.num_channels for m in model.modules()
                         if isinstance(m, (InvalidGroupNorm, nn.GroupNorm))})
        common = math.gcd(*widths)
        divisors = [g for g in range(1, common + 1) if common % g == 0]
        key, value = places[0][1].key, places[0][1].value
        by_width: dict[int, list[str]] = {}
        for path, module in places:
            by_width.setdefault(module.num_channels, []).append(f"'{path}'")
        named = "; ".join(f"the {width} channels of {', '.join(paths)}"
                          for width, paths in sorted(by_width.items()))
        count = "1 layer" if len(places) == 1 else f"{len(places)} layers"
        return UserError(
            f"norm.{key}={value} does not divide {named} ({count}; layer widths here: "
            f"{', '.join(map(str, widths))})",
            f"choose norm.{key} from {divisors}",
        )


class _GroupNormBuild(Norm):
    # Either count may be null: exactly one is set (checked in the config and in build).
    Options = GroupNormOptions

    @classmethod
    def build(cls, spec: NormSpec, num_features: int, *, t_max=None) -> nn.Module:
        groups = groups_for(spec, num_features)
        if groups is None:
            return InvalidGroupNorm(num_features, *group_setting(spec))
        return drop_affine_parts(cls(groups, num_features, eps=spec.eps,
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
