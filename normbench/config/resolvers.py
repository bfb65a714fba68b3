"""The `${nb_...:}` resolvers that conf/ uses: a run stamp, and arithmetic for presets."""

from __future__ import annotations

import os
import secrets
import time

from omegaconf import OmegaConf

STAMP_ENV = "NORMBENCH_STAMP"


def stamp() -> str:
    """`${nb_stamp:}`: one time stamp per invocation. Inherited by launcher worker processes
    through the environment, so every job of a sweep resolves the same folder."""
    if STAMP_ENV not in os.environ:
        os.environ[STAMP_ENV] = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    return os.environ[STAMP_ENV]


def product(*factors: float) -> float:
    """`${nb_mul:a,b,...}`: presets scale a value (lr with batch size) without eval."""
    value = 1.0
    for f in factors:
        value *= float(f)
    return float(f"{value:.10g}")  # 0.1*3 -> 0.3, not 0.30000000000000004 (folder names)


def quotient(a: float, b: float) -> float:
    """`${nb_div:a,b}`."""
    return float(f"{float(a) / float(b):.10g}")


def floor_quotient(a: int, b: int) -> int:
    """`${nb_idiv:a,b}`: integer a // b, at least 1 (e.g. log every N samples, not steps).

    b <= 0 gives 1, so that a bad batch_size is reported by the config checks by name."""
    return max(1, int(a) // int(b)) if int(b) > 0 else 1


def unless(given, default):
    """`${nb_unless:x,v}`: v while x is null, null once x is set (GroupNorm's num_groups
    gives way to a group_size given on its own, so that exactly one of them is in effect)."""
    return default if given is None else None


def register_resolvers() -> None:
    for name, function in (("nb_stamp", stamp), ("nb_mul", product), ("nb_div", quotient),
                           ("nb_idiv", floor_quotient), ("nb_unless", unless)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, function)
