"""GroupNorm by group size (`norm.group_size`, channels per group): each layer of C channels
gets C/group_size groups. Against torch's GroupNorm with the derived number of groups, the
edge cases 1 (instance-norm-like) and C (LayerNorm over C,H,W), the divisibility error, the
config's exactly-one-of rule and what a run records."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from normbench.config.checks import check_config
from normbench.data import DataInfo
from normbench.engine.dashboards import hparams_of
from normbench.errors import UserError
from normbench.models import build_model
from normbench.norms import create_norm
from normbench.report.grid import build_report
from normbench.report.runs import find_runs
from tests.helpers.config_defaults import model_options, norm_spec
from tests.helpers.runs import fake_run

IMAGES = DataInfo(kind="image", num_classes=10, in_channels=3, image_size=8)


def by_size(size: int):
    return norm_spec("group", num_groups=None, group_size=size)


def randomize_affine(*modules: nn.Module) -> None:
    """The same random gamma and beta in each module (init values would hide a mix-up)."""
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(modules[0].weight.shape, generator=gen)
    bias = torch.randn(modules[0].bias.shape, generator=gen)
    with torch.no_grad():
        for m in modules:
            m.weight.copy_(weight)
            m.bias.copy_(bias)


@pytest.mark.parametrize("size", [1, 2, 4, 12])
@pytest.mark.parametrize("layout", ["images", "tokens", "steps"])
def test_group_size_is_torch_group_norm_with_c_over_size_groups(layout, size):
    torch.manual_seed(0)
    channels = 12
    norm = create_norm(by_size(size), layout, channels, t_max=4)
    reference = nn.GroupNorm(channels // size, channels, eps=1e-5)
    randomize_affine(norm, reference)
    assert norm.num_groups == channels // size
    if layout == "images":
        x = torch.randn(3, channels, 5, 4) * 2 + 1
        expected = reference(x)
    else:  # each (token / row) of D features is one GroupNorm sample
        x = torch.randn(3, 4, channels) * 2 + 1
        expected = reference(x.reshape(-1, channels)).reshape_as(x)
    torch.testing.assert_close(norm(x), expected)
    if layout == "steps":
        torch.testing.assert_close(norm.at(2)(x[:, 2]), expected[:, 2])


def test_group_size_1_normalizes_each_channel_over_its_positions():
    # One channel per group: instance norm (per sample and channel over H, W).
    torch.manual_seed(1)
    x = torch.randn(2, 6, 5, 5) * 3 - 2
    norm = create_norm(by_size(1), "images", 6)
    var, mean = torch.var_mean(x, dim=(2, 3), keepdim=True, correction=0)
    torch.testing.assert_close(norm(x), (x - mean) / torch.sqrt(var + 1e-5))
    torch.testing.assert_close(norm(x), nn.InstanceNorm2d(6, eps=1e-5)(x))


def test_group_size_c_is_layer_norm_over_c_h_w():
    torch.manual_seed(2)
    x = torch.randn(2, 8, 3, 4) * 2 + 5
    norm = create_norm(by_size(8), "images", 8)
    torch.testing.assert_close(norm(x), nn.functional.layer_norm(x, (8, 3, 4), eps=1e-5))
    torch.testing.assert_close(norm(x), create_norm(norm_spec("layer"), "images", 8)(x))


def test_each_layer_of_a_resnet_gets_its_width_over_the_group_size():
    model = build_model(model_options("resnet", depth=8), by_size(8), IMAGES)
    groups = {name: (m.num_channels, m.num_groups) for name, m in model.named_modules()
              if isinstance(m, nn.GroupNorm)}
    assert {c for c, _ in groups.values()} == {16, 32, 64}
    assert all(g == c // 8 for c, g in groups.values()), groups
    # num_groups, by contrast, is the same in every layer.
    fixed = build_model(model_options("resnet", depth=8), norm_spec("group", num_groups=8), IMAGES)
    assert {m.num_groups for m in fixed.modules() if isinstance(m, nn.GroupNorm)} == {8}


@pytest.mark.parametrize("setting", [{"num_groups": None, "group_size": 3},
                                     {"num_groups": None, "group_size": 32},
                                     {"num_groups": 3}])
def test_the_error_names_every_layer_not_divided_with_its_width(setting):
    (key, value), = ((k, v) for k, v in setting.items() if v is not None)
    widths = {name: m.num_channels
              for name, m in build_model(model_options("resnet", depth=8), by_size(1),
                                         IMAGES).named_modules()
              if isinstance(m, nn.GroupNorm)}
    failing = {name: c for name, c in widths.items() if c % value}
    assert failing  # the case means something
    with pytest.raises(UserError) as err:
        build_model(model_options("resnet", depth=8), norm_spec("group", **setting), IMAGES)
    line = err.value.line()
    assert "\n" not in line and line.startswith(f"norm.{key}={value} does not divide")
    for name in widths:  # every failing layer named, no other
        assert (f"'{name}'" in line) == (name in failing), name
    for width in sorted(set(failing.values())):  # each width, then its layers in model order
        names = ", ".join(f"'{n}'" for n, c in failing.items() if c == width)
        assert f"the {width} channels of {names}" in line
    assert f"({len(failing)} layers;" in line
    assert line.endswith(f"Fix: choose norm.{key} from [1, 2, 4, 8, 16].")


def test_the_lstm_and_the_transformer_take_a_group_size_too():
    text = DataInfo(kind="text", num_classes=20, in_channels=0, image_size=0, seq_len=8)
    lstm = build_model(model_options("lstm", hidden=12, embed=8), by_size(4), text)
    sizes = {m.num_channels // m.num_groups for m in lstm.modules() if isinstance(m, nn.GroupNorm)}
    assert sizes == {4}
    with pytest.raises(UserError, match=r"norm.group_size=5 does not divide the 12 channels of "
                                        r"'layers.0.norm_c'.*the 48 channels of"):
        build_model(model_options("lstm", hidden=12, embed=8), by_size(5), text)
    with pytest.raises(UserError, match=r"group_size=5 does not divide the 16 channels of "
                                        r"'blocks.0.norm1'"):
        build_model(model_options("transformer", width=16, heads=2, depth=1), by_size(5), text)


def test_config_has_exactly_one_of_num_groups_and_group_size(tiny_config):
    config = tiny_config("norm=group", "norm.group_size=4")
    assert (config["norm"]["num_groups"], config["norm"]["group_size"]) == (None, 4)
    check_config(config)
    default = tiny_config("norm=group")
    assert (default["norm"]["num_groups"], default["norm"]["group_size"]) == (8, None)
    both = tiny_config("norm=group", "norm.group_size=4", "norm.num_groups=2")
    with pytest.raises(UserError, match="norm.num_groups=2 and norm.group_size=4 are both set"):
        check_config(both)
    with pytest.raises(UserError, match="neither norm.num_groups nor norm.group_size"):
        check_config(tiny_config("norm=group", "norm.num_groups=null"))
    with pytest.raises(UserError, match="norm.group_size=0 must be an integer, 1 or more"):
        check_config(tiny_config("norm=group", "norm.group_size=0"))


@pytest.mark.slow
def test_a_run_records_the_group_size_and_the_report_sweeps_it(tmp_path, tiny_config):
    from normbench.engine.train import run_experiment

    config = tiny_config("norm=group", "norm.group_size=4", "steps=2", "probes=false")
    summary = run_experiment(config, tmp_path / "run", live=False)
    assert (summary["group_size"], summary["num_groups"]) == (4, None)
    on_disk = json.loads((tmp_path / "run" / "config.json").read_text())["norm"]
    assert (on_disk["group_size"], on_disk["num_groups"]) == (4, None)
    swept = {**config, "swept": {"norm.group_size": "4"}}
    assert hparams_of(summary, swept)["group_size"] == 4 and "num_groups" not in hparams_of(
        summary, swept)

    sweep = tmp_path / "sweep"
    for size, acc in ((2, 0.5), (8, 0.7)):
        fake_run(sweep, f"gs{size}", norm="group", group_size=size, num_groups=None,
                 val_acc=acc)
    report = build_report(find_runs([sweep]))
    assert report.x == "group_size" and report.columns == [2, 8]  # auto: the key that varies
    assert report.cells[(("group",), 8)].mean == pytest.approx(30.0)
