"""Miners, picked by name: ``build(name, **kwargs)``, ``available()`` and :func:`check_compatible`.

See ``docs/miners.md`` for the table of miners and the calling convention; index-tuple helpers shared
with the losses live in :mod:`dmlkit.miners.tuples`. PML's miners are in :mod:`dmlkit.miners.pml_style`,
Roth et al.'s in :mod:`dmlkit.miners.roth_style`, and progressive hard mining (annealing a miner's
``hardness_knob``) in :mod:`dmlkit.miners.schedule`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from dmlkit.errors import ConfigError
from dmlkit.miners import pml_style, roth_style, schedule
from dmlkit.miners.base import REGISTRY, BaseMiner, register
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
from dmlkit.miners.tuples import TUPLE_KINDS, IndicesTuple

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


def output_kind(miner: nn.Module | type | str) -> str:
    """``"pairs"`` or ``"triplets"`` for a miner instance, class or registered name."""
    factory = REGISTRY.get(miner) if isinstance(miner, str) else miner
    kind = getattr(factory, "output_kind", None)
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
    kind = output_kind(miner)
    kinds: frozenset[str] = getattr(loss, "tuple_kinds", frozenset())
    if kind in kinds:
        return
    loss_name = _name(loss)
    if not kinds:
        raise ConfigError(f"loss {loss_name} cannot use miner {_name(miner)}: it takes no miner")
    fitting = [m for m in available() if getattr(REGISTRY.get(m), "output_kind", None) in kinds]
    raise ConfigError(
        f"loss {loss_name} cannot use miner {_name(miner)} (it outputs {kind}); "
        f"miners that fit: {', '.join(fitting) or '(none)'} (loss {loss_name} takes only "
        f"{' and '.join(sorted(kinds))}; {CONVERSION_RULES})"
    )


def _name(obj: object) -> str:
    if isinstance(obj, str):
        return f"'{obj}'"
    registered = getattr(obj, "registry_name", "")
    if registered:
        return f"'{registered}'"
    return (obj if isinstance(obj, type) else type(obj)).__name__


def hardness_knob(miner: nn.Module | type | str) -> str | None:
    """The ``hardness_knob`` of a miner instance, class or registered name (None: it has none)."""
    factory = REGISTRY.get(miner) if isinstance(miner, str) else miner
    return getattr(factory, "hardness_knob", None)


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
    "IndicesTuple",
    "IntraRandomMiner",
    "LiftedMiner",
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
    "check_schedule",
    "hardness_knob",
    "output_kind",
    "pml_style",
    "register",
    "roth_style",
    "schedule",
]
