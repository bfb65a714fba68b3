"""The optimizer's implementations (fused, foreach, for_loop) apply the same update rule."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from normbench.engine.optim import IMPLEMENTATIONS, build_optimizer, param_groups, resolve_implementation

OPTIMIZERS = {"sgd": {"momentum": 0.9, "nesterov": True}, "adamw": {"betas": (0.9, 0.999)}}


def small_model() -> nn.Module:
    torch.manual_seed(0)
    # No conv bias before the BN: its gradient is ~0, which Adam would blow up to rounding noise.
    return nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.Flatten(),
                         nn.Linear(8 * 16, 5))


def train(model: nn.Module, name: str, implementation: str, steps: int = 4) -> nn.Module:
    optimizer = build_optimizer(model, 0.05, name, 0.01, implementation, **OPTIMIZERS[name])
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(4, 3, 6, 6, generator=g), torch.randint(5, (4,), generator=g)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("implementation", ["fused", "foreach"])
def test_implementations_take_the_same_steps(name, implementation):
    reference = train(small_model(), name, "for_loop")
    other = train(small_model(), name, implementation)
    moved = False
    for (key, a), b in zip(reference.state_dict().items(), other.state_dict().values(),
                           strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=key)
        moved |= not torch.equal(a, small_model().state_dict()[key])
    assert moved  # the comparison is between trained weights, not two initializations


def test_implementation_reaches_torch():
    model = small_model()
    for implementation, kwargs in IMPLEMENTATIONS.items():
        group = build_optimizer(model, 0.1, "sgd", 0.0, implementation,
                                **OPTIMIZERS["sgd"]).param_groups[0]
        assert all(group[k] == v for k, v in kwargs.items()), implementation
    auto = build_optimizer(model, 0.1, "adamw", 0.0, "auto", **OPTIMIZERS["adamw"])
    assert auto.param_groups[0]["foreach"] is True  # CPU parameters: the multi-tensor path


def test_auto_is_fused_on_cuda_only():
    assert resolve_implementation("auto", torch.device("cuda")) == "fused"
    assert resolve_implementation("auto", torch.device("cpu")) == "foreach"
    assert resolve_implementation("for_loop", torch.device("cuda")) == "for_loop"


def test_weight_decay_skips_norm_parameters_and_biases():
    groups = param_groups(small_model(), 0.5)
    assert [p.dim() for p in groups[0]["params"]] == [4, 2]  # conv kernel, linear matrix
    assert all(p.dim() == 1 for p in groups[1]["params"]) and groups[1]["weight_decay"] == 0.0
    assert copy.deepcopy(groups[0]["weight_decay"]) == 0.5


def test_weight_norm_scales_are_not_decayed_and_their_directions_are():
    from normbench.norms import apply_weight_norm

    model = apply_weight_norm(small_model())
    groups = param_groups(model, 0.5)
    decayed = {id(p) for p in groups[0]["params"]}
    named = dict(model.named_parameters())
    scales = [n for n in named if n.endswith("original0")]
    directions = [n for n in named if n.endswith("original1")]
    assert len(scales) == len(directions) == 2  # the conv and the linear layer
    assert not any(id(named[n]) in decayed for n in scales)
    assert all(id(named[n]) in decayed for n in directions)
