"""Foundations of every miner: the registry, the calling convention and statistics.

A miner is called as ``miner(embeddings, labels, ref_emb=None, ref_labels=None, ref_exclude=None)`` and
returns an indices tuple (see :mod:`dmlkit.tuples`): pairs ``(a1, p, a2, n)`` or triplets ``(a, p,
n)``, as declared by :attr:`BaseMiner.output_kind`. Anchors index ``embeddings``; positives and negatives
index ``ref_emb`` (the batch when not given); ``ref_exclude``, a boolean ``batch × reference`` mask, names
pairs that are never mined (e.g. an anchor and its own copy in a cross-batch memory). Mining runs under
``torch.no_grad()``.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any, ClassVar, Protocol, TypedDict, Unpack, runtime_checkable

import torch
from torch import nn

from dmlkit import distances
from dmlkit.errors import ConfigError, UnknownNameError, unknown_name_message
from dmlkit.registry import Registered, Registry, SharedOptions
from dmlkit.tuples import Batch, IndicesTuple, TupleKind, checked_batch, drop_excluded

REGISTRY: Registry[BaseMiner] = Registry("miner")


#: Class decorator registering a miner under a name (the class learns it as ``registry_name``).
register = REGISTRY.register


class MinerInputs(TypedDict, total=False):
    """The optional inputs of a miner call, by keyword: the reference set (each None when absent; see
    :meth:`BaseMiner.forward`)."""

    ref_emb: torch.Tensor | None
    ref_labels: torch.Tensor | None
    ref_exclude: torch.Tensor | None


@runtime_checkable
class Miner(Protocol):
    """What the trainer uses of a miner (every :class:`BaseMiner` is one; :meth:`BaseMiner.forward`
    implements the call): called with the embeddings, the labels and, by keyword, the :class:`MinerInputs`
    it has, it returns an indices tuple of the kind it declares (``output_kind``); ``last_stats`` are the
    last call's statistics."""

    @property
    def output_kind(self) -> str: ...

    @property
    def last_stats(self) -> dict[str, float]: ...

    def __call__(
        self, embeddings: torch.Tensor, labels: torch.Tensor, **inputs: Unpack[MinerInputs]
    ) -> IndicesTuple: ...


@runtime_checkable
class HardMiner(Miner, Protocol):
    """A miner whose hardness can be annealed (:class:`~dmlkit.miners.schedule.MinerSchedule`):
    ``hardness_knob`` names its default knob (None: it has none; logs use the name), ``hardness`` is the
    knob's value and ``set_hardness(value, knob=None)`` sets it, or another float hyperparameter ``knob``."""

    @property
    def hardness_knob(self) -> str | None: ...

    @property
    def hardness(self) -> float | None: ...

    def set_hardness(self, value: float, knob: str | None = None) -> None: ...


# ------------------------------------------------------------------------------------------ validation


def check_number(name: str, value: Any, low: float = -math.inf, high: float = math.inf) -> float:
    """``float(value)`` if it is a real number in ``[low, high]``, else a ``ConfigError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if not low <= value <= high:
        raise ConfigError(f"{name} must be in [{low}, {high}], got {value!r}")
    return float(value)


def check_count(name: str, value: Any, low: int = 1) -> int:
    """``value`` if it is an integer ``>= low``, else a ``ConfigError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``, else an ``UnknownNameError`` with the closest choice."""
    if value not in choices:
        raise UnknownNameError(unknown_name_message(name, str(value), choices))
    return str(value)


def float_hyperparameters(cls: type) -> list[str]:
    """Constructor keywords of ``cls`` whose default is a float, sorted: the attributes a schedule may set."""
    return list(_float_hyperparameters(cls))


@functools.cache  # per class: set_hardness checks its knob every iteration
def _float_hyperparameters(cls: type) -> tuple[str, ...]:
    params = inspect.signature(cls).parameters.values()
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return tuple(sorted(p.name for p in params if isinstance(p.default, float) and p.kind in kinds))


# ---------------------------------------------------------------------------------------------- base class


class BaseMiner(Registered, SharedOptions, nn.Module):
    """Validation, distance matrix, no-grad and statistics around :meth:`mine`.

    Statistics (:attr:`last_stats`): ``num_pos_pairs`` and ``num_neg_pairs`` (pair miners) or
    ``num_triplets`` (triplet miners), and ``mean_pos_distance`` / ``mean_neg_distance``: the mean of the
    miner's distance (a similarity for ``cosine``/``dot``) over the mined anchor–positive and
    anchor–negative pairs, NaN when none was mined. ``frac_hard`` / ``frac_semihard`` / ``frac_easy``
    classify each mined triplet by PML's ``TripletMarginMiner`` rule on ``m = d(a, n) − d(a, p)`` (``s(a, p)
    − s(a, n)`` for a similarity): hard ``m ≤ 0``, semihard ``0 < m ≤ margin``, easy ``m > margin``, with
    ``margin`` the miner's :attr:`margin`. Pair miners are classified over the triplets their pairs imply
    (every positive pair joined with every negative pair of the same anchor, PML's
    ``convert_to_triplets``), counted without building them. Means and fractions are computed when
    ``last_stats`` is read, from at most :data:`STATS_SAMPLE` evenly spaced tuples of each kind (exact
    below that). Subclasses may add keys to ``self._extra_stats`` inside :meth:`mine`.

    Constructor: the options every miner takes (``distance``, ``normalize_embeddings``) are declared once,
    by :meth:`shared_options`; a miner declares its own hyperparameters as the parameters of
    :meth:`configure` and a different default distance in :attr:`defaults`
    (:class:`dmlkit.registry.SharedOptions`); the shared options are keyword-only.
    """

    #: ``"pairs"`` or ``"triplets"``: the kind of indices tuple :meth:`forward` returns.
    output_kind: ClassVar[TupleKind] = "pairs"
    #: Name of the float hyperparameter that sets how hard the mined tuples are, annealed by
    #: :class:`dmlkit.miners.schedule.MinerSchedule` through :meth:`set_hardness`; None when the miner has
    #: no such knob.
    hardness_knob: ClassVar[str | None] = None
    #: Whether the miner's ``margin`` is, by default, its loss's (Roth's ``semihard`` reads
    #: ``--loss_<loss>_margin``): the trainer passes the loss's :attr:`~dmlkit.losses.BaseLoss.triplet_margin`
    #: when the config gives the miner no ``margin`` of its own.
    takes_loss_margin: ClassVar[bool] = False
    #: Valid ``(low, high)`` of the hyperparameters a schedule may set (unbounded when not listed).
    knob_ranges: ClassVar[dict[str, tuple[float, float]]] = {}
    #: The margin of the hard/semihard/easy split in :attr:`last_stats`; miners with a ``margin``
    #: hyperparameter replace it with theirs.
    margin: float = 0.2

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self._stats: dict[str, torch.Tensor | float] = {}
        self._extra_stats: dict[str, torch.Tensor | float] = {}
        self._pending_stats: tuple[torch.Tensor, IndicesTuple, float, bool] | None = None
        self.apply_arguments(args, kwargs)

    def shared_options(self, *, distance: str = "euclidean", normalize_embeddings: bool = True) -> None:
        """Build the miner's distance (L2-normalising first when ``normalize_embeddings``)."""
        self.normalize_embeddings = bool(normalize_embeddings)
        self.distance = distances.build(distance, normalize_embeddings=normalize_embeddings)

    @property
    def is_similarity(self) -> bool:
        """True when the miner's distance grows with similarity (``cosine``, ``dot``)."""
        return self.distance.is_similarity

    def require_unit_euclidean(self, why: str) -> None:
        """Raise ``ConfigError`` unless the distance is ``euclidean`` between L2-normalised embeddings
        (``why``: what needs it)."""
        if self.distance != "euclidean" or not self.distance.normalizes:
            raise ConfigError(
                f"miner '{self.who}' needs distance='euclidean' with normalize_embeddings=True ({why}), got "
                f"distance={str(self.distance)!r}, normalize_embeddings={self.normalize_embeddings}"
            )

    # -- hardness ----------------------------------------------------------------------------------------

    @property
    def hardness(self) -> float | None:
        """The value of the :attr:`hardness_knob` (None when the miner has none)."""
        return None if self.hardness_knob is None else float(getattr(self, self.hardness_knob))

    def set_hardness(self, value: float, knob: str | None = None) -> None:
        """Set the :attr:`hardness_knob`, or the float hyperparameter ``knob``, to ``value`` (how hard the
        next mined tuples are; :class:`~dmlkit.miners.schedule.MinerSchedule` calls this every iteration)."""
        name = knob or self.hardness_knob
        if name is None:
            raise ConfigError(
                f"miner '{self.who}' has no hardness knob; name a float hyperparameter with knob"
            )
        valid = _float_hyperparameters(type(self))
        if name not in valid:
            what = f"float hyperparameter of miner '{self.who}'"
            raise UnknownNameError(unknown_name_message(what, name, valid or ["(none)"]))
        setattr(self, name, float(value))

    # -- calling convention ------------------------------------------------------------------------------

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        ref_emb: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
        ref_exclude: torch.Tensor | None = None,
    ) -> IndicesTuple:
        """Mine an indices tuple from a batch (and optionally a reference set); ``ref_exclude`` (boolean,
        ``B × R``, with a reference set only): pairs never to mine."""
        with torch.no_grad():
            batch = checked_batch(embeddings, labels, ref_emb, ref_labels, ref_exclude, "miner", self.who)
            mat = self.distance.matrix(batch.embeddings, batch.ref_emb)
            self._extra_stats = {}
            out = self.mine(mat, batch)
            if batch.exclude is not None:  # for rules that pick pairs other than from the masks
                out = drop_excluded(out, batch.exclude)
            self._record(mat, out)
        return out

    def mine(self, mat: torch.Tensor, batch: Batch) -> IndicesTuple:
        """The mining rule. ``mat`` is the ``batch × reference`` matrix of the miner's distance (no
        gradient: L2 distances are ``torch.cdist``'s, PML's ``LpDistance`` values); ``batch`` the validated
        call (its ``ref_emb``/``ref_labels`` None when the reference set is the batch; its mask helpers leave
        ``ref_exclude``'s pairs out)."""
        raise NotImplementedError

    def _record(self, mat: torch.Tensor, out: IndicesTuple) -> None:
        if len(out) == 3:
            self._stats = {"num_triplets": float(out[0].numel())}
        else:
            self._stats = {"num_pos_pairs": float(out[0].numel()), "num_neg_pairs": float(out[2].numel())}
        self._stats.update(self._extra_stats)
        # Means and hardness fractions are computed when read, so a caller that never reads them (or a
        # benchmark) does not pay for gathers over millions of mined tuples.
        self._pending_stats = (mat, out, float(self.margin), self.is_similarity)

    @property
    def last_stats(self) -> dict[str, float]:
        """Statistics of the last call (converted lazily, so a GPU sync happens only when read)."""
        if self._pending_stats is not None:
            self._stats.update(_tuple_stats(*self._pending_stats))
            self._pending_stats = None
        return {key: float(val) for key, val in self._stats.items()}

    def extra_repr(self) -> str:
        return f"distance={str(self.distance)!r}, normalize_embeddings={self.normalize_embeddings}"


#: Statistics are computed from at most this many mined tuples (evenly spaced) of each kind.
STATS_SAMPLE = 1 << 18


def _thin(indices: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """At most :data:`STATS_SAMPLE` evenly spaced entries of parallel index tensors."""
    size = indices[0].numel()
    if size <= STATS_SAMPLE:
        return indices
    keep = torch.arange(STATS_SAMPLE, device=indices[0].device) * size // STATS_SAMPLE
    return tuple(t[keep] for t in indices)


def _tuple_stats(
    mat: torch.Tensor, out: IndicesTuple, margin: float, similarity: bool
) -> dict[str, torch.Tensor | float]:
    """``mean_pos_distance``, ``mean_neg_distance`` and ``frac_*`` of a miner's output (see BaseMiner)."""
    if len(out) == 3:
        a, p, n = _thin(out)
        a1 = a2 = a
    else:
        a1, p = _thin(out[:2])
        a2, n = _thin(out[2:])
    # mean of an empty selection is NaN, which is what "no pair mined" should read as.
    pos_values, neg_values = mat[a1, p], mat[a2, n]
    sign = -1.0 if similarity else 1.0
    hard, semihard, easy = _hardness_fractions(
        len(out) == 3, a1, sign * pos_values, a2, sign * neg_values, margin
    )
    return {
        "mean_pos_distance": pos_values.mean(),
        "mean_neg_distance": neg_values.mean(),
        "frac_hard": hard,
        "frac_semihard": semihard,
        "frac_easy": easy,
    }


def _hardness_fractions(
    triplets: bool,
    a1: torch.Tensor,
    pos: torch.Tensor,
    a2: torch.Tensor,
    neg: torch.Tensor,
    margin: float,
) -> tuple[float, float, float]:
    """Fractions of hard / semihard / easy triplets; ``pos``/``neg`` are distance-like (larger = farther).

    For triplets, ``pos[i]``/``neg[i]`` belong to triplet ``i``. For pairs, the triplets are the join on
    the anchor; for each negative pair the positives of its anchor with ``d_p ≥ d_n`` (hard) and
    ``d_p ≥ d_n − margin`` (hard or semihard) are counted, against a padded row of the anchor's
    positives when anchors have few, else by binary search in the positives sorted by ``(anchor, d_p)``
    (packed into one increasing float64 key).
    """
    if triplets:
        if pos.numel() == 0:
            return (float("nan"),) * 3
        gap = neg - pos
        total = gap.numel()
        hard = float((gap <= 0).sum()) / total
        easy = float((gap > margin).sum()) / total
        return hard, 1.0 - hard - easy, easy
    if pos.numel() == 0 or neg.numel() == 0:
        return (float("nan"),) * 3
    num_anchors = int(torch.maximum(a1.max(), a2.max())) + 1
    pos_count = torch.bincount(a1, minlength=num_anchors)
    neg_count = torch.bincount(a2, minlength=num_anchors)
    total = float(pos_count.double() @ neg_count.double())
    if total == 0:
        return (float("nan"),) * 3
    widest = int(pos_count.max())
    if widest <= 32:
        # few positives per anchor: compare each negative with a padded row of its anchor's positives
        order = torch.argsort(a1, stable=True)
        a_sorted = a1[order]
        rank = torch.arange(a1.numel(), device=a1.device) - (torch.cumsum(pos_count, 0) - pos_count)[a_sorted]
        rows = pos.new_full((num_anchors, widest), -torch.inf)
        rows[a_sorted, rank] = pos[order]
        anchor_rows = rows[a2]
        hard = float((anchor_rows >= neg.unsqueeze(1)).sum()) / total
        easy = 1.0 - float((anchor_rows >= (neg - margin).unsqueeze(1)).sum()) / total
        return hard, 1.0 - hard - easy, easy
    pos, neg = pos.double(), neg.double()
    low = torch.minimum(pos.min(), neg.min())
    # anchor a's keys lie in [a·stride, (a + 1)·stride), so one search covers every anchor's block
    stride = torch.maximum(pos.max(), neg.max()) - low + abs(margin) + 1.0
    keys, _ = torch.sort(a1 * stride + (pos - low))
    block_end = float(torch.cumsum(pos_count, 0).double() @ neg_count.double())
    block_start = a2 * stride

    def at_least(threshold: torch.Tensor) -> float:
        # Σ over negative pairs of #{positives of the same anchor with d_p >= threshold}; thresholds
        # below every d_p are raised to `low` so that the search stays inside the anchor's block
        first = torch.searchsorted(keys, block_start + (threshold.clamp_min(low) - low))
        return block_end - float(first.sum())

    hard = at_least(neg) / total
    easy = 1.0 - at_least(neg - margin) / total
    return hard, 1.0 - hard - easy, easy
