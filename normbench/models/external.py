"""Models normbench does not ship: `model=torchvision`, `model=timm`, `model=custom`.

Each is built without pretrained weights for the dataset's classes, then given the chosen
norm by `normbench.models.convert` (through `norm_layer` where the builder takes it, by
replacing the norm modules otherwise). `norm=native` keeps the model's own norms.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from normbench.data import DataInfo
from normbench.errors import UserError
from normbench.models.convert import (
    NormSlot,
    Placement,
    native_placements,
    replace_norms,
)
from normbench.norms import NormSpec, apply_weight_norm, check_norms

EXTERNAL = ("torchvision", "timm", "custom")
NATIVE = "native"  # norm=native: the model's own norms


def _unknown_arch(source: str, arch: str, names: list[str], listing: str) -> UserError:
    close = difflib.get_close_matches(arch, names, n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return UserError(f"model.arch={arch} is not a {source} model",
                     f"{hint}see {listing} for the names")


def _without_rng(build: Callable[[], nn.Module]) -> nn.Module:
    """Run `build`; if it raises, the global RNG is as before (a retry gets the same init)."""
    state = torch.get_rng_state()
    try:
        return build()
    except BaseException:
        torch.set_rng_state(state)
        raise


def _refuses_norm_layer(error: TypeError) -> bool:
    return "norm_layer" in str(error)


# What a builder raises for arguments it cannot take: a keyword it lacks (TypeError), a
# value it checks (ValueError, AssertionError), a size its layers cannot be made with.
BUILDER_REFUSALS = (TypeError, ValueError, AssertionError, RuntimeError)


def _call_builder(builder: Callable[..., nn.Module], kwargs: dict, describe: str,
                  offer_slot: bool) -> tuple[nn.Module, bool]:
    """(model, whether it took norm_layer): with `norm_layer=NormSlot` if `offer_slot` and the
    builder accepts it, else as the builder makes it."""
    def refused(error: Exception) -> UserError:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return UserError(f"{describe} refused its arguments: {type(error).__name__}: {first}",
                         "check +model.kwargs.* against the builder's arguments")

    if offer_slot and "norm_layer" not in kwargs:
        try:
            return _without_rng(lambda: builder(**kwargs, norm_layer=NormSlot)), True
        except BUILDER_REFUSALS as error:
            if not (isinstance(error, TypeError) and _refuses_norm_layer(error)):
                raise refused(error) from None
    try:
        return builder(**kwargs), False
    except BUILDER_REFUSALS as error:
        raise refused(error) from None


def torchvision_builder(arch: str) -> Callable[..., nn.Module]:
    import torchvision.models as tvm

    names = tvm.list_models(module=tvm)
    if arch not in names:
        raise _unknown_arch("torchvision classification", arch, names,
                            "torchvision.models.list_models(module=torchvision.models)")
    builder = tvm.get_model_builder(arch)
    return lambda **kw: builder(weights=None, **kw)


def timm_builder(arch: str) -> Callable[..., nn.Module]:
    try:
        import timm
    except ImportError:
        raise UserError("model=timm needs the timm package, which is not installed",
                        "pip install 'normbench[timm]' (or pip install timm)") from None
    names = timm.list_models()
    if arch not in names:
        raise _unknown_arch("timm", arch, names, "timm.list_models()")
    return lambda **kw: timm.create_model(arch, pretrained=False, **kw)


def custom_builder(target: str | None) -> Callable[..., nn.Module]:
    """`package.module:builder` (importable) or `path/to/file.py:builder`."""
    fix = "set model.target=package.module:function or model.target=path/to/file.py:function"
    if not target or ":" not in target:
        raise UserError(f"model.target={target} does not name a builder", fix)
    where, _, name = target.rpartition(":")
    if where.endswith(".py"):
        path = Path(where).expanduser()
        if not path.is_file():
            raise UserError(f"model.target={target}: there is no file {path}", fix)
        module_name = f"normbench_custom_{path.stem}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # pickling and dataclasses look modules up here
        try:
            spec.loader.exec_module(module)
        except Exception as error:
            raise UserError(f"model.target={target}: importing {path} failed: "
                            f"{type(error).__name__}: {error}", "fix the file") from None
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as error:
            raise UserError(f"model.target={target}: cannot import {where} ({error})",
                            "install the package, or put its folder on PYTHONPATH") from None
    builder = getattr(module, name, None)
    if not callable(builder):
        raise UserError(f"model.target={target}: {where} has no function {name}", fix)
    return builder


def build_with_slots(options: dict, info: DataInfo, *, slots: bool = True) -> nn.Module:
    """Model `options["name"]` (torchvision, timm or custom) for the data `info`, its norms not
    yet placed: `NormSlot` where the builder takes `norm_layer` (if `slots`; timm never gets
    one), its own norms elsewhere. `place_norms` finishes it; `build_external` does both."""
    options = dict(options)
    name = options.pop("name")
    kwargs = dict(options.pop("kwargs", None) or {})
    if name == "custom":
        describe = f"model.target={options.get('target')}"
        builder = custom_builder(options.get("target"))
    else:
        describe = f"model={name} model.arch={options.get('arch')}"
        arch = options.get("arch")
        if not arch:
            raise UserError(f"model={name} needs model.arch", "e.g. model.arch=resnet18")
        builder = torchvision_builder(arch) if name == "torchvision" else timm_builder(arch)
    if info.kind != "image":
        raise UserError(f"model={name} reads images, and dataset is {info.kind} data",
                        "use an image dataset (dataset=shapes, cifar10, imagefolder)")
    if info.in_channels != 3 and name != "custom" and "in_chans" not in kwargs:
        raise UserError(f"{describe} takes 3-channel images; the dataset has {info.in_channels}",
                        "use an RGB dataset")
    kwargs.setdefault("num_classes", info.num_classes)
    # timm wraps norm_layer into fused norm+activation layers by its class name: its models
    # get the chosen norm by replacement only.
    model, took_slot = _call_builder(builder, kwargs, describe,
                                     offer_slot=slots and name != "timm")
    if not isinstance(model, nn.Module):
        raise UserError(f"{describe} returned {type(model).__name__}, not a torch nn.Module",
                        "make the builder return the model")
    if options.get("cifar_stem"):
        cifar_stem(model, describe)
    model.normbench_describe = describe  # names the model in place_norms' errors
    model.normbench_took_norm_layer = took_slot  # for inspect: how the norm went in
    return model


def place_norms(model: nn.Module, norm: NormSpec, info: DataInfo,
                placements: list[Placement] | None = None) -> nn.Module:
    """Norm `norm` in every norm's place of a model from `build_with_slots` (in place, and
    returned), after one sample pass of `info`'s images; `placements`, if given, receives
    where each norm went (`normbench inspect`). norm=native keeps the model's own norms;
    `norm.weight_norm` (norm=weight) reparametrizes every conv/linear weight too."""
    describe = getattr(model, "normbench_describe", type(model).__name__)
    sample = torch.zeros(2, info.in_channels, info.image_size, info.image_size)
    if norm.name == NATIVE:
        if any(isinstance(m, NormSlot) for m in model.modules()):
            raise ValueError("norm=native needs a model built without slots "
                             "(build_with_slots(..., slots=False))")
        found = native_placements(model, sample, describe)
    else:
        found = replace_norms(model, norm, sample, describe)
    check_norms(model)
    if norm.weight_norm:
        weight_norm_from_zero(model)
    if placements is not None:
        placements.extend(found)
    return model


def weight_norm_from_zero(model: nn.Module) -> nn.Module:
    """Weight normalization on every conv/linear (`apply_weight_norm`), also where a builder
    zeroed a weight (ViT's head): w = g v/||v|| has no direction v there, and torch's 0/0 is
    NaN. Such a row gets a direction of the layer's default init and the gain g = 0: w is 0
    at init as the builder made it, and g learns (as ZeroGate does for a zeroed gamma)."""
    zero_rows = {}
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Conv2d):
            rows = module.weight.detach().flatten(1).norm(dim=1) == 0
            if rows.any():
                zero_rows[module] = rows
    apply_weight_norm(model)
    for module, rows in zero_rows.items():
        g, v = module.parametrizations.weight.original0, module.parametrizations.weight.original1
        direction = torch.empty_like(v)
        nn.init.kaiming_uniform_(direction, a=math.sqrt(5))  # torch's default for both layers
        with torch.no_grad():
            v[rows] = direction[rows]
            g[rows] = 0.0
    return model


def build_external(options: dict, norm: NormSpec, info: DataInfo,
                   placements: list[Placement] | None = None) -> nn.Module:
    """Model `options["name"]` (torchvision, timm or custom) with norm `norm` in every norm's
    place; `placements`, if given, receives where each norm went (`normbench inspect`)."""
    model = build_with_slots(options, info, slots=norm.name != NATIVE)
    return place_norms(model, norm, info, placements)


def cifar_stem(model: nn.Module, describe: str) -> None:
    """The usual CIFAR adaptation of an ImageNet ResNet (model.cifar_stem=true): a 3x3
    stride-1 first convolution and no max-pool, so 32 px images keep an 8x8 map to the
    last stage instead of 1x1."""
    conv = getattr(model, "conv1", None)
    if not isinstance(conv, nn.Conv2d) or not isinstance(getattr(model, "maxpool", None),
                                                         nn.Module):
        raise UserError(f"model.cifar_stem=true: {describe} has no ResNet stem (conv1, maxpool)",
                        "use it with torchvision's resnet/resnext/wide_resnet models, or drop it")
    model.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, 3, stride=1, padding=1,
                            bias=conv.bias is not None)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
