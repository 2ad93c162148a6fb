"""Progressive hard mining: anneal a miner's hardness knob during training.

Progressive hard mining is one of the best practices of Berton, Musgrave & Masone, *All You Need to Know
About Training Image Retrieval Models* (2025): start with easier tuples and make them harder as the
embedding improves. A :class:`MinerSchedule` maps training progress (``global_step / total_steps``) to a
value of the miner's numeric *hardness knob* (the hyperparameter named by the miner class's
``hardness_knob``, e.g. ``margin`` of ``triplet_margin``, ``epsilon`` of ``multisimilarity``,
``hard_fraction`` of ``semihard``), or of another float hyperparameter named with ``knob=``, and sets it
with the miner's :meth:`~dmlkit.miners.base.BaseMiner.set_hardness`.

With ``t = clip((progress − from) / (until − from), 0, 1)`` (``t = [progress ≥ from]`` when
``from == until``):

- ``linear``: ``start + (end − start) · t``
- ``cosine``: ``start + (end − start) · (1 − cos(π t)) / 2``
- ``step``: ``start + (end − start) · floor(steps · t) / steps``: ``steps`` equal jumps, at
  ``from + k (until − from) / steps`` for ``k = 1 … steps``, the last one to ``end`` at ``until`` (with
  a 1e-9 tolerance on ``steps · t``, so that exact boundaries are not lost to rounding).

Text form (``--miner-schedule``): ``"linear:start=0.0,end=1.0,from=0.1,until=0.8"``, optionally with
``knob=<attribute>`` and (``step`` only) ``steps=<int>``; ``from`` defaults to 0 and ``until`` to 1.
Dict form (YAML): ``{kind: linear, start: 0.0, end: 1.0, from: 0.1, until: 0.8}`` (``from_fraction`` /
``until_fraction`` are accepted too).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from dmlkit.errors import ConfigError, UnknownNameError, unknown_name_message
from dmlkit.miners.base import REGISTRY, BaseMiner, HardMiner, float_hyperparameters

KINDS: tuple[str, ...] = ("linear", "cosine", "step")
# text/dict key → dataclass field
_KEYS: dict[str, str] = {
    "kind": "kind",
    "start": "start",
    "end": "end",
    "from": "from_fraction",
    "until": "until_fraction",
    "from_fraction": "from_fraction",
    "until_fraction": "until_fraction",
    "knob": "knob",
    "steps": "steps",
}


@dataclass(frozen=True)
class MinerSchedule:
    """Anneal a miner's hardness knob from ``start`` to ``end`` over ``[from_fraction, until_fraction]``
    of training (see the module docstring for the formulas and the text/dict forms).

    The value is ``start`` before ``from_fraction`` and ``end`` after ``until_fraction``. ``knob`` names
    the attribute to set (default: the miner class's ``hardness_knob``); ``steps`` is the number of jumps
    of a ``step`` schedule.
    """

    kind: str
    start: float
    end: float
    from_fraction: float = 0.0
    until_fraction: float = 1.0
    knob: str | None = None
    steps: int = 1

    TEXT_EXAMPLE: ClassVar[str] = "linear:start=0.0,end=1.0,from=0.1,until=0.8"

    def __post_init__(self) -> None:
        where = f"miner schedule {self}"
        if self.kind not in KINDS:
            raise UnknownNameError(unknown_name_message("miner schedule kind", str(self.kind), KINDS))
        for name in ("start", "end", "from_fraction", "until_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ConfigError(f"{where}: {_text_key(name)} must be a finite number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if not 0.0 <= self.from_fraction <= self.until_fraction <= 1.0:
            raise ConfigError(
                f"{where}: need 0 <= from <= until <= 1 (fractions of training), got "
                f"from={self.from_fraction}, until={self.until_fraction}"
            )
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"{where}: steps must be an integer >= 1, got {self.steps!r}")
        if self.steps != 1 and self.kind != "step":
            raise ConfigError(f"{where}: steps is only used by kind 'step' (got kind '{self.kind}')")
        if self.knob is not None and (not isinstance(self.knob, str) or not self.knob.isidentifier()):
            raise ConfigError(f"{where}: knob must be an attribute name, got {self.knob!r}")

    # ------------------------------------------------------------------------------------------ parsing

    @classmethod
    def parse(cls, spec: str | Mapping[str, Any] | MinerSchedule) -> MinerSchedule:
        """From the text form ``"kind:key=value,..."``, the dict form, or an instance (returned as is).

        Errors are ``ConfigError`` (``UnknownNameError`` for an unknown kind or key) quoting the bad part.
        """
        if isinstance(spec, MinerSchedule):
            return spec
        if isinstance(spec, Mapping):
            return cls._from_mapping(dict(spec), f"miner schedule {dict(spec)!r}")
        if not isinstance(spec, str):
            raise ConfigError(
                f"miner schedule must be a string like {cls.TEXT_EXAMPLE!r} or a mapping, "
                f"got {type(spec).__name__}"
            )
        text = spec.strip()
        where = f"miner schedule {spec!r}"
        kind, sep, rest = text.partition(":")
        kind = kind.strip()
        if not sep or not kind:
            raise ConfigError(f"{where}: expected '<kind>:key=value,...' like {cls.TEXT_EXAMPLE!r}")
        if kind not in KINDS:
            raise UnknownNameError(f"{where}: " + unknown_name_message("miner schedule kind", kind, KINDS))
        fields: dict[str, Any] = {"kind": kind}
        for part in rest.split(","):
            if not part.strip():
                raise ConfigError(f"{where}: empty entry (stray comma?) in {rest!r}")
            key, eq, raw = part.partition("=")
            key, raw = key.strip(), raw.strip()
            if not eq or not key or not raw:
                raise ConfigError(f"{where}: '{part.strip()}' is not key=value")
            if key in fields:
                raise ConfigError(f"{where}: '{key}' is given twice")
            fields[key] = raw
        return cls._from_mapping(fields, where, text_values=True)

    @classmethod
    def _from_mapping(cls, raw: dict[str, Any], where: str, text_values: bool = False) -> MinerSchedule:
        kwargs: dict[str, Any] = {}
        for key, value in raw.items():
            field = _KEYS.get(key) if isinstance(key, str) else None
            if field is None:
                valid = ["kind", "start", "end", "from", "until", "knob", "steps"]
                raise UnknownNameError(f"{where}: " + unknown_name_message("schedule key", str(key), valid))
            if field in kwargs:
                raise ConfigError(f"{where}: '{key}' is given twice (as '{_text_key(field)}')")
            kwargs[field] = _convert(field, key, value, where, text_values)
        for required in ("kind", "start", "end"):
            if required not in kwargs:
                raise ConfigError(f"{where}: missing '{required}' (e.g. {cls.TEXT_EXAMPLE!r})")
        try:
            return cls(**kwargs)
        except UnknownNameError as exc:
            raise UnknownNameError(f"{where}: {exc}") from None

    def to_text(self) -> str:
        """The text form, parseable by :meth:`parse`."""
        parts = [f"start={self.start!r}", f"end={self.end!r}"]
        parts += [f"from={self.from_fraction!r}", f"until={self.until_fraction!r}"]
        if self.kind == "step":
            parts.append(f"steps={self.steps}")
        if self.knob is not None:
            parts.append(f"knob={self.knob}")
        return f"{self.kind}:{','.join(parts)}"

    def to_dict(self) -> dict[str, Any]:
        """The dict form (for YAML), parseable by :meth:`parse`."""
        out: dict[str, Any] = {"kind": self.kind, "start": self.start, "end": self.end}
        out.update({"from": self.from_fraction, "until": self.until_fraction})
        if self.kind == "step":
            out["steps"] = self.steps
        if self.knob is not None:
            out["knob"] = self.knob
        return out

    def __str__(self) -> str:
        try:
            return self.to_text()
        except Exception:  # called from __post_init__ error messages, possibly with unconverted fields
            return repr(self)

    # ------------------------------------------------------------------------------------------ values

    def value(self, progress: float) -> float:
        """The knob's value at ``progress = global_step / total_steps`` (clipped to ``[0, 1]``)."""
        progress = float(progress)
        if math.isnan(progress):
            raise ConfigError(f"miner schedule {self}: progress is NaN")
        span = self.until_fraction - self.from_fraction
        if span == 0:
            t = 1.0 if progress >= self.from_fraction else 0.0
        else:
            t = min(1.0, max(0.0, (progress - self.from_fraction) / span))
        if self.kind == "linear":
            f = t
        elif self.kind == "cosine":
            f = (1.0 - math.cos(math.pi * t)) / 2.0
        else:
            # the tolerance puts progress = from + k·(until − from)/steps, up to rounding, on step k
            f = math.floor(self.steps * t + 1e-9) / self.steps
        if f >= 1.0:  # exactly `end` at and after `until`, whatever the rounding
            return self.end
        return self.start + (self.end - self.start) * f

    def knob_for(self, miner: nn.Module | type | str) -> str:
        """The attribute this schedule sets on ``miner`` (instance, class or registered name).

        Raises ``ConfigError`` when the miner has no hardness knob (naming the miners that have one),
        when ``knob`` is not one of its float hyperparameters, or when ``start``/``end`` is outside the
        knob's valid range.
        """
        return _resolve_knob(self, _miner_class(miner))

    def apply(self, miner: HardMiner, progress: float) -> float:
        """Set the miner's knob to :meth:`value` ``(progress)`` with its ``set_hardness``; return the value
        (for logging)."""
        knob = _resolve_knob(self, type(miner))
        value = self.value(progress)
        miner.set_hardness(value, knob)
        return value


@functools.lru_cache(maxsize=256)
def _resolve_knob(schedule: MinerSchedule, cls: type) -> str:
    """:meth:`MinerSchedule.knob_for` on a class (cached: ``apply`` runs every iteration)."""
    name = _miner_name(cls)
    if not issubclass(cls, BaseMiner):
        raise ConfigError(f"miner schedule {schedule}: {name} is not a dmlkit miner (it has no set_hardness)")
    knob = schedule.knob or cls.hardness_knob
    if knob is None:
        with_knob = [
            f"{m} ({REGISTRY.get(m).hardness_knob})"  # type: ignore[attr-defined]
            for m in REGISTRY.available()
            if REGISTRY.get(m).hardness_knob  # type: ignore[attr-defined]
        ]
        raise ConfigError(
            f"miner schedule {schedule}: miner {name} has no hardness knob to schedule; miners that have "
            f"one: {', '.join(with_knob)}; or name a float hyperparameter of {name} with knob=..."
        )
    numeric = float_hyperparameters(cls)
    if knob not in numeric:
        raise UnknownNameError(
            f"miner schedule {schedule}: "
            + unknown_name_message(f"float hyperparameter of miner {name}", knob, numeric or ["(none)"])
        )
    low, high = cls.knob_ranges.get(knob, (-math.inf, math.inf))
    for label, value in (("start", schedule.start), ("end", schedule.end)):
        if not low <= value <= high:
            raise ConfigError(
                f"miner schedule {schedule}: {label}={value} is outside the range [{low}, {high}] of "
                f"{name}'s {knob}"
            )
    return knob


def check_schedule(
    miner: nn.Module | type | str, schedule: str | Mapping[str, Any] | MinerSchedule | None
) -> MinerSchedule | None:
    """Config-time validation: parse ``schedule`` and check it fits ``miner`` (name, class or instance).

    Returns the parsed schedule (None for None); raises ``ConfigError`` naming the problem.
    """
    if schedule is None:
        return None
    parsed = MinerSchedule.parse(schedule)
    parsed.knob_for(miner)
    return parsed


def _miner_class(miner: nn.Module | type | str) -> type:
    if isinstance(miner, str):
        return REGISTRY.get(miner)  # type: ignore[return-value]
    return miner if isinstance(miner, type) else type(miner)


def _miner_name(cls: type) -> str:
    return f"'{cls.registry_name or cls.__name__}'" if issubclass(cls, BaseMiner) else f"'{cls.__name__}'"


def _text_key(field: str) -> str:
    return {"from_fraction": "from", "until_fraction": "until"}.get(field, field)


def _convert(field: str, key: str, value: Any, where: str, text_values: bool) -> Any:
    if field in ("kind", "knob"):
        if not isinstance(value, str):
            raise ConfigError(f"{where}: '{key}' must be a string, got {value!r}")
        return value
    if field == "steps":
        if text_values:
            try:
                return int(value)
            except ValueError:
                raise ConfigError(f"{where}: '{key}={value}' is not an integer") from None
        return value
    if text_values:
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}: '{key}={value}' is not a number") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where}: '{key}' must be a number, got {value!r}")
    return value


__all__ = ["KINDS", "MinerSchedule", "check_schedule", "float_hyperparameters"]
