"""Curvature of the training loss at the current parameters, as PyHessian measures it (Yao et al.
2020, "PyHessian: Neural Networks Through the Lens of the Hessian"): the largest Hessian
eigenvalue (Lanczos, ARPACK's `eigsh`) and the trace (Hutchinson's estimator), both from
Hessian-vector products (HVPs); the Hessian itself is never stored, except for a handful of
parameters.

HVPs come from double backward, `torch.autograd.grad` of the gradients, not from
`torch.func.jvp(torch.func.grad(f))`: torch.func refuses old-style `torch.autograd.Function`s
(no `setup_context`), which the norms use, and forwards that update buffers in place, as
BatchNorm does with its running statistics in training mode.

What is differentiated is the backward as written: where a custom backward is not the
gradient of its forward (PowerNorm's approximate backpropagation in training mode) the
"Hessian" is the Jacobian of that backward, not symmetric, and lambda_max loses its meaning.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from scipy.sparse.linalg import ArpackError, ArpackNoConvergence, LinearOperator, eigsh

# Up to this many parameters the Hessian is built from P HVPs with unit vectors and solved
# densely: ARPACK's Lanczos basis (ncv = min(P, 20) for k = 1) would span the whole space
# anyway, so it cannot be cheaper, and eigsh needs k < P (P = 1 is impossible for it).
DENSE_MAX = 20
NCV = 20  # Lanczos basis size (ARPACK's default for k = 1), fewer under a smaller HVP budget

NAN = float("nan")


class _NonFinite(Exception):
    """An HVP returned inf or NaN: raised inside eigsh's matvec to stop the iteration."""


class _OverBudget(Exception):
    """max_hvps HVPs are spent and eigsh has not converged."""


def hessian_vector_product(grads: list[torch.Tensor], params: list[torch.Tensor],
                           vector: list[torch.Tensor]) -> list[torch.Tensor]:
    """H @ vector, one tensor per parameter, from `grads` = dloss/dparams taken with
    create_graph=True. The graph is retained, so it can be called again with the same grads.

    A gradient without a graph (its parameter is unused, or enters the loss linearly) has zero
    second derivatives: it is left out of the backward, which would refuse it.
    """
    live = [i for i, g in enumerate(grads) if g.requires_grad]
    if not live:
        return [torch.zeros_like(p) for p in params]
    hv = torch.autograd.grad([grads[i] for i in live], params,
                             grad_outputs=[vector[i] for i in live],
                             retain_graph=True, allow_unused=True, materialize_grads=True)
    return list(hv)


def _flatten(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _split(flat: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    chunks = torch.split(flat, [p.numel() for p in params])
    return [c.view(p.shape).to(p.dtype) for c, p in zip(chunks, params, strict=True)]


class _Hessian:
    """H as a map on flat vectors (the params' order, each param flattened), counting HVPs."""

    def __init__(self, grads: list[torch.Tensor], params: list[torch.Tensor]):
        self.grads, self.params = grads, params
        self.size = sum(p.numel() for p in params)
        self.dtype, self.device = params[0].dtype, params[0].device
        self.count = 0

    def __call__(self, flat: torch.Tensor) -> torch.Tensor:
        self.count += 1
        vector = _split(flat.to(self.device, self.dtype), self.params)
        return _flatten(hessian_vector_product(self.grads, self.params, vector))


def _gradients(loss: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """dloss/dparams with their graph (zeros for unused params), or None when the loss or a
    gradient is not finite: a diverged model has no curvature worth an HVP."""
    if not loss.requires_grad:
        raise ValueError("curvature: the loss has no autograd graph (computed under no_grad?)")
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True,
                                materialize_grads=True)
    finite = torch.stack([torch.isfinite(loss).all(), *(torch.isfinite(g).all() for g in grads)])
    return list(grads) if bool(finite.all()) else None


def _rademacher(size: int, generator: torch.Generator) -> torch.Tensor:
    """Entries ±1, drawn on the CPU so that a seed gives the same vectors on every device."""
    return 2 * torch.randint(0, 2, (size,), generator=generator) - 1


def _hutchinson(hessian: _Hessian, generator: torch.Generator, samples: int) -> tuple[float, float]:
    """Mean of v^T H v over `samples` Rademacher vectors, and its standard error; NaN for both
    when any v^T H v is not finite."""
    quads = []
    for _ in range(samples):
        v = _rademacher(hessian.size, generator).to(hessian.device, hessian.dtype)
        # float64 sum: v^T H v of a large model is a sum of millions of fp32 terms
        quads.append(torch.sum(v * hessian(v), dtype=torch.float64))
    q = torch.stack(quads).cpu().numpy()
    if not np.isfinite(q).all():  # an overflow, not a measurement: NaN like every other failure
        return NAN, NAN
    stderr = float(q.std(ddof=1) / math.sqrt(samples)) if samples > 1 else NAN
    return float(q.mean()), stderr


def _lambda_max_dense(hessian: _Hessian) -> float:
    """Largest eigenvalue of H built column by column from P unit-vector HVPs (small P)."""
    eye = torch.eye(hessian.size, dtype=hessian.dtype, device=hessian.device)
    h = torch.stack([hessian(e) for e in eye], dim=1).double().cpu().numpy()
    if not np.isfinite(h).all():
        return NAN
    # double backward is symmetric only up to rounding; eigvalsh reads one triangle
    return float(np.linalg.eigvalsh((h + h.T) / 2)[-1])


def _lambda_max_arpack(hessian: _Hessian, generator: torch.Generator, tol: float,
                       max_hvps: int) -> float:
    """Largest algebraic eigenvalue of H by implicitly restarted Lanczos (eigsh, "LA"), in at
    most `max_hvps` HVPs: a Lanczos basis of NCV vectors costs NCV HVPs, each restart
    NCV - 1 more, so the budget sets the basis size and the number of restarts; past it the
    iteration stops (lambda_max NaN: not converged)."""
    v0 = torch.randn(hessian.size, generator=generator, dtype=torch.float64).numpy()
    all_zero = None  # True: there were HVPs, and every one was exactly 0
    ncv = max(2, min(hessian.size, NCV, max_hvps))
    restarts = max(1, (max_hvps - ncv) // (ncv - 1) + 1)
    budget = hessian.count + max_hvps

    def matvec(x: np.ndarray) -> np.ndarray:
        nonlocal all_zero
        if hessian.count >= budget:
            raise _OverBudget
        hv = hessian(torch.tensor(x.reshape(-1), dtype=torch.float64)).double().cpu().numpy()
        if not np.isfinite(hv).all():
            raise _NonFinite
        all_zero = all_zero is not False and not hv.any()
        return hv

    op = LinearOperator((hessian.size, hessian.size), matvec=matvec, dtype=np.float64)
    try:
        values = eigsh(op, k=1, which="LA", v0=v0, tol=tol, maxiter=restarts, ncv=ncv,
                       return_eigenvectors=False)
    except (_NonFinite, _OverBudget):
        return NAN
    except ArpackNoConvergence as e:  # the eigenvalues that did converge (k = 1: none)
        return float(np.max(e.eigenvalues)) if len(e.eigenvalues) else NAN
    except ArpackError as e:
        # H v0 = 0 for a Gaussian v0 means (almost surely) H = 0; ARPACK then fails with
        # "starting vector is zero" since it cannot extend the Krylov space.
        if all_zero:
            return 0.0
        warnings.warn(f"curvature: eigsh failed, lambda_max is NaN ({e})", RuntimeWarning,
                      stacklevel=3)
        return NAN
    return float(values.max())


def _check(params: list[torch.Tensor], trace_samples: int, max_hvps: int, tol: float) -> None:
    if not params:
        raise ValueError("curvature: no parameters")
    if trace_samples < 1 or max_hvps < 1 or tol < 0:
        raise ValueError(f"curvature: need trace_samples >= 1, max_hvps >= 1, tol >= 0; got "
                         f"{trace_samples}, {max_hvps}, {tol}")


def curvature(loss: torch.Tensor, params: list[torch.Tensor], *, generator: torch.Generator,
              trace_samples: int = 20, max_hvps: int = 100, tol: float = 1e-3) -> dict[str, float]:
    """Largest Hessian eigenvalue and Hutchinson trace of `loss` w.r.t. `params`.

    Returns {"lambda_max", "trace", "trace_stderr" (sample std / sqrt(trace_samples); NaN for
    one sample), "hvps" (HVPs done, an int)}. `loss` must still hold its graph; it is
    differentiated with `torch.autograd.grad` only, so p.grad and the params are untouched.
    The backward runs once more, with whatever side effects a custom backward has.

    Randomness comes from `generator` (CPU) alone, in this order: trace_samples Rademacher
    vectors `2 * torch.randint(0, 2, (P,), generator=generator) - 1` (P = total parameter
    count, params flattened and concatenated in order), then for P > DENSE_MAX eigsh's start
    vector `torch.randn(P, generator=generator, dtype=torch.float64)`.

    A non-finite loss or gradient gives NaN for every value (hvps = 0) without an HVP; a
    non-finite HVP makes the values it feeds NaN (lambda_max, or trace and its stderr). If
    lambda_max has not converged within max_hvps HVPs (trace_samples more go to the trace),
    it is NaN: eigsh reports no partial eigenvalue for k = 1.
    """
    _check(params, trace_samples, max_hvps, tol)
    grads = _gradients(loss, params)
    if grads is None:
        return {"lambda_max": NAN, "trace": NAN, "trace_stderr": NAN, "hvps": 0}
    hessian = _Hessian(grads, params)
    trace, stderr = _hutchinson(hessian, generator, trace_samples)
    if hessian.size <= DENSE_MAX:
        lam = _lambda_max_dense(hessian)
    else:
        lam = _lambda_max_arpack(hessian, generator, tol, max_hvps)
    return {"lambda_max": lam, "trace": trace, "trace_stderr": stderr, "hvps": hessian.count}
