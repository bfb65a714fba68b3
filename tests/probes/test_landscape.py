"""The loss landscape along the gradient (probes.landscape) against a walk written out here with
torch.func.functional_call, against a quadratic known in closed form, and at its edges."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from normbench.probes.landscape import landscape, landscape_points

ETAS = [0.01, 0.1, 0.5, 1.0, 3.0]

# ------------------------------------------------------------------------------- a small network


def mlp(batchnorm: bool) -> nn.Module:
    torch.manual_seed(0)
    middle = [nn.BatchNorm1d(8)] if batchnorm else []
    return nn.Sequential(nn.Linear(4, 8), *middle, nn.Tanh(), nn.Linear(8, 3)).train()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(16, 4, generator=gen), torch.randint(0, 3, (16,), generator=gen)


def loss_closure(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """A `loss_at` whose repeated calls agree: the running buffers are reset before each forward.
    (Resetting them after the forward, in place, would break the backward: BatchNorm saves them.)"""
    saved = {name: b.clone() for name, b in model.named_buffers()}

    def loss_at() -> torch.Tensor:
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(saved[name])
        return F.cross_entropy(model(x), y)

    return loss_at


def reference_walk(model: nn.Module, x: torch.Tensor, y: torch.Tensor, etas: list[float]) -> dict:
    """The walk written out: θ − ηg as fresh leaves run through functional_call, on copies of the
    buffers (so the model itself is never touched), norms over the concatenated gradient."""
    theta = {name: p.detach().clone() for name, p in model.named_parameters()}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}

    def loss_and_grad(values: dict[str, torch.Tensor]) -> tuple[float, torch.Tensor]:
        leaves = {name: v.clone().requires_grad_() for name, v in values.items()}
        copies = {name: b.clone() for name, b in buffers.items()}
        loss = F.cross_entropy(functional_call(model, {**leaves, **copies}, (x,)), y)
        grads = torch.autograd.grad(loss, list(leaves.values()))
        return loss.item(), torch.cat([g.reshape(-1) for g in grads])

    loss, g = loss_and_grad(theta)
    sizes = [t.numel() for t in theta.values()]
    losses, changes, ratios = [], [], []
    for eta in etas:
        moved = (t - eta * gi.view_as(t) for t, gi in zip(theta.values(), g.split(sizes), strict=True))
        step = dict(zip(theta, moved, strict=True))
        loss_eta, g_eta = loss_and_grad(step)
        losses.append(loss_eta)
        changes.append((g - g_eta).norm().item())
        ratios.append(changes[-1] / (eta * g).norm().item())
    return {"loss_range": max(losses) - min(losses), "grad_change": max(changes),
            "beta_smoothness": max(ratios), "loss": loss, "grad_norm": g.norm().item(),
            "losses": losses, "grad_changes": changes}


@pytest.mark.parametrize("batchnorm", [False, True], ids=["mlp", "mlp_batchnorm"])
def test_landscape_matches_a_walk_written_out(batchnorm):
    model = mlp(batchnorm)
    x, y = batch()
    expected = reference_walk(model, x, y, ETAS)
    points = landscape_points(loss_closure(model, x, y), list(model.named_parameters()), ETAS)
    assert points.losses == pytest.approx(expected["losses"], rel=1e-6)
    assert points.grad_changes == pytest.approx(expected["grad_changes"], rel=1e-6)
    summary = points.summary()
    assert set(summary) == {"loss_range", "grad_change", "beta_smoothness", "loss", "grad_norm"}
    assert all(type(v) is float for v in summary.values())
    for key, value in summary.items():
        assert value == pytest.approx(expected[key], rel=1e-6), key
    assert summary["loss_range"] > 0 and summary["beta_smoothness"] > 0  # a walk that moved


def test_params_and_grads_are_untouched_also_on_an_exception():
    model = mlp(batchnorm=True)
    x, y = batch()
    params = list(model.named_parameters())
    model[0].weight.grad = torch.full_like(model[0].weight, 7.0)
    values = [p.detach().clone() for _, p in params]
    landscape(loss_closure(model, x, y), params, ETAS)
    assert all(torch.equal(p, v) for (_, p), v in zip(params, values, strict=True))
    assert torch.equal(model[0].weight.grad, torch.full_like(model[0].weight, 7.0))
    assert all(p.grad is None for name, p in params if name != "0.weight")

    calls = []
    inner = loss_closure(model, x, y)

    def failing() -> torch.Tensor:
        calls.append(1)
        if len(calls) == 3:  # in the middle of the walk: the parameters are at θ − ηg now
            raise RuntimeError("boom")
        return inner()

    with pytest.raises(RuntimeError, match="boom"):
        landscape(failing, params, ETAS)
    assert all(torch.equal(p, v) for (_, p), v in zip(params, values, strict=True))


# ------------------------------------------------------------------ a quadratic, in closed form


def quadratic(theta: torch.Tensor):
    """L(w) = ½ wᵀAw with A symmetric positive definite, eigenvalues 0.5 … 4 (fp64: closed forms
    to 1e-10); returns (params, loss_at, A)."""
    gen = torch.Generator().manual_seed(2)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=gen, dtype=torch.float64))
    a = q @ torch.diag(torch.tensor([0.5, 1.0, 1.5, 2.5, 4.0], dtype=torch.float64)) @ q.T
    w = nn.Parameter(theta.clone())
    return [("w", w)], (lambda: 0.5 * w @ a @ w), a


THETA = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0], dtype=torch.float64)


def test_quadratic_beta_is_the_curvature_along_g_and_the_loss_a_parabola():
    params, loss_at, a = quadratic(THETA)
    g = a @ THETA
    ag = a @ g
    # ∇L(θ) − ∇L(θ − ηg) = ηAg: every ratio is ‖Ag‖/‖g‖, a Rayleigh-type quotient ≤ λ_max(A).
    curvature = (ag.norm() / g.norm()).item()
    etas = [0.05, 0.1, (g @ g / (g @ ag)).item(), 0.6]  # the third is the parabola's minimum
    points = landscape_points(loss_at, params, etas)
    summary = points.summary()
    assert points.ratios == pytest.approx([curvature] * len(etas), rel=1e-10)
    assert summary["beta_smoothness"] == pytest.approx(curvature, rel=1e-10)
    assert summary["beta_smoothness"] <= torch.linalg.eigvalsh(a).max().item() + 1e-12
    assert summary["grad_change"] == pytest.approx(max(etas) * ag.norm().item(), rel=1e-10)
    loss = 0.5 * (THETA @ a @ THETA).item()
    parabola = [loss - eta * (g @ g).item() + 0.5 * eta**2 * (g @ ag).item() for eta in etas]
    assert points.losses == pytest.approx(parabola, rel=1e-10)
    assert summary["loss_range"] == pytest.approx(max(parabola) - min(parabola), rel=1e-10)
    assert summary["loss"] == pytest.approx(loss, rel=1e-12)
    assert summary["grad_norm"] == pytest.approx(g.norm().item(), rel=1e-12)


def test_eta_zero_is_a_point_of_the_walk_without_a_ratio():
    params, loss_at, a = quadratic(THETA)
    g = a @ THETA
    points = landscape_points(loss_at, params, [0.0, 0.1, 0.3])
    assert points.losses[0] == points.loss  # θ itself, because the grid holds η = 0
    assert points.grad_changes[0] == 0.0 and points.steps[0] == 0.0
    assert math.isnan(points.ratios[0])
    summary = points.summary()
    assert summary["beta_smoothness"] == pytest.approx(((a @ g).norm() / g.norm()).item(), rel=1e-10)
    assert summary["loss_range"] == pytest.approx(max(points.losses) - min(points.losses), rel=1e-12)

    only_zero = landscape(loss_at, params, [0.0])
    assert only_zero["loss_range"] == 0.0 and only_zero["grad_change"] == 0.0
    assert math.isnan(only_zero["beta_smoothness"])


def test_zero_gradient_walks_nowhere():
    params, loss_at, _ = quadratic(torch.zeros(5, dtype=torch.float64))  # the minimum: g = 0
    summary = landscape(loss_at, params, ETAS)
    assert summary["loss_range"] == 0.0 and summary["grad_change"] == 0.0
    assert summary["loss"] == 0.0 and summary["grad_norm"] == 0.0
    assert math.isnan(summary["beta_smoothness"])  # ‖ηg‖ = 0 at every η: no ratio anywhere


# --------------------------------------------------------------------------------- non-finite


def counting(loss_at):
    calls = []

    def wrapped() -> torch.Tensor:
        calls.append(1)
        return loss_at()

    return wrapped, calls


def test_a_nan_loss_or_an_infinite_gradient_at_theta_makes_everything_nan():
    w = nn.Parameter(torch.tensor([1.0, 2.0]))
    for loss_at in (lambda: (w * w).sum() * math.nan,  # NaN loss
                    lambda: torch.sqrt(w - 1.0).sum()):  # finite loss 1, gradient +inf at w = 1
        wrapped, calls = counting(loss_at)
        summary = landscape(wrapped, [("w", w)], ETAS)
        assert all(math.isnan(v) for v in summary.values()), summary
        assert len(calls) == 1  # no line to walk
        assert torch.equal(w, torch.tensor([1.0, 2.0])) and w.grad is None


def test_a_non_finite_loss_on_the_walk_is_reported_not_hidden():
    w = nn.Parameter(torch.tensor([1.0]))  # L = log w: g = 1, θ − ηg = 1 − η

    def loss_at() -> torch.Tensor:
        return torch.log(w).sum()

    # η = 2: log(−1) = NaN, while the gradient 1/w = −1 stays finite.
    nan_step = landscape(loss_at, [("w", w)], [0.5, 2.0])
    assert math.isnan(nan_step["loss_range"])
    assert nan_step["grad_change"] == pytest.approx(2.0)  # |1 − (−1)|
    assert nan_step["beta_smoothness"] == pytest.approx(2.0)  # max(|1 − 2|/0.5, 2/2)
    # η = 1: log 0 = −inf and the gradient 1/0 = +inf.
    inf_step = landscape(loss_at, [("w", w)], [0.5, 1.0])
    assert inf_step["loss_range"] == math.inf
    assert inf_step["grad_change"] == math.inf and inf_step["beta_smoothness"] == math.inf
    assert torch.equal(w, torch.tensor([1.0])) and w.grad is None


@pytest.mark.parametrize("etas", [[], [0.1, math.nan], [math.inf]])
def test_an_empty_or_non_finite_grid_is_refused(etas):
    params, loss_at, _ = quadratic(THETA)
    with pytest.raises(ValueError, match="step sizes"):
        landscape(loss_at, params, etas)
