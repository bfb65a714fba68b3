"""Hydra's composition errors, and keys outside the schemas, as one line: problem and fix.

Every line says which key, where it came from (the command line, a preset, a conf file),
and which options do have it.
"""

from __future__ import annotations

import dataclasses
import difflib
import errno
import itertools
import os
import re
import shlex
import typing
from functools import cache

from omegaconf import DictConfig, OmegaConf

from normbench.config.ranges import show_value
from normbench.config.schema import SCHEMAS, TrainConfig
from normbench.config.tree import PRIMARY, conf_dir, config_options, initialized
from normbench.errors import UserError

GROUPS = tuple(dict.fromkeys(group for group, _, _ in SCHEMAS))  # dataset, model, ...

# Groups whose options are `@package _global_` presets rather than one section's options.
PRESET_GROUPS = ("experiment", "setup", "gap_setup", "debug")


@cache
def schema_of_option(group: str, option: str) -> str | None:
    """The schema a conf/<group>/<option>.yaml extends, from its defaults list."""
    path = conf_dir() / group / f"{option}.yaml"
    match = re.search(rf"- /{group}_(\w+)_schema@", path.read_text()) if path.is_file() else None
    return match.group(1) if match else None


def _schema_class(group: str, schema: str | None) -> type | None:
    return next((cls for g, name, cls in SCHEMAS if g == group and name == schema), None)


def options_with_key(group: str, key: str) -> list[str]:
    """The options of `group` whose schema has `key` (dataset.noise: shapes)."""
    out = []
    for option in config_options(group):
        cls = _schema_class(group, schema_of_option(group, option))
        if cls is not None and key in {f.name for f in dataclasses.fields(cls)}:
            out.append(option)
    return out


def options_of_schema(class_name: str) -> tuple[str, list[str]] | None:
    """(group, options) of the conf files that extend the schema class `class_name`."""
    for group, schema, cls in SCHEMAS:
        if cls.__name__ == class_name:
            return group, [o for o in config_options(group)
                           if schema_of_option(group, o) == schema]
    return None


def _type_words(class_name: str, key: str) -> str:
    """What a key's schema type asks for, in words ('an integer (or null)')."""
    classes = [TrainConfig] + [cls for _, _, cls in SCHEMAS]
    cls = next((c for c in classes if c.__name__ == class_name), None)
    hint = typing.get_type_hints(cls).get(key) if cls else None
    nullable = type(None) in typing.get_args(hint)
    if nullable:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    words = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    what = words.get(hint, "a list of numbers" if typing.get_origin(hint) is list else
                     "a value of its type")
    return what + (" (or null)" if nullable else "")


def _unknown_key_line(full_key: str, class_name: str, where: str,
                      command_line: list[str]) -> tuple[str, str] | None:
    """A group key its option's schema lacks: name the options that have it."""
    found = options_of_schema(class_name)
    if found is None:
        return None
    group, options = found
    # Several options share a schema (cifar10, cifar100): name the one picked, if on the line.
    picked = [o.split("=", 1)[1] for o in command_line if o.split("=", 1)[0] == group]
    if picked and picked[-1] in options:
        options = [picked[-1]]
    key = full_key.split(".", 1)[1] if "." in full_key else full_key
    others = options_with_key(group, key)
    chosen = f"{group}={'/'.join(options)}" if options else group
    fields = {f.name for _, _, cls in SCHEMAS for f in dataclasses.fields(cls)
              if options_of_schema(cls.__name__)[0] == group} - {key}
    close = difflib.get_close_matches(key, sorted(fields), n=1)
    if others:
        also = f"it is an option of {', '.join(f'{group}={o}' for o in others)}"
    elif close:
        also = f"did you mean {group}.{close[0]}"
    else:
        also = f"'normbench train --cfg job {group}=...' lists the keys of each option"
    drop = (f"take {full_key} off the command line" if where == "the command line"
            else f"leave {full_key} out of {where}")
    return (f"{full_key} (from {where}) is not an option of {chosen}: the run would ignore it",
            f"{drop}; {also}")


def explain_hydra_error(error: Exception, overrides: list[str]) -> tuple[str, str]:
    """Turn Hydra's multi-line composition errors into (problem, fix) for one line."""
    from hydra.errors import MissingConfigException

    text = str(error)
    cause = str(error.__cause__ or "")
    if isinstance(error, MissingConfigException) and getattr(error, "options", None) is not None:
        # "In 'experiment/stat_gap': Could not find 'gap_setup/foo'": the missing file is
        # the one after "Could not find", not the config that asked for it.
        missing = getattr(error, "missing_cfg_file", None) or ""
        match = re.search(r"Could not find '([\w/]+)/([^']+)'", text)
        group, _, choice = missing.rpartition("/") if "/" in missing else (
            (match.group(1), "/", match.group(2)) if match else ("?", "/", "?"))
        options = list(error.options)
        close = difflib.get_close_matches(choice, options, n=1)
        hint = f"did you mean {group}={close[0]}? " if close else ""
        return f"unknown {group} '{choice}'", f"{hint}use one of: {', '.join(sorted(options))}"
    details = text + "\n" + cause
    full_key = re.search(r"full_key: (\S+)", details)
    schema = re.search(r"object_type=(\w+)", details)
    source = re.search(r"^In '([\w/@]+)'", text)
    where = "the command line"
    if source:
        where = (f"the preset {source.group(1).replace('/', '=', 1)}"
                 if source.group(1).split("/")[0] in PRESET_GROUPS else f"conf/{source.group(1)}.yaml")
    value = re.search(r"Value '([^']*)' of type", details)
    if value and full_key and schema:
        key = full_key.group(1)
        return (f"{key}={value.group(1)} (from {where}) must be "
                f"{_type_words(schema.group(1), key.rsplit('.', 1)[-1])}",
                f"give {key} a value of that type, e.g. from 'normbench train --cfg job'")
    if full_key and schema and schema.group(1) != TrainConfig.__name__ and (
            "not in" in details):
        line = _unknown_key_line(full_key.group(1), schema.group(1), where, overrides)
        if line:
            return line
    match = (re.search(r"Could not override '([^']+)'", text)
             or re.search(r"Key '([^']+)' not in 'TrainConfig'", details)
             or re.search(r"Key '([^']+)' is not in struct", text))
    if match:
        key = match.group(1)
        parent, _, leaf = key.rpartition(".")
        if parent.rpartition(".")[2] == "kwargs":  # a builder's arguments: any key, added
            given = next((o.partition("=")[2] for o in overrides
                          if o.partition("=")[0] == key), "VALUE")
            return (f"{key}: {parent} holds no {leaf} yet, and Hydra adds a new key to it "
                    "only with a '+'", f"write +{key}={given}")
        close = [k for k in difflib.get_close_matches(key, known_keys(), n=2) if k != key][:1]
        hint = f"did you mean {close[0]}? " if close else ""
        return (f"unknown config key '{key}' (from {where})",
                f"{hint}'normbench train --cfg job' prints every key")
    if "Ambiguous value for argument" in text:
        return ("a sweep (comma-separated values) needs multirun mode",
                "add -m, e.g. normbench train -m " + " ".join(overrides))
    first = next((line for line in text.splitlines() if line.strip()), text)
    return first, "check the override against 'normbench train --cfg job'"


def explain_lookup_error(error: OSError, overrides: list[str]) -> tuple[str, str]:
    """Hydra looks an unknown key up as a config group folder: a key too long for a file
    name ends there in OSError(ENAMETOOLONG), not in Hydra's unknown-key error."""
    name = os.path.basename(str(error.filename or ""))
    culprit = next((o for o in overrides if name and name in o), None)
    if error.errno != errno.ENAMETOOLONG or culprit is None:
        raise error
    key = culprit.split("=", 1)[0].lstrip("+~")
    shown = key if len(key) <= 60 else f"{key[:40]}..., {len(key)} characters"
    return f"unknown config key '{shown}' (from the command line)", \
        "'normbench train --cfg job' prints every key"


def explain_parse_error(overrides: list[str], error: Exception, parser) -> tuple[str, str]:
    """An override Hydra's grammar refuses, named, with what the usual causes need: a value
    the shell split at a space, or a sweep with an empty value between its commas."""
    from hydra.errors import HydraException

    def refusal(word: str) -> Exception | None:
        try:
            parser.parse_override(word)
        except HydraException as e:
            return e
        return None

    found = next(((i, e) for i, w in enumerate(overrides) if (e := refusal(w)) is not None), None)
    if found is None:  # each parses alone: name them all
        return (f"cannot parse the overrides {' '.join(overrides)}: {str(error).splitlines()[0]}",
                "write overrides as key=value")
    bad, error = found
    word = overrides[bad]
    previous = overrides[bad - 1] if bad else ""
    if "=" not in word and not word.startswith("~") and "=" in previous:
        # `key=/data/my file.txt` unquoted: the shell passes `key=/data/my` and `file.txt`.
        tail = list(itertools.takewhile(lambda w: "=" not in w, overrides[bad:]))
        key, _, head = previous.partition("=")
        value = " ".join([head.strip("'\""), *tail])
        hydra_value = f'"{value}"' if '"' not in value else f"'{value}'"
        return (f"'{word}' is not an override (key=value): the shell split the value of {key} "
                f"at a space ({previous} {' '.join(tail)})",
                f"quote the value, for the shell and for Hydra: "
                f"{shlex.quote(f'{key}={hydra_value}')}")
    key, sep, value = word.partition("=")
    where, items = _empty_sweep_value(value) if sep else (None, [])
    if where:
        following = overrides[bad + 1] if bad + 1 < len(overrides) else ""
        if where == "after the last comma" and following and "=" not in following:
            # `norm=batch, group`: the shell split the list at the space after the comma
            return (f"{word} has an empty value after the last comma; '{following}' after it "
                    f"is not an override", f"write the values without spaces: {word}{following}")
        return (f"{word} has an empty value {where}",
                f"remove the extra comma ({key}={','.join(i for i in items if i)}) or put "
                "another value there")
    first = str(error).splitlines()[0] if str(error) else type(error).__name__
    return f"cannot parse the override {word}: {first}", "write overrides as key=value"


def _empty_sweep_value(value: str) -> tuple[str | None, list[str]]:
    """Where a comma-separated value has an empty item ('after the last comma', ...; None
    if it has none), and its items. Commas inside quotes or brackets belong to one item."""
    depth, quote, items, current = 0, "", [], ""
    for char in value:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            items.append(current.strip())
            current = ""
            continue
        current += char
    items.append(current.strip())
    if len(items) < 2 or all(items):
        return None, items
    if not items[-1]:
        return "after the last comma", items
    if not items[0]:
        return "before the first comma", items
    return "between two commas", items


def refuse_keys_outside_schema(cfg: DictConfig, job: list[str], command_line: list[str]) -> None:
    """`+key=value` and `++key=value` add keys past Hydra's struct check: refuse any key that
    the schema of its section (or the top level) does not declare; nothing would read it."""
    choices = cfg.hydra.runtime.choices
    for section in ("", *GROUPS):
        node = cfg if not section else cfg.get(section)
        if not isinstance(node, DictConfig):
            continue
        declared = _declared(node, section)
        for key in node:
            if key in declared:
                continue
            dotted = f"{section}.{key}" if section else key
            mentioned = any(o.lstrip("+~").split("=", 1)[0] == dotted for o in command_line)
            where = "the command line" if mentioned else (
                f"the sweep of the preset experiment={choices.get('experiment')}")
            value = show_value(OmegaConf.to_container(node, resolve=False)[key])
            if not section:
                raise UserError(f"{dotted}={value} (from {where}) is not a normbench setting: "
                                "nothing reads it", f"take {dotted} off the command line; "
                                "'normbench train --cfg job' lists every key")
            problem, fix = _unknown_key_line(dotted, OmegaConf.get_type(node).__name__, where,
                                             [f"{section}={choices.get(section)}"])
            raise UserError(problem.replace(f"{dotted} (", f"{dotted}={value} ("), fix)


def _declared(node: DictConfig, section: str) -> set[str]:
    cls = OmegaConf.get_type(node)
    names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    return names | ({"hydra"} if not section else set())


@cache
def known_keys() -> list[str]:
    """Every dotted key of the default config (for 'did you mean')."""
    from hydra import compose

    with initialized():
        cfg = OmegaConf.to_container(compose(PRIMARY), resolve=False)
    keys: list[str] = []

    def walk(node, prefix):
        for k, v in node.items():
            keys.append(prefix + k)
            if isinstance(v, dict):
                walk(v, prefix + k + ".")

    walk(cfg, "")
    return keys
