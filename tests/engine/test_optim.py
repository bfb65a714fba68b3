"""The optimizer's implementations (fused, foreach, for_loop) apply the same update rule;
the step schedule's rates against a direct computation, and its options' checks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from normbench.config.checks import check_ranges
from normbench.engine.optim import (
    IMPLEMENTATIONS,
    build_optimizer,
    build_scheduler,
    param_groups,
    resolve_implementation,
)
from normbench.errors import UserError

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


def scheduled_rates(lr: float, total_steps: int, **sched) -> list[float]:
    """The learning rate that each step 0..total_steps-1 trains with."""
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=lr)
    scheduler = build_scheduler(optimizer, total_steps, **sched)
    rates = []
    for _ in range(total_steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_step_schedule_warms_up_then_divides_by_ten_at_each_milestone():
    # 20 steps: warm-up over 2, milestones at steps 10 and 15 exactly (0.5 and 0.75 of 20).
    rates = scheduled_rates(0.4, 20, name="step", warmup_frac=0.1, milestones=[0.5, 0.75],
                            gamma=0.1)
    expected = [0.2, 0.4] + [0.4] * 8 + [0.04] * 5 + [0.004] * 5
    assert rates == pytest.approx(expected, rel=1e-12)
    assert rates[9] == pytest.approx(0.4) and rates[10] == pytest.approx(0.04)  # on the step


def test_step_schedule_is_goyal_et_al_s_epochs_30_60_80_of_90():
    # setup=imagenet's schedule, 7 steps per epoch: 5 epochs of warm-up, then x0.1 from the
    # first step of epochs 31, 61 and 81 (epochs counted from 1), computed from the epoch.
    per_epoch, lr = 7, 0.1
    rates = scheduled_rates(lr, 90 * per_epoch, name="step", warmup_frac=5 / 90,
                            milestones=[30 / 90, 60 / 90, 80 / 90], gamma=0.1)
    warmup = 5 * per_epoch
    expected = [lr * min(1.0, (s + 1) / warmup) * 0.1 ** sum(s // per_epoch >= e for e in (30, 60, 80))
                for s in range(90 * per_epoch)]
    assert rates == pytest.approx(expected, rel=1e-9)
    assert rates[30 * per_epoch - 1] == pytest.approx(lr)
    assert rates[30 * per_epoch] == pytest.approx(lr / 10)
    assert rates[-1] == pytest.approx(lr / 1000)


def test_a_milestone_inside_the_warm_up_scales_it():
    rates = scheduled_rates(1.0, 10, name="step", warmup_frac=0.4, milestones=[0.2], gamma=0.5)
    assert rates == pytest.approx([0.25, 0.5, 0.375, 0.5] + [0.5] * 6)


def sched_error(**sched) -> str:
    with pytest.raises(UserError) as caught:
        check_ranges({"sched": {"name": "step", "warmup_frac": 0.0, "gamma": 0.1, **sched}})
    line = str(caught.value)
    assert "\n" not in line and "Fix: use e.g. sched." in line, line
    return line


@pytest.mark.parametrize("milestones, problem", [
    ([0.5, 0.4], "sched.milestones=[0.5,0.4] must increase: 0.4 follows 0.5"),
    ([0.5, 0.5], "sched.milestones=[0.5,0.5] must increase: 0.5 follows 0.5"),
    ([0.0, 0.5], "sched.milestones[0]=0.0 must be a number, above 0 and at most 1"),
    ([0.5, 1.5], "sched.milestones[1]=1.5 must be a number, above 0 and at most 1"),
    ([-0.2], "sched.milestones[0]=-0.2 must be a number, above 0 and at most 1"),
    ([float("nan")], "sched.milestones[0]=nan must be a finite number"),
    (0.5, "sched.milestones=0.5 must be a list of fractions of the steps"),
])
def test_out_of_range_milestones_are_refused_in_one_line(milestones, problem):
    assert sched_error(milestones=milestones).startswith(problem)


def test_milestones_in_range_and_gamma_pass_and_a_bad_gamma_does_not():
    check_ranges({"sched": {"name": "step", "warmup_frac": 0.05, "gamma": 1.0,
                            "milestones": [30 / 90, 60 / 90, 1.0]}})
    check_ranges({"sched": {"name": "step", "warmup_frac": 0.0, "gamma": 0.1, "milestones": []}})
    assert sched_error(milestones=[0.5], gamma=0.0).startswith(
        "sched.gamma=0.0 must be a number, above 0 and at most 1")
