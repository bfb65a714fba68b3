"""normbench's norm in a model built elsewhere (normbench.models.convert): torchvision's
ResNet-18 against direct computations (ghost BN, GroupNorm, the shift of norm=none, the
zeroed branches of zero_init_residual), and the pieces on their own (layouts, AsTokens,
ThenActivation, weight norm on a zeroed layer)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from normbench.data import DataInfo
from normbench.errors import UserError
from normbench.models.convert import (
    AsImages,
    AsTokens,
    NormSlot,
    ShiftOnly,
    ThenActivation,
    ZeroGate,
    layout_of,
)
from normbench.models.external import build_with_slots, place_norms
from normbench.norms import GhostBatchNorm2d, ImageGroupNorm, create_norm
from tests.helpers.config_defaults import model_options, norm_spec

INFO = DataInfo(kind="image", num_classes=10, image_size=32)
BLOCKS = [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]


def resnet18(norm, slots: bool = True, info: DataInfo = INFO, **kwargs) -> nn.Module:
    """torchvision's ResNet-18 (seed 0) with `norm` (a name or a NormSpec) in its norms' places."""
    torch.manual_seed(0)
    model = build_with_slots(model_options("torchvision", kwargs=kwargs), info, slots=slots)
    return place_norms(model, norm_spec(norm) if isinstance(norm, str) else norm, info)


def randomize_affine(model: nn.Module, kind: type) -> int:
    """Gammas and betas off 1 and 0, so that the comparisons see them; returns the count."""
    layers = [m for m in model.modules() if isinstance(m, kind)]
    with torch.no_grad():
        for m in layers:
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_()
    return len(layers)


def train_pass(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    model.train()
    out = model(x)
    F.cross_entropy(out, y).backward()
    return out


def test_ghost_bn_over_the_whole_batch_is_torchs_batchnorm_bit_for_bit():
    """norm.stats_batch = the batch inside ResNet-18 (through norm_layer) against the model
    with nn.BatchNorm2d: outputs, every gradient and the running statistics, bit for bit."""
    torch.manual_seed(0)
    plain = build_with_slots(model_options("torchvision"), INFO, slots=False)
    assert randomize_affine(plain, nn.BatchNorm2d) == 20
    ghost = resnet18(norm_spec("batch", stats_batch=8))
    assert sum(isinstance(m, GhostBatchNorm2d) and m.stats_batch == 8
               for m in ghost.modules()) == 20
    ghost.load_state_dict(plain.state_dict())  # strict: the same names and shapes
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    assert torch.equal(train_pass(ghost, x, y), train_pass(plain, x, y))
    grads = dict(plain.named_parameters())
    for name, p in ghost.named_parameters():
        assert torch.equal(p.grad, grads[name].grad), name
    running = plain.state_dict()
    for name, value in ghost.state_dict().items():
        assert torch.equal(value, running[name]), name


def test_ghost_bn_in_groups_of_four_is_the_model_run_on_each_group():
    """Convolutions see one sample at a time, so with stats_batch=4 every BN of the model
    normalizes each half of a batch of 8 on its own: the model on each half, concatenated."""
    ghost = resnet18(norm_spec("batch", stats_batch=4)).train()
    plain = resnet18(norm_spec("batch")).train()
    plain.load_state_dict(ghost.state_dict())
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        halves = torch.cat([plain(x[:4]), plain(x[4:])])
        torch.testing.assert_close(ghost(x), halves, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(plain(x), halves, rtol=1e-4, atol=1e-5)  # it does matter


def test_group_norm_in_every_place_is_torchs_group_norm():
    model = resnet18("group")  # num_groups 8
    assert randomize_affine(model, ImageGroupNorm) == 20
    seen = []
    for m in model.modules():
        if isinstance(m, ImageGroupNorm):
            m.register_forward_hook(lambda m, a, out: seen.append((m, a[0], out.clone())))
    model.train()(torch.randn(4, 3, 32, 32))
    assert len(seen) == 20
    for m, x, out in seen:
        reference = nn.GroupNorm(8, m.num_channels, eps=1e-5)
        reference.load_state_dict(m.state_dict())
        assert torch.equal(out, reference(x))


def test_norm_layer_and_replacement_build_the_same_model():
    """ResNet-18 with the norm through norm_layer and the same built with BatchNorm2d then
    replaced: the same modules at the same paths, the same init, the same function."""
    injected, replaced = resnet18("group"), resnet18("group", slots=False)
    assert injected.normbench_took_norm_layer and not replaced.normbench_took_norm_layer
    modules = [(path, type(m)) for path, m in injected.named_modules()]
    assert modules == [(path, type(m)) for path, m in replaced.named_modules()]
    assert sum(t is ImageGroupNorm for _, t in modules) == 20
    assert not any(issubclass(t, (_BatchNorm, NormSlot)) for _, t in modules)
    expected = replaced.state_dict()
    for name, value in injected.state_dict().items():
        assert torch.equal(value, expected[name]), name
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(injected(x), replaced(x))


def test_norm_none_keeps_the_beta_as_a_conv_bias():
    model = resnet18("none")
    shifts = [m for m in model.modules() if isinstance(m, ShiftOnly)]
    assert len(shifts) == 20 and all(torch.count_nonzero(s.bias) == 0 for s in shifts)
    with torch.no_grad():
        model.bn1.bias.normal_()
        x = torch.randn(2, 3, 32, 32)
        conv = model.conv1
        direct = F.conv2d(x, conv.weight, model.bn1.bias, conv.stride, conv.padding)
        torch.testing.assert_close(model.bn1(conv(x)), direct, rtol=1e-5, atol=1e-6)
    # On tokens the shift is on the last axis: a linear layer's bias.
    linear, shift = nn.Linear(6, 4, bias=False), ShiftOnly(4, channel_axis=-1)
    with torch.no_grad():
        shift.bias.normal_()
        x = torch.randn(2, 5, 6)
        torch.testing.assert_close(shift(linear(x)), F.linear(x, linear.weight, shift.bias))


@pytest.mark.parametrize("norm", ["batch", "none"])
def test_zero_init_residual_starts_every_block_as_its_shortcut(norm):
    """kwargs.zero_init_residual: bn2's gamma is 0 with norm=batch, and with norm=none (no
    gamma) a ZeroGate at 0 stands there; each block then computes relu(shortcut)."""
    model = resnet18(norm, zero_init_residual=True).train()
    for name in BLOCKS:
        block = model.get_submodule(name)
        if norm == "batch":
            assert isinstance(block.bn2, GhostBatchNorm2d)
            assert torch.count_nonzero(block.bn2.weight) == 0
            assert torch.equal(block.bn1.weight, torch.ones_like(block.bn1.weight))
        else:
            assert isinstance(block.bn2, ZeroGate) and block.bn2.gate.item() == 0.0
            assert isinstance(block.bn2.norm, ShiftOnly) and isinstance(block.bn1, ShiftOnly)
        x = torch.randn(2, block.conv1.in_channels, 8, 8)
        with torch.no_grad():
            shortcut = x if block.downsample is None else block.downsample(x)
            assert torch.equal(block(x), torch.relu(shortcut))
    plain = resnet18(norm)  # without the kwarg: no gate, no zero
    assert not any(isinstance(m, ZeroGate) for m in plain.modules())
    if norm == "batch":
        assert torch.count_nonzero(plain.layer1[0].bn2.weight) == 64


def test_a_zeroed_gamma_the_norm_lacks_gates_the_branch_and_the_gate_learns():
    model = resnet18("none", zero_init_residual=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    for _ in range(2):
        opt.zero_grad()
        train_pass(model, x, y)
        opt.step()
    gates = [m.gate.item() for m in model.modules() if isinstance(m, ZeroGate)]
    assert len(gates) == 8 and all(g != 0.0 for g in gates)


@pytest.mark.parametrize("norm", ["instance", "frn"])
def test_one_position_per_channel_is_refused_for_norms_over_positions(norm):
    """ResNet-18 at 32 px ends on 1x1 maps, where InstanceNorm's x - mean_HW is 0 and FRN is
    sign(x): refused in one line naming the first; at 64 px every map has 2x2 or more."""
    with pytest.raises(UserError) as caught:
        resnet18(norm)
    line = str(caught.value)
    assert f"norm={norm}" in line and "first layer4.0.bn1, input (2, 512, 1, 1)" in line
    assert "\n" not in line
    model = resnet18(norm, info=DataInfo("image", 10, image_size=64)).train()
    model(torch.randn(2, 3, 64, 64)).sum().backward()


@pytest.mark.parametrize("module,shape,expected", [
    (NormSlot(16), (2, 16, 8, 8), ("images", "")),
    (NormSlot(16), (2, 8, 8, 16), ("tokens", "tokens")),  # Swin's (N, H, W, C)
    (NormSlot(16), (2, 5, 16), ("tokens", "")),  # ViT's (N, T, D)
    (nn.LayerNorm(16), (2, 8, 8, 16), ("tokens", "tokens")),  # ConvNeXt's block
    (nn.LayerNorm(16), (2, 16, 16, 16), ("tokens", "tokens")),  # by its class, whatever H
    (nn.BatchNorm1d(16), (2, 16), ("images", "images")),
    (nn.GroupNorm(4, 16), (2, 16, 3), ("images", "images")),
    (nn.LayerNorm(16), None, ("tokens", "tokens")),  # never reached: by class
])
def test_layout_from_the_class_and_the_shape_seen(module, shape, expected):
    assert layout_of(module, shape, 16) == expected


def test_layout_of_a_torchvision_layernorm2d_is_images():
    from torchvision.models.convnext import LayerNorm2d

    assert layout_of(LayerNorm2d(16), (2, 16, 4, 4), 16) == ("images", "")
    with pytest.raises(ValueError, match="width 16"):
        layout_of(nn.LayerNorm(16), (2, 16, 4, 8), 16)


class Patches(nn.Module):
    """A patch embedding, then the norm on (N, H, W, C) as Swin's (or on (N, C, H, W))."""

    def __init__(self, norm_layer, channels_last: bool, width: int = 8):
        super().__init__()
        self.channels_last = channels_last
        self.embed, self.norm = nn.Conv2d(3, width, 1), norm_layer(width)
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        h = self.embed(x)
        if self.channels_last:
            return self.head(self.norm(h.permute(0, 2, 3, 1)).mean((1, 2)))
        return self.head(self.norm(h).mean((2, 3)))


@pytest.mark.parametrize("channels_last", [True, False])
def test_a_slot_that_sees_as_many_positions_as_channels_is_settled(channels_last):
    """At 8 px the 8-channel slot is called with (2, 8, 8, 8) either way: a second pass at a
    larger size tells the layouts apart. Layer norm then equals torch's per position."""
    model, placements = Patches(NormSlot, channels_last), []
    place_norms(model, norm_spec("layer"), DataInfo("image", 10, image_size=8), placements)
    assert [(p.path, p.input_shape) for p in placements] == [("norm", (2, 8, 8, 8))]
    assert placements[0].layout == ("tokens" if channels_last else "images")
    h = torch.randn(2, 8, 8, 8)
    with torch.no_grad():
        if channels_last:
            assert isinstance(model.norm, AsTokens)
            torch.nn.init.normal_(model.norm.norm.weight)
            inner = model.norm.norm
            expected = F.layer_norm(h, (8,), inner.weight, inner.bias, inner.eps)
        else:
            expected = F.group_norm(h, 1, model.norm.weight, model.norm.bias, model.norm.eps)
        torch.testing.assert_close(model.norm(h), expected)


def test_as_tokens_normalizes_each_position_of_a_grid():
    norm = AsTokens(create_norm(norm_spec("layer"), "tokens", 16))
    reference = nn.LayerNorm(16)
    with torch.no_grad():
        norm.norm.weight.normal_()
        norm.norm.bias.normal_()
        reference.load_state_dict(norm.norm.state_dict())
        x = torch.randn(2, 3, 5, 16) * 3 + 1
        torch.testing.assert_close(norm(x), reference(x))
    as_images = AsImages(create_norm(norm_spec("batch"), "images", 16)).train()
    x = torch.randn(6, 16)
    torch.testing.assert_close(as_images(x), F.batch_norm(x, None, None, training=True))


def test_a_fused_norm_and_activation_keeps_its_activation():
    layers = pytest.importorskip("timm.layers")
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False),
                          layers.BatchNormAct2d(8, act_layer=nn.ReLU),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    place_norms(model, norm_spec("group", num_groups=4), INFO)
    fused = model[1]
    assert isinstance(fused, ThenActivation) and isinstance(fused.act, nn.ReLU)
    assert isinstance(fused.norm, ImageGroupNorm)
    with torch.no_grad():
        fused.norm.bias.normal_()
        h = torch.randn(2, 8, 6, 6)
        expected = F.relu(F.group_norm(h, 4, fused.norm.weight, fused.norm.bias, 1e-5))
        assert torch.equal(fused(h), expected)


def test_weight_norm_on_a_zeroed_layer_starts_at_zero_and_learns():
    """ViT zeroes its head: w = g v/||v|| would be 0/0 there. Its rows get a direction and
    g = 0 (the same zero); the other layers keep their weights (g = ||v||)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 10))
    nn.init.zeros_(model[4].weight)
    conv_weight = model[0].weight.detach().clone()
    place_norms(model, norm_spec("weight"), INFO)
    head = model[4].parametrizations.weight
    assert torch.count_nonzero(head.original0) == 0 and head.original1.norm(dim=1).min() > 0
    assert torch.equal(model[4].weight, torch.zeros(10, 8))
    torch.testing.assert_close(model[0].weight, conv_weight)
    x = torch.randn(4, 3, 8, 8)
    F.cross_entropy(model(x), torch.randint(0, 10, (4,))).backward()
    assert torch.isfinite(head.original0.grad).all() and head.original0.grad.abs().sum() > 0


def test_a_norm_over_several_axes_is_refused_in_one_line():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.LayerNorm([8, 30, 30]), nn.Flatten(),
                          nn.Linear(8 * 30 * 30, 10))
    with pytest.raises(UserError, match="more than one axis") as caught:
        place_norms(model, norm_spec("batch"), INFO)
    assert "\n" not in str(caught.value)


def test_a_norm_without_the_layout_a_place_needs_is_refused_naming_the_place():
    with pytest.raises(UserError) as caught:
        place_norms(Patches(NormSlot, channels_last=True), norm_spec("instance"),
                    DataInfo("image", 10, image_size=4))
    line = str(caught.value)
    assert "the norm at norm sees tokens (2, 4, 4, 8), and norm=instance has no version" in line
    assert "model=transformer" not in line and "\n" not in line
