"""Command-line flags of a :class:`TrainConfig`: one flag per field, grouped by section.

Precedence: field defaults < ``--config`` YAML (or a resumed run's ``config.yaml``) < flags.
"""

from __future__ import annotations

import argparse
import json
import types
import typing
from typing import Any, Literal

import yaml

from dmlkit import distances, metrics
from dmlkit.config.loading import (
    FlagKey,
    apply_flags,
    flag_keys,
    load_yaml,
    make_config,
    parse_yaml,
    yaml_error,
)
from dmlkit.config.sections import SECTIONS, TrainConfig
from dmlkit.errors import ConfigError
from dmlkit.train import optim

#: Flags whose value must be one of a registry's names (argparse lists them in ``--help``).
CHOICES: dict[str, typing.Callable[[], list[str]]] = {
    "optimizer": optim.OPTIMIZERS.available,
    "scheduler": optim.SCHEDULERS.available,
    "eval_distance": lambda: distances.available(indexable=True),
    "eval_backend": lambda: list(metrics.BACKENDS),
}


class FlagValueError(ConfigError, argparse.ArgumentTypeError):
    """A malformed flag value. argparse reports it as ``argument --flag: <message>`` (an
    ``ArgumentTypeError``); called from Python, it is a ``ConfigError``."""


def _yaml_value(text: str, what: str) -> Any:
    """``text`` read as YAML (YAML 1.2 numbers: :class:`Yaml12Loader`); a syntax error names ``what``."""
    try:
        return parse_yaml(text)
    except yaml.YAMLError as exc:
        raise FlagValueError(f"{what}: {text!r} is not valid YAML ({yaml_error(exc)})") from None


def parse_mapping(text: str) -> dict[str, Any]:
    """``'{alpha: 2, beta: 50}'`` (YAML/JSON) or ``'alpha=2,beta=50'`` → dict; ``none``/``{}`` → {}.

    Values are read as YAML 1.2 (``{margin: 1e-1}`` is a float); malformed text raises
    :class:`FlagValueError` quoting it."""
    text = text.strip()
    if not text or text.lower() in ("none", "null", "{}"):
        return {}
    if "=" in text and not text.startswith("{"):
        out: dict[str, Any] = {}
        for part in text.split(","):
            key, sep, value = part.partition("=")
            if not sep or not key.strip():
                raise FlagValueError(f"expected key=value, got {part.strip()!r} in {text!r}")
            out[key.strip()] = _yaml_value(value.strip(), f"value of {key.strip()!r}")
        return out
    value = _yaml_value(text, "not a mapping")
    if not isinstance(value, dict):
        shown = "text" if isinstance(value, str) else type(value).__name__
        raise FlagValueError(f"not a mapping: {text!r} (a {shown}; write '{{key: value, ...}}')")
    keys = [key for key in value if not isinstance(key, str)]
    if keys:
        raise FlagValueError(f"not a mapping of names: {text!r} (key {keys[0]!r} is not a name)")
    return value


def parse_list(text: str) -> list[str]:
    """``'a,b'`` or ``'[a, b]'`` (YAML) → ``['a', 'b']``; malformed text (``'[a, b'``, nested lists or
    mappings) raises :class:`FlagValueError` quoting it."""
    text = text.strip()
    if not text.startswith("["):
        return [part.strip() for part in text.split(",") if part.strip()]
    items = _yaml_value(text, "not a list")
    if not isinstance(items, list):
        raise FlagValueError(f"not a list: {text!r} (write '[a, b, ...]' or 'a,b,...')")
    for index, item in enumerate(items):
        if isinstance(item, list | dict) or item is None:
            raise FlagValueError(f"not a list of values: {text!r} (item {index + 1} is {item!r})")
    return [str(item) for item in items]


def _none_or(text: str) -> str | None:
    return None if text.strip().lower() in ("none", "null") else text


def _kind(annotation: Any) -> str:
    """How a field's value is written on the command line: bool, dict, list, choice or scalar."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _kind(args[0])
    if annotation is bool:
        return "bool"
    if origin is dict:
        return "dict"
    if origin is list:
        return "list"
    if origin is Literal:
        return "choice"
    return "scalar"


def _help(description: str, default: Any) -> str:
    """The field's description and its default, shown once (a description may state it in words)."""
    if "default:" in description:
        return description
    shown = json.dumps(default) if isinstance(default, dict | list) else default
    return f"{description} (default: {shown})"


def _add_flag(group: Any, key: FlagKey, info: Any) -> None:
    flag = "--" + key.flag.replace("_", "-")
    default = info.get_default(call_default_factory=True)
    description = str(info.description)
    if key.part != "value":
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        if key.part == "args":
            description = str(extra.get("args_help", f"keyword arguments of the {key.field}"))
            default = default.args if default is not None else {}
        else:
            default = default.name if default is not None else None
    common: dict[str, Any] = {
        "dest": key.flag,
        "default": argparse.SUPPRESS,
        "help": _help(description, default),
    }
    kind = "dict" if key.part == "args" else "scalar" if key.part == "name" else _kind(info.annotation)
    if key.flag in CHOICES:
        group.add_argument(flag, choices=CHOICES[key.flag](), **common)
    elif kind == "bool":
        group.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
    elif kind == "dict":
        group.add_argument(flag, type=parse_mapping, metavar="MAP", **common)
    elif kind == "list":
        group.add_argument(flag, type=parse_list, metavar="A,B,...", **common)
    elif kind == "choice":
        group.add_argument(flag, choices=typing.get_args(info.annotation), **common)
    else:
        group.add_argument(flag, type=_none_or, metavar="VALUE", **common)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per config field, grouped by section, each default shown once in its help."""
    groups = {name: parser.add_argument_group(name, model.__doc__) for name, model in SECTIONS.items()}
    for key in flag_keys().values():
        _add_flag(groups[key.section], key, SECTIONS[key.section].model_fields[key.field])


def flag_names() -> list[str]:
    """Every config flag, as written on the command line (``--embedding-size``, ...)."""
    return ["--" + name.replace("_", "-") for name in flag_keys()]


def config_from_args(args: argparse.Namespace, base: dict[str, Any] | None = None) -> TrainConfig:
    """Merge defaults < ``--config`` file (or ``base``, a sectioned mapping) < flags, and validate."""
    data: dict[str, Any] = dict(base or {})
    source = "config"
    config_path = getattr(args, "config", None)
    if config_path:
        data = load_yaml(config_path)
        source = str(config_path)
    overrides = {name: getattr(args, name) for name in flag_keys() if hasattr(args, name)}
    if overrides:
        source = f"{source} + command line" if config_path else "command line"
    return make_config(apply_flags(data, overrides, source), source)
