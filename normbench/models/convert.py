"""normbench's norm inside a model built elsewhere (torchvision, timm, a user's builder).

Every norm of such a model ends up as a normbench norm of the same width, in the same place:

- Builders that take `norm_layer` (torchvision's ResNet, MobileNet, EfficientNet, RegNet,
  ConvNeXt, ViT, Swin, MaxViT; a custom model) get `NormSlot`, a stand-in that records what
  it is called with; builders that lack it (VGG-BN, DenseNet, timm's fused norm+activation
  layers) keep their own norms. `replace_norms` then swaps every slot *and* every torch norm
  module the model still holds (ConvNeXt's block LayerNorm and MaxViT's attention LayerNorms
  are not built through `norm_layer`), so no native norm is left behind.
- The layout a norm sees is read from the tensor it gets in one forward pass on a sample
  batch: (N, C, H, W) is `images`; a LayerNorm over the last axis is `tokens` (N, T, D), its
  positions flattened into T when the model keeps a grid (Swin, ConvNeXt's blocks:
  (N, H, W, C)); a feature vector (N, C) is one token. A slot called with (N, C, C, C) is
  settled by a second pass at a larger size. What a builder's own norm computed and what
  each normbench norm computes there is tabled in docs/models.md.
- A norm with statistics over positions only (instance, frn: no version for an LSTM step's
  rows) is refused, in one line, where a channels-first norm sees a single position (the
  1x1 maps of an ImageNet model at 32 px).
- What the builder did to its norm's gamma and beta (1 and 0, or 0 for torchvision's
  `zero_init_residual` and timm's `zero_init_last`) is carried over to the new norm's; where
  the builder zeroed a gamma the new norm does not have, a scalar gate starting at 0 keeps
  the branch at 0 (`ZeroGate`).
- `norm=none` keeps a learned per-channel shift where the native norm had a beta: the
  builders leave the conv in front of a norm without bias, and the shift is that bias.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from normbench.errors import UserError
from normbench.norms import NormSpec, make_norm_factory
from normbench.norms.registry import (
    UnbuildableNorm,
    norm_names,
    registered,
    unsupported_reason,
)

# The torch norm modules a model may hold (their subclasses included: timm's BatchNormAct2d,
# LayerNorm2d, GroupNorm1; torchvision's LayerNorm2d).
NATIVE_NORMS: tuple[type[nn.Module], ...] = (_BatchNorm, nn.GroupNorm, nn.LayerNorm,
                                             _InstanceNorm, nn.RMSNorm, nn.LocalResponseNorm)


class NormSlot(nn.Module):
    """Stands where a builder calls `norm_layer(num_features, ...)`, until the layout is known.

    It has BatchNorm's gamma (`weight`, ones) and beta (`bias`, zeros), so a builder that
    initializes its norms (torchvision's `zero_init_residual`) finds them, and passes its input
    through unchanged; keyword arguments the builder gives its own norm (eps, momentum) are
    ignored: the norm's options come from `norm.*`.
    """

    def __init__(self, num_features: int, *args, **kwargs):
        super().__init__()
        self.num_features = int(num_features)
        self.weight = nn.Parameter(torch.ones(self.num_features))
        self.bias = nn.Parameter(torch.zeros(self.num_features))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return x

    def extra_repr(self) -> str:
        return str(self.num_features)


def is_norm_module(module: nn.Module) -> bool:
    return isinstance(module, (NormSlot, *NATIVE_NORMS))


def norm_width(module: nn.Module) -> int | None:
    """The number of channels/features a norm module normalizes per position."""
    for attr in ("num_features", "num_channels"):
        if isinstance(getattr(module, attr, None), int):
            return getattr(module, attr)
    shape = getattr(module, "normalized_shape", None)
    if shape is not None and len(shape) == 1:
        return int(shape[0])
    return None


@dataclass(frozen=True)
class Placement:
    """One norm of a model: where it is, how wide, what it sees, what stood there before."""

    path: str
    width: int | None
    layout: str | None  # images | tokens; None where the sample pass never reached it
    input_shape: tuple[int, ...] | None
    native: str  # class the builder put there (NormSlot: the builder's norm_layer)
    module: str  # class there now


class ShiftOnly(nn.Module):
    """norm=none where the native norm had a beta: a learned per-channel bias, starting at 0."""

    def __init__(self, num_features: int, channel_axis: int):
        super().__init__()
        self.channel_axis = channel_axis
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        shape = [1] * x.dim()
        shape[self.channel_axis] = -1
        return x + self.bias.view(shape).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.bias.numel()}, channel_axis={self.channel_axis}"


class AsTokens(nn.Module):
    """A tokens-layout norm applied to features on the last axis of any shape: (N, ..., C) is
    read as (N, T, C), T the positions (a grid's H*W), and given back in its own shape."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1, x.shape[-1])
        return self.norm(flat).reshape(x.shape)


class AsImages(nn.Module):
    """An images-layout norm applied to channels-first features that are not a 2-d map:
    (N, C) and (N, C, L) are read as (N, C, L, 1)."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(x.shape[0], x.shape[1], -1, 1)
        return self.norm(flat).reshape(x.shape)


class ThenActivation(nn.Module):
    """A norm followed by the dropout and activation of the fused norm+act layer it replaces
    (timm's BatchNormAct2d, GroupNormAct)."""

    def __init__(self, norm: nn.Module, drop: nn.Module, act: nn.Module):
        super().__init__()
        self.norm, self.drop, self.act = norm, drop, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(self.norm(x)))


def find_norms(model: nn.Module) -> dict[str, nn.Module]:
    """The outermost norm modules of `model` by path (a norm's own children are not norms)."""
    found: dict[str, nn.Module] = {}
    for path, module in model.named_modules():
        if is_norm_module(module) and not any(path.startswith(p + ".") for p in found):
            found[path] = module
    return found


def seen_shapes(model: nn.Module, sample: torch.Tensor, norms: dict[str, nn.Module],
                describe: str) -> dict[str, tuple[int, ...]]:
    """The input shape each norm gets in one forward pass of `sample` (eval mode, no
    gradients, nothing random drawn), or one UserError where the model cannot take it."""
    shapes: dict[str, tuple[int, ...]] = {}

    def recorder(path: str):
        def record(_module, args) -> None:  # returns None: the input goes on unchanged
            shapes.setdefault(path, tuple(args[0].shape))
        return record

    hooks = [m.register_forward_pre_hook(recorder(path)) for path, m in norms.items()]
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(sample)
    except (RuntimeError, AssertionError, ValueError, IndexError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        size = "x".join(str(s) for s in sample.shape[2:])
        raise UserError(f"{describe} cannot take {size} images: {first}",
                        "give it the input it expects: a larger dataset.image_size, or "
                        "model.kwargs for its input (a ViT: +model.kwargs.image_size="
                        f"{sample.shape[-1]} and a patch size that divides it)") from None
    finally:
        model.train(training)
        for hook in hooks:
            hook.remove()
    return shapes


def layout_of(module: nn.Module, shape: tuple[int, ...] | None, width: int,
              larger: tuple[int, ...] | None = None) -> tuple[str, str]:
    """(layout, view) of a norm from the class it replaces and the shape it was called with
    (`larger`: with larger images, for a slot whose shape alone cannot tell); view is ""
    (called as is), "tokens" (positions flattened into T) or "images" ((N, C, L, 1))."""
    channels_last = isinstance(module, (nn.LayerNorm, nn.RMSNorm)) and \
        "2d" not in type(module).__name__.lower()
    if shape is None:  # not reached by the sample: decide by class, view whatever comes
        return ("tokens", "tokens") if channels_last else ("images", "images")
    if isinstance(module, NormSlot):  # no class to go by: the shape says it
        channels_last = len(shape) != 4 or shape[1] != width
        if larger is not None and len(shape) == 4 and shape[1] == shape[3] == width:
            channels_last = larger[1] != width
    if channels_last:
        if shape[-1] != width:
            raise ValueError(f"a norm of width {width} got features of shape {shape}")
        return "tokens", "" if len(shape) == 3 else "tokens"
    if len(shape) < 2 or shape[1] != width:
        raise ValueError(f"a norm of width {width} got channels of shape {shape}")
    return "images", "" if len(shape) == 4 else "images"


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def _carry_affine(old: nn.Module, new: nn.Module) -> bool:
    """Give the new norm the gamma and beta the builder gave the old one. True where the
    builder started a gamma at 0 that the new norm lacks (the caller gates the norm)."""
    gate = False
    for attr, default in (("weight", 1.0), ("bias", 0.0)):
        value = getattr(old, attr, None)
        if not isinstance(value, torch.Tensor) or value.dim() != 1:
            continue
        target = getattr(new, attr, None)
        if isinstance(target, torch.Tensor) and target.shape == value.shape:
            with torch.no_grad():
                target.copy_(value)
        elif attr == "weight" and not torch.all(value == default):
            if not torch.all(value == 0):
                raise UserError(f"the model's builder sets the scale of a norm to values the "
                                f"chosen norm has no parameter for ({type(old).__name__})",
                                "use a norm with a scale (affine), or norm=native")
            gate = True
    return gate


class ZeroGate(nn.Module):
    """A norm whose output a learned scalar multiplies, starting at 0: where a builder starts
    a residual branch's last gamma at 0 (torchvision's zero_init_residual, timm's
    zero_init_last) and the chosen norm has no gamma (norm=none, affine=false), the branch
    still starts at 0 (SkipInit, De & Smith 2020; normbench's own ResNet does the same)."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x) * self.gate


def _check_placeable(spec: NormSpec, layouts: dict[str, tuple[str, str]],
                     shapes: dict[str, tuple[int, ...]], sample: torch.Tensor,
                     describe: str) -> None:
    """One UserError, naming the first place, where norm `spec` has no version for the
    layout a norm of the model sees; or where its statistics run over positions only (no
    version for an LSTM step's rows: instance, frn) and a channels-first norm sees a single
    position (a 1x1 map, a feature vector): InstanceNorm's x - mean_HW is 0 there (torch
    refuses it in training), FRN's x / sqrt(x^2 + eps) is sign(x)."""
    for path, (layout, _) in layouts.items():
        # (The registry's own error would name normbench's model for the layout.)
        if spec.name in norm_names() and (spec.name, layout) not in registered():
            why = unsupported_reason(spec.name, layout)
            raise UserError(f"{describe}: the norm at {path} sees {layout} "
                            f"{shapes.get(path, '')}, and norm={spec.name} has no version for "
                            f"{layout}{': ' + why if why else ''}",
                            f"use one of: {', '.join(norm_names(layout))}, or norm=native")
    if (spec.name, "steps") in registered():
        return
    single = [(path, shape) for path, shape in shapes.items()
              if layouts.get(path, ("",))[0] == "images" and math.prod(shape[2:]) == 1]
    if single:
        path, shape = single[0]
        size = "x".join(str(s) for s in sample.shape[2:])
        raise UserError(f"norm={spec.name} normalizes each channel over its positions, and "
                        f"{len(single)} norm(s) of {describe} see one position per channel at "
                        f"{size} px (first {path}, input {tuple(shape)})",
                        "a larger dataset.image_size (model.cifar_stem=true for a ResNet), "
                        "or another norm")


def _layouts(model: nn.Module, sample: torch.Tensor, norms: dict[str, nn.Module],
             shapes: dict[str, tuple[int, ...]], describe: str) -> dict[str, tuple[str, str]]:
    """`layout_of` every norm with a width. A slot called with (N, C, C, C) could be
    channels-first or channels-last (Swin at 384 px: a 96x96 grid of 96 channels): a second
    pass 32 px larger tells, since a grid follows the image size and the channels do not."""
    ambiguous = [path for path, m in norms.items() if isinstance(m, NormSlot)
                 and len(shape := shapes.get(path) or ()) == 4
                 and shape[1] == shape[3] == norm_width(m)]
    second: dict[str, tuple[int, ...]] = {}
    if ambiguous:
        n, c, h, w = sample.shape
        second = seen_shapes(model, sample.new_zeros(n, c, h + 32, w + 32),
                             {path: norms[path] for path in ambiguous}, describe)
    layouts = {}
    for path, module in norms.items():
        width = norm_width(module)
        if width is not None:
            layouts[path] = layout_of(module, shapes.get(path), width, second.get(path))
    return layouts


def replace_norms(model: nn.Module, spec: NormSpec, sample: torch.Tensor,
                  describe: str) -> list[Placement]:
    """Swap every norm of `model` for norm `spec` (see the module docstring), in place; the
    list says where each one went. `describe` names the model in errors."""
    norms = find_norms(model)
    if not norms and spec.name != "none":
        raise UserError(f"{describe} has no norm layers: there is no place for norm={spec.name}",
                        "pick a model with norms (normbench inspect shows them), or use "
                        "norm=none or norm=native for this one")
    shapes = seen_shapes(model, sample, norms, describe)
    layouts = _layouts(model, sample, norms, shapes, describe)
    _check_placeable(spec, layouts, shapes, sample, describe)
    placements = []
    for path, old in norms.items():
        width = norm_width(old)
        if width is None:
            raise UserError(f"{describe}: the norm at {path} ({type(old).__name__}) normalizes "
                            "over more than one axis; normbench cannot place its norms there",
                            "use norm=native to keep the model's own norms")
        shape = shapes.get(path)
        layout, view = layouts[path]
        factory = make_norm_factory(spec, layout)
        axis = 1 if layout == "images" else -1
        had_beta = isinstance(getattr(old, "bias", None), torch.Tensor)
        new = ShiftOnly(width, axis) if spec.name == "none" and had_beta else factory(width)
        gate = not isinstance(new, UnbuildableNorm) and _carry_affine(old, new)
        if view == "tokens":
            new = AsTokens(new)
        elif view == "images":
            new = AsImages(new)
        if gate:
            new = ZeroGate(new)
        if isinstance(getattr(old, "act", None), nn.Module):  # timm's norm+act layers
            new = ThenActivation(new, getattr(old, "drop", nn.Identity()), old.act)
        _set_submodule(model, path, new)
        placements.append(Placement(path, width, layout if shape else None, shape,
                                    type(old).__name__, type(new).__name__))
    return placements


def native_placements(model: nn.Module, sample: torch.Tensor, describe: str) -> list[Placement]:
    """The model's own norms where they are (norm=native), after checking it takes `sample`."""
    norms = find_norms(model)
    shapes = seen_shapes(model, sample, norms, describe)
    placements = []
    for path, module in norms.items():
        width, shape = norm_width(module), shapes.get(path)
        layout = None
        if shape is not None and width is not None:
            layout = layout_of(module, shape, width)[0]
        name = type(module).__name__
        placements.append(Placement(path, width, layout, shape, name, name))
    return placements
