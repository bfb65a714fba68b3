"""Curvature probes checked against the exact Hessian, `torch.autograd.functional.hessian` of the
loss as a function of the flattened parameters, written out with torch.nn.functional (a second
implementation of each model, independent of its nn.Module)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.sparse.linalg import ArpackError, ArpackNoConvergence
from torch import nn

from normbench.probes import hessian
from normbench.probes.hessian import DENSE_MAX, curvature, hessian_vector_product

# ----------------------------------------------------------------------------- models


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def mlp(bn: str | None = None, dtype: torch.dtype = torch.float64) -> nn.Sequential:
    """3 -> 5 -> 2 with tanh (32 params; 42 with a BatchNorm1d, in mode `bn`, after the first
    layer), random weights and running statistics from a fixed seed."""
    layers = [nn.Linear(3, 5), *([nn.BatchNorm1d(5)] if bn else []), nn.Tanh(), nn.Linear(5, 2)]
    model = nn.Sequential(*layers).to(dtype)
    g = seeded(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
        if bn:
            model[1].running_mean.copy_(torch.randn(5, generator=g, dtype=torch.float64))
            model[1].running_var.copy_(torch.rand(5, generator=g, dtype=torch.float64) * 1.5 + 0.5)
    return model.train(bn == "train")


def batch(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = seeded(2)
    x = torch.randn(8, 3, generator=g, dtype=torch.float64)  # fp32: the same values, rounded
    return x.to(dtype), torch.randint(0, 2, (8,), generator=g)


def loss_and_params(model: nn.Module) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x, y = batch(next(model.parameters()).dtype)
    return F.cross_entropy(model(x), y), list(model.parameters())


def unflatten(theta: torch.Tensor, shapes: list[torch.Size]) -> list[torch.Tensor]:
    parts = torch.split(theta, [math.prod(s) for s in shapes])
    return [t.reshape(s) for t, s in zip(parts, shapes, strict=True)]


def functional_loss(model: nn.Sequential):
    """`model`'s loss as a function of its flattened parameters, in float64."""
    x, y = batch()
    bn = model[1] if isinstance(model[1], nn.BatchNorm1d) else None
    shapes = [p.shape for p in model.parameters()]
    stats = (None, None) if bn is None or bn.training else \
        (bn.running_mean.double().clone(), bn.running_var.double().clone())

    def f(theta: torch.Tensor) -> torch.Tensor:
        w1, b1, *mid, w2, b2 = unflatten(theta, shapes)
        h = F.linear(x, w1, b1)
        if bn is not None:  # training: batch statistics (running ones None)
            h = F.batch_norm(h, *stats, mid[0], mid[1], training=bn.training, eps=bn.eps)
        return F.cross_entropy(F.linear(torch.tanh(h), w2, b2), y)

    return f


def flat(params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params]).double()


def exact_hessian(f, params: list[torch.Tensor]) -> np.ndarray:
    return torch.autograd.functional.hessian(f, flat(params)).numpy()


def top_eigenvalue(h: np.ndarray) -> float:
    return float(np.linalg.eigvalsh(h)[-1])


def rademacher_vectors(seed: int, size: int, count: int) -> np.ndarray:
    """The vectors curvature draws first from a generator seeded `seed` (its docstring)."""
    g = seeded(seed)
    return np.stack([(2 * torch.randint(0, 2, (size,), generator=g) - 1).double().numpy()
                     for _ in range(count)])


# ----------------------------------------------------------------------------- lambda_max


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-6), (torch.float32, 1e-3)])
def test_lambda_max_of_mlp_matches_exact_hessian(dtype, tol):
    model = mlp(dtype=dtype)
    loss, params = loss_and_params(model)
    out = curvature(loss, params, generator=seeded(), tol=tol)
    assert sum(p.numel() for p in params) > DENSE_MAX  # eigsh, not the dense path
    assert out["lambda_max"] == pytest.approx(top_eigenvalue(exact_hessian(functional_loss(model), params)),
                                              rel=1e-3)
    assert out["hvps"] > 20


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_lambda_max_with_batchnorm_matches_exact_hessian(mode):
    """Eval: running statistics; train: batch statistics, which the double backward must
    differentiate through (the mean and variance depend on the first layer's weights)."""
    model = mlp(bn=mode)
    exact = exact_hessian(functional_loss(model), list(model.parameters()))  # before the forward
    loss, params = loss_and_params(model)
    out = curvature(loss, params, generator=seeded(), tol=1e-6)
    assert out["lambda_max"] == pytest.approx(top_eigenvalue(exact), rel=1e-3)


@pytest.mark.parametrize("size", [1, 2, DENSE_MAX, DENSE_MAX + 1, 50])
def test_lambda_max_of_quadratic_on_both_sides_of_the_dense_path(size):
    g = seeded(size)
    a = torch.randn(size, size, generator=g, dtype=torch.float64)
    a = a + a.T
    w = torch.randn(size, generator=g, dtype=torch.float64, requires_grad=True)
    out = curvature(0.5 * w @ a @ w, [w], generator=seeded(), trace_samples=3, tol=1e-8)
    assert out["lambda_max"] == pytest.approx(top_eigenvalue(a.numpy()), rel=1e-6, abs=1e-9)
    if size <= DENSE_MAX:
        assert out["hvps"] == size + 3


@pytest.mark.parametrize("size", [3, 30])
def test_negative_definite_gives_largest_algebraic_eigenvalue(size):
    """Eigenvalues -2c in [-4, -2]: the largest in magnitude would be -4."""
    c = torch.linspace(1, 2, size, dtype=torch.float64)
    w = torch.randn(size, generator=seeded(), dtype=torch.float64, requires_grad=True)
    out = curvature(-(c * w**2).sum(), [w], generator=seeded(), tol=1e-8)
    assert out["lambda_max"] == pytest.approx(-2.0, rel=1e-6)
    assert out["trace"] == pytest.approx(-2 * c.sum().item(), rel=1e-12)  # diagonal H: exact
    assert out["trace_stderr"] == 0.0


def test_single_scalar_parameter():
    w = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    out = curvature(w**4, [w], generator=seeded(), trace_samples=4)
    assert out == pytest.approx({"lambda_max": 12 * 0.49, "trace": 12 * 0.49, "trace_stderr": 0.0,
                                 "hvps": 5}, rel=1e-12)


# ----------------------------------------------------------------------------- trace


def test_trace_is_the_mean_quadratic_form_over_its_rademacher_vectors():
    model = mlp(bn="eval")
    loss, params = loss_and_params(model)
    out = curvature(loss, params, generator=seeded(5), trace_samples=7)
    h = exact_hessian(functional_loss(model), params)
    v = rademacher_vectors(5, h.shape[0], 7)
    quads = np.einsum("si,ij,sj->s", v, h, v)
    assert out["trace"] == pytest.approx(quads.mean(), rel=1e-5)
    assert out["trace_stderr"] == pytest.approx(quads.std(ddof=1) / math.sqrt(7), rel=1e-5)


def test_trace_estimate_and_stderr_agree_with_exact_values():
    """Var(v^T H v) = 2 sum_{i != j} H_ij^2 for Rademacher v: the true standard error."""
    model = mlp()
    loss, params = loss_and_params(model)
    m = 2000
    out = curvature(loss, params, generator=seeded(), trace_samples=m)
    h = exact_hessian(functional_loss(model), params)
    true_stderr = math.sqrt(2 * ((h**2).sum() - (np.diag(h) ** 2).sum()) / m)
    assert abs(out["trace"] - np.trace(h)) < 4 * true_stderr
    assert out["trace_stderr"] == pytest.approx(true_stderr, rel=0.1)


def test_one_trace_sample_has_no_stderr():
    loss, params = loss_and_params(mlp())
    assert math.isnan(curvature(loss, params, generator=seeded(), trace_samples=1)["trace_stderr"])


# ----------------------------------------------------------------------------- HVPs


def test_hessian_vector_product_matches_exact_hessian():
    model = mlp(bn="eval")
    loss, params = loss_and_params(model)
    grads = list(torch.autograd.grad(loss, params, create_graph=True))
    g = seeded(3)
    vector = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    hv = hessian_vector_product(grads, params, vector)
    assert [t.shape for t in hv] == [p.shape for p in params]
    expected = exact_hessian(functional_loss(model), params) @ flat(vector).numpy()
    np.testing.assert_allclose(flat(hv).numpy(), expected, rtol=1e-10, atol=1e-12)


def test_unused_and_linear_parameters_add_zero_rows():
    """A parameter the loss never reaches and one it is linear in: zero gradient of the
    gradient, which the double backward must not refuse; lambda_max and trace unchanged."""
    model = mlp()
    loss, params = loss_and_params(model)
    unused = torch.ones(4, dtype=torch.float64, requires_grad=True)
    linear = torch.ones(3, dtype=torch.float64, requires_grad=True)
    everything = [*params[:2], unused, *params[2:], linear]
    out = curvature(loss + linear.sum(), everything, generator=seeded(), tol=1e-6)

    h = np.zeros((len(flat(everything)),) * 2)
    keep = np.r_[0:20, 24:36]  # the MLP's entries; 20:24 unused, 36:39 linear
    h[np.ix_(keep, keep)] = exact_hessian(functional_loss(model), params)
    assert out["lambda_max"] == pytest.approx(top_eigenvalue(h[np.ix_(keep, keep)]), rel=1e-3)
    v = rademacher_vectors(0, h.shape[0], 20)
    assert out["trace"] == pytest.approx(np.einsum("si,ij,sj->s", v, h, v).mean(), rel=1e-5)

    grads = list(torch.autograd.grad(loss + linear.sum(), everything, create_graph=True,
                                     allow_unused=True, materialize_grads=True))
    hv = hessian_vector_product(grads, everything, [torch.ones_like(p) for p in everything])
    assert not hv[2].any() and not hv[-1].any()


def test_zero_hessian():
    """A loss linear in every parameter: no HVP graph at all, and eigsh's Krylov space is
    one vector (ARPACK's "starting vector is zero")."""
    w = torch.randn(30, generator=seeded(), dtype=torch.float64, requires_grad=True)
    out = curvature((3 * w).sum(), [w], generator=seeded())
    assert (out["lambda_max"], out["trace"], out["trace_stderr"]) == (0.0, 0.0, 0.0)


# ----------------------------------------------------------------------------- contract


def test_same_seed_gives_identical_results():
    loss, params = loss_and_params(mlp(bn="eval"))
    first = curvature(loss, params, generator=seeded(9))
    assert curvature(loss, params, generator=seeded(9)) == first
    assert curvature(loss, params, generator=seeded(10))["trace"] != first["trace"]


def test_params_grads_and_the_loss_graph_are_left_alone():
    model = mlp(bn="train")
    loss, params = loss_and_params(model)
    for i, p in enumerate(params):
        p.grad = torch.full_like(p, float(i))
    grads = [p.grad for p in params]
    values = [p.detach().clone() for p in params]
    curvature(loss, params, generator=seeded())
    assert all(p.grad is g and torch.equal(g, torch.full_like(p, float(i)))
               for i, (p, g) in enumerate(zip(params, grads, strict=True)))
    assert all(torch.equal(p, v) for p, v in zip(params, values, strict=True))
    torch.autograd.grad(loss, params)  # the caller can still backpropagate its loss


def test_global_rng_is_not_touched():
    loss, params = loss_and_params(mlp())
    state = torch.get_rng_state()
    curvature(loss, params, generator=seeded())
    assert torch.equal(torch.get_rng_state(), state)


def test_works_under_a_callers_no_grad():
    """The backward records the double-backward graph whatever the grad mode (create_graph)."""
    loss, params = loss_and_params(mlp())
    expected = curvature(loss, params, generator=seeded())
    with torch.no_grad():
        assert curvature(loss, params, generator=seeded()) == expected


def nan_result(out: dict) -> bool:
    return all(math.isnan(out[k]) for k in ("lambda_max", "trace", "trace_stderr"))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), "gradient"])
def test_non_finite_loss_or_gradient_gives_nan_without_hvps(bad, monkeypatch):
    monkeypatch.setattr(hessian, "eigsh", lambda *a, **k: pytest.fail("eigsh called"))
    w = torch.tensor([0.0, 1.0], dtype=torch.float64).repeat(20).requires_grad_()
    # sqrt(|w|) at 0: a finite loss whose gradient is not
    loss = w.abs().sqrt().sum() if bad == "gradient" else (w**2).sum() * bad
    out = curvature(loss, [w], generator=seeded())
    assert nan_result(out) and out["hvps"] == 0


@pytest.mark.parametrize("size", [3, 30])
def test_non_finite_hvp_gives_nan(size):
    """w^1.5 at w = 0: finite gradient (0), infinite second derivative. (Not |w|^1.5: abs's
    double backward makes torch import torch._dynamo, 2 s.)"""
    w = torch.linspace(0, 1, size, dtype=torch.float64, requires_grad=True)
    out = curvature(w.pow(1.5).sum(), [w], generator=seeded())
    assert nan_result(out)


@pytest.mark.parametrize(("partial", "expected"), [([3.0], 3.0), ([], float("nan"))])
def test_arpack_no_convergence_reports_its_partial_eigenvalue(partial, expected, monkeypatch):
    def stuck(*args, **kwargs):
        raise ArpackNoConvergence("no convergence", np.array(partial), None)

    monkeypatch.setattr(hessian, "eigsh", stuck)
    loss, params = loss_and_params(mlp())
    out = curvature(loss, params, generator=seeded())
    assert out["lambda_max"] == pytest.approx(expected, nan_ok=True)
    assert math.isfinite(out["trace"])


def test_other_arpack_errors_give_nan_with_a_warning(monkeypatch):
    def broken(*args, **kwargs):
        raise ArpackError(-9999)

    monkeypatch.setattr(hessian, "eigsh", broken)
    loss, params = loss_and_params(mlp())
    with pytest.warns(RuntimeWarning, match="eigsh failed"):
        assert math.isnan(curvature(loss, params, generator=seeded())["lambda_max"])


def test_bad_arguments_are_refused():
    loss, params = loss_and_params(mlp())
    for kwargs in ({"trace_samples": 0}, {"max_hvps": 0}, {"tol": -1.0}):
        with pytest.raises(ValueError):
            curvature(loss, params, generator=seeded(), **kwargs)
    with pytest.raises(ValueError, match="no autograd graph"):
        curvature(loss.detach(), params, generator=seeded())


def test_lambda_max_stays_within_its_hvp_budget():
    """max_hvps bounds the Lanczos iteration: a spectrum it cannot resolve in the budget gives
    NaN (not converged), and the same spectrum with a larger budget converges."""
    diag = torch.linspace(0.0, 1.0, 400, dtype=torch.float64)  # no gap at the top
    w = torch.randn(400, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    w.requires_grad_(True)
    loss = 0.5 * (diag * w.square()).sum()
    small = curvature(loss, [w], generator=torch.Generator().manual_seed(1), trace_samples=1,
                      max_hvps=12, tol=1e-10)
    assert math.isnan(small["lambda_max"]) and small["hvps"] <= 1 + 12
    large = curvature(loss, [w], generator=torch.Generator().manual_seed(1), trace_samples=1,
                      max_hvps=2000, tol=1e-6)
    assert large["lambda_max"] == pytest.approx(1.0, rel=1e-5) and large["hvps"] <= 1 + 2000
