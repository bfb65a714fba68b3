"""Norm options, each declared once: a field of its norm's options dataclass.

A norm family declares the options of each of its norms as a dataclass of `option(...)`
fields (`BatchNormOptions` in normbench/norms/batch.py), and its classes point at it
(`Options = BatchNormOptions`). Everything else is read from that one declaration:

- the config schema of `norm=<name>` is the dataclass itself (stored by
  normbench/config/schema.py as `norm_<name>_schema`): its defaults are the config's
  defaults, and Hydra checks the types and refuses unknown keys while composing;
- the registry's `Norm.options` (what `build` reads) and `Norm.nullable` (what a NormSpec
  may leave unset), normbench/norms/registry.py;
- the range checks of the pre-flight, normbench/config/checks.py;
- the options `normbench list` shows, with their defaults and help.

A field's type says whether the config may hold null (`float | None`). Shared groups are
base classes: `NormOptions` (name and weight_norm, which every norm config has and the
model builder reads), `EpsOptions`, `AffineOptions`.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from functools import cache

from omegaconf import MISSING

from normbench.config.ranges import Range, show_number

_RANGE = "range"  # metadata keys of an option's field
_HELP = "help"
_UNSET_OK = "unset_ok"


def option(default, help: str, *, low: float | None = None, high: float = math.inf,
           low_open: bool = False, high_open: bool = False, example: str | None = None,
           why: str = "", unset_ok: bool = False):
    """One norm option: its default, what it means (`normbench list` shows `help`), and,
    for a number, the range the pre-flight holds it to (`low`..`high`; `why` ends the
    error line, `example` is its fix, the default by default).

    `unset_ok`: a NormSpec built by hand may leave it None, which the norm reads as its
    usual meaning (an affine part on, no sync); options whose type allows null are so
    anyway. Every other option must be given: a missing one is a caller's bug, not a
    silent second default.
    """
    bounds = None
    if low is not None:
        if example is None and (isinstance(default, str) or default is None):
            raise ValueError("an option whose default is not a number needs an example")
        bounds = dict(low=low, high=high, low_open=low_open, high_open=high_open,
                      example=example if example is not None else show_number(default), why=why)
    return dataclasses.field(default=default, metadata={_HELP: help, _RANGE: bounds,
                                                         _UNSET_OK: unset_ok})


def eps_option(default: float = 1e-5):
    return option(default, "added under the square root, so that the division stays finite",
                  low=0, low_open=True, example="1e-5",
                  why=" (it keeps the division by the standard deviation finite)")


@dataclass
class NormOptions:
    """What every norm config has. `name` comes from conf/norm/<name>.yaml; weight_norm is
    read by the model builder, not by the norm layer."""

    name: str = MISSING
    weight_norm: bool = option(False, "also weight-normalize every conv/linear weight "
                                      "(norm=weight is that alone)")


@dataclass
class EpsOptions(NormOptions):
    eps: float = eps_option()


@dataclass
class AffineOptions(NormOptions):
    """The learned gamma and beta: unset (in a NormSpec) means on."""

    affine: bool = option(True, "shorthand: false turns off both center and scale",
                          unset_ok=True)
    center: bool = option(True, "the shift beta (Keras' name)", unset_ok=True)
    scale: bool = option(True, "the scale gamma (Keras' name)", unset_ok=True)


# ----------------------------------------------------------------------------- reading them

_SHARED = frozenset(f.name for f in dataclasses.fields(NormOptions))


def option_fields(options: type) -> tuple[dataclasses.Field, ...]:
    """The fields of an options dataclass, `name` left out."""
    return tuple(f for f in dataclasses.fields(options) if f.name != "name")


def option_help(field: dataclasses.Field) -> str:
    return field.metadata.get(_HELP, "")


@cache
def _hints(options: type) -> dict:
    return typing.get_type_hints(options)


def allows_null(options: type, key: str) -> bool:
    """Whether the config may set the option to null (its type includes None)."""
    return type(None) in typing.get_args(_hints(options)[key])


def layer_options(options: type) -> frozenset[str]:
    """The options the norm's `build` reads: all but those every norm config has."""
    return frozenset(f.name for f in option_fields(options)) - _SHARED


def unset_options(options: type) -> frozenset[str]:
    """The layer options a NormSpec may leave None: null is a value of theirs, or they
    are `unset_ok`."""
    fields = {f.name: f for f in option_fields(options)}
    return frozenset(k for k in layer_options(options)
                     if allows_null(options, k) or fields[k].metadata.get(_UNSET_OK))


def option_ranges(options: type) -> dict[str, Range]:
    """The range of each numeric option that declares one, by key."""
    out = {}
    for f in option_fields(options):
        bounds = f.metadata.get(_RANGE)
        if bounds is not None:
            hint = _hints(options)[f.name]
            integer = int in (hint, *typing.get_args(hint))
            out[f.name] = Range(integer=integer, nullable=allows_null(options, f.name), **bounds)
    return out


def known_options() -> frozenset[str]:
    """Every option of every options dataclass defined so far (the families' modules
    define theirs when imported)."""
    found, todo = set(), [NormOptions]
    while todo:
        cls = todo.pop()
        found.update(f.name for f in option_fields(cls))
        todo.extend(cls.__subclasses__())
    return frozenset(found)
