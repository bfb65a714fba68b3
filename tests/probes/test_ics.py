"""Internal covariate shift (probes.ics) against a two-layer network worked by hand and a direct
functional_call computation, and the forward order of the parameters it relies on."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from normbench.probes.ics import internal_covariate_shift, parameter_order

# ------------------------------------------------------- y = W2 · relu(W1 · x), worked by hand

X = torch.tensor([[1.0, 2.0], [-1.0, 0.5], [0.5, -1.5], [2.0, 1.0]])
Y = torch.tensor([[1.0], [0.0], [-1.0], [2.0]])
W1 = torch.tensor([[0.5, -0.2], [0.3, 0.8], [-0.6, 0.4]])
W2 = torch.tensor([[1.0, -0.5, 0.7]])
W1_AFTER = torch.tensor([[0.4, -0.1], [0.35, 0.7], [-0.5, 0.45]])
W2_AFTER = torch.tensor([[0.9, -0.4, 0.8]])
LAYERS = ["fc1.weight", "fc2.weight"]


class TwoLayer(nn.Module):
    def __init__(self, bias: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(2, 3, bias=bias)
        self.fc2 = nn.Linear(3, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def stepped(w1_after: torch.Tensor, w2_after: torch.Tensor, bias: bool = False):
    """The network at its after-values, its parameters, the before-values and a counting loss_at
    (½ mean squared error on the fixed batch)."""
    model = TwoLayer(bias)
    with torch.no_grad():
        model.fc1.weight.copy_(W1)
        model.fc2.weight.copy_(W2)
    params = list(model.named_parameters())
    before = {name: p.detach().clone() for name, p in params}
    with torch.no_grad():
        model.fc1.weight.copy_(w1_after)
        model.fc2.weight.copy_(w2_after)
    calls = []

    def loss_at() -> torch.Tensor:
        calls.append(1)
        return 0.5 * (model(X) - Y).square().mean()

    return model, params, before, loss_at, calls


def grad_w2(w1: torch.Tensor, w2: torch.Tensor, b1: torch.Tensor | None = None) -> torch.Tensor:
    """∂L/∂W2 = mean_n (W2 h_n − y_n) h_nᵀ with h = relu(W1 x + b1): the chain rule by hand."""
    h = torch.relu(X @ w1.T + (0 if b1 is None else b1))
    return (h @ w2.T - Y).T @ h / len(X)


def shift(g: torch.Tensor, g_shift: torch.Tensor) -> dict[str, float]:
    cos = F.cosine_similarity(g.flatten(), g_shift.flatten(), dim=0)
    return {"l2": (g - g_shift).norm().item(), "cos": cos.item()}


def test_two_layers_match_the_hand_computation():
    model, params, before, loss_at, calls = stepped(W1_AFTER, W2_AFTER)
    after = [p.detach().clone() for _, p in params]
    out = internal_covariate_shift(loss_at, params, before, LAYERS)
    # G' of layer 2 sees W1' and W2; layer 1 has nothing before it, so its G' is G.
    expected = shift(grad_w2(W1, W2), grad_w2(W1_AFTER, W2))
    assert expected["l2"] > 1e-3  # the step moved W1 enough to matter
    assert out["fc2.weight"]["l2"] == pytest.approx(expected["l2"], rel=1e-6)
    assert out["fc2.weight"]["cos"] == pytest.approx(expected["cos"], rel=1e-6)
    assert out["fc1.weight"] == {"l2": 0.0, "cos": 1.0}
    assert len(calls) == 2  # G at W, then G' for layer 2 only
    assert all(torch.equal(p, v) for (_, p), v in zip(params, after, strict=True))
    assert all(p.grad is None for _, p in params)


def test_hand_gradient_agrees_with_autograd():
    w2 = W2.clone().requires_grad_()
    loss = 0.5 * (torch.relu(X @ W1_AFTER.T) @ w2.T - Y).square().mean()
    (g,) = torch.autograd.grad(loss, [w2])
    assert torch.allclose(g, grad_w2(W1_AFTER, W2), rtol=1e-6, atol=0)


def test_only_the_last_layer_moved_means_no_shift_anywhere():
    _, params, before, loss_at, calls = stepped(W1, W2_AFTER)
    out = internal_covariate_shift(loss_at, params, before, LAYERS)
    assert out == {"fc1.weight": {"l2": 0.0, "cos": 1.0}, "fc2.weight": {"l2": 0.0, "cos": 1.0}}
    assert len(calls) == 1  # W2's G' uses W1' = W1: the model at W, so no second forward


def test_an_earlier_bias_is_part_of_an_earlier_layer():
    b1, b1_after = torch.tensor([0.1, -0.2, 0.3]), torch.tensor([-0.3, 0.2, 0.5])
    model, params, before, loss_at, _ = stepped(W1, W2, bias=True)
    with torch.no_grad():
        model.fc1.bias.copy_(b1)
    before["fc1.bias"] = b1.clone()
    with torch.no_grad():
        model.fc1.bias.copy_(b1_after)
    out = internal_covariate_shift(loss_at, params, before, LAYERS)
    expected = shift(grad_w2(W1, W2, b1), grad_w2(W1, W2, b1_after))
    assert out["fc2.weight"] == pytest.approx(expected, rel=1e-6)
    assert out["fc1.weight"] == {"l2": 0.0, "cos": 1.0}  # fc1.bias comes after fc1.weight


def test_a_dead_layer_has_no_direction():
    # W1' = 0: h' = relu(0) = 0, so G' of layer 2 is zero: l2 = ‖G‖ and no cosine.
    _, params, before, loss_at, _ = stepped(torch.zeros(3, 2), W2)
    out = internal_covariate_shift(loss_at, params, before, ["fc2.weight"])
    assert out["fc2.weight"]["l2"] == pytest.approx(grad_w2(W1, W2).norm().item(), rel=1e-6)
    assert math.isnan(out["fc2.weight"]["cos"])


def test_a_nan_loss_gives_nan_and_restores_the_parameters():
    model, params, before, _, _ = stepped(W1_AFTER, W2_AFTER)
    out = internal_covariate_shift(lambda: model(X).sum() * math.nan, params, before, LAYERS)
    assert all(math.isnan(v) for layer in out.values() for v in layer.values())
    assert torch.equal(model.fc1.weight, W1_AFTER) and torch.equal(model.fc2.weight, W2_AFTER)


def test_an_exception_restores_the_after_values():
    model, params, before, loss_at, calls = stepped(W1_AFTER, W2_AFTER)

    def failing() -> torch.Tensor:
        if calls:  # the second call: fc1 holds W1', fc2 still W2
            raise RuntimeError("boom")
        return loss_at()

    with pytest.raises(RuntimeError, match="boom"):
        internal_covariate_shift(failing, params, before, LAYERS)
    assert torch.equal(model.fc1.weight, W1_AFTER) and torch.equal(model.fc2.weight, W2_AFTER)


def test_caller_errors_are_refused_before_touching_the_model():
    model, params, before, loss_at, calls = stepped(W1_AFTER, W2_AFTER)
    with pytest.raises(ValueError, match="fc3.weight"):
        internal_covariate_shift(loss_at, params, before, ["fc3.weight"])
    with pytest.raises(KeyError, match="fc2.weight"):
        internal_covariate_shift(loss_at, params, {"fc1.weight": W1}, LAYERS)
    with pytest.raises(ValueError, match="wrong shape"):
        internal_covariate_shift(loss_at, params, {**before, "fc2.weight": torch.zeros(())}, LAYERS)
    assert not calls and torch.equal(model.fc1.weight, W1_AFTER)


# ------------------------------------------------- a deeper network with BatchNorm, after an SGD step


def test_matches_functional_call_after_an_sgd_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 8),
                          nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).train()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 4, generator=gen), torch.randint(0, 3, (16,), generator=gen)
    buffers = {name: b.clone() for name, b in model.named_buffers()}

    def loss_of(values: dict[str, torch.Tensor]) -> torch.Tensor:  # on copies of the buffers
        copies = {name: b.clone() for name, b in buffers.items()}
        return F.cross_entropy(functional_call(model, {**values, **copies}, (x,)), y)

    def loss_at() -> torch.Tensor:
        return loss_of(dict(model.named_parameters()))

    order = parameter_order(model, lambda: model(x))
    named = dict(model.named_parameters())
    params = [(name, named[name]) for name in order]
    before = {name: p.detach().clone() for name, p in params}
    grads = torch.autograd.grad(loss_at(), [p for _, p in params])
    with torch.no_grad():
        for (_, p), g in zip(params, grads, strict=True):
            p.sub_(0.5 * g)
    after = {name: p.detach().clone() for name, p in params}
    layers = ["0.weight", "3.weight", "6.weight"]
    out = internal_covariate_shift(loss_at, params, before, layers)
    for layer in layers:
        k = order.index(layer)
        mixed = {name: (after if i < k else before)[name] for i, name in enumerate(order)}
        leaf = before[layer].clone().requires_grad_()
        (g,) = torch.autograd.grad(loss_of(before | {layer: leaf}), [leaf])
        (g_shift,) = torch.autograd.grad(loss_of(mixed | {layer: leaf}), [leaf])
        assert out[layer] == pytest.approx(shift(g, g_shift), rel=1e-6), layer
    assert out["0.weight"] == {"l2": 0.0, "cos": 1.0} and out["6.weight"]["l2"] > 0
    assert all(torch.equal(p, after[name]) for name, p in params)


# ------------------------------------------------------------------------------ parameter order


class Shuffled(nn.Module):
    """Registered b, unused, a, frozen, scale; called frozen, a, b, a again."""

    def __init__(self):
        super().__init__()
        self.b = nn.Linear(3, 3)
        self.unused = nn.Linear(3, 3)
        self.a = nn.Linear(3, 3)
        self.frozen = nn.Linear(3, 3).requires_grad_(False)
        self.scale = nn.Parameter(torch.ones(3))
        self.grad_enabled = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.grad_enabled = torch.is_grad_enabled()
        return self.a(self.b(self.a(self.frozen(x)))) * self.scale


def test_parameter_order_is_call_order_and_leaves_no_hooks():
    model = Shuffled()
    order = parameter_order(model, lambda: model(torch.randn(2, 3)))
    # The model itself is called first, so a parameter it owns directly ranks first; `a` is
    # called again after `b` but ranks at its first call; frozen parameters are not listed.
    assert order == ["scale", "a.weight", "a.bias", "b.weight", "b.bias", "unused.weight", "unused.bias"]
    assert model.grad_enabled is False
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_parameter_order_removes_its_hooks_on_an_exception():
    model = Shuffled()

    def failing() -> None:
        model(torch.randn(2, 3))
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        parameter_order(model, failing)
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_a_container_whose_children_use_its_parameters_ranks_at_its_first_childs_call():
    """The LSTM's per-step norms share their container's scale and shift, and the cell calls
    the step children (`norm.at(t)`), never the container: its parameters rank where its
    first step child was called, before the parameters of later layers, not last."""
    from normbench.data import DataInfo
    from normbench.models import build_model
    from tests.helpers.config_defaults import model_options, norm_spec

    model = build_model(model_options("lstm", depth=1, hidden=4, embed=4, t_max=3),
                        norm_spec("batch"), DataInfo(kind="text", num_classes=7, seq_len=3))
    order = parameter_order(model, lambda: model(torch.randint(0, 7, (2, 3))))
    names = [n for n, _ in model.named_parameters()]
    head = [n for n in names if n.startswith("head")]
    shared = [n for n in names if ".norm_h." in n or ".norm_c." in n]
    assert shared and head
    assert max(order.index(n) for n in shared) < min(order.index(n) for n in head)
