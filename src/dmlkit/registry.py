"""One small registry per kind of component: ``build(name, **kwargs)`` and ``available()``.

Registration happens at import time of the module that defines the component, so the registries are
filled once and never mutated afterwards. Keyword arguments are checked against the constructor's
signature, so a misspelt option is an error naming it instead of being silently dropped.

:class:`Registered` classes learn their registry name; :class:`SharedOptions` lets a family of classes
(losses, miners, samplers) declare the constructor options they all share once, on the family's base.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, Generic, TypeVar

from dmlkit.errors import ConfigError, UnknownNameError, unknown_name_message

T = TypeVar("T")


class Registered:
    """A class that knows the name it is registered under (:attr:`registry_name`, set by
    :meth:`Registry.register`), for messages that name it as the user does."""

    #: Registry name ("" for a class that is not registered).
    registry_name: ClassVar[str] = ""

    @property
    def who(self) -> str:
        """The name used in messages: the registry name, else the class name."""
        return self.registry_name or type(self).__name__


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
            if isinstance(factory, type) and issubclass(factory, Registered):
                factory.registry_name = name
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


# ---------------------------------------------------------------------------------------------------------
# Constructor options shared by a family of classes


class SharedOptions:
    """A family of classes whose constructors share options, declared once.

    The family's base class declares the shared options as the parameters of its :meth:`shared_options`,
    which applies them: positional ones come first in every constructor (a sampler's ``labels`` and
    ``batch_size``), keyword-only ones last (a loss's ``distance``, ``normalize_embeddings``,
    ``reduction``). Each class declares only its own hyperparameters, as the parameters of
    :meth:`configure`, and changes a shared option's default in :attr:`defaults`. So ::

        class ContrastiveLoss(PairLoss):
            defaults = {"distance": "euclidean", "reduction": "avg_non_zero"}

            def configure(self, pos_margin: float = 0.0, neg_margin: float = 1.0) -> None: ...

    is constructed as ``ContrastiveLoss(pos_margin=0.0, neg_margin=1.0, *, distance="euclidean",
    normalize_embeddings=True, reduction="avg_non_zero")``: that is the class's ``__signature__``, which
    ``inspect.signature``, ``help()`` and :meth:`Registry.check_kwargs` read. An intermediate base class
    adds shared options by overriding :meth:`shared_options` with more keyword-only parameters, handing
    the rest on with ``**shared`` (a triplet loss's ``triplets_per_anchor``).
    """

    #: Shared option name → this class's default, when it differs from the family's.
    defaults: ClassVar[dict[str, Any]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.__signature__ = _signature(cls)  # type: ignore[attr-defined]

    def shared_options(self, **options: Any) -> None:
        """Apply the options every class of the family takes (the family's base class overrides this)."""

    def configure(self) -> None:
        """Apply this class's own hyperparameters (a class with some overrides this)."""

    def apply_arguments(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Bind constructor arguments to the class's signature (a ``TypeError`` names a wrong one), then
        apply the shared options and the class's own hyperparameters, in that order."""
        try:
            bound = inspect.signature(type(self)).bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{type(self).__name__}(): {exc}") from None
        bound.apply_defaults()
        shared_names = {p.name for p in _shared_parameters(type(self))}
        self.shared_options(**{k: v for k, v in bound.arguments.items() if k in shared_names})
        self.configure(**{k: v for k, v in bound.arguments.items() if k not in shared_names})


def _own_parameters(method: Callable[..., Any]) -> list[inspect.Parameter]:
    return [p for name, p in inspect.signature(method).parameters.items() if name != "self"]


def _shared_parameters(cls: type) -> list[inspect.Parameter]:
    """The shared options of ``cls``'s family: those of every ``shared_options`` along the MRO, the most
    derived class's first (keyword-only options) and the family base's positional ones."""
    found: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        method = klass.__dict__.get("shared_options")
        if method is None or klass is SharedOptions:
            continue
        for p in _own_parameters(method):
            if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                continue
            found.setdefault(p.name, p)
    return list(found.values())


def _signature(cls: type[SharedOptions]) -> inspect.Signature:
    shared = [p.replace(default=cls.defaults.get(p.name, p.default)) for p in _shared_parameters(cls)]
    unknown = set(cls.defaults) - {p.name for p in shared}
    if unknown:
        raise TypeError(f"{cls.__name__}.defaults names options the family does not share: {sorted(unknown)}")
    leading = [p for p in shared if p.kind == p.POSITIONAL_OR_KEYWORD]
    trailing = [p.replace(kind=p.KEYWORD_ONLY) for p in shared if p.kind != p.POSITIONAL_OR_KEYWORD]
    own = [p for p in _own_parameters(cls.configure) if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    return inspect.Signature([*leading, *own, *trailing])


Configure = TypeVar("Configure", bound=Callable[..., None])


def extends(parent: Callable[..., None]) -> Callable[[Configure], Configure]:
    """Decorator: the decorated ``configure`` takes ``parent``'s options first, then its own.

    The decorated method lists only its own options, plus ``**inherited``, which receives ``parent``'s
    (:meth:`SharedOptions.apply_arguments` passes options by keyword) for it to hand on
    with ``super().configure(**inherited)``. Its ``__signature__`` becomes ``(self, <parent's options>,
    <own options>)``, which is what the class's constructor signature is computed from, so a subclass adds
    options after its base's without repeating them::

        class D2CoresetSampler(EmbeddingBatchSampler):
            @extends(EmbeddingBatchSampler.configure)
            def configure(self, power: float = 1.0, **inherited: Any) -> None: ...
    """

    def decorate(configure: Configure) -> Configure:
        own = list(inspect.signature(configure).parameters.values())
        base = list(inspect.signature(parent).parameters.values())
        name = configure.__qualname__
        if len(own) < 2 or own[-1].kind != inspect.Parameter.VAR_KEYWORD:
            raise TypeError(f"{name} must end with **kwargs, which receives {parent.__qualname__}'s options")
        clash = {p.name for p in own[1:-1]} & {p.name for p in base}
        if clash:
            raise TypeError(f"{name} redeclares options of {parent.__qualname__}: {sorted(clash)}")
        configure.__signature__ = inspect.Signature([*base, *own[1:-1]])  # type: ignore[attr-defined]
        return configure

    return decorate
