"""Exceptions raised for bad input. Each names the culprit (key, value, file) so users can fix it."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class DmlkitError(Exception):
    """Base class of every error dmlkit raises on purpose."""


class ConfigError(DmlkitError, ValueError):
    """A configuration key or value is invalid."""


class UnknownNameError(ConfigError, KeyError):
    """A name (registry entry, config key, keyword argument) does not exist."""

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0]) if self.args else ""


class DataError(DmlkitError):
    """A dataset is missing, unreadable or malformed."""


class NonFiniteLossError(DmlkitError):
    """Training produced too many non-finite losses in a row."""


def closest(name: str, candidates: Iterable[str]) -> str | None:
    """Return the candidate most similar to ``name`` or ``None`` if nothing is close."""
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return matches[0] if matches else None


def unknown_name_message(kind: str, name: str, candidates: Iterable[str]) -> str:
    """Format ``unknown <kind> 'name'; did you mean 'x'? Valid: ...``."""
    candidates = sorted(candidates)
    suggestion = closest(name, candidates)
    hint = f"; did you mean '{suggestion}'?" if suggestion else ""
    return f"unknown {kind} '{name}'{hint} Valid choices: {', '.join(candidates)}"
