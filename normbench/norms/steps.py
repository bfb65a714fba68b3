"""Per-time-step norms for the LSTM cell (the steps layout), after the BN-LSTM of Cooijmans
et al. 2016 ("Recurrent Batch Normalization"): a norm with running statistics keeps them
separately for each time step, because the statistics of the first steps of a recurrence
differ from those of later ones.

`PerStepNorm` is the container: step t < T_max has its own child of the container's
`step_class` (BatchNorm, Batch Renorm, PowerNorm rows), named `tNN` (zero-padded, so that
names sort in time order); steps beyond T_max reuse the child of step T_max - 1. The probes
find the children by type, and TensorBoard shows e.g. `bn_gap/dmu/layers.0.norm_h.t07`.

The affine transform is the container's, one gamma and beta shared across time steps,
gamma starting at 0.1 (a unit scale saturates the LSTM's gates). Each child is built with
its own affine off and applies the container's after its normalization (`SharedAffineStep`),
so that hooks on the child see its real output.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from normbench.norms.registry import Norm, NormSpec, affine_flags


class SharedAffineStep:
    """Mixin for a per-step child: after its own normalization, the `owner`'s gamma and beta
    (shared across time). Without an owner it is the plain norm it derives from."""

    owner: PerStepNorm | None = None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        y = super().forward(x, mask)
        owner = self.owner
        if owner is None:
            return y
        if owner.weight is not None:
            y = y * owner.weight
        if owner.bias is not None:
            y = y + owner.bias
        return y


class PerStepNorm(Norm, nn.Module):
    """One `step_class` child per time step and one affine transform shared across time.

    A subclass names its `step_class` (a `SharedAffineStep` norm for (N, D) rows) and the
    options it reads; `at(t)` is the child for step min(t, T_max - 1).
    """

    INIT_SCALE = 0.1  # Cooijmans et al. 2016: a unit gamma saturates the gates
    probed = False  # its per-step children are the layers the probes measure
    step_class: ClassVar[type[nn.Module]]

    def __init__(self, num_features: int, t_max: int, spec: NormSpec):
        super().__init__()
        width = len(str(t_max - 1))
        self.keys = [f"t{t:0{width}d}" for t in range(t_max)]
        own = spec.replace(affine=False)  # the steps share the owner's
        for key in self.keys:
            step = self.step_class.build(own, num_features)
            # A plain attribute, not a submodule: the owner must not appear twice in the tree.
            object.__setattr__(step, "owner", self)
            self.add_module(key, step)
        scale, center = affine_flags(spec)
        self.weight = nn.Parameter(torch.full((num_features,), self.INIT_SCALE)) if scale else None
        self.bias = nn.Parameter(torch.zeros(num_features)) if center else None

    @classmethod
    def build(cls, spec: NormSpec, num_features: int, *, t_max=None) -> nn.Module:
        if not t_max or t_max < 1:
            raise ValueError("a per-step norm needs t_max >= 1, the longest sequence")
        return cls(num_features, t_max, spec)

    def at(self, t: int) -> nn.Module:
        return getattr(self, self.keys[min(t, len(self.keys) - 1)])

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """A whole sequence (N, T, D), each step with its own statistics."""
        return torch.stack([self.at(t)(x[:, t], None if mask is None else mask[:, t])
                            for t in range(x.shape[1])], dim=1)
