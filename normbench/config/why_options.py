"""The why-probes' options (conf/train.yaml's `why:`; normbench/probes/why.py): ranges,
and the one combination they cannot measure. Part of the pre-flight (config/checks.py)."""

from __future__ import annotations

from numbers import Real

from normbench.config.ranges import Range
from normbench.config.ranges import show_value as _show
from normbench.errors import UserError


def _check(section: dict, key: str, label: str, *, low: float, integer: bool = False,
           low_open: bool = False, allow_none: bool = False, example: str, why: str = "") -> None:
    if key in section:
        Range(low, float("inf"), low_open, False, integer, allow_none, example, why).check(
            label, section[key])


def check_why_options(why: dict, norm: str | None) -> None:
    """The why-probes' intervals and sizes, and the one combination they cannot measure."""
    for probe, options in why.items():
        _check(options, "every", f"why.{probe}.every", low=0, integer=True,
               example="1 (or 0: off)", why=" (logging steps between two measurements)")
    landscape, ics, hessian = why.get("landscape", {}), why.get("ics", {}), why.get("hessian", {})
    factors = landscape.get("lr_factors")
    if factors is not None and (not factors or any(
            isinstance(f, bool) or not isinstance(f, Real) or not f > 0 for f in factors)):
        raise UserError(f"why.landscape.lr_factors={_show(factors)} must be a non-empty list of "
                        "positive numbers", "use e.g. why.landscape.lr_factors=[0.5,1,2,4]")
    _check(ics, "layers", "why.ics.layers", low=1, integer=True, allow_none=True,
           example="8 (or null: every weight)")
    if hessian.get("bn_mode", "eval") not in ("eval", "train"):
        raise UserError(f"why.hessian.bn_mode={_show(hessian['bn_mode'])} is not a BN mode",
                        "use why.hessian.bn_mode=eval (running statistics) or train (the "
                        "batch's own)")
    if hessian.get("every") and hessian.get("bn_mode") == "train" and norm == "power":
        raise UserError("why.hessian.bn_mode=train cannot differentiate norm=power twice: its "
                        "training backward updates its nu buffer in place",
                        "use why.hessian.bn_mode=eval (running statistics)")
    _check(hessian, "batch_size", "why.hessian.batch_size", low=1, integer=True,
           allow_none=True, example="128 (or null: the run's batch_size)")
    _check(hessian, "max_hvps", "why.hessian.max_hvps", low=1, integer=True, example="100")
    _check(hessian, "tol", "why.hessian.tol", low=0, low_open=True, example="0.001")
    _check(hessian, "trace_samples", "why.hessian.trace_samples", low=1, integer=True,
           example="20")
