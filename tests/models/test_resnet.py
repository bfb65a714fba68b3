import math

import pytest
import torch

from normbench.data import DataInfo
from normbench.errors import UserError
from normbench.models import build_model
from normbench.norms import norm_names
from tests.helpers.config_defaults import model_options, norm_spec

INFO = DataInfo(kind="image", num_classes=10)


def resnet(norm="batch", **options):
    return build_model(model_options("resnet", **{"depth": 8, **options}),
                       norm_spec(norm, num_groups=8), INFO)


@pytest.mark.parametrize("norm", norm_names("images"))
def test_every_norm_trains_forward_and_backward(norm):
    torch.manual_seed(0)
    # Full-scale branches: a zeroed branch passes no gradient into its convs at init (the
    # zero init's first steps: test_every_parameter_learns_once_the_branches_have_opened).
    model = resnet(norm, residual_init="default")
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    logits = model(x)
    assert logits.shape == (4, 10)
    torch.nn.functional.cross_entropy(logits, y).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} got no gradient"


@pytest.mark.parametrize("norm,has_bias", [("batch", False), ("group", False), ("layer", False),
                                           ("instance", False), ("none", True), ("rms", True),
                                           ("frn", True), ("dyt", True)])
def test_conv_bias_only_without_a_recentring_norm(norm, has_bias):
    convs = [m for m in resnet(norm).modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all((c.bias is not None) == has_bias for c in convs)


def test_depth_and_parameter_count_match_the_paper():
    # He et al. 2016, Table 6: ResNet-20 has 0.27M parameters, ResNet-56 0.85M.
    for depth, millions in [(20, 0.27), (56, 0.85)]:
        model = build_model(model_options("resnet", depth=depth), norm_spec("batch"), INFO)
        n = sum(p.numel() for p in model.parameters())
        assert abs(n / 1e6 - millions) < 0.01
        convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
        assert convs + 1 == depth  # conv layers + the classifier


def test_bad_depth_is_a_user_error():
    with pytest.raises(UserError, match="6n\\+2"):
        resnet(depth=21)


def test_projection_shortcut_runs():
    model = resnet(shortcut="conv")
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)


def shortcut_of(block, x):
    """A block's shortcut path, written out: He et al.'s option A (subsample, zero-pad the
    new channels half before, half after) or the 1x1 projection."""
    if block.shortcut is not None:
        return block.shortcut(x)
    if block.conv1.stride[0] == 1 and block.conv1.in_channels == block.conv2.out_channels:
        return x
    extra = block.conv2.out_channels - block.conv1.in_channels
    sub = x[:, :, ::2, ::2]
    return torch.cat([sub.new_zeros(sub.shape[0], extra // 2, *sub.shape[2:]), sub,
                      sub.new_zeros(sub.shape[0], extra - extra // 2, *sub.shape[2:])], dim=1)


@pytest.mark.parametrize("shortcut", ["pad", "conv"])
@pytest.mark.parametrize("norm", norm_names("images"))
def test_zero_residual_init_starts_every_block_as_its_shortcut(norm, shortcut):
    torch.manual_seed(0)
    model = resnet(norm, residual_init="zero", shortcut=shortcut).train()
    gated = 0
    for block in model.blocks:
        gamma = getattr(block.norm2, "weight", None)
        # A gamma to zero, or (none, weight, ...) a scalar gate at 0: one of the two, not both.
        assert (gamma is None) == (block.gate is not None)
        if gamma is not None:
            assert torch.count_nonzero(gamma) == 0
        else:
            gated += 1
            assert block.gate.shape == () and block.gate.item() == 0.0
        x = torch.randn(4, block.conv1.in_channels, 8, 8)
        with torch.no_grad():
            assert torch.equal(block(x), torch.relu(shortcut_of(block, x)))
    assert gated == (len(model.blocks) if norm in ("none", "weight") else 0)


def test_skipinit_gates_every_block_and_leaves_gamma_at_one():
    torch.manual_seed(0)
    model = resnet("batch", residual_init="skipinit").train()
    for block in model.blocks:
        assert block.gate.item() == 0.0 and torch.equal(block.norm2.weight,
                                                         torch.ones_like(block.norm2.weight))
        x = torch.randn(4, block.conv1.in_channels, 8, 8)
        with torch.no_grad():
            assert torch.equal(block(x), torch.relu(shortcut_of(block, x)))


@pytest.mark.parametrize("norm", ["batch", "none", "weight", "frn"])
def test_residual_init_changes_nothing_but_the_branch_scales(norm):
    """Same seed: `zero` differs from `default` only in the zeroed gammas and the added gates,
    and `default` has no gate (the init every run had before the option existed)."""
    built = {}
    for init in ("default", "zero", "skipinit"):
        torch.manual_seed(0)
        built[init] = dict(resnet(norm, residual_init=init).named_parameters())
    default = built["default"]
    assert not any(name.endswith("gate") for name in default)
    for init in ("zero", "skipinit"):
        for name, p in built[init].items():
            if name.endswith("gate"):
                assert p.item() == 0.0
            elif init == "zero" and name.endswith("norm2.weight"):
                assert torch.count_nonzero(p) == 0 and torch.equal(default[name],
                                                                   torch.ones_like(p))
            else:
                assert torch.equal(p, default[name]), (init, name)


@pytest.mark.parametrize("norm", norm_names("images"))
def test_every_parameter_learns_once_the_branches_have_opened(norm):
    """At init a zeroed branch passes no gradient into its convs (that is the point); after
    one SGD step its gamma or gate is off zero and every parameter gets a gradient."""
    torch.manual_seed(0)
    model = resnet(norm, residual_init="zero")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} got no gradient"


def test_unknown_residual_init_is_a_user_error():
    with pytest.raises(UserError, match="model.residual_init=ones is not known"):
        resnet(residual_init="ones")


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["none", "weight"])
def test_without_a_norm_resnet20_stays_finite_at_the_default_lr_only_with_zeroed_branches(
        tiny_config, tmp_path, norm):
    """debug=tiny at ResNet-20 depth, lr 0.1 (the default): full-scale branches blow up by
    step 3; branches that start at 0 complete the run with a finite loss."""
    from normbench.engine.train import run_experiment

    runs = {}
    for init in ("default", "zero"):
        config = tiny_config(f"norm={norm}", "model.depth=20", f"model.residual_init={init}")
        assert config["lr"] == 0.1
        runs[init] = run_experiment(config, tmp_path / init, live=False)
    assert runs["default"]["status"] == "diverged"
    zero = runs["zero"]
    assert zero["status"] == "completed" and zero["residual_init"] == "zero"
    assert zero["steps"] == 6 and math.isfinite(zero["final"]["train_loss"])
