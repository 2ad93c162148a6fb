"""Miners, picked by name: ``build(name, **kwargs)``, ``available()``, :func:`check_compatible` and
:func:`check_fits`.

See ``docs/miners.md`` for the table of miners and the calling convention; index-tuple helpers shared
with the losses live in :mod:`dmlkit.tuples`. PML's miners are in :mod:`dmlkit.miners.pml_style`,
Roth et al.'s in :mod:`dmlkit.miners.roth_style`, and progressive hard mining (annealing a miner's
``hardness_knob`` through :meth:`~dmlkit.miners.base.BaseMiner.set_hardness`) in
:mod:`dmlkit.miners.schedule`. :class:`Miner` and :class:`HardMiner` are the protocols the trainer uses.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import nn

from dmlkit.errors import ConfigError
from dmlkit.miners import pml_style, roth_style, schedule
from dmlkit.miners.base import REGISTRY, BaseMiner, HardMiner, Miner, MinerInputs, register
from dmlkit.miners.pml_style import (
    AngularMiner,
    BatchEasyHardMiner,
    BatchHardMiner,
    DistanceWeightedMiner,
    HDCMiner,
    MultiSimilarityMiner,
    PairMarginMiner,
    StochasticMiner,
    TripletMarginMiner,
    UniformHistogramMiner,
)
from dmlkit.miners.roth_style import (
    DistanceMiner,
    IntraRandomMiner,
    LiftedMiner,
    NPairMiner,
    ParametricMiner,
    RandomDistanceMiner,
    RandomMiner,
    RhoDistanceMiner,
    SemihardMiner,
    SofthardMiner,
)
from dmlkit.miners.schedule import MinerSchedule, check_schedule
from dmlkit.registry import Registered
from dmlkit.tuples import TUPLE_KINDS, IndicesTuple

# PML's conversions (loss_and_miner_utils.convert_to_pairs / convert_to_triplets), quoted in errors.
CONVERSION_RULES = (
    "losses with tuple_kinds {pairs, triplets} convert as PML does: triplets (a, p, n) are used as pairs "
    "(a, p, a, n), and pairs are joined on a shared anchor into triplets"
)


def build(name: str, /, **kwargs: Any) -> nn.Module:
    """Instantiate the miner registered as ``name``; unknown names/keywords raise ``UnknownNameError``."""
    return REGISTRY.build(name, **kwargs)


def available() -> list[str]:
    """Sorted names of every registered miner."""
    return REGISTRY.available()


@runtime_checkable
class _TakesTuples(Protocol):
    """A loss (instance or class) declaring the miner outputs it takes, as :class:`dmlkit.losses.Loss`."""

    @property
    def tuple_kinds(self) -> frozenset[str]: ...


def output_kind(miner: nn.Module | type | str) -> str:
    """``"pairs"`` or ``"triplets"`` for a miner (:class:`Miner`) instance, class or registered name."""
    factory = REGISTRY.get(miner) if isinstance(miner, str) else miner
    kind = factory.output_kind if isinstance(factory, Miner) else None
    if kind not in TUPLE_KINDS:
        raise ConfigError(f"miner {_name(miner)} declares no valid output_kind (got {kind!r})")
    return kind  # type: ignore[return-value]


def check_compatible(loss: nn.Module | type, miner: nn.Module | type | str) -> None:
    """Raise ``ConfigError`` if ``loss`` (instance or class) cannot consume ``miner``'s output.

    A loss consumes the kinds in its ``tuple_kinds``. For PML-style losses that is both kinds, thanks to
    PML's conversions: triplets ``(a, p, n)`` are used by pair losses as pairs ``(a, p, a, n)``, and pairs
    are joined on their anchor into triplets by triplet losses. Losses that take no miner (proxy and
    classification losses) have an empty ``tuple_kinds``.
    """
    check_fits(loss, loss.tuple_kinds if isinstance(loss, _TakesTuples) else frozenset(), miner)


def check_fits(loss: nn.Module | type, tuple_kinds: frozenset[str], miner: nn.Module | type | str) -> None:
    """Raise ``ConfigError`` if ``miner``'s output is not one of ``tuple_kinds``, the kinds ``loss`` (an
    instance or class) takes as configured: :func:`dmlkit.losses.capabilities`, e.g. from a configuration
    file before anything is built.

    The messages are :func:`check_compatible`'s, except where the configuration narrowed the class's kinds
    (a combination such as ``multiple``, whose kinds are those of its members without a miner of their
    own): the message then says so.
    """
    kind = output_kind(miner)
    if kind in tuple_kinds:
        return
    loss_name, miner_name = _name(loss), _name(miner)
    declared = loss.tuple_kinds if isinstance(loss, _TakesTuples) else frozenset()
    if tuple_kinds != declared:
        raise ConfigError(
            f"miner {miner_name} outputs {kind}, which no member of this {loss_name} loss without its own "
            "miner can use"
        )
    if not tuple_kinds:
        raise ConfigError(f"loss {loss_name} cannot use miner {miner_name}: it takes no miner")
    fitting = [m for m in available() if REGISTRY.get(m).output_kind in tuple_kinds]  # type: ignore[attr-defined]
    raise ConfigError(
        f"loss {loss_name} cannot use miner {miner_name} (it outputs {kind}); "
        f"miners that fit: {', '.join(fitting) or '(none)'} (loss {loss_name} takes only "
        f"{' and '.join(sorted(tuple_kinds))}; {CONVERSION_RULES})"
    )


def _name(obj: object) -> str:
    """``'name'`` for a registry name or a registered class or instance, else the class name."""
    if isinstance(obj, str):
        return f"'{obj}'"
    cls = obj if isinstance(obj, type) else type(obj)
    if issubclass(cls, Registered) and cls.registry_name:
        return f"'{cls.registry_name}'"
    return cls.__name__


def hardness_knob(miner: nn.Module | type | str) -> str | None:
    """The ``hardness_knob`` of a miner (:class:`HardMiner`) instance, class or registered name (None: it has
    none)."""
    factory = REGISTRY.get(miner) if isinstance(miner, str) else miner
    return factory.hardness_knob if isinstance(factory, HardMiner) else None


__all__ = [
    "CONVERSION_RULES",
    "REGISTRY",
    "AngularMiner",
    "BaseMiner",
    "BatchEasyHardMiner",
    "BatchHardMiner",
    "DistanceMiner",
    "DistanceWeightedMiner",
    "HDCMiner",
    "HardMiner",
    "IndicesTuple",
    "IntraRandomMiner",
    "LiftedMiner",
    "Miner",
    "MinerInputs",
    "MinerSchedule",
    "MultiSimilarityMiner",
    "NPairMiner",
    "PairMarginMiner",
    "ParametricMiner",
    "RandomDistanceMiner",
    "RandomMiner",
    "RhoDistanceMiner",
    "SemihardMiner",
    "SofthardMiner",
    "StochasticMiner",
    "TripletMarginMiner",
    "UniformHistogramMiner",
    "available",
    "build",
    "check_compatible",
    "check_fits",
    "check_schedule",
    "hardness_knob",
    "output_kind",
    "pml_style",
    "register",
    "roth_style",
    "schedule",
]
