"""Exceptions raised for bad input. Each names the culprit (key, value, file) so users can fix it."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

_WORKER_PREFIX = "Caught "
_WORKER_TRACEBACK = "\nOriginal Traceback"


class DmlkitError(Exception):
    """Base class of every error dmlkit raises on purpose.

    Raised in a DataLoader worker, the error reaches the main process re-created by torch with the worker's
    whole traceback as its message; the constructor keeps only the original one-line message, so a bad
    file is reported the same way with or without workers.
    """

    def __init__(self, *args: object) -> None:
        if len(args) == 1 and isinstance(args[0], str):
            args = (_original_message(args[0], type(self)),)
        super().__init__(*args)


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


def _original_message(message: str, kind: type) -> str:
    """The message an error had in a DataLoader worker (``message`` unchanged when it was raised here)."""
    if not (message.startswith(_WORKER_PREFIX) and _WORKER_TRACEBACK in message):
        return message
    marker = f"{kind.__module__}.{kind.__qualname__}: "
    start = message.rfind(marker)
    if start < 0:
        return message
    return message[start + len(marker) :].strip()


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
