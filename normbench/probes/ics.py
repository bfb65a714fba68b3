"""Internal covariate shift as the change of a layer's gradient (Santurkar et al. 2018,
"How Does Batch Normalization Help Optimization?", Def. 2.1).

On one fixed batch, with W the weights before an optimizer step and W' after it, layer i's
shift compares G = ∇_{W_i} L(W_1, …, W_k) with G' = ∇_{W_i} L(W_1', …, W_{i−1}', W_i, …, W_k):
the gradient layer i would get if only the layers before it had taken their step. "Before it"
is a position in the forward pass (`parameter_order`), and it means every earlier parameter,
biases and norm scales included: they belong to earlier layers. `internal_covariate_shift`
reports ‖G − G'‖₂ and cos(G, G') per layer.

A layer none of whose earlier parameters moved (bit for bit: the first layer always) has
G' = G by the determinism `loss_at` promises; it is given l2 = 0 exactly without a forward
pass, rather than a value that a nondeterministic backward (atomics on a GPU) would blur.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from normbench.probes.landscape import LossAt, Params, assign, gradients, snapshot


def parameter_order(model: nn.Module, run_forward: Callable[[], Any]) -> list[str]:
    """Trainable parameter names (as `model.named_parameters()` gives them) in the order their
    owning module is first called in one forward of `run_forward` (under no_grad).

    The order is that of module calls, seen by forward pre-hooks, not of parameter uses: a
    parameter a module uses directly (a ViT's position embedding, owned by the model itself)
    ranks with that module's call. A module called many times (a recurrent cell) ranks at its
    first call; a parameter shared by several modules at the earliest of their first calls.
    A module never called itself whose submodules are (a container whose children use its
    parameters: the LSTM's per-step norms share their container's scale and shift) ranks at
    its first submodule's call. Parameters of modules never called at all come last, in
    registration order. The hooks are removed afterwards, also on an exception.
    """
    first_call: dict[int, int] = {}  # id(module) -> rank of its first call

    def record(module: nn.Module, args: Any) -> None:
        first_call.setdefault(id(module), len(first_call))

    handles = []
    try:
        for module in model.modules():
            handles.append(module.register_forward_pre_hook(record))
        with torch.no_grad():
            run_forward()
    finally:
        for handle in handles:
            handle.remove()
    return rank_by_call(model, first_call)


def rank_by_call(model: nn.Module, first_call: dict[int, int]) -> list[str]:
    """Trainable parameter names sorted by their owners' first call; ties and never-called
    owners keep registration order (the sort is stable)."""
    rank: dict[int, float] = {}  # id(parameter) -> earliest first call of a module owning it
    for module in model.modules():
        called = first_call.get(id(module))
        if called is None:  # a container: when its first submodule was called, if ever
            called = min((first_call.get(id(m), math.inf) for m in module.modules()),
                         default=math.inf)
        for p in module.parameters(recurse=False):
            rank[id(p)] = min(rank.get(id(p), math.inf), called)
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    return [name for name, p in sorted(named, key=lambda item: rank[id(item[1])])]


def nan_shift() -> dict[str, float]:
    return {"l2": math.nan, "cos": math.nan}


def compare(g: torch.Tensor, g_shift: torch.Tensor) -> dict[str, float]:
    """‖G − G'‖₂ and cos(G, G') in fp64; NaN for anything not finite, cos NaN with a zero G or G'.

    cos = ⟨G,G'⟩ / sqrt(⟨G,G⟩⟨G',G'⟩) is exactly 1 for G' = G (sqrt of a rounded square is
    exact), and clamped to [−1, 1] against rounding otherwise."""
    g, h = g.detach().reshape(-1).double(), g_shift.detach().reshape(-1).double()
    gg, hh, gh, l2 = torch.stack([g @ g, h @ h, g @ h, torch.linalg.vector_norm(g - h)]).tolist()
    if not all(math.isfinite(v) for v in (gg, hh, gh, l2)):
        return nan_shift()
    cos = gh / math.sqrt(gg * hh) if gg > 0 and hh > 0 else math.nan
    return {"l2": l2, "cos": cos if math.isnan(cos) else max(-1.0, min(1.0, cos))}


def check_inputs(params: Params, before: dict[str, torch.Tensor], layers: Sequence[str]) -> None:
    """Unknown layers, missing or misshapen before-values are caller errors: raise before
    touching the model (copy_ would broadcast a wrong shape silently)."""
    names = {name for name, _ in params}
    if unknown := [name for name in layers if name not in names]:
        raise ValueError(f"layers not among the parameters: {unknown}")
    if missing := [name for name in names if name not in before]:
        raise KeyError(f"no before-step value for: {missing}")
    if wrong := [name for name, p in params if before[name].shape != p.shape]:
        raise ValueError(f"before-step values of the wrong shape for: {wrong}")


def shifted_gradient(loss_at: LossAt, weight: torch.Tensor) -> torch.Tensor | None:
    """G' of one layer: one forward and backward, only w.r.t. its weight; None if the loss
    is not finite."""
    loss = loss_at()
    (g_shift,) = gradients(loss, [weight])
    return g_shift if math.isfinite(float(loss.detach())) else None


def internal_covariate_shift(loss_at: LossAt, params: Params, before: dict[str, torch.Tensor],
                             layers: Sequence[str]) -> dict[str, dict[str, float]]:
    """{layer: {"l2": ‖G − G'‖₂, "cos": cos(G, G')}} for each weight named in `layers`.

    Called after the optimizer step: the parameters hold W' now, `before` holds W for every
    name of `params`, which is in forward order. G for all layers comes from one backward at
    W; G' walks the layers in forward order, moving the parameters ahead of each to their
    after-values, one forward and backward per layer whose earlier parameters moved. A
    non-finite loss gives NaN values (all layers at W, one layer at its G'). The parameters
    end at their after-values, bit-exactly, also on an exception; each loss is differentiated
    before `loss_at` is called again (see probes.landscape on resetting buffers).
    """
    check_inputs(params, before, layers)
    if not layers:
        return {}
    position = {name: k for k, (name, _) in enumerate(params)}
    order = sorted(dict.fromkeys(layers), key=position.__getitem__)
    after = snapshot(params)
    try:
        assign(params, (before[name] for name, _ in params))
        loss = loss_at()
        grads = dict(zip(order, gradients(loss, [params[position[n]][1] for n in order]), strict=True))
        if not math.isfinite(float(loss.detach())):
            return {name: nan_shift() for name in layers}
        shifts = walk_layers(loss_at, params, after, order, grads, position)
    finally:
        assign(params, after)
    return {name: shifts[name] for name in layers}


def walk_layers(loss_at: LossAt, params: Params, after: list[torch.Tensor], order: list[str],
                grads: dict[str, torch.Tensor], position: dict[str, int]) -> dict[str, dict[str, float]]:
    """The G' pass of `internal_covariate_shift`: params[:k] move to their after-values as the
    walk reaches the layer at position k (never back: `order` is sorted by position)."""
    shifts, moved, any_moved = {}, 0, False
    for name in order:
        k = position[name]
        with torch.no_grad():
            for (_, p), value in zip(params[moved:k], after[moved:k], strict=True):
                any_moved = any_moved or not torch.equal(p, value)
                p.copy_(value)
        moved = k
        if not any_moved:  # the model is still at W: G' is G (see the module docstring)
            shifts[name] = compare(grads[name], grads[name])
            continue
        g_shift = shifted_gradient(loss_at, params[k][1])
        shifts[name] = nan_shift() if g_shift is None else compare(grads[name], g_shift)
    return shifts
