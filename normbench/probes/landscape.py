"""The loss landscape along the gradient (Santurkar et al. 2018, "How Does Batch Normalization
Help Optimization?", App. A): how far the loss and its gradient move when the parameters take
a gradient step, over a grid of step sizes, on one fixed batch.

At the current parameters θ, with g = ∇L(θ), the loss and its gradient are evaluated at θ − ηg
for every η of the grid. `landscape` reduces the walk to

- ``loss_range``: max − min of L(θ − ηg) over the grid, the paper's "range of losses over the
  step sizes". θ itself is not added to the grid: it enters only when the grid holds η = 0.
- ``grad_change``: max over η of ‖∇L(θ) − ∇L(θ − ηg)‖₂, all parameters as one vector.
- ``beta_smoothness``: max over η of ‖∇L(θ) − ∇L(θ − ηg)‖₂ / ‖ηg‖₂, the paper's "effective
  β-smoothness". It is the maximum of the ratio, point by point, not the largest change over
  some step: each ratio is a Lipschitz estimate of the gradient along its own step. A point
  with ‖ηg‖ = 0 (η = 0, or g = 0) has no ratio (0/0) and is left out of the maximum; with no
  point left the value is NaN. (At g = 0 the walk never leaves θ: loss_range and grad_change
  are then an honest 0, measured, and only the ratio is undefined.)
- ``loss``: L(θ) and ``grad_norm``: ‖g‖₂.

A loss or gradient at θ that is not finite makes every value NaN and nothing is walked: there
is no line to follow. A non-finite loss or gradient at some η is kept, not hidden: NaN anywhere
in the walk makes the maxima it enters NaN, an infinite loss makes loss_range infinite (or NaN
when every loss is +inf). `landscape_points` keeps the per-η values.

The parameters are changed in place during the call and restored bit-exactly afterwards, also
on an exception; gradients come from torch.autograd.grad, so no ``.grad`` is touched. Each
loss is differentiated before `loss_at` is called again, so a `loss_at` that resets the
model's buffers at its start (BatchNorm's running statistics) does not invalidate a graph.
`snapshot`, `assign` and `gradients` are shared with the internal covariate shift probe.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

Params = Sequence[tuple[str, torch.Tensor]]
LossAt = Callable[[], torch.Tensor]
SUMMARY_KEYS = ("loss_range", "grad_change", "beta_smoothness", "loss", "grad_norm")


def snapshot(params: Params) -> list[torch.Tensor]:
    """Copies of the parameter values, to restore bit-exactly with `assign`."""
    return [p.detach().clone() for _, p in params]


def assign(params: Params, values: Iterable[torch.Tensor]) -> None:
    """Set the parameters to `values` in place (no_grad: they are autograd leaves)."""
    with torch.no_grad():
        for (_, p), value in zip(params, values, strict=True):
            p.copy_(value)


def gradients(loss: torch.Tensor, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """∂loss/∂tensors without accumulating into ``.grad``; a tensor the loss does not reach,
    or a loss that reaches none, gets zeros: its gradient is zero, not missing."""
    if not tensors or not loss.requires_grad:  # autograd.grad refuses both
        return [torch.zeros_like(t) for t in tensors]
    grads = torch.autograd.grad(loss, list(tensors), allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(tensors, grads, strict=True)]


def norm(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """‖·‖₂ of the tensors as one vector, in fp64 (sums of squared fp32 entries cannot overflow
    there). A generator of differences is consumed one tensor at a time."""
    norms = [torch.linalg.vector_norm(t.detach(), dtype=torch.float64) for t in tensors]
    if not norms:
        return torch.zeros((), dtype=torch.float64)
    return torch.linalg.vector_norm(torch.stack(norms))


def nan_max(values: Sequence[float]) -> float:
    """max that a NaN anywhere makes NaN (the builtin's result would depend on the order);
    NaN for no values."""
    if not values or any(math.isnan(v) for v in values):
        return math.nan
    return max(values)


@dataclass(frozen=True)
class LandscapePoints:
    """The walk point by point: ``losses[k]`` is L(θ − η_k g), ``grad_changes[k]`` is
    ‖g − ∇L(θ − η_k g)‖₂ and ``steps[k]`` is ‖η_k g‖₂ = |η_k|·‖g‖₂. `loss` and `grad_norm`
    are measured at θ even when not finite; the lists are then NaN (nothing was walked)."""

    loss: float
    grad_norm: float
    etas: list[float]
    losses: list[float]
    grad_changes: list[float]
    steps: list[float]

    @property
    def ratios(self) -> list[float]:
        """grad_changes / steps; NaN where the step is 0 (0/0: no ratio there)."""
        return [c / s if s > 0 else math.nan for c, s in zip(self.grad_changes, self.steps, strict=True)]

    def summary(self) -> dict[str, float]:
        """The five numbers of the module docstring, as plain floats."""
        if not (math.isfinite(self.loss) and math.isfinite(self.grad_norm)):
            return dict.fromkeys(SUMMARY_KEYS, math.nan)
        moved = [r for r, s in zip(self.ratios, self.steps, strict=True) if s > 0]
        return {
            "loss_range": nan_max(self.losses) - min(self.losses),  # NaN stays NaN
            "grad_change": nan_max(self.grad_changes),
            "beta_smoothness": nan_max(moved),
            "loss": self.loss,
            "grad_norm": self.grad_norm,
        }


def check_etas(etas: Sequence[float]) -> list[float]:
    """An empty or non-finite grid is a configuration error, not a measurement: raise."""
    etas = [float(eta) for eta in etas]
    if not etas or not all(math.isfinite(eta) for eta in etas):
        raise ValueError(f"landscape needs a non-empty grid of finite step sizes, got {etas}")
    return etas


def point(loss_at: LossAt, params: Params, theta: list[torch.Tensor], g: list[torch.Tensor],
          eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """L(θ − ηg) and ‖g − ∇L(θ − ηg)‖₂ as 0-d tensors: the walk reads them back in one transfer."""
    assign(params, (t - eta * gi for t, gi in zip(theta, g, strict=True)))
    loss = loss_at()
    g_eta = gradients(loss, [p for _, p in params])
    change = norm(gi - he for gi, he in zip(g, g_eta, strict=True))
    return loss.detach().double().reshape(()), change


def landscape_points(loss_at: LossAt, params: Params, etas: Sequence[float]) -> LandscapePoints:
    """Walk θ − ηg over `etas` (see the module docstring); the parameters end as they began."""
    etas = check_etas(etas)
    theta = snapshot(params)
    try:
        loss = loss_at()
        g = gradients(loss, [p for _, p in params])
        loss0, grad_norm = float(loss.detach()), float(norm(g))
        if not (math.isfinite(loss0) and math.isfinite(grad_norm)):
            nans = [math.nan] * len(etas)
            return LandscapePoints(loss0, grad_norm, etas, nans, nans, nans)
        losses, changes = zip(*(point(loss_at, params, theta, g, eta) for eta in etas), strict=True)
    finally:
        assign(params, theta)
    steps = [abs(eta) * grad_norm for eta in etas]
    return LandscapePoints(loss0, grad_norm, etas, torch.stack(losses).tolist(),
                           torch.stack(changes).tolist(), steps)


def landscape(loss_at: LossAt, params: Params, etas: Sequence[float]) -> dict[str, float]:
    """loss_range, grad_change, beta_smoothness, loss and grad_norm at the current parameters
    (the module docstring defines them); the parameters end as they began."""
    return landscape_points(loss_at, params, etas).summary()
