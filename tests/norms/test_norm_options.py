"""Options every norm shares: Keras' center/scale switches, weight normalization, and the
parameter counts `normbench list` and summary.json report."""

import pytest
import torch
from torch import nn

from normbench.config.checks import check_config
from normbench.data import DataInfo
from normbench.errors import UserError
from normbench.models import build_model
from normbench.norms import LAYOUTS, create_norm, norm_class
from normbench.norms.counts import layer_formulas, model_norm_counts, module_counts
from tests.helpers.common import compose_config
from tests.helpers.config_defaults import model_options, norm_spec

C = 6


def standardize(x, dims, eps=1e-5):
    var, mean = torch.var_mean(x, dim=dims, keepdim=True, correction=0)
    return (x - mean) / torch.sqrt(var + eps)


@pytest.mark.parametrize("center,scale", [(True, True), (False, True), (True, False),
                                          (False, False)])
@pytest.mark.parametrize("name,layout,dims", [("batch", "images", (0, 2, 3)),
                                              ("layer", "images", (1, 2, 3)),
                                              ("batch", "tokens", (0, 1)),
                                              ("layer", "tokens", (2,))])
def test_center_and_scale_switch_beta_and_gamma(name, layout, dims, center, scale):
    norm = create_norm(norm_spec(name, center=center, scale=scale), layout, C).train()
    assert (norm.weight is not None) == scale and (norm.bias is not None) == center
    gamma, beta = torch.rand(C) + 0.5, torch.randn(C)
    with torch.no_grad():
        if scale:
            norm.weight.copy_(gamma)
        if center:
            norm.bias.copy_(beta)
    x = torch.randn(2, C, 3, 4) if layout == "images" else torch.randn(2, 5, C)
    shape = (1, C, 1, 1) if layout == "images" else (1, 1, C)
    expected = standardize(x, dims)
    if scale:
        expected = expected * gamma.reshape(shape)
    if center:
        expected = expected + beta.reshape(shape)
    torch.testing.assert_close(norm(x), expected)
    assert module_counts(norm)[0] == C * (int(center) + int(scale))


def test_affine_false_is_the_shorthand_for_both_off():
    for name in ("batch", "layer", "group"):
        norm = create_norm(norm_spec(name, affine=False, num_groups=2), "images", C)
        assert norm.weight is None and norm.bias is None, name


@pytest.mark.parametrize("center,scale", [(False, True), (True, False)])
def test_per_step_batchnorm_shares_only_the_parts_asked_for(center, scale):
    norm = create_norm(norm_spec("batch", center=center, scale=scale), "steps", C, t_max=3)
    assert (norm.weight is not None) == scale and (norm.bias is not None) == center
    x = torch.randn(4, C)
    y = norm.at(1)(x)
    expected = standardize(x, (0,))
    expected = expected * 0.1 if scale else expected + norm.bias
    torch.testing.assert_close(y, expected)


def test_counts_of_the_issue_examples():
    # BatchNorm on C channels: 2C trainable + 2C running statistics.
    assert layer_formulas(norm_spec("batch"), "images") == ("2C", "2C")
    # LayerNorm with center=false, scale=false: nothing at all.
    assert layer_formulas(norm_spec("layer", center=False, scale=False), "tokens") == ("0", "0")
    # Per-step BatchNorm keeps 2C running numbers for each of T steps, one shared affine.
    assert layer_formulas(norm_spec("batch", center=False), "steps") == ("C", "2CT")
    bn = create_norm(norm_spec("batch"), "images", 16)
    assert module_counts(bn) == (32, 32)  # the counter num_batches_tracked is not state


def test_model_norm_counts_add_the_layers_once():
    info = DataInfo(kind="text", num_classes=11, seq_len=7)
    model = build_model(model_options("lstm", depth=1, hidden=4, embed=3), norm_spec("batch"),
                        info)
    # norm_x, norm_h: 4H = 16 channels; norm_c: H = 4; 7 steps each.
    assert model_norm_counts(model) == {"norm_params": 2 * (16 + 16 + 4),
                                        "norm_state": 2 * 7 * (16 + 16 + 4)}


def test_model_norm_counts_count_torch_norm_layers_as_norm_native_keeps_them():
    # norm=native: torch's own layers, counted as normbench's (a norm inside a norm once).
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.GroupNorm(2, 4),
                          nn.Sequential(nn.LayerNorm(4), nn.InstanceNorm2d(4)),
                          create_norm(norm_spec("batch"), "images", 4))
    assert model_norm_counts(model) == {"norm_params": 4 * 2 * 4, "norm_state": 2 * 2 * 4}
    info = DataInfo(kind="image", num_classes=10, image_size=8)
    native = build_model(model_options("torchvision", arch="resnet18"), norm_spec("native"),
                         info)
    replaced = build_model(model_options("torchvision", arch="resnet18"), norm_spec("batch"),
                           info)
    # ResNet-18's 20 BatchNorm2d: 4800 channels, gamma and beta, running mean and variance
    assert model_norm_counts(native) == model_norm_counts(replaced) == \
        {"norm_params": 9600, "norm_state": 9600}


def test_weight_norm_reparametrizes_every_linear_and_conv():
    info = DataInfo(kind="image", num_classes=10)
    plain = build_model(model_options("resnet", depth=8), norm_spec("none"), info)
    torch.manual_seed(0)
    weighted = build_model(model_options("resnet", depth=8), norm_spec("weight"), info)
    layers = [m for m in weighted.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    assert layers and all(hasattr(m, "parametrizations") for m in layers)
    for m in layers:
        g, v = m.parametrizations.weight.original0, m.parametrizations.weight.original1
        assert g.shape == (v.shape[0],) + (1,) * (v.dim() - 1)
        expected = g * v / v.flatten(1).norm(dim=1).reshape(g.shape)
        torch.testing.assert_close(m.weight, expected)
        torch.testing.assert_close(g.flatten(), v.flatten(1).norm(dim=1))  # g starts at ||v||
    # one g per output unit more than the plain network, biases kept (no re-centring norm)
    outputs = sum(m.weight.shape[0] for m in layers)
    assert (sum(p.numel() for p in weighted.parameters())
            == sum(p.numel() for p in plain.parameters()) + outputs)
    assert all(m.bias is not None for m in layers)


def test_weight_norm_on_top_of_batchnorm_keeps_batchnorm():
    info = DataInfo(kind="image", num_classes=10)
    model = build_model(model_options("resnet", depth=8), norm_spec("batch", weight_norm=True),
                        info)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(hasattr(c, "parametrizations") and c.bias is None for c in convs)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()
    g = convs[0].parametrizations.weight.original0
    assert g.grad is not None and g.grad.abs().sum() > 0


def test_norm_weight_without_weight_norm_is_refused():
    config = compose_config(["norm=weight", "norm.weight_norm=false"])
    with pytest.raises(UserError, match="use norm=none"):
        check_config(config)


def test_every_layout_of_every_norm_has_a_version_or_a_reason():
    from normbench.norms.registry import norm_names, unsupported_reason

    for name in norm_names():
        for layout in LAYOUTS:
            try:
                norm_class(name, layout)
            except UserError as err:
                assert unsupported_reason(name, layout), (name, layout)
                assert unsupported_reason(name, layout) in err.line()
