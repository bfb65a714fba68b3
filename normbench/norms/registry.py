"""The norm registry: a norm *name* and a tensor *layout* resolve to one registered class.

Layouts, and what a norm module of each is called with. Every norm is called as
``norm(x, mask=None)``; `mask` has x's shape without the channel axis, True on real
entries, False on padding (no model pads images today; image BatchNorm honours a mask all
the same, per-sample norms ignore it):

| layout | x                                                        | mask           |
|--------|----------------------------------------------------------|----------------|
| images | (N, C, H, W)                                             | (N, H, W)      |
| tokens | (N, T, D)                                                | (N, T)         |
| steps  | (N, T, D); through `norm.at(t)` the (N, D) rows of step t | (N, T) / (N,) |

A norm family registers its classes in its own module with `@register(name, *layouts)`;
models get a factory from `make_norm_factory(spec, layout)` (or one module from
`create_norm`) and never see the name. A registered class is a `Norm`: it builds itself
from a `NormSpec` (`Norm.build`), points at its options dataclass (`Options`, where each
option is declared once, normbench/norms/options.py; the config keys it reads, `options`,
come from it) and says whether it re-centres its input (`recentres`: the conv/linear in
front then needs no bias).

A norm that cannot be built for some width (GroupNorm whose groups do not divide it)
returns an `UnbuildableNorm` instead of raising: `check_norms(model)` then names every
such layer by its path in the model, which the factory alone cannot know.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import ClassVar

from torch import nn

from normbench.errors import UserError
from normbench.norms.options import known_options, layer_options, unset_options

LAYOUTS = ("images", "tokens", "steps")
# Which models build norms in each layout, for the error of a norm that lacks one.
LAYOUT_USERS = {"images": "model=resnet; norms over channels in model=torchvision, timm, custom",
                "tokens": "model=transformer; norms over the last axis (ViT, Swin, ConvNeXt) "
                          "in model=torchvision, timm, custom",
                "steps": "model=lstm"}


class NormSpec:
    """The norm config as plain values (so that models stay Hydra-free): the norm's `name`
    and the options given, read as attributes (`spec.eps`).

    The values come from the config, whose defaults are the norm's options dataclass
    (normbench/norms/options.py). An option not given reads None: a norm reads only its
    `options`, and building one whose required option is missing is an error rather than a
    silent second default. A name no options dataclass declares is an AttributeError, as
    it would be on any object (a typo must not read as "not given").
    """

    __slots__ = ("name", "_given")

    def __init__(self, name: str, **given):
        unknown = sorted(set(given) - known_options())
        if unknown:
            raise TypeError(f"NormSpec: {', '.join(unknown)} is no norm's option")
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "_given", MappingProxyType(dict(given)))

    def __getattr__(self, key: str):  # called only for names that are not slots
        given = object.__getattribute__(self, "_given")
        if key in given:
            return given[key]
        if key in known_options():
            return None
        raise AttributeError(f"NormSpec has no option {key!r}")

    def __setattr__(self, key, value):
        raise AttributeError("NormSpec is frozen; use replace()")

    @property
    def given(self) -> Mapping:
        """The options given, by key (None where given as null)."""
        return self._given

    def replace(self, **changes) -> NormSpec:
        """This spec with some options set to other values."""
        return NormSpec(self.name, **{**self._given, **changes})

    def _key(self) -> tuple:
        return self.name, tuple(sorted(self._given.items()))

    def __eq__(self, other) -> bool:
        return isinstance(other, NormSpec) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __reduce__(self):
        return _rebuild_spec, (self.name, dict(self._given))

    def __repr__(self) -> str:
        values = "".join(f", {k}={v!r}" for k, v in self._given.items())
        return f"NormSpec({self.name!r}{values})"


def _rebuild_spec(name: str, given: dict) -> NormSpec:
    return NormSpec(name, **given)


def affine_flags(spec: NormSpec) -> tuple[bool, bool]:
    """(scale, center): whether the norm has a gamma and a beta. `affine` is the shorthand
    for both; `center`/`scale` (Keras' switches) turn one off; unset means on."""
    on = spec.affine is not False
    return on and spec.scale is not False, on and spec.center is not False


def has_affine(spec: NormSpec) -> bool:
    """Whether the norm learns a gamma or a beta at all (the torch layers' `affine`)."""
    return any(affine_flags(spec))


def drop_affine_parts(module: nn.Module, spec: NormSpec) -> nn.Module:
    """Remove gamma (`weight`) or beta (`bias`) from a layer built with both, as `center`
    and `scale` ask: torch's layers take None for either one in their functional forms."""
    scale, center = affine_flags(spec)
    if not scale and getattr(module, "weight", None) is not None:
        module.weight = None
    if not center and getattr(module, "bias", None) is not None:
        module.bias = None
    return module


def make_spec(**config) -> NormSpec:
    """NormSpec from a config mapping (`name` and the options), ignoring keys that are not
    norm options."""
    names = known_options()
    return NormSpec(config["name"], **{k: v for k, v in config.items() if k in names})


class Norm:
    """What every registered norm class is, besides an nn.Module.

    `build` is the one place that turns a spec into the class's constructor arguments;
    `at(t)` is the module to call for time step t in the steps layout (the norm itself,
    unless it keeps per-step state).
    """

    norm_name: ClassVar[str] = ""  # set by @register
    # The norm's options dataclass (normbench/norms/options.py): its config schema, and
    # where `options` and `nullable` come from. A class without one (a test's) lists
    # `options` itself and has no config.
    Options: ClassVar[type | None] = None
    options: ClassVar[frozenset[str]] = frozenset()  # the spec's options `build` reads
    nullable: ClassVar[frozenset[str]] = frozenset()  # options a spec may leave None
    recentres: ClassVar[bool] = True
    # Whether the probes and the act/ tags measure this module (False for an identity, and
    # for a container whose children are the norms actually called, e.g. per time step).
    probed: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.Options is not None and ("options" in cls.__dict__ or "nullable" in cls.__dict__):
            raise TypeError(f"{cls.__name__}: options and nullable come from its Options; "
                            "declare an option there")
        if cls.__dict__.get("Options") is not None:
            cls.options = layer_options(cls.Options)
            cls.nullable = unset_options(cls.Options)

    @classmethod
    def build(cls, spec: NormSpec, num_features: int, *, t_max: int | None = None) -> nn.Module:
        raise NotImplementedError

    def at(self, t: int) -> nn.Module:
        return self

    @classmethod
    def activates(cls, spec: NormSpec) -> bool:
        """Whether the norm ends in an activation of its own (FRN's TLU): a model then
        leaves out the ReLU it puts right after a norm, which the norm's activation replaces."""
        return False


_REGISTRY: dict[tuple[str, str], type[Norm]] = {}
# (name, layout) -> why the norm has no version there (said in the pre-flight error).
_UNSUPPORTED: dict[tuple[str, str], str] = {}


def register(name: str, *layouts: str):
    """Class decorator: `cls` is norm `name` for each of `layouts`."""

    def add(cls: type[Norm]) -> type[Norm]:
        if not issubclass(cls, Norm) or not issubclass(cls, nn.Module):
            raise TypeError(f"{cls.__name__} must be an nn.Module and a Norm")
        for layout in layouts:
            if layout not in LAYOUTS:
                raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
            if (name, layout) in _REGISTRY:
                raise ValueError(f"norm {name!r} is already registered for {layout}: "
                                 f"{_REGISTRY[name, layout].__name__}")
        # One config per name: every layout's class reads the same options.
        for (other_name, _), other in _REGISTRY.items():
            if other_name == name and other.Options is not cls.Options:
                raise ValueError(f"{cls.__name__}.Options must be {other.__name__}'s for norm "
                                 f"{name!r}: one config serves every layout")
        for layout in layouts:
            _REGISTRY[name, layout] = cls
        cls.norm_name = name
        return cls

    return add


def unsupported(name: str, layout: str, reason: str) -> None:
    """Record why norm `name` has no version for `layout`: the pre-flight error says it."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    _UNSUPPORTED[name, layout] = reason


def unsupported_reason(name: str, layout: str) -> str | None:
    return _UNSUPPORTED.get((name, layout))


def norm_names(layout: str | None = None) -> tuple[str, ...]:
    """Every registered norm name (with a version for `layout`, if given), in registration
    order."""
    return tuple(dict.fromkeys(name for name, lay in _REGISTRY if layout in (None, lay)))


def registered() -> tuple[tuple[str, str], ...]:
    """Every registered (name, layout) pair."""
    return tuple(_REGISTRY)


def norm_options(name: str) -> frozenset[str]:
    """The config keys norm `name` reads, over all its layouts."""
    return frozenset().union(*(cls.options for (n, _), cls in _REGISTRY.items() if n == name))


def norm_options_class(name: str) -> type | None:
    """The options dataclass of norm `name` (its config schema); None for a name without
    one (unknown, or a test's norm that lists its options by hand)."""
    return next((cls.Options for (n, _), cls in _REGISTRY.items() if n == name), None)


def norm_class(name: str, layout: str) -> type[Norm]:
    """The class registered for (name, layout), or a one-line UserError naming the choices."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    if (name, layout) in _REGISTRY:
        return _REGISTRY[name, layout]
    names = norm_names()
    if name not in names:
        raise UserError(f"unknown norm '{name}'", f"use one of: {', '.join(names)}")
    usable = [n for n in names if (n, layout) in _REGISTRY]
    reason = _UNSUPPORTED.get((name, layout))
    why = f": {reason}" if reason else ""
    raise UserError(f"norm={name} has no version for {layout} ({LAYOUT_USERS[layout]}){why}",
                    f"use one of: {', '.join(usable)}")


class NormFactory:
    """`make(num_features) -> nn.Module` for one (spec, layout); `recentres` tells the model
    whether the layer in front of the norm needs a bias, `activates` whether the ReLU after
    it is left out (the norm brings its own activation)."""

    def __init__(self, spec: NormSpec, layout: str, *, t_max: int | None = None):
        self.cls = norm_class(spec.name, layout)
        missing = sorted(k for k in self.cls.options - self.cls.nullable
                         if getattr(spec, k) is None)
        if missing:
            raise ValueError(f"norm={spec.name} needs {', '.join(missing)}; build its "
                             "NormSpec from the config (make_spec)")
        self.spec = spec
        self.t_max = t_max

    @property
    def recentres(self) -> bool:
        return self.cls.recentres

    @property
    def activates(self) -> bool:
        return self.cls.activates(self.spec)

    def __call__(self, num_features: int) -> nn.Module:
        return self.cls.build(self.spec, num_features, t_max=self.t_max)


def make_norm_factory(spec: NormSpec, layout: str, *, t_max: int | None = None) -> NormFactory:
    """Resolve a norm name and layout once; `t_max` is the longest sequence (steps layout)."""
    return NormFactory(spec, layout, t_max=t_max)


def create_norm(spec: NormSpec, layout: str, num_features: int, *,
                t_max: int | None = None) -> nn.Module:
    """One norm module for `num_features` channels in `layout`."""
    return make_norm_factory(spec, layout, t_max=t_max)(num_features)


# ----------------------------------------------------------------------------- build checks


class UnbuildableNorm(nn.Module):
    """Stands where a norm cannot be built; `check_norms` turns every one of them into one
    UserError that names their places in the model (building first and checking afterwards
    is what lets the error say *which* layers failed, without threading names through
    blocks)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    @classmethod
    def user_error(cls, places: list[tuple[str, UnbuildableNorm]], model: nn.Module) -> UserError:
        """The error for all the (path, module) pairs of this class found in `model`."""
        raise NotImplementedError

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"{type(self).__name__} reached forward; call check_norms(model) first")


def check_norms(model: nn.Module) -> None:
    """Raise one UserError naming every layer whose norm could not be built (those of the
    first failing kind, when there are several kinds)."""
    places = [(path, m) for path, m in model.named_modules() if isinstance(m, UnbuildableNorm)]
    if places:
        kind = type(places[0][1])
        raise kind.user_error([(p, m) for p, m in places if type(m) is kind], model)
