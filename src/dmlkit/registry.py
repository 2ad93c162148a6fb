"""One small registry per kind of component: ``build(name, **kwargs)`` and ``available()``.

Registration happens at import time of the module that defines the component, so the registries are
filled once and never mutated afterwards. Keyword arguments are checked against the constructor's
signature, so a misspelt option is an error naming it instead of being silently dropped.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

from dmlkit.errors import ConfigError, UnknownNameError, unknown_name_message

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to factories (classes or functions) of one kind of component."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator registering ``factory`` under ``name``."""

        def decorator(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._entries[name] = factory
            return factory

        return decorator

    def available(self) -> list[str]:
        """Sorted names of every registered entry."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def get(self, name: str) -> Callable[..., T]:
        """The factory registered as ``name``; unknown names raise with the closest valid name."""
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(unknown_name_message(self.kind, name, self._entries)) from None

    def parameters(self, name: str) -> dict[str, inspect.Parameter]:
        """Keyword parameters the factory accepts (``self`` and var-positional ones excluded)."""
        signature = inspect.signature(self.get(name))
        return {
            key: p
            for key, p in signature.parameters.items()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        }

    def check_kwargs(self, name: str, kwargs: Iterable[str], provided_by_caller: Iterable[str] = ()) -> None:
        """Raise if ``kwargs`` holds a key the factory does not take (with the closest valid key).

        ``provided_by_caller`` are keys the library fills in itself (e.g. ``num_classes``); they are
        valid but are not required to be present.
        """
        factory = self.get(name)
        signature = inspect.signature(factory)
        if any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values()):
            return
        valid = set(self.parameters(name)) | set(provided_by_caller)
        for key in kwargs:
            if key not in valid:
                raise UnknownNameError(
                    unknown_name_message(f"argument of {self.kind} '{name}'", key, valid or ["(none)"])
                )

    def build(self, name: str, /, **kwargs: Any) -> T:
        """Instantiate ``name`` with ``kwargs`` after checking every keyword exists."""
        self.check_kwargs(name, kwargs)
        try:
            return self.get(name)(**kwargs)
        except TypeError as exc:
            raise ConfigError(f"cannot build {self.kind} '{name}' with {kwargs}: {exc}") from exc
