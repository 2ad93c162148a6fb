"""Combinators: weighted sums of losses, each optionally fed by its own miner."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from dmlkit import miners
from dmlkit.errors import ConfigError, UnknownNameError, unknown_name_message
from dmlkit.losses.base import PAIRS_AND_TRIPLETS, REGISTRY, BaseLoss, Batch, register
from dmlkit.tuples import tuple_kind

#: Keys of one member's configuration.
MEMBER_KEYS: tuple[str, ...] = ("name", "weight", "args", "miner", "miner_args")
#: Constructor arguments ``multiple`` supplies to the members that need them.
SUPPLIED: tuple[str, ...] = ("num_classes", "embedding_size")


def _member_spec(spec: object, index: int) -> dict[str, Any]:
    """Normalise one member's configuration to a dict with every key of :data:`MEMBER_KEYS`."""
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, Mapping):
        raise ConfigError(
            f"multiple: losses[{index}] must be a loss name or a mapping with keys {list(MEMBER_KEYS)}, "
            f"got {type(spec).__name__}"
        )
    for key in spec:
        if key not in MEMBER_KEYS:
            raise UnknownNameError(
                unknown_name_message(f"key of multiple: losses[{index}]", str(key), MEMBER_KEYS)
            )
    if "name" not in spec or not isinstance(spec["name"], str):
        raise ConfigError(f"multiple: losses[{index}] needs a 'name' (a registered loss), got {dict(spec)}")
    weight = spec.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
        raise ConfigError(
            f"multiple: losses[{index}] ('{spec['name']}'): weight must be a finite number, got {weight!r}"
        )
    for key in ("args", "miner_args"):
        if spec.get(key) is not None and not isinstance(spec[key], Mapping):
            raise ConfigError(
                f"multiple: losses[{index}] ('{spec['name']}'): {key} must be a mapping of keyword "
                f"arguments, got {spec[key]!r}"
            )
    out = {
        "name": spec["name"],
        "weight": float(weight),
        "args": dict(spec.get("args") or {}),
        "miner": spec.get("miner"),
        "miner_args": dict(spec.get("miner_args") or {}),
    }
    if out["miner"] is not None and not isinstance(out["miner"], str):
        raise ConfigError(
            f"multiple: losses[{index}] ('{out['name']}'): miner must be a miner name, got {out['miner']!r}"
        )
    if out["miner"] is None and out["miner_args"]:
        raise ConfigError(f"multiple: losses[{index}] ('{out['name']}'): miner_args given but no miner")
    return out


def check_members(losses: Sequence[object]) -> list[dict[str, Any]]:
    """Validate a ``multiple`` configuration without building anything; return the normalised specs.

    Checks every member's keys, loss name and keyword arguments (``num_classes``/``embedding_size``
    count as supplied), miner name and arguments, and that the miner's output suits the loss. Usable
    before any data is loaded (e.g. from config validation).
    """
    if isinstance(losses, str | Mapping) or not isinstance(losses, Sequence):
        raise ConfigError(f"multiple: losses must be a list of member losses, got {type(losses).__name__}")
    if len(losses) == 0:
        raise ConfigError(
            "multiple: losses is empty; give at least one member, e.g. [{'name': 'contrastive'}]"
        )
    specs = [_member_spec(spec, i) for i, spec in enumerate(losses)]
    for spec in specs:
        REGISTRY.check_kwargs(spec["name"], spec["args"], provided_by_caller=SUPPLIED)
        if spec["miner"] is not None:
            miners.REGISTRY.check_kwargs(spec["miner"], spec["miner_args"])
            miners.check_compatible(REGISTRY.get(spec["name"]), spec["miner"])
    return specs


def _combined_attributes(members: Sequence[tuple[frozenset[str], bool, bool]]) -> tuple[frozenset[str], bool]:
    """``(tuple_kinds, accepts_ref)`` of a combination of members ``(tuple_kinds, accepts_ref, has own
    miner)``."""
    kinds = frozenset().union(*(member_kinds for member_kinds, _, own_miner in members if not own_miner))
    return kinds, any(accepts_ref for _, accepts_ref, _ in members)


def declared_attributes(losses: Sequence[object]) -> tuple[frozenset[str], bool]:
    """``(tuple_kinds, accepts_ref)`` that ``multiple`` built from ``losses`` will have, without building
    it (e.g. to check a miner or a cross-batch memory against a configuration)."""
    members = []
    for spec in check_members(losses):
        cls: type[BaseLoss] = REGISTRY.get(spec["name"])  # type: ignore[assignment]
        members.append((*cls.capabilities(spec["args"]), spec["miner"] is not None))
    return _combined_attributes(members)


@register("multiple")
class MultipleLosses(BaseLoss):
    """Weighted sum of losses, each optionally with its own miner (PML ``MultipleLosses``).

    ``L = Σ_k w_k · L_k(embeddings, labels, tuples_k)`` where ``tuples_k`` is member ``k``'s own miner's
    output if it has one, else the ``indices_tuple`` given to ``multiple`` (if member ``k`` can use it).

    ``losses`` is a list of member configurations, each a loss name or a mapping::

        {"name": "contrastive", "weight": 1.0, "args": {...}, "miner": "batch_hard", "miner_args": {...}}

    (``weight`` defaults to 1, ``args``/``miner_args`` to ``{}``, ``miner`` to none), so the whole
    configuration fits in YAML or ``--loss-args``. ``num_classes`` and ``embedding_size`` are passed on to
    the members whose ``needs`` include them (unless their ``args`` set them); the class declares both
    in ``needs`` so the trainer always supplies them, and building a member that needs one that is
    missing is a ``ConfigError``.

    Outer inputs go to the members that can use them (PML's ``MultipleLosses`` passes its
    ``indices_tuple`` to every loss):

    - an ``indices_tuple`` goes to every member without its own miner whose ``tuple_kinds`` holds its
      kind; the instance's ``tuple_kinds`` is the **union** of those members' kinds (empty when every
      member has its own miner), so ``check_compatible(instance, miner)`` rejects a miner no member can
      use. The class attribute is ``{"pairs", "triplets"}`` (the most a configuration can accept).
    - a call with ``ref_emb``/``ref_labels`` is answered by the members with ``accepts_ref`` (and their
      miners) alone; the others are skipped (they contribute 0), since a reference-set call compares the
      batch with the reference set: a cross-batch memory objective, ``L(batch) + w·L(batch, memory)``,
      counts a proxy member once, in its batch term. ``accepts_ref`` is True when any member accepts a
      reference set. (A member's own miner mines the whole reference set, copies of the batch included.)

    :func:`declared_attributes` gives ``tuple_kinds``/``accepts_ref`` of a configuration without building it.

    Members are an ``nn.ModuleList`` (``self.losses``), so their parameters are the combinator's.
    ``last_stats``: each member's statistics prefixed ``"{k}_{name}/"`` (its miner's under
    ``"{k}_{name}/miner/"``), plus ``"{k}_{name}/loss"``, the member's unweighted value.
    """

    tuple_kinds: ClassVar[frozenset[str]] = PAIRS_AND_TRIPLETS
    accepts_ref: ClassVar[bool] = True
    needs: ClassVar[frozenset[str]] = frozenset(SUPPLIED)
    takes_shared_options: ClassVar[bool] = False

    @classmethod
    def capabilities(cls, args: Mapping[str, Any]) -> tuple[frozenset[str], bool]:
        """The configured combination's: see :func:`declared_attributes` (``args`` must hold ``losses``)."""
        if "losses" not in args:
            raise ConfigError("loss 'multiple' needs loss_args {losses: [{name: ..., weight: ...}, ...]}")
        return declared_attributes(args["losses"])

    def configure(
        self,
        losses: Sequence[object] = (),
        num_classes: int | None = None,
        embedding_size: int | None = None,
    ) -> None:
        specs = check_members(losses)
        supplied = {"num_classes": num_classes, "embedding_size": embedding_size}
        members: list[nn.Module] = []
        member_miners: dict[str, nn.Module] = {}
        for k, spec in enumerate(specs):
            args = dict(spec["args"])
            for key in REGISTRY.get(spec["name"]).needs:  # type: ignore[attr-defined]
                if key in args:
                    continue
                if supplied[key] is None:
                    raise ConfigError(
                        f"multiple: losses[{k}] ('{spec['name']}') needs {key}; pass {key}=... to 'multiple' "
                        "(the trainer does) or in the member's args"
                    )
                args[key] = supplied[key]
            members.append(REGISTRY.build(spec["name"], **args))
            if spec["miner"] is not None:
                member_miners[str(k)] = miners.build(spec["miner"], **spec["miner_args"])
        self.losses = nn.ModuleList(members)
        self.miners = nn.ModuleDict(member_miners)
        self.weights = [spec["weight"] for spec in specs]
        self.names = [f"{k}_{spec['name']}" for k, spec in enumerate(specs)]
        self.num_classes = num_classes
        self.embedding_size = embedding_size
        # instance attributes shadow the permissive class attributes (see the class docstring)
        self.tuple_kinds, self.accepts_ref = _combined_attributes(  # type: ignore[misc]
            [(m.tuple_kinds, m.accepts_ref, str(k) in self.miners) for k, m in enumerate(members)]
        )
        self._ran: list[int] = []

    def compute_loss(self, batch: Batch) -> torch.Tensor:
        kind = None if batch.indices_tuple is None else tuple_kind(batch.indices_tuple)
        total: torch.Tensor | None = None
        self._ran = []
        emb, labels = batch.embeddings, batch.labels
        ref = {"ref_emb": batch.ref_emb, "ref_labels": batch.ref_labels, "ref_exclude": batch.exclude}
        for k, (loss, weight) in enumerate(zip(self.losses, self.weights, strict=True)):
            if batch.ref_emb is not None and not loss.accepts_ref:
                continue  # a reference-set call is for the members that compare with a reference set
            if str(k) in self.miners:  # (nn.ModuleDict has no .get)
                tuples = self.miners[str(k)](emb, labels, **ref)
            elif kind is not None and kind in loss.tuple_kinds:
                tuples = batch.indices_tuple
            else:
                tuples = None
            value = loss(emb, labels, indices_tuple=tuples, **ref)
            self._stats[f"{self.names[k]}/loss"] = value.detach()
            self._ran.append(k)
            term = value * weight
            total = term if total is None else total + term
        assert total is not None  # a member ran: accepts_ref is checked before a reference-set call
        return total

    @property
    def last_stats(self) -> dict[str, float]:
        """Statistics of the members (and their miners) that ran in the last call, prefixed by
        ``"{index}_{name}/"``."""
        stats = super().last_stats
        for k in self._ran:
            for key, val in self.losses[k].last_stats.items():
                stats[f"{self.names[k]}/{key}"] = float(val)
            if str(k) in self.miners:
                for key, val in self.miners[str(k)].last_stats.items():
                    stats[f"{self.names[k]}/miner/{key}"] = float(val)
        return stats

    def extra_repr(self) -> str:
        return f"weights={self.weights}"


__all__ = ["MEMBER_KEYS", "MultipleLosses", "check_members", "declared_attributes"]
