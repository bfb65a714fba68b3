"""Weight normalization (Salimans & Kingma 2016): w = g * v / ||v|| for every conv and linear
weight, with ||v|| per output unit (torch's `weight_norm` parametrization, dim 0).

`norm=weight` is weight normalization alone: no activation norm (the identity, as
norm=none), so the layers keep their biases. `norm.weight_norm=true` adds it on top of any
other norm; the biases then follow that norm (a re-centring norm makes them redundant).
Every nn.Linear and nn.Conv2d is reparametrized, the output head included as in the paper;
embeddings are lookup tables, not weights of a linear map, and are left alone. g starts at
||v||, so the network computes the same function at initialization as without it (the
paper's data-dependent initialization is not done).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from normbench.norms.none import Identity
from normbench.norms.options import NormOptions, option
from normbench.norms.registry import LAYOUTS, register


@dataclass
class WeightNormOptions(NormOptions):
    """norm=weight (conf/norm/weight.yaml)."""

    weight_norm: bool = option(True, "what this norm is (false is refused: norm=none is "
                                     "that); any other norm takes norm.weight_norm=true too")


@register("weight", *LAYOUTS)
class WeightNormOnly(Identity):
    """norm=weight: the activations pass unchanged; `apply_weight_norm` does the work."""

    Options = WeightNormOptions


def apply_weight_norm(model: nn.Module) -> nn.Module:
    """Reparametrize every conv/linear weight of `model` in place (and return it)."""
    for module in list(model.modules()):
        if isinstance(module, nn.Linear | nn.Conv2d):
            weight_norm(module, name="weight", dim=0)
    return model
