"""Building a :class:`TrainConfig` from YAML, mappings and flags, with errors that name the key.

A configuration is a mapping of sections (``run``, ``data``, ...; see :mod:`.sections`). Wherever a
mapping is accepted, a key may also be a *flag name* (``lr``, ``loss``, ``loss_args``): it means the field of
that name in its section (``optim.lr``, ``objective.loss.name``, ``objective.loss.args``). Command-line
flags are applied this way.

Flat YAML files (the layout before sections: every key at the top level) are converted with a
``FutureWarning`` that lists where each key went; write them in sections (the run directory's resolved
``config.yaml`` shows the layout).

YAML is read by :class:`Yaml12Loader` everywhere (config files, ``--*-args`` mappings, list flags): PyYAML
follows YAML 1.1, where a float needs a dot, so ``lr: 1e-4`` would be the *string* ``'1e-4'``; this loader
reads numbers as YAML 1.2 does.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ValidationError

from dmlkit.config.sections import SECTIONS, ComponentSpec, TrainConfig
from dmlkit.errors import ConfigError, UnknownNameError, unknown_name_message

_FLOAT_TAG = "tag:yaml.org,2002:float"
#: YAML 1.2's float (core schema): a dot or an exponent (``1e-40``, ``1E5``, ``.5``, ``-1e3``, ``1.``),
#: ``.inf``/``inf`` and ``.nan``/``nan`` in any of their cases; ``_`` digit separators (YAML 1.1) still work.
_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
    |[-+]?\.?(?:inf|Inf|INF)
    |\.?(?:nan|NaN|NAN))$""",
    re.VERBOSE,
)


class Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader (no Python objects) whose floats follow YAML 1.2: ``1e-40`` is a float.

    PyYAML's YAML 1.1 float needs a dot, so ``1e-4`` or ``1E5`` would be strings that a float field, or a
    loss hyperparameter, refuses (or worse, takes as a string). Integers, booleans and nulls are PyYAML's.
    """

    # A copy of the safe loader's resolvers without its float (add_implicit_resolver appends to the copy).
    yaml_implicit_resolvers: ClassVar[dict[str, list[tuple[str, re.Pattern[str]]]]] = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != _FLOAT_TAG]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }


Yaml12Loader.add_implicit_resolver(_FLOAT_TAG, _FLOAT, list("-+0123456789.iInN"))


def parse_yaml(text: str) -> Any:
    """``text`` read as YAML by :class:`Yaml12Loader` (raises ``yaml.YAMLError``)."""
    return yaml.load(text, Loader=Yaml12Loader)  # a SafeLoader subclass: no Python objects


def yaml_error(exc: yaml.YAMLError) -> str:
    """A YAML syntax error on one line: ``line 3, column 7: expected ',' or ']', but got '<stream end>'``."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        context = f" ({exc.context})" if exc.context else ""
        return f"line {mark.line + 1}, column {mark.column + 1}: {exc.problem}{context}"
    return " ".join(str(exc).split())


@dataclass(frozen=True)
class FlagKey:
    """Where a flag name lives: ``section.field`` (``part``: the whole value, or a component's name/args)."""

    flag: str
    section: str
    field: str
    part: Literal["value", "name", "args"] = "value"

    @property
    def path(self) -> str:
        return f"{self.section}.{self.field}" + ("" if self.part == "value" else f".{self.part}")


def _is_component(annotation: Any) -> bool:
    return ComponentSpec in (annotation, *getattr(annotation, "__args__", ()))


@cache
def flag_keys() -> dict[str, FlagKey]:
    """Every flag name (``lr``, ``loss``, ``loss_args``, ...) → where it lives, in ``--help`` order."""
    keys: dict[str, FlagKey] = {}
    for section, model in SECTIONS.items():
        for name, info in model.model_fields.items():
            if _is_component(info.annotation):
                keys[name] = FlagKey(name, section, name, "name")
                keys[f"{name}_args"] = FlagKey(f"{name}_args", section, name, "args")
            else:
                keys[name] = FlagKey(name, section, name)
    return keys


def _as_mapping(value: Any) -> dict[str, Any]:
    """A section's (or a component's) current value as a plain mutable mapping."""
    if isinstance(value, BaseModel):
        return value.model_dump()
    if isinstance(value, str):
        return {"name": value}
    return dict(value) if isinstance(value, Mapping) else {}


def set_flag(data: dict[str, Any], key: FlagKey, value: Any) -> None:
    """Set one flag's value into a sectioned mapping (in place)."""
    section = data.setdefault(key.section, {})
    if not isinstance(section, dict):
        section = data[key.section] = _as_mapping(section)
    if key.part == "value":
        section[key.field] = value
        return
    spec = section.get(key.field)
    if spec is None and key.field not in section:  # start from the default component (its name)
        spec = SECTIONS[key.section].model_fields[key.field].get_default(call_default_factory=True)
    spec = {} if spec is None else _as_mapping(spec)
    spec[key.part] = value
    section[key.field] = spec


def apply_flags(data: Mapping[str, Any], flags: Mapping[str, Any], source: str) -> dict[str, Any]:
    """``data`` (sectioned) with every flag-named key of ``flags`` set; unknown names raise with the
    closest valid flag name or section."""
    out = {name: _copy_section(value) for name, value in data.items()}
    keys = flag_keys()
    for name, value in flags.items():
        if name not in keys:
            valid = [*keys, *SECTIONS]
            raise UnknownNameError(f"{source}: " + unknown_name_message("config key", str(name), valid))
        set_flag(out, keys[name], value)
    return out


def _copy_section(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in value.items()}
    return value


def split_sections(data: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(sections, flag-named keys)`` of a mapping that may mix both."""
    sections = {k: v for k, v in data.items() if k in SECTIONS}
    flags = {k: v for k, v in data.items() if k not in SECTIONS}
    return sections, flags


def check_keys(data: Mapping[str, Any], source: str) -> None:
    """Raise ``UnknownNameError`` for a key that is no field of its section (with the closest one)."""
    for section, values in data.items():
        if section not in SECTIONS:
            raise UnknownNameError(
                f"{source}: " + unknown_name_message("config section", str(section), SECTIONS)
            )
        if not isinstance(values, Mapping):
            if values is None:
                continue
            raise ConfigError(f"{source}: section '{section}' must be a mapping, got {type(values).__name__}")
        fields = SECTIONS[section].model_fields
        for key in values:
            if key not in fields:
                valid = [f"{section}.{name}" for name in fields]
                raise UnknownNameError(
                    f"{source}: " + unknown_name_message("config key", f"{section}.{key}", valid)
                )


def format_validation_error(exc: ValidationError, source: str) -> str:
    """One line per problem: ``source: invalid value for 'optim.lr' (got -0.1): ...``."""
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "config"
        value = err.get("input")
        shown = "" if isinstance(value, dict | BaseModel) else f" (got {value!r})"
        message = str(err["msg"]).removeprefix("Value error, ")
        lines.append(f"{source}: invalid value for '{where}'{shown}: {message}")
    return "\n".join(lines)


def make_config(data: Mapping[str, Any] | None = None, source: str = "config") -> TrainConfig:
    """A validated config from a mapping of sections and/or flag-named keys (``{"optim": {"lr": 0.1}}``
    or ``{"lr": 0.1}``); errors name the key and ``source``. Names and arguments are checked against their
    registries before anything is loaded."""
    sections, flags = split_sections(dict(data or {}))
    merged = apply_flags(sections, flags, source)
    check_keys(merged, source)
    try:
        config = TrainConfig(**{k: (v if v is not None else {}) for k, v in merged.items()})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None
    config.check()
    return config


def validate_names(config: TrainConfig) -> None:
    """Check every name and keyword argument against its registry, before any data is loaded."""
    config.check()


def load_yaml(path: str | Path) -> dict[str, Any]:
    """The sectioned mapping of a YAML file; a flat (pre-sections) file is converted with a warning."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = parse_yaml(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {yaml_error(exc)}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of config sections, got {type(data).__name__}"
        )
    sections, flags = split_sections(data)
    if flags:
        converted = apply_flags(sections, flags, str(path))
        keys = flag_keys()
        moved = ", ".join(f"{name} → {keys[name].path}" for name in flags)
        warnings.warn(
            f"{path}: flat config keys (the layout before sections) were converted: {moved}. Write the file "
            "in sections (run, data, model, objective, memory, optim, eval, log), as the resolved "
            "config.yaml of any run shows.",
            FutureWarning,
            stacklevel=2,
        )
        sections = converted
    check_keys(sections, str(path))
    return sections


def config_from_checkpoint(stored: Mapping[str, Any], source: str) -> TrainConfig:
    """The config stored in a checkpoint (sectioned, or flat from before sections: converted silently,
    since a checkpoint cannot be rewritten)."""
    return make_config(stored, source)


def dump_yaml(config: TrainConfig, path: str | Path) -> None:
    """Write the fully resolved config in sections; the file is re-runnable with ``--config``."""
    Path(path).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
