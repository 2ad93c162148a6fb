"""Components of other libraries named in a configuration, next to dmlkit's own registry names.

``loss: pml:ContrastiveLoss`` builds ``pytorch_metric_learning.losses.ContrastiveLoss`` (``miner:
pml:TripletMarginMiner`` its miner); ``loss: my_package.losses:MyLoss`` builds ``MyLoss`` from any importable
module. The training loop already takes any ``nn.Module`` with PML's call signature (``loss(embeddings,
labels, indices_tuple=None, ref_emb=None, ref_labels=None)``, ``miner(embeddings, labels, ref_emb=None,
ref_labels=None)``); this module only lets a YAML file or a sweep name one, so that a study can put PML's
objects and dmlkit's side by side with the same data, model, schedule and seeds.

- An argument that is itself a mapping ``{name: "pml:CosineSimilarity", args: {...}}`` (or a string
  ``"pml:CosineSimilarity"`` for a key that PML documents as an object: ``distance``, ``reducer``,
  ``embedding_regularizer``, ``weight_regularizer``, ``loss``) is built the same way: PML's distances,
  reducers and regularizers, found in their own modules.
- ``num_classes`` / ``embedding_size`` are filled from the data and the model where the class takes them.
- Names and keys are checked before anything is loaded (the keyword names along the class's ``__init__``
  chain, as far as each passes ``**kwargs`` on); the values are checked when the object is built.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from typing import Any

from torch import nn

from dmlkit.errors import ConfigError

#: A prefix → for each kind, the modules searched for the class (in order).
PREFIXES: dict[str, dict[str, tuple[str, ...]]] = {
    "pml": {
        "loss": ("pytorch_metric_learning.losses",),
        "miner": ("pytorch_metric_learning.miners",),
        "object": (
            "pytorch_metric_learning.distances",
            "pytorch_metric_learning.reducers",
            "pytorch_metric_learning.regularizers",
            "pytorch_metric_learning.losses",
            "pytorch_metric_learning.miners",
        ),
    }
}
#: What a missing package is installed as.
INSTALL = {"pml": "pip install pytorch-metric-learning"}
#: PML keyword arguments whose value is an object, so a bare ``"pml:Name"`` string there is built.
OBJECT_KEYS = frozenset(
    {"distance", "reducer", "embedding_regularizer", "weight_regularizer", "loss", "miner", "classifier_loss"}
)
#: Filled from the run (data and model) when the class takes them and the configuration does not set them.
PROVIDED = ("num_classes", "embedding_size")


def is_foreign(name: object) -> bool:
    """Whether ``name`` names another library's class (``prefix:Class`` or ``module.path:Class``)."""
    return isinstance(name, str) and ":" in name and not name.startswith(("torchvision:", "timm:"))


def resolve(name: str, kind: str) -> type:
    """The class ``name`` names (``kind``: ``loss``, ``miner`` or ``object``); ``ConfigError`` naming what
    is wrong: an unknown prefix or module, a missing package (with its install line), no such class."""
    prefix, _, attribute = name.partition(":")
    if not attribute.isidentifier():
        raise ConfigError(f"{kind} '{name}': after ':' comes a class name, e.g. pml:ContrastiveLoss")
    modules = PREFIXES[prefix][kind] if prefix in PREFIXES else (prefix,)
    found: list[str] = []
    for module_name in modules:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            hint = f" ({INSTALL[prefix]})" if prefix in INSTALL else ""
            raise ConfigError(f"{kind} '{name}': cannot import {module_name}{hint}: {exc}") from None
        value = getattr(module, attribute, None)
        if isinstance(value, type):
            return value
        found.append(module_name)
    raise ConfigError(f"{kind} '{name}': no class '{attribute}' in {' or '.join(found)}")


def accepted_keywords(cls: type) -> set[str] | None:
    """Keyword names ``cls(...)`` accepts, following ``**kwargs`` up the ``__init__`` chain (PML passes them
    on to its base classes); None when a class takes ``**kwargs`` without a base that names them."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        if klass in (nn.Module, object):
            return names
        parameters = list(inspect.signature(init).parameters.values())[1:]
        names |= {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            return names
    return None


def check(name: str, args: Mapping[str, Any], kind: str) -> None:
    """Check a foreign component before anything loads: the class exists, is an ``nn.Module`` (losses and
    miners), every key of ``args`` is one it takes, nested objects likewise."""
    cls = resolve(name, kind)
    if kind in ("loss", "miner") and not issubclass(cls, nn.Module):
        raise ConfigError(f"{kind} '{name}' is not a torch.nn.Module: the training loop calls it as one")
    accepted = accepted_keywords(cls)
    if accepted is not None:
        unknown = sorted(set(args) - accepted)
        if unknown:
            raise ConfigError(
                f"{kind} '{name}' takes no argument {unknown[0]!r} (it takes {', '.join(sorted(accepted))})"
            )
    for key, value in args.items():
        nested = _nested(key, value)
        if nested is not None:
            check(nested[0], nested[1], "object")


def build(name: str, args: Mapping[str, Any], kind: str, **provided: Any) -> Any:
    """The object: ``cls(**args)`` with nested objects built and ``provided`` values (``num_classes``,
    ``embedding_size``) filled where the class takes them and ``args`` does not set them."""
    cls = resolve(name, kind)
    kwargs = {key: _build_value(key, value) for key, value in args.items()}
    accepted = accepted_keywords(cls)
    for key, value in provided.items():
        if key not in kwargs and (accepted is None or key in accepted) and key in _named(cls):
            kwargs[key] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, AssertionError) as exc:
        raise ConfigError(f"{kind} '{name}' with {dict(args)}: {exc}") from None


def _named(cls: type) -> set[str]:
    accepted = accepted_keywords(cls)
    return accepted if accepted is not None else set(inspect.signature(cls).parameters)


def _nested(key: str, value: Any) -> tuple[str, Mapping[str, Any]] | None:
    if isinstance(value, Mapping) and is_foreign(value.get("name")):
        return str(value["name"]), dict(value.get("args") or {})
    if key in OBJECT_KEYS and is_foreign(value):
        return str(value), {}
    return None


def _build_value(key: str, value: Any) -> Any:
    nested = _nested(key, value)
    return value if nested is None else build(nested[0], nested[1], "object")


__all__ = ["INSTALL", "PREFIXES", "PROVIDED", "accepted_keywords", "build", "check", "is_foreign", "resolve"]
