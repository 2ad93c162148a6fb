"""One small registry per kind of component: ``build(name, **kwargs)`` and ``available()``.

Registration happens at import time of the module that defines the component, so the registries are
filled once and never mutated afterwards. Keyword arguments are checked against the constructor's
signature, so a misspelt option is an error naming it instead of being silently dropped, and their values
against its type annotations (:class:`ArgumentTypes`), so ``pos_margin='abc'`` is a ``ConfigError`` naming
the entry, the argument, the value and the expected type instead of a ``TypeError`` deep inside.

:class:`Registered` classes learn their registry name; :class:`SharedOptions` lets a family of classes
(losses, miners, samplers) declare the constructor options they all share once, on the family's base.
"""

from __future__ import annotations

import functools
import inspect
import re
import reprlib
import types
import typing
from collections.abc import Callable, Iterable, Mapping, MutableMapping, MutableSequence, Sequence
from collections.abc import Set as AbstractSet
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np
import torch
from pydantic import ConfigDict, TypeAdapter, ValidationError

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
        # Names that are no entry on purpose (ambiguous, renamed) → why, told to whoever asks for one.
        self._reserved: dict[str, str] = {}
        # Filled on first use of an entry: resolving annotations and building validators is not free.
        self._types: dict[str, ArgumentTypes] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator registering ``factory`` under ``name``."""

        def decorator(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            if name in self._reserved:
                raise ValueError(f"{self.kind} '{name}' is reserved: {self._reserved[name]}")
            self._entries[name] = factory
            if isinstance(factory, type) and issubclass(factory, Registered):
                factory.registry_name = name
            return factory

        return decorator

    def reserve(self, name: str, reason: str) -> None:
        """Make ``name`` a name that is no entry on purpose (ambiguous, or renamed): asking for it raises
        ``UnknownNameError`` with ``reason`` (which should name the entries meant) instead of a guess at
        the closest name. It is not :meth:`available`, and cannot be registered."""
        if name in self._entries or name in self._reserved:
            raise ValueError(f"{self.kind} '{name}' is already registered or reserved")
        self._reserved[name] = reason

    def available(self) -> list[str]:
        """Sorted names of every registered entry."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def get(self, name: str) -> Callable[..., T]:
        """The factory registered as ``name``; unknown names raise with the closest valid name, reserved
        ones (:meth:`reserve`) with their reason."""
        try:
            return self._entries[name]
        except KeyError:
            if name in self._reserved:
                raise UnknownNameError(f"{self.kind} '{name}' {self._reserved[name]}") from None
            raise UnknownNameError(unknown_name_message(self.kind, name, self._entries)) from None

    def parameters(self, name: str) -> dict[str, inspect.Parameter]:
        """Keyword parameters the factory accepts (``self`` and var-positional ones excluded)."""
        signature = inspect.signature(self.get(name))
        return {
            key: p
            for key, p in signature.parameters.items()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        }

    def argument_types(self, name: str) -> ArgumentTypes:
        """The type checks of ``name``'s keyword parameters (built once per entry)."""
        found = self._types.get(name)
        if found is None:
            found = self._types[name] = ArgumentTypes(self.get(name), self.parameters(name))
        return found

    def check_kwargs(
        self,
        name: str,
        kwargs: Iterable[str] | Mapping[str, Any],
        provided_by_caller: Iterable[str] = (),
    ) -> None:
        """Raise if ``kwargs`` holds a key the factory does not take (``UnknownNameError`` with the closest
        valid key) or, when ``kwargs`` is a mapping, a value that does not fit the parameter's type
        annotation (``ConfigError``, see :meth:`check_values`).

        ``provided_by_caller`` are keys the library fills in itself (e.g. ``num_classes``); they are
        valid but are not required to be present.
        """
        factory = self.get(name)
        signature = inspect.signature(factory)
        if not any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values()):
            valid = set(self.parameters(name)) | set(provided_by_caller)
            for key in kwargs:
                if key not in valid:
                    raise UnknownNameError(
                        unknown_name_message(f"argument of {self.kind} '{name}'", key, valid or ["(none)"])
                    )
        if isinstance(kwargs, Mapping):
            self.check_values(name, kwargs)

    def check_values(self, name: str, kwargs: Mapping[str, Any]) -> None:
        """Raise ``ConfigError`` naming the entry, the argument, its value and the expected type when a
        value does not fit its parameter's annotation (see :class:`ArgumentTypes`)."""
        checks = self.argument_types(name)
        for key, value in kwargs.items():
            problem = checks.problem(str(key), value)
            if problem is not None:
                raise ConfigError(f"{self.kind} '{name}': argument {problem}")

    def build(self, name: str, /, **kwargs: Any) -> T:
        """Instantiate ``name`` with ``kwargs`` (passed as given) after checking every keyword exists and
        every value fits its parameter's type."""
        self.check_kwargs(name, kwargs)
        try:
            return self.get(name)(**kwargs)
        except TypeError as exc:
            raise ConfigError(f"cannot build {self.kind} '{name}' with {kwargs}: {exc}") from exc


# ---------------------------------------------------------------------------------------------------------
# Type checks of keyword arguments

#: Values a configuration can hold. Anything else (a tensor, an array, a module, a distance object) is
#: passed by code, not written by a user, and is left to the constructor: annotations such as
#: ``Sequence[float]`` describe configuration values and would refuse a tensor that works.
_PLAIN_SCALARS: tuple[type, ...] = (str, bytes, bool, int, float, type(None), np.generic)
#: Lax mode (an int for a float, a list for a tuple); a class without a pydantic schema: an isinstance check.
_LAX = ConfigDict(arbitrary_types_allowed=True)
#: Module paths left out of type names in messages (``collections.abc.Sequence`` → ``Sequence``).
_MODULE_PATH = re.compile(r"\b(?:[a-z_]\w*\.)+(?=[A-Za-z_])")


class ArgumentTypes:
    """Validators of a factory's keyword parameters, from their type annotations.

    Annotations are strings under ``from __future__ import annotations``; each is resolved in the module
    of the function that declares it (for a :class:`SharedOptions` class: its ``configure`` or a base's
    ``shared_options``) with ``typing.get_type_hints``. Not checked: a parameter without an annotation, or
    whose annotation cannot be resolved or has no pydantic schema; a parameter that takes arrays or tensors
    (data, e.g. a sampler's ``labels``: its constructor checks it); a value that is not plain data
    (:data:`_PLAIN_SCALARS` and lists, tuples and dicts of them), which code, not a configuration, passes.

    A value is validated by a pydantic ``TypeAdapter`` in lax mode, which accepts an int for a float, a
    list for a tuple, a numpy scalar for a number. Lax mode would also read ``'0.5'`` or ``'yes'`` as a
    number or a bool and truncate ``2.0`` to ``2``: those changes of kind are refused here, since the value
    is passed to the constructor as given (a string would fail there, deep inside).
    """

    def __init__(self, factory: Callable[..., Any], parameters: Mapping[str, inspect.Parameter]) -> None:
        self._checks: dict[str, tuple[Any, TypeAdapter[Any]]] = {}
        declaring = _declaring_functions(factory)
        for name, parameter in parameters.items():
            hint = _resolve(parameter, declaring)
            # A parameter that takes arrays or tensors takes data (labels), which its constructor checks
            # with messages about the data (and which may be long: no second pass over it here).
            adapter = None if _admits_arrays(hint) else _adapter(hint)
            if adapter is not None:
                self._checks[name] = (hint, adapter)

    def problem(self, name: str, value: Any) -> str | None:
        """Why ``value`` does not fit parameter ``name`` (``None``: it fits, or cannot be checked)."""
        if name not in self._checks or not _plain(value):
            return None
        hint, adapter = self._checks[name]
        expected = f"{name} must be {_described(hint)} ({_type_name(hint)}), got {_shown(value)}"
        try:
            validated = adapter.validate_python(value)
        except ValidationError as exc:
            errors = exc.errors()
            detail = f": {errors[0]['msg']}" if len(errors) == 1 else ""
            return f"{expected} ({type(value).__name__}){detail}"
        except TypeError:  # an isinstance check the annotation's class does not support (a Protocol)
            return None
        changed = _changed_kind(value, validated)
        return None if changed is None else f"{expected} ({changed})"


def _plain(value: Any) -> bool:
    """Whether ``value`` is configuration data: scalars, and lists, tuples and dicts of them."""
    if isinstance(value, _PLAIN_SCALARS):
        return True
    if isinstance(value, list | tuple):
        return all(map(_plain, value))
    if isinstance(value, dict):
        return all(map(_plain, value.values()))
    return False


def _changed_kind(original: Any, validated: Any) -> str | None:
    """The first scalar of ``original`` whose kind lax validation changed: a string or a bool read as a
    number, a float truncated to an int (``None``: none was)."""
    if isinstance(original, list | tuple) and isinstance(validated, list | tuple):
        return next(filter(None, map(_changed_kind, original, validated)), None)
    if isinstance(original, dict) and isinstance(validated, Mapping):
        return next(filter(None, map(_changed_kind, original.values(), validated.values())), None)
    if isinstance(original, str) and not isinstance(validated, str):
        return f"{original!r} is a string: write the value without quotes"
    if isinstance(original, bool) and not isinstance(validated, bool):
        return f"{original!r} is a bool, not a number"
    if isinstance(original, float) and not isinstance(validated, float):
        return f"{original!r} is a float, not an int"
    return None


def _declaring_functions(factory: Callable[..., Any]) -> list[Callable[..., Any]]:
    """The functions whose parameters make up ``factory``'s signature, most derived first."""
    if isinstance(factory, functools.partial):
        return _declaring_functions(factory.func)
    if not isinstance(factory, type):
        return [inspect.unwrap(getattr(factory, "__func__", factory))]
    found = []
    for klass in factory.__mro__:
        for attribute in ("__init__", "__new__", "configure", "shared_options"):
            member = klass.__dict__.get(attribute)
            if isinstance(member, staticmethod | classmethod):
                member = member.__func__
            if isinstance(member, types.FunctionType):
                found.append(inspect.unwrap(member))
    return found


def _resolve(parameter: inspect.Parameter, declaring: list[Callable[..., Any]]) -> Any:
    """``parameter``'s annotation as a type: a string is evaluated in the module of the first function
    that declares the parameter with that very annotation (``None``: none, or it does not resolve)."""
    annotation = parameter.annotation
    if annotation is inspect.Parameter.empty:
        return None
    if not isinstance(annotation, str):
        return annotation
    for function in declaring:
        if getattr(function, "__annotations__", {}).get(parameter.name) != annotation:
            continue
        holder = types.SimpleNamespace(__annotations__={parameter.name: annotation})
        try:
            return typing.get_type_hints(holder, globalns=function.__globals__)[parameter.name]
        except Exception:  # a name imported only for type checkers, a typo: the parameter is not checked
            return None
    return None


def _adapter(hint: Any) -> TypeAdapter[Any] | None:
    """A lax validator of ``hint`` (``None``: nothing to check, or pydantic has no schema for it)."""
    if hint is None or hint is Any:
        return None
    try:
        return TypeAdapter(hint, config=_LAX)
    except Exception:  # e.g. a pydantic model (takes no config) or a type without a schema: not checked
        return None


def _admits_arrays(hint: Any) -> bool:
    """Whether ``hint`` (or a member of its union or a type argument) is a numpy array or a tensor."""
    if isinstance(hint, type) and typing.get_origin(hint) is None:
        return issubclass(hint, np.ndarray | torch.Tensor)
    return any(map(_admits_arrays, typing.get_args(hint)))


#: How a message describes the common annotations.
_DESCRIBED: dict[Any, str] = {
    int: "an integer",
    float: "a number",
    bool: "a bool",
    str: "a string",
    type(None): "none",
}


def _described(hint: Any) -> str:
    """``an integer``, ``a number or none``, ``one of 'all'``, ``a list``: what a value of ``hint`` is."""
    if hint in _DESCRIBED:
        return _DESCRIBED[hint]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(map(_described, args))
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin in (list, tuple, set, frozenset, Sequence, MutableSequence, AbstractSet):
        return "a list"
    if origin in (dict, Mapping, MutableMapping):
        return "a mapping"
    return f"a {_type_name(hint)}"


def _type_name(hint: Any) -> str:
    """``float``, ``int | None``, ``Sequence[float]``: a type as written in an annotation."""
    if hint is type(None):
        return "None"
    if isinstance(hint, type) and typing.get_origin(hint) is None:
        return hint.__name__
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " | ".join(map(_type_name, typing.get_args(hint)))
    return _MODULE_PATH.sub("", str(hint))


def _shown(value: Any) -> str:
    """``repr(value)``, shortened (a long list would swamp the message)."""
    return reprlib.repr(value)


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
