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
    model = resnet(norm)
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
