"""The config vocabulary every part of effitrans declares its keys with (imports nothing from effitrans).

A part declares each key it reads once, as `Key(default, check, doc)`: the default the config starts from,
the check of what is allowed, and a one-line description. A group of keys (a dict of name -> Key, or of
name -> nested group) builds its ml_collections ConfigDict of defaults (`default_config`) and validates a
ConfigDict (`validate`). Unknown keys are errors, so a typo never silently falls back to a default; every
error names the key path, the value and what is allowed.

A check is a function value -> None when allowed, else a phrase saying what is allowed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections

Check = Callable[[Any], str | None]


class ConfigError(ValueError):
    """A config value that is not allowed; the message names the key, the value and what is allowed."""


class _NotSet:
    def __repr__(self):
        return "NOT_SET"


NOT_SET = _NotSet()  # default of a key a config may add but the default group leaves out


@dataclasses.dataclass(frozen=True)
class Key:
    """One config key: its default, its check and what it means.

    A key whose check is a group (a Mapping of keys) is a nested group a config may add (default NOT_SET).

    field_type: the ConfigDict field type when the default alone does not fix it (a None default, or a
    value of several types such as `int | list[int]`: `object`); the default is then held in a
    FieldReference so command-line overrides keep that type.
    """

    default: Any
    check: Check | Mapping = None
    doc: str = ""
    field_type: type | None = None

    def __post_init__(self):
        if self.check is None:
            object.__setattr__(self, "check", anything)


Group = Mapping[str, "Key | Group"]


# ---- small value checks: each returns None if ok, else a description of what is allowed -------------


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def int_at_least(lo: int) -> Check:
    return lambda v: None if is_int(v) and v >= lo else f"an int >= {lo}"


def is_number(v) -> bool:
    """A finite int or float (bools, NaN and infinities are not numbers a config can use)."""
    return is_int(v) or (isinstance(v, float) and math.isfinite(v))


def float_at_least(lo: float, strict: bool = False) -> Check:
    def check(v):
        ok = is_number(v) and (v > lo if strict else v >= lo)
        return None if ok else f"a finite number {'>' if strict else '>='} {lo}"

    return check


def float_in(lo: float, hi: float, *, hi_open: bool = True) -> Check:
    """A finite number in [lo, hi) (or [lo, hi] with hi_open=False)."""

    def check(v):
        ok = is_number(v) and lo <= v and (v < hi if hi_open else v <= hi)
        return None if ok else f"a number in [{lo:g}, {hi:g}{')' if hi_open else ']'}"

    return check


def one_of(*allowed) -> Check:
    return lambda v: None if v in allowed else f"one of {list(allowed)}"


def optional(check: Check) -> Check:
    return lambda v: None if v is None else (None if check(v) is None else f"None or {check(v)}")


def boolean(v):
    return None if isinstance(v, bool) else "True or False"


def non_empty_string(v):
    return None if isinstance(v, str) and v else "a non-empty string"


def anything(v):
    return None


def block_size(v):
    return None if v is None or (is_int(v) and v > 0 and v % 8 == 0) else "None or a positive multiple of 8"


def int_list(v):
    ok = isinstance(v, (list, tuple)) and all(is_int(x) and x >= 1 for x in v)
    return None if ok else "a list of ints >= 1"


def int_or_int_list(v):
    if is_int(v) and v >= 1:
        return None
    if isinstance(v, (list, tuple)) and v and all(is_int(x) and x >= 1 for x in v):
        return None
    return "an int >= 1 or a non-empty list of ints >= 1"


def rules_table(v):
    try:
        ok = all(len(r) == 2 and isinstance(r[0], str) for r in v)
    except TypeError:
        ok = False
    return None if ok else "a sequence of (logical_axis, mesh_axis | tuple of mesh axes | None) pairs"


# ---- groups ------------------------------------------------------------------------------------------


def default_config(group: Group, **overrides) -> ml_collections.ConfigDict:
    """The ConfigDict of a group's defaults (keys with default NOT_SET left out), then `overrides`."""
    cfg = ml_collections.ConfigDict()
    for name, key in group.items():
        if isinstance(key, Mapping):
            cfg[name] = default_config(key)
        elif key.default is NOT_SET:
            continue
        elif key.field_type is not None:
            cfg[name] = ml_collections.FieldReference(key.default, field_type=key.field_type)
        else:
            cfg[name] = key.default
    cfg.update(overrides)
    return cfg


def validate(cfg: Mapping, group: Group, prefix: str) -> None:
    """Checks every key of `cfg` against `group`; the first problem raises ConfigError naming its path."""
    for name in cfg.keys():
        path = f"{prefix}.{name}"
        if name not in group:
            raise ConfigError(f"{path} is not a known config key; known keys of {prefix}: {sorted(group)}")
        key, value = group[name], cfg[name]
        check = key if isinstance(key, Mapping) else key.check
        if isinstance(check, Mapping):
            if not hasattr(value, "keys"):
                raise ConfigError(f"{path}={value!r} must be a group with keys {sorted(check)}")
            validate(value, check, path)
            continue
        problem = check(value)
        if problem is not None:
            raise ConfigError(f"{path}={value!r} is not allowed: expected {problem}")


def load_config(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """`get_config(arg)` of the config file at `path` (a configs/*.py file; `path:arg` is split off too).

    Config files are plain modules loaded by path, as ml_collections' config_flags does, so they need no
    package of their own and nothing on sys.path.
    """
    if arg is None and ":" in os.path.basename(path):
        path, arg = path.rsplit(":", 1)
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(f"effitrans_config_{name}", path)
    if spec is None or not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config() if arg is None else module.get_config(arg)


def value(cfg: Mapping, group: Group, name: str):
    """cfg[name], or the key's declared default when the config leaves it out or None."""
    v = cfg.get(name)
    return group[name].default if v is None else v


def split_arg(arg: str) -> list[tuple[str, str]]:
    """'a=1,b.c=[2,3],d=x' -> [("a", "1"), ("b.c", "[2,3]"), ("d", "x")]: commas inside brackets or quotes stay."""
    parts, depth, quote, current = [], 0, None, ""
    for ch in arg:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(current)
            current = ""
            continue
        current += ch
    parts.append(current)
    out = []
    for part in parts:
        key, eq, text = part.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"config argument {part!r} is not key=value (allowed: 'key=value,key2=value2,...')")
        out.append((key.strip(), text.strip()))
    return out


def parse_value(text: str):
    """A Python literal ('4', '[2, 4]', 'None', '0.5', 'True') as its value; anything else as the string itself."""
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_arg(config: ml_collections.ConfigDict, arg: str | None, shorthands: Mapping | None = None):
    """`config` with the config-file argument `arg` applied: 'key=value,...' (the `file.py:key=value,...` of
    --config), where a key is a dotted config key (train.steps=50, model.funnel.strides=[4]) or one of the config
    file's `shorthands` (name -> function(config, value) that sets the keys it stands for). An unknown key, or
    a value of another type than the key's, raises ConfigError naming the key. None or "" changes nothing."""
    shorthands = dict(shorthands or {})
    for key, text in split_arg(arg) if arg else ():
        value = parse_value(text)
        if key in shorthands:
            shorthands[key](config, value)
        else:
            set_key(
                config,
                key,
                value,
                f"config argument {key}={text}",
                f"or one of the config file's shorthands {sorted(shorthands)}",
            )
    return config


def set_key(config: ml_collections.ConfigDict, key: str, value, what: str, also: str = "") -> None:
    """config[key] = value for a dotted `key` the config already has, keeping the key's type. `what` starts the
    ConfigError an unknown key, a group or a value of another type raises (`also`: other allowed keys)."""
    parts = key.split(".")
    node = config
    for i, part in enumerate(parts):
        if not hasattr(node, "keys") or part not in node:
            where = ".".join(parts[:i]) or "the config"
            raise ConfigError(
                f"{what}: {key} is not a key of this config ({part!r} is not in {where}); allowed: a dotted "
                f"config key{' ' + also if also else ''}"
            )
        if i < len(parts) - 1:
            node = node[part]
    name = parts[-1]
    old = node[name]
    if hasattr(old, "keys"):
        raise ConfigError(f"{what}: {key} is a group; set one of its keys {sorted(old)}")
    try:
        node[name] = value
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{what}: {key} holds {type(old).__name__} {old!r}, not {value!r} ({e})") from None
