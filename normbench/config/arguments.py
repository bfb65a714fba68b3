"""The words after `normbench train`: Hydra's flags, the overrides, and the record folder.

Hydra's own parser would answer an unknown flag with argparse's usage block; here it is one
line naming the flag (and the nearest known one).
"""

from __future__ import annotations

import difflib

from normbench.errors import UserError

_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-name", "-cn", "--config-dir",
                "-cd", "--config-path", "-cp", "--experimental-rerun"}
_INFO_FLAGS = {"-h", "--help", "--hydra-help", "--info", "-i", "--version", "--shell-completion",
               "-sc"}
# Every flag Hydra's own parser takes: anything else would end in argparse's usage block.
_FLAGS = _VALUE_FLAGS | _INFO_FLAGS | {"-m", "--multirun", "-r", "--run", "--resolve"}
_CFG_KINDS = ("job", "hydra", "all")


def split_args(args: list[str]) -> tuple[list[str], list[str], bool, bool]:
    """(Hydra flags, overrides, multirun?, info-only?) from the words after `train`."""
    flags, overrides, multirun, info_only = [], [], False, False
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("-") and a.split("=")[0] not in _FLAGS:
            close = difflib.get_close_matches(a.split("=")[0], sorted(_FLAGS), n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise UserError(f"unknown option {a} for 'normbench train'",
                            f"{hint}see 'normbench train --help'; settings are key=value "
                            "overrides without dashes")
        if a in ("-m", "--multirun"):
            multirun = True
            flags.append(a)
        elif a in ("--cfg", "-c"):
            if i + 1 >= len(args) or args[i + 1] not in _CFG_KINDS:
                given = f"'{args[i + 1]}'" if i + 1 < len(args) else "nothing"
                raise UserError(f"{a} takes one of {', '.join(_CFG_KINDS)}, not {given}",
                                f"e.g. normbench train {a} job norm=group")
            flags.extend(args[i:i + 2])
            i += 1
        elif a in _VALUE_FLAGS:
            flags.extend(args[i:i + 2])
            i += 1
        elif a.split("=")[0] in _INFO_FLAGS or a.startswith("-"):
            flags.append(a)
            info_only = info_only or a.split("=")[0] in _INFO_FLAGS
        elif a.lstrip("+~").startswith("="):
            raise UserError(f"'{a}' has no key before its '='",
                            "write key=value, e.g. lr=0.1 or norm=group")
        else:
            overrides.append(a)
        i += 1
    return flags, overrides, multirun, info_only


def take_output_subdir(overrides: list[str]) -> tuple[str | None, list[str]]:
    """The record folder the command asks for (hydra.output_subdir, default .hydra), and the
    overrides without it."""
    subdir, rest = ".hydra", []
    for override in overrides:
        key, _, value = override.partition("=")
        if key == "hydra.output_subdir":
            subdir = None if value.strip().lower() in ("null", "none", "") else value.strip("'\"")
        else:
            rest.append(override)
    return subdir, rest
