"""model=torchvision, timm and custom: every registered norm in real architectures, trained
for two SGD steps or refused in one line, and the one-line refusals of what cannot be built.

Each architecture is built once (with slots, and with its own norms for norm=native); every
norm goes into a copy. `pytest -s` prints the trained/refused table."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normbench.data import DataInfo
from normbench.errors import UserError
from normbench.models import build_model
from normbench.models.convert import (
    NATIVE_NORMS,
    AsImages,
    AsTokens,
    NormSlot,
    ShiftOnly,
    ThenActivation,
    ZeroGate,
    find_norms,
)
from normbench.models.external import build_external, build_with_slots, place_norms
from normbench.norms import Norm, norm_class, norm_names
from tests.helpers.common import FIXTURES
from tests.helpers.config_defaults import model_options, norm_spec

SIZE, BATCH = 32, 2
INFO = DataInfo(kind="image", num_classes=10, image_size=SIZE)
TORCHVISION = {"resnet18": {}, "resnet50": {}, "mobilenet_v2": {}, "efficientnet_b0": {},
               "regnet_y_400mf": {}, "convnext_tiny": {}, "vit_b_16": {"image_size": SIZE},
               "swin_t": {}, "vgg11_bn": {}, "densenet121": {}}
TIMM = {"resnet18": {}, "convnext_atto": {}}
MODELS = [("torchvision", arch) for arch in TORCHVISION] + [("timm", arch) for arch in TIMM]
QUICK = (("torchvision", "resnet18"), ("timm", "convnext_atto"))  # norm_layer; replacement
NORMS = (*norm_names(), "native")
MUST_TRAIN = ("batch", "group", "layer", "none", "native")
WITHOUT_NORM_LAYER = ("vgg11_bn", "densenet121")  # torchvision builders that lack it
WRAPPERS = (AsTokens, AsImages, ZeroGate, ThenActivation)


def keep_head_small(model: nn.Module) -> None:
    model.avgpool, model.classifier = nn.AdaptiveAvgPool2d(1), nn.Linear(512, 10)


# Cost cuts that leave every kind of norm place: VGG's 120M-parameter classifier has no norm
# (its 512-channel features get a linear head), and the blocks cut from a stage of identical
# blocks (ViT's encoder, the third stage of ResNet-50, Swin and ConvNeXt) repeat those kept.
TRIM = {
    "vgg11_bn": keep_head_small,
    "resnet50": lambda model: setattr(model, "layer3", model.layer3[:2]),
    "vit_b_16": lambda model: setattr(model.encoder, "layers", model.encoder.layers[:2]),
    "swin_t": lambda model: model.features.__setitem__(5, model.features[5][:2]),
    "convnext_tiny": lambda model: model.features.__setitem__(5, model.features[5][:3]),
}


def build(source: str, arch: str, slots: bool) -> nn.Module:
    torch.manual_seed(0)
    model = build_with_slots(options(source, arch), INFO, slots=slots)
    if source == "torchvision" and arch in TRIM:
        TRIM[arch](model)
    return model


def options(source: str, arch: str) -> dict:
    kwargs = (TORCHVISION if source == "torchvision" else TIMM)[arch]
    return model_options(source, arch=arch, kwargs=kwargs)


def expected_layout(arch: str, path: str) -> str:
    """ViT and Swin keep tokens, (N, T, D) and (N, H, W, C); a ConvNeXt block's LayerNorm
    runs on (N, H, W, C) too, its stem, downsampling and head LayerNorm2d on (N, C, H, W)."""
    if arch in ("vit_b_16", "swin_t") or (arch == "convnext_tiny" and ".block." in path):
        return "tokens"
    return "images"


def chain(module: nn.Module) -> list[nn.Module]:
    """A placed module and the ones it wraps, down to the norm."""
    found = [module]
    while isinstance(found[-1], WRAPPERS):
        found.append(found[-1].norm)
    return found


def inner(module: nn.Module) -> nn.Module:
    return chain(module)[-1]


def direct(norm: str, layout: str, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm and GroupNorm written out: statistics per sample over channel groups and
    positions (images), or per position over groups of the last axis (tokens, any shape)."""
    groups = 1 if norm == "layer" else module.num_groups
    if layout == "images":
        g = x.reshape(x.shape[0], groups, -1)
        shape = (1, -1) + (1,) * (x.dim() - 2)
    else:
        g = x.reshape(*x.shape[:-1], groups, -1)
        shape = (-1,)
    y = (g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True)
                                                    + module.eps)
    return y.reshape(x.shape) * module.weight.view(shape) + module.bias.view(shape)


@pytest.fixture(scope="module")
def table():
    rows: dict[str, dict[str, str]] = {}  # model -> norm -> T(rained) or R(efused)
    yield rows
    if not rows:
        return
    rows["all"] = {f"{m}{n}": v for m, row in rows.items() for n, v in row.items()}
    print(f"\n{'model':28s}" + "".join(f"{n[:6]:>7s}" for n in NORMS) + "  trained refused")
    for model, row in rows.items():
        marks = "".join(f"{row.get(n, ''):>7s}" for n in NORMS)
        counts = [list(row.values()).count(mark) for mark in "TR"]
        print(f"{model:28s}{marks}  {counts[0]:7d} {counts[1]:7d}")


def check_placed(arch: str, norm: str, model: nn.Module, placements, native_paths: list[str]):
    """Every native norm's place got the chosen norm, in the layout its input has; no slot
    and no torch norm of the builder's is left."""
    assert [p.path for p in placements] == native_paths
    assert not any(isinstance(m, NormSlot) for m in model.modules())
    if norm == "native":
        assert all(p.module == p.native != "NormSlot" for p in placements)
        return
    left = [path for path, m in model.named_modules()
            if isinstance(m, NATIVE_NORMS) and not isinstance(m, Norm)]
    assert not left, f"native norms left: {left}"
    for p in placements:
        assert p.layout == expected_layout(arch, p.path), p
        # A view where the shape is not the layout's own: a grid of tokens, channels alone.
        dims = len(p.input_shape)
        view = ([AsTokens] if p.layout == "tokens" and dims != 3 else
                [AsImages] if p.layout == "images" and dims != 4 else [])
        assert [type(m) for m in chain(model.get_submodule(p.path))
                if isinstance(m, (AsTokens, AsImages))] == view, p
        placed = inner(model.get_submodule(p.path))
        if norm == "none" and isinstance(placed, ShiftOnly):
            continue  # the native norm's beta (test_convert.py checks it)
        assert isinstance(placed, norm_class(norm, p.layout)), (p, type(placed))


def train_two_steps(model: nn.Module, norm: str, placements) -> None:
    """Two SGD steps: finite losses and gradients, the head and the norms' parameters move;
    for layer and group, what every placed norm gives in the first pass equals `direct`."""
    seen, hooks = [], []

    def record(module, args, out, layout):
        seen.append((layout, inner(module), args[0].detach().clone(), out.detach().clone()))

    if norm in ("layer", "group"):
        hooks = [model.get_submodule(p.path).register_forward_hook(
                     lambda m, a, out, layout=p.layout: record(m, a, out, layout))
                 for p in placements]
    torch.manual_seed(1)
    x, y = torch.randn(BATCH, 3, SIZE, SIZE), torch.randint(0, 10, (BATCH,))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(2):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        assert torch.isfinite(loss), loss
        if hooks:
            assert len(seen) == len(placements)
            for layout, module, x_in, out in seen:
                torch.testing.assert_close(out, direct(norm, layout, module, x_in).detach(),
                                           rtol=1e-4, atol=1e-4)
            for hook in hooks:
                hook.remove()
            hooks = []
        loss.backward()
        for n, p in model.named_parameters():
            assert p.grad is None or torch.isfinite(p.grad).all(), n
        opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    head = [path for path, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    assert any(n.startswith(head + ".") for n in changed), f"the head {head} did not learn"
    norm_params = {f"{p.path}.{n}" for p in placements
                   for n, _ in model.get_submodule(p.path).named_parameters()}
    assert not norm_params or norm_params & changed, "no norm parameter changed"


@pytest.mark.parametrize("source,arch", [
    pytest.param(s, a, id=f"{s}-{a}", marks=() if (s, a) in QUICK else pytest.mark.slow)
    for s, a in MODELS])
def test_every_norm_trains_or_is_refused_in_one_line(source, arch, table):
    if source == "timm":
        pytest.importorskip("timm")
    slotted = build(source, arch, slots=True)
    native = build(source, arch, slots=False) if slotted.normbench_took_norm_layer else slotted
    native_paths = list(find_norms(native))
    assert native_paths
    took = source == "torchvision" and arch not in WITHOUT_NORM_LAYER
    assert slotted.normbench_took_norm_layer == took
    assert any(isinstance(m, NormSlot) for m in slotted.modules()) == took
    row = table.setdefault(f"{source} {arch}", {})
    for norm in NORMS:
        spec = norm_spec(norm)
        model = copy.deepcopy(native if norm == "native" else slotted)
        placements = []
        try:
            torch.manual_seed(0)
            place_norms(model, spec, INFO, placements)
        except UserError as error:
            assert norm not in MUST_TRAIN, f"norm={norm} refused: {error}"
            assert "\n" not in str(error) and "Fix:" in str(error), str(error)
            row[norm] = "R"
            continue
        check_placed(arch, norm, model, placements, native_paths)
        train_two_steps(model, norm, placements)
        row[norm] = "T"


# ---------------------------------------------------------------------------------- refusals


def refusal(options: dict, norm: str = "batch", info: DataInfo = INFO) -> str:
    with pytest.raises(UserError) as caught:
        build_model(options, norm_spec(norm), info)
    line = str(caught.value)
    assert "\n" not in line and "Fix:" in line, line
    return line


def test_unknown_arch_names_the_close_matches():
    line = refusal(model_options("torchvision", arch="resnet81"))
    assert "model.arch=resnet81 is not a torchvision" in line and "did you mean resnet18" in line


def test_timm_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` raises ImportError
    assert "pip install" in refusal(model_options("timm", arch="resnet18"))


@pytest.mark.parametrize("target,says", [
    ("tests/fixtures/no_such_file.py:build", "there is no file"),
    (f"{FIXTURES}/custom_model.py:make", "has no function make"),
    ("{tmp}/constant.py:build", "has no function build"),
    ("{tmp}/broken.py:build", "importing"),
    ("custom_model", "does not name a builder"),
    ("no_such_package.models:build", "cannot import no_such_package.models"),
])
def test_custom_target_that_is_not_a_builder(tmp_path, target, says):
    (tmp_path / "constant.py").write_text("build = 3\n")
    (tmp_path / "broken.py").write_text("import no_such_module\n")
    assert says in refusal(model_options("custom", target=target.format(tmp=tmp_path)))


def test_text_data_and_own_models_with_native():
    text = DataInfo(kind="text", num_classes=50, seq_len=16)
    assert "cannot read text data" in refusal(model_options("torchvision"), info=text)
    with pytest.raises(UserError, match="image dataset"):
        build_external(model_options("torchvision"), norm_spec("batch"), text)
    assert "norm=native keeps a model's own norms" in refusal(model_options("resnet"), "native")


def test_builder_kwarg_typo():
    line = refusal(model_options("torchvision", kwargs={"zero_init_residul": True}))
    assert "zero_init_residul" in line and "model.kwargs" in line
    line = refusal(model_options("custom", target=f"{FIXTURES}/custom_model.py:build",
                                 kwargs={"widht": 8}), "native")
    assert "widht" in line


def test_builder_that_refuses_a_value():
    """MaxViT checks its input size against its windows with a ValueError of its own."""
    line = refusal(model_options("torchvision", arch="maxvit_t",
                                 kwargs={"input_size": [32, 32]}), "layer")
    assert "refused its arguments: ValueError" in line and "+model.kwargs" in line


def test_model_without_norms_has_no_place_for_one():
    line = refusal(model_options("torchvision", arch="squeezenet1_0"), "group")
    assert "has no norm layers" in line and "norm=native" in line
    placements = []
    torch.manual_seed(0)
    build_external(model_options("torchvision", arch="squeezenet1_0"), norm_spec("none"), INFO,
                   placements)  # no norm: the model as built, nothing placed
    assert placements == []


# vit_b_16 is built for 224 px unless kwargs.image_size says; maxvit_t's 7x7 windows need it.
@pytest.mark.parametrize("arch", ["vit_b_16", "maxvit_t"])
def test_model_that_cannot_take_the_images(arch):
    line = refusal(model_options("torchvision", arch=arch), "layer")
    assert "cannot take 32x32 images" in line and "dataset.image_size" in line


@pytest.mark.slow
def test_maxvit_at_224_px_takes_the_norm_in_both_layouts():
    """MaxViT's 7x7 windows need 224 px: its MBConv BatchNorms become images norms, its
    attention LayerNorms tokens norms (one forward and backward: seconds on a CPU)."""
    placements = []
    info = DataInfo(kind="image", num_classes=10, image_size=224)
    torch.manual_seed(0)
    model = build_external(model_options("torchvision", arch="maxvit_t"), norm_spec("group"),
                           info, placements)
    layouts = [p.layout for p in placements]
    assert len(layouts) == 79 and {"images", "tokens"} == set(layouts)
    loss = F.cross_entropy(model(torch.randn(2, 3, 224, 224)), torch.tensor([0, 1]))
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is None or torch.isfinite(p.grad).all()
                                        for p in model.parameters())


# ---------------------------------------------------------------------------- custom models


@pytest.mark.parametrize("norm", ["group", "native"])
def test_custom_model_from_a_file_gets_the_norm_through_norm_layer(norm):
    target = f"{FIXTURES}/custom_model.py:build"
    torch.manual_seed(0)
    model = build_model(model_options("custom", target=target, kwargs={"width": 8}),
                        norm_spec(norm), INFO)
    assert model.normbench_took_norm_layer == (norm != "native")
    expected = nn.BatchNorm2d if norm == "native" else norm_class("group", "images")
    norms = [m for m in model.modules() if isinstance(m, (*NATIVE_NORMS, Norm))]
    assert [type(m) for m in norms] == [expected, expected]
    assert [m.num_features if norm == "native" else m.num_channels for m in norms] == [8, 16]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(BATCH, 3, SIZE, SIZE), torch.randint(0, 10, (BATCH,))
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]  # the same batch three times: it fits
