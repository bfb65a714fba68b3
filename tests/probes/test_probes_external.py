"""The BatchNorm probes (bn_gap, PreciseBN) on torchvision's ResNet-18, with normbench's
BatchNorm in its norms' places (norm=batch) and with its own BatchNorm2d (norm=native):
every BN layer is found, and one layer's values match a direct computation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normbench.data import Batch, DataInfo
from normbench.engine.precise_bn import precise_bn_stats
from normbench.models import build_model
from normbench.probes.monitor import Probes, batchnorm_layers, norm_layers
from tests.helpers.config_defaults import model_options, norm_spec

INFO = DataInfo(kind="image", num_classes=10, in_channels=3, image_size=8)


@pytest.fixture(scope="module")
def torchvision_bn_paths() -> list[str]:
    import torchvision

    paths = [n for n, m in torchvision.models.resnet18().named_modules()
             if isinstance(m, nn.BatchNorm2d)]
    assert len(paths) == 20  # bn1, two per basic block x 8, three downsample BNs
    return paths


def resnet18(norm: str) -> nn.Module:
    torch.manual_seed(0)
    return build_model(model_options("torchvision", arch="resnet18"), norm_spec(norm), INFO)


@pytest.mark.parametrize("norm", ["batch", "native"])
def test_every_bn_layer_is_probed_and_bn1_gaps_match_a_direct_computation(norm,
                                                                          torchvision_bn_paths):
    model = resnet18(norm).train()
    assert sorted(batchnorm_layers(model)) == sorted(norm_layers(model)) \
        == sorted(torchvision_bn_paths)
    assert (type(model.bn1) is nn.BatchNorm2d) == (norm == "native")  # else normbench's subclass
    bn1 = model.bn1
    with torch.no_grad():  # running statistics away from their start, as after some steps
        bn1.running_mean.normal_()
        bn1.running_var.uniform_(0.5, 2.0)
    running_mean, running_var = bn1.running_mean.clone(), bn1.running_var.clone()
    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 + 0.5
    probes = Probes(model)
    with probes.watch_forward(True):
        model(x)
    values = probes.flush()
    for stat in ("dmu", "dvar", "tid_mu", "tid_sigma"):
        assert {t.rsplit("/", 1)[0] for t in values if t.startswith(f"bn_gap/{stat}/")} \
            == {f"bn_gap/{stat}"}
        assert len([t for t in values if t.startswith(f"bn_gap/{stat}/")]) == 20

    # bn1's input is conv1's output: its batch moments against the running statistics
    # (running_var holds unbiased variances: on the biased scale it is x (n-1)/n).
    with torch.no_grad():
        h = model.conv1(x).double()
    var_b, mean_b = torch.var_mean(h, dim=(0, 2, 3), correction=0)
    n, c = h.numel() // h.shape[1], h.shape[1]
    biased_running = running_var.double() * (n - 1) / n
    assert values["bn_gap/dmu/bn1"] == pytest.approx(
        float((mean_b - running_mean.double()).norm() / c), rel=1e-5)
    assert values["bn_gap/dvar/bn1"] == pytest.approx(
        float((var_b - biased_running).norm() / c), rel=1e-5)
    sigma_b = (var_b + bn1.eps).sqrt()
    tid_mu = ((running_mean.double() - mean_b).abs() / sigma_b).mean()
    tid_sigma = ((biased_running + bn1.eps).sqrt() / sigma_b - 1).abs().mean()
    assert values["bn_gap/tid_mu/bn1"] == pytest.approx(float(tid_mu), rel=1e-5)
    assert values["bn_gap/tid_sigma/bn1"] == pytest.approx(float(tid_sigma), rel=1e-5)
    assert values["act/in_mean/bn1"] == pytest.approx(float(h.mean()), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("norm", ["batch", "native"])
def test_precise_bn_pools_every_bn_layer_and_bn1_matches_a_direct_computation(
        norm, torchvision_bn_paths):
    model = resnet18(norm).eval()
    g = torch.Generator().manual_seed(2)
    batches = [Batch(torch.randn(n, 3, 8, 8, generator=g) + 1, torch.zeros(n, dtype=torch.long))
               for n in (5, 3)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = precise_bn_stats(model, batches)
    assert sorted(stats) == sorted(torchvision_bn_paths)
    for key, value in model.state_dict().items():  # buffers and mode untouched
        assert torch.equal(value, before[key]), key
    assert not model.training
    with torch.no_grad():
        h = torch.cat([model.conv1(b.x) for b in batches]).double()
    var, mean = torch.var_mean(h, dim=(0, 2, 3), correction=0)
    pop = stats["bn1"]
    assert pop.count == 8 * 4 * 4  # 8 images, conv1's 4x4 map at 8 px
    torch.testing.assert_close(pop.mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pop.var.double(), var, rtol=1e-5, atol=1e-7)
