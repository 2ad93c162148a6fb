"""Metric names and definitions: every metric computed from a search's top-k and R (see
:mod:`dmlkit.metrics.scoring` for how they are computed from a :class:`~dmlkit.search.RetrievalResults`).

Definitions (see ``docs/metrics.md``). For a query q let rel(i) ∈ {0, 1} say whether the i-th retrieved
gallery item (1-based, best first, excluded items skipped) has q's label, P(i) = (1/i) Σ_{j≤i} rel(j),
R the number of retrievable gallery items with q's label and N the number of gallery items with q's label
before exclusions (Roth et al.'s class frequency; R + 1 in plain leave-one-out).

- ``recall@K``    = 1[Σ_{i≤K} rel(i) ≥ 1]                      (DML Recall@K, Song et al. 2016)
- ``precision@K`` = (1/K) Σ_{i≤K} rel(i)
- ``r_precision`` = (1/R) Σ_{i≤R} rel(i)
- ``map@r``       = (1/R) Σ_{i≤R} P(i)·rel(i)                   (Musgrave et al. 2020)
- ``map@K``       = (1/min(K, R)) Σ_{i≤K} P(i)·rel(i)           (AP@K; GLDv2's mAP@100 for K = 100)
- ``map_pml@K``   = (1/R) Σ_{i≤K} P(i)·rel(i)                   (PML ``mean_average_precision``, k = K)
- ``map_1000``    = (1/N) Σ_{i≤1000} P(i)·rel(i)                (Roth et al. 2020 ``mAP_1000``)
- ``map_lim``     = (1/N) Σ_{i≤1023} P(i)·rel(i)                (Roth et al. 2020 ``mAP_lim``)
- ``map_c``       = (1/N) Σ_{i≤N} P(i)·rel(i)                   (Roth et al. 2020 ``mAP_c``)
- ``mrr``         = 1 / (rank of the first relevant item in the full ranking)
- ``mrr@K``       = 1 / (rank of the first relevant item) if it is ≤ K, else 0
- ``nmi``/``ami``/``f1``: k-means on the query embeddings (k = number of query classes) scored against
  the labels (:mod:`dmlkit.metrics.clustering`).
- ``rho_spectrum@K``, ``dists@intra``, ``dists@inter``, ``dists@intra_over_inter``, ``pcf@F``:
  diagnostics of the query embeddings (:mod:`dmlkit.metrics.embedding_space`).
- ``fnmr@fmr=F``: open-metric-learning's false non-match rate at false match rate F, on the distances of
  every relevant and irrelevant pair (:mod:`dmlkit.metrics.verification`).

Name modifiers: ``c_NAME`` / ``e_NAME`` compute NAME with the cosine / Euclidean distance whatever the
evaluation's distance (Roth et al.'s ``c_``/``e_`` metrics; one search per distance); ``NAME@class`` is the
mean over classes of the per-class means of a per-query metric (PML's ``avg_of_avgs``). Further metrics are
registered with :func:`register_metric` (or by a package, through the ``dmlkit.metrics`` entry point group).

Each per-query metric is averaged over the queries with R > 0; queries with R = 0 are excluded from every
average and counted in ``num_queries_without_relevant`` (the rule of PML's ``AccuracyCalculator``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from dmlkit import distances, search
from dmlkit.distances import DistanceLike
from dmlkit.errors import ConfigError, UnknownNameError, closest
from dmlkit.metrics import clustering, embedding_space, verification
from dmlkit.registry import Registry

DEFAULT_METRICS: tuple[str, ...] = ("recall@1", "recall@2", "recall@4", "recall@8", "map@r", "nmi")

#: Truncation depths of Roth et al.'s ``mAP_1000`` and ``mAP_lim`` (1023: faiss-GPU's former k limit).
ROTH_MAP_1000_DEPTH = 1000
ROTH_MAP_LIM_DEPTH = 1023


@dataclass
class RetrievalContext:
    """What a retrieval metric sees for a block of queries: relevance of the top-k, R, N, first rank.

    The cumulative sums every metric reads are computed once per block, on first use, so that each
    metric costs O(n_query) after them instead of another pass over the ``n_query × k`` block.
    """

    relevant: torch.Tensor  # bool [nq, k]
    num_relevant: torch.Tensor  # int64 [nq]: R
    first_relevant_rank: torch.Tensor | None  # int64 [nq] (only when "mrr" was requested)
    class_size: torch.Tensor | None = None  # int64 [nq]: N, gallery items with the query's label
    _hits: torch.Tensor | None = field(default=None, repr=False)
    _precision_hits: torch.Tensor | None = field(default=None, repr=False)
    _first_hit: torch.Tensor | None = field(default=None, repr=False)

    @property
    def k(self) -> int:
        return self.relevant.shape[1]

    def hits(self, limit: int | torch.Tensor) -> torch.Tensor:
        """Σ_{i ≤ limit} rel(i) per row (int64); ``limit`` an int or a per-row int64 tensor."""
        if self._hits is None:
            self._hits = self.relevant.cumsum(dim=1)
        return _prefix(self._hits, limit)

    def precision_hits(self, limit: int | torch.Tensor) -> torch.Tensor:
        """Σ_{i ≤ limit} P(i)·rel(i) per row (float64), P(i) = (1/i) Σ_{j≤i} rel(j)."""
        if self._precision_hits is None:
            if self._hits is None:
                self._hits = self.relevant.cumsum(dim=1)
            ranks = torch.arange(1, self.k + 1, device=self.relevant.device, dtype=torch.float64)
            self._precision_hits = (self._hits.double() / ranks * self.relevant).cumsum(dim=1)
        return _prefix(self._precision_hits, limit)

    def first_hit(self) -> torch.Tensor:
        """1-based position of the first relevant item in the top-k; k + 1 when there is none."""
        if self._first_hit is None:
            if self.k == 0:
                self._first_hit = torch.ones(
                    len(self.relevant), dtype=torch.int64, device=self.relevant.device
                )
            else:
                found = self.relevant.any(dim=1)
                first = self.relevant.to(torch.uint8).argmax(dim=1) + 1
                self._first_hit = torch.where(found, first, torch.full_like(first, self.k + 1))
        return self._first_hit


def _prefix(cumulative: torch.Tensor, limit: int | torch.Tensor) -> torch.Tensor:
    """Column ``min(limit, k) − 1`` of each row of a cumulative sum (0 where the limit is ≤ 0)."""
    k = cumulative.shape[1]
    zero = torch.zeros((), dtype=cumulative.dtype, device=cumulative.device)
    if not isinstance(limit, torch.Tensor):
        limit = min(int(limit), k)
        if limit <= 0 or len(cumulative) == 0:
            return zero.expand(len(cumulative)).clone()
        return cumulative[:, limit - 1].clone()
    if k == 0:
        return zero.expand(len(cumulative)).clone()
    column = limit.to(cumulative.device).clamp(1, k) - 1
    values = cumulative.gather(1, column[:, None]).squeeze(1)
    return torch.where(limit.to(cumulative.device) > 0, values, zero)


RetrievalMetric = Callable[[RetrievalContext, int | None], torch.Tensor]

#: How a metric is computed: per query from the ranking, from the whole results, by clustering, or from
#: the query embeddings alone.
MetricKind = Literal["query", "results", "clustering", "embedding"]
#: Kinds :func:`register_metric` accepts: ``query`` (``fn(context, K) -> float64 [nq]``, per-query
#: values averaged like the built-in retrieval metrics) and ``results`` (``fn(results[, K]) -> float``, a
#: value of the whole :class:`~dmlkit.search.RetrievalResults`).
REGISTRABLE_KINDS: tuple[str, ...] = ("query", "results")
#: Depths a metric may ask for: ``"K"`` (its K), ``"R"`` (every relevant item: k ≥ R), ``"N"`` (the largest
#: N), ``"all"`` (every retrievable item), or a number of neighbours (capped at what a query can retrieve).
DEPTHS: tuple[str, ...] = ("K", "R", "N", "all")
#: Name modifiers: ``c_``/``e_`` prefixes (the distance they rank by) and the ``@class`` suffix.
VARIANT_PREFIXES: dict[str, str] = {"c_": "cosine", "e_": "euclidean"}
CLASS_SUFFIX = "@class"
#: Entry point group whose entries are imported before a metric name is looked up in vain (and by
#: :func:`available`): a package registers its metrics there (see ``docs/metrics.md``).
PLUGIN_GROUP = "dmlkit.metrics"


@dataclass(frozen=True)
class MetricSpec:
    """How a registered metric pattern is computed: its kind, direction and the neighbours it needs."""

    pattern: str
    kind: MetricKind
    higher_is_better: bool = True
    depth: int | str | None = None
    builtin: bool = True

    @property
    def parameter(self) -> str | None:
        """``"K"`` (an integer) or ``"F"`` (a number in [0, 1]) for a parameterised pattern, else None."""
        if len(self.pattern) >= 2 and self.pattern[-1] in "KF" and self.pattern[-2] in "@=":
            return self.pattern[-1]
        return None


class MetricRegistry(Registry[Any]):
    """The metric registry: functions by pattern, with their :class:`MetricSpec`; the ``dmlkit.metrics``
    entry points are imported before :meth:`available` lists the names."""

    def __init__(self) -> None:
        super().__init__("metric")
        self.specs: dict[str, MetricSpec] = {}
        self._plugins_loaded = False

    def add(self, spec: MetricSpec, fn: Callable[..., Any]) -> None:
        self.register(spec.pattern)(fn)
        self.specs[spec.pattern] = spec

    def remove(self, pattern: str) -> None:
        self._entries.pop(pattern, None)
        self._types.pop(pattern, None)
        self.specs.pop(pattern, None)

    def load_plugins(self) -> None:
        """Import every entry point of :data:`PLUGIN_GROUP` (once per process); a failing one raises
        ``ConfigError`` naming it."""
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        from importlib.metadata import entry_points

        for entry in entry_points(group=PLUGIN_GROUP):
            try:
                entry.load()
            except Exception as exc:
                raise ConfigError(
                    f"metric plugin '{entry.name}' ({entry.value}, entry point group '{PLUGIN_GROUP}') "
                    f"failed to load: {type(exc).__name__}: {exc}"
                ) from exc

    def available(self) -> list[str]:
        self.load_plugins()
        return super().available()


#: Every metric pattern. Per-query retrieval metrics: ``fn(context, K) -> float64 [nq]`` (K is None for
#: fixed names); whole-results metrics: ``fn(results[, K]) -> float``; clustering metrics:
#: ``fn(labels, assignments) -> float``; embedding metrics: ``fn(embeddings, labels, distance, K) -> float``.
METRICS = MetricRegistry()
#: Names whose value comes from clustering, not from the k-NN ranking.
CLUSTERING_METRICS: tuple[str, ...] = ("nmi", "ami", "f1")
#: Names computed from the query embeddings alone (no ranking, no per-class values).
EMBEDDING_METRICS: tuple[str, ...] = (
    "rho_spectrum@K",
    "dists@intra",
    "dists@inter",
    "dists@intra_over_inter",
    "pcf@F",
)
#: Built-in names computed from the whole results at once (no per-query values, no per-class values).
RESULTS_METRICS: tuple[str, ...] = ("fnmr@fmr=F",)
#: Metrics that need every relevant item in the top-k (k ≥ R).
NEEDS_ALL_RELEVANT: tuple[str, ...] = ("r_precision", "map@r")
#: Patterns whose K may be negative (Roth et al.'s ``rho_spectrum@-1`` is KL(p ‖ u)).
SIGNED_K: tuple[str, ...] = ("rho_spectrum@K",)
#: Names where a smaller value is better (everything else: larger is better).
LOWER_IS_BETTER: tuple[str, ...] = ("rho_spectrum@K", "dists@intra", "dists@intra_over_inter", "fnmr@fmr=F")
#: Neighbours each built-in ranking metric needs (see :data:`DEPTHS`); ``mrr`` needs none (its rank is
#: found in the whole ranking).
_BUILTIN_DEPTHS: dict[str, int | str] = {
    "recall@K": "K",
    "precision@K": "K",
    "map@K": "K",
    "map_pml@K": "K",
    "mrr@K": "K",
    "r_precision": "R",
    "map@r": "R",
    "map_1000": ROTH_MAP_1000_DEPTH,
    "map_lim": ROTH_MAP_LIM_DEPTH,
    "map_c": "N",
    "mrr": 0,
    "fnmr@fmr=F": "all",
}


def _builtin(pattern: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering a built-in metric, its kind taken from the tuples above."""
    kind: MetricKind
    if pattern in CLUSTERING_METRICS:
        kind = "clustering"
    elif pattern in EMBEDDING_METRICS:
        kind = "embedding"
    elif pattern in RESULTS_METRICS:
        kind = "results"
    else:
        kind = "query"
    spec = MetricSpec(pattern, kind, pattern not in LOWER_IS_BETTER, _BUILTIN_DEPTHS.get(pattern))

    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        METRICS.add(spec, fn)
        return fn

    return decorator


@_builtin("recall@K")
def recall_at_k(ctx: RetrievalContext, K: int | None) -> torch.Tensor:
    """1 if any of the top K is relevant, else 0 (the DML "Recall@K" of Song et al. 2016)."""
    assert K is not None
    return (ctx.first_hit() <= K).double()


@_builtin("precision@K")
def precision_at_k(ctx: RetrievalContext, K: int | None) -> torch.Tensor:
    """(1/K) Σ_{i≤K} rel(i): the denominator is K even when R < K."""
    assert K is not None
    return ctx.hits(K).double() / K


def _within(relevant: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    """``relevant`` with every column ≥ ``limit[row]`` cleared."""
    columns = torch.arange(relevant.shape[1], device=relevant.device)
    return relevant & (columns[None, :] < limit[:, None])


def precision_sum(relevant: torch.Tensor, limit: int | torch.Tensor | None = None) -> torch.Tensor:
    """Σ_{i ≤ limit} P(i)·rel(i) per row (float64), P(i) = (1/i) Σ_{j≤i} rel(j); ``limit`` an int, a
    per-row int64 tensor, or None (every column)."""
    if isinstance(limit, torch.Tensor):
        rel = _within(relevant, limit)
    else:
        rel = relevant if limit is None else relevant[:, :limit]
    ranks = torch.arange(1, rel.shape[1] + 1, device=rel.device, dtype=torch.float64)
    precision = rel.cumsum(dim=1).double() / ranks
    return (precision * rel).sum(dim=1)


@_builtin("r_precision")
def r_precision(ctx: RetrievalContext, K: int | None = None) -> torch.Tensor:
    """(1/R) Σ_{i≤R} rel(i)."""
    return ctx.hits(ctx.num_relevant).double() / ctx.num_relevant.clamp_min(1).double()


@_builtin("map@r")
def map_at_r(ctx: RetrievalContext, K: int | None = None) -> torch.Tensor:
    """MAP@R (Musgrave, Belongie & Lim, "A Metric Learning Reality Check", ECCV 2020):
    (1/R) Σ_{i≤R} P(i)·rel(i) with P(i) the precision of the top i."""
    return ctx.precision_hits(ctx.num_relevant) / ctx.num_relevant.clamp_min(1).double()


@_builtin("map@K")
def map_at_k(ctx: RetrievalContext, K: int | None) -> torch.Tensor:
    """AP@K = (1/min(K, R)) Σ_{i≤K} P(i)·rel(i): 1 when the top K holds min(K, R) relevant items first
    (the mAP@100 of Google Landmarks v2, Weyand et al. CVPR 2020, for K = 100)."""
    assert K is not None
    return ctx.precision_hits(K) / ctx.num_relevant.clamp(1, K).double()


@_builtin("map_pml@K")
def map_pml_at_k(ctx: RetrievalContext, K: int | None) -> torch.Tensor:
    """(1/R) Σ_{i≤K} P(i)·rel(i): pytorch-metric-learning's ``mean_average_precision`` with k = K, whose
    denominator is R even when K < R (so at most K/R)."""
    assert K is not None
    return ctx.precision_hits(K) / ctx.num_relevant.clamp_min(1).double()


def _roth_denominator(ctx: RetrievalContext) -> torch.Tensor:
    assert ctx.class_size is not None
    return ctx.class_size.clamp_min(1).double()


@_builtin("map_1000")
def map_1000(ctx: RetrievalContext, K: int | None = None) -> torch.Tensor:
    """Roth et al. 2020 ``mAP_1000``: (1/N) Σ_{i≤1000} P(i)·rel(i), N = gallery items with the query's
    label before exclusions (the class size in leave-one-out, so a perfect ranking scores R/(R+1))."""
    return ctx.precision_hits(ROTH_MAP_1000_DEPTH) / _roth_denominator(ctx)


@_builtin("map_lim")
def map_lim(ctx: RetrievalContext, K: int | None = None) -> torch.Tensor:
    """Roth et al. 2020 ``mAP_lim``: (1/N) Σ_{i≤1023} P(i)·rel(i) (N as for ``map_1000``)."""
    return ctx.precision_hits(ROTH_MAP_LIM_DEPTH) / _roth_denominator(ctx)


@_builtin("map_c")
def map_c(ctx: RetrievalContext, K: int | None = None) -> torch.Tensor:
    """Roth et al. 2020 ``mAP_c``: (1/N) Σ_{i≤N} P(i)·rel(i) (N as for ``map_1000``)."""
    assert ctx.class_size is not None
    return ctx.precision_hits(ctx.class_size) / _roth_denominator(ctx)


@_builtin("mrr")
def mean_reciprocal_rank(ctx: RetrievalContext, K: int | None = None) -> torch.Tensor:
    """1 / rank of the first relevant item in the full ranking (not truncated at k)."""
    assert ctx.first_relevant_rank is not None
    return 1.0 / ctx.first_relevant_rank.clamp_min(1).double()


@_builtin("mrr@K")
def mean_reciprocal_rank_at_k(ctx: RetrievalContext, K: int | None) -> torch.Tensor:
    """1 / rank of the first relevant item if it is within the top K, else 0 (PML's MRR with k = K)."""
    assert K is not None
    first = ctx.first_hit().double()
    return torch.where(first <= K, 1.0 / first, torch.zeros_like(first))


@_builtin("nmi")
def _nmi(labels: torch.Tensor, assignments: torch.Tensor) -> float:
    return clustering.nmi(labels, assignments)


@_builtin("ami")
def _ami(labels: torch.Tensor, assignments: torch.Tensor) -> float:
    return clustering.ami(labels, assignments)


@_builtin("f1")
def _f1(labels: torch.Tensor, assignments: torch.Tensor) -> float:
    return clustering.f1(labels, assignments)


@_builtin("rho_spectrum@K")
def _rho(embeddings: torch.Tensor, labels: torch.Tensor, distance: str, K: int | None) -> float:
    assert K is not None
    return embedding_space.rho_spectrum(embeddings, K)


@_builtin("dists@intra")
def _intra(embeddings: torch.Tensor, labels: torch.Tensor, distance: str, K: int | None = None) -> float:
    return embedding_space.intra_class_distance(embeddings, labels, distance)


@_builtin("dists@inter")
def _inter(embeddings: torch.Tensor, labels: torch.Tensor, distance: str, K: int | None = None) -> float:
    return embedding_space.inter_class_distance(embeddings, labels, distance)


@_builtin("dists@intra_over_inter")
def _ratio(embeddings: torch.Tensor, labels: torch.Tensor, distance: str, K: int | None = None) -> float:
    return embedding_space.intra_over_inter(embeddings, labels, distance)


@_builtin("pcf@F")
def _pcf(embeddings: torch.Tensor, labels: torch.Tensor, distance: str, K: float | None) -> float:
    assert K is not None
    return embedding_space.principal_components_fraction(embeddings, K)


@_builtin("fnmr@fmr=F")
def _fnmr(results: search.RetrievalResults, K: float | None) -> float:
    assert K is not None
    return verification.fnmr_metric(results, K)


# ---------------------------------------------------------------------------------------------------------
# Names


@dataclass(frozen=True)
class MetricName:
    """A parsed metric name: ``name`` as asked, its registered ``base`` pattern and parameter ``K``, the
    distance a ``c_``/``e_`` prefix ranks by (``variant``, None: the evaluation's) and whether an ``@class``
    suffix asks for the mean of the per-class means (``by_class``)."""

    name: str
    base: str
    K: int | float | None
    variant: str | None = None
    by_class: bool = False

    @property
    def spec(self) -> MetricSpec:
        return METRICS.specs[self.base]

    @property
    def kind(self) -> str:
        return self.spec.kind


_INTEGER = re.compile(r"-?\d+")
_FRACTION = re.compile(r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE]-?\d+)?")


def _parse_core(name: str) -> tuple[str, int | float | None] | None:
    """(pattern, parameter) of a name without modifiers; None when no pattern matches."""
    spec = METRICS.specs.get(name)
    if spec is not None and spec.parameter is None:
        return name, None
    for pattern, spec in METRICS.specs.items():
        stem = pattern[:-1]
        if spec.parameter is None or not name.startswith(stem):
            continue
        text = name[len(stem) :]
        if spec.parameter == "K" and _INTEGER.fullmatch(text):
            K = int(text)
            if pattern in SIGNED_K:
                if K == 0:
                    raise ConfigError(
                        f"metric '{name}': K must be a non-zero integer (K = 0 is Roth et al.'s whole "
                        "spectrum, not a number: use dmlkit.metrics.singular_values)"
                    )
            elif K < 1:
                raise ConfigError(f"metric '{name}': K must be a positive integer, got {K}")
            return pattern, K
        if spec.parameter == "F" and _FRACTION.fullmatch(text):
            F = float(text)
            if not 0 <= F <= 1:
                raise ConfigError(f"metric '{name}': F must be a number in [0, 1], got {text}")
            return pattern, F
    return None


def parse_name(name: str) -> MetricName:
    """``"c_recall@5@class"`` → ``MetricName(name, "recall@K", 5, variant="cosine", by_class=True)``;
    unknown names raise ``UnknownNameError`` with the closest valid name (after importing the
    ``dmlkit.metrics`` entry points once), a bad parameter ``ConfigError``."""
    if not isinstance(name, str):
        raise ConfigError(f"metric names are strings, got {name!r}")
    variant, core, prefix = None, name, ""
    for start, distance in VARIANT_PREFIXES.items():
        if name.startswith(start):
            variant, core, prefix = distance, name[len(start) :], start
            break
    by_class = core.endswith(CLASS_SUFFIX)
    if by_class:
        core = core[: -len(CLASS_SUFFIX)]
    found = _parse_core(core)
    if found is None:
        METRICS.load_plugins()
        found = _parse_core(core)
    if found is None:
        raise UnknownNameError(_unknown_metric_message(name, core, prefix, CLASS_SUFFIX if by_class else ""))
    base, K = found
    kind = METRICS.specs[base].kind
    if by_class and kind != "query":
        raise ConfigError(
            f"metric '{name}': only per-query retrieval metrics have a mean of per-class means "
            f"('{CLASS_SUFFIX}'); '{core}' is a {kind} metric"
        )
    return MetricName(name, base, K, variant, by_class)


def available() -> list[str]:
    """Metric patterns accepted by :func:`evaluate` (built-in and registered); ``K`` stands for a positive
    integer (``recall@5``; ``rho_spectrum@K`` also takes a negative one), ``F`` for a number in [0, 1]
    (``pcf@0.5``, ``fnmr@fmr=0.1``). Every name also takes a ``c_``/``e_`` prefix, and every per-query
    retrieval metric an ``@class`` suffix."""
    return METRICS.available()


def parse_metric(name: str) -> tuple[str, int | float | None]:
    """``"recall@5"`` → ``("recall@K", 5)``; ``"map@r"`` → ``("map@r", None)``; ``"c_map@r@class"`` →
    ``("map@r", None)`` (the metric computed, modifiers dropped: :func:`parse_name` keeps them); unknown
    names raise."""
    parsed = parse_name(name)
    return parsed.base, parsed.K


def higher_is_better(name: str) -> bool:
    """Whether a larger value of metric ``name`` is better (False for ``rho_spectrum@K``, ``dists@intra``,
    ``dists@intra_over_inter``, ``fnmr@fmr=F`` and registered metrics that say so); unknown names raise."""
    return parse_name(name).spec.higher_is_better


def _example(spec: MetricSpec, number: str) -> str:
    if spec.parameter == "K":
        return spec.pattern[:-1] + number
    if spec.parameter == "F":
        return spec.pattern[:-1] + "0.1"
    return spec.pattern


def _unknown_metric_message(name: str, core: str, prefix: str = "", suffix: str = "") -> str:
    patterns = available()
    number = re.search(r"@(\d+)$", core)
    # Suggest a concrete name ("recall@5" for "recal@5"), listing the patterns as the valid names.
    concrete = [_example(METRICS.specs[p], number.group(1) if number else "1") for p in patterns]
    suggestion = closest(core, concrete) or closest(core.lower(), concrete)
    hint = f"; did you mean '{prefix}{suggestion}{suffix}'?" if suggestion else ""
    return (
        f"unknown metric '{name}'{hint} Valid metrics: {', '.join(patterns)} (K a positive integer, F a "
        "number in [0, 1]; a c_/e_ prefix ranks by cosine/Euclidean, an @class suffix averages per class)"
    )


# ---------------------------------------------------------------------------------------------------------
# Registration


_STEM = re.compile(r"^[a-z][a-z0-9_@=.]*[@=]$")
_FIXED = re.compile(r"^[a-z][a-z0-9_@=.]*[a-z0-9_]$|^[a-z]$")


def _check_new_name(name: str) -> None:
    if not isinstance(name, str):
        raise ConfigError(f"metric names are strings, got {name!r}")
    spec = MetricSpec(name, "query")
    shape_ok = _STEM.match(name[:-1]) if spec.parameter else _FIXED.match(name)
    if not shape_ok:
        raise ConfigError(
            f"cannot register metric '{name}': a name is lower-case letters, digits and _ . @ = (the command "
            "line lower-cases names), starting with a letter; a trailing '@K' or '=K' (an integer) or '@F' "
            "or '=F' (a number in [0, 1]) makes it a pattern"
        )
    if name.startswith(tuple(VARIANT_PREFIXES)) or name.endswith(CLASS_SUFFIX):
        raise ConfigError(
            f"cannot register metric '{name}': the prefixes {', '.join(VARIANT_PREFIXES)} and the suffix "
            f"'{CLASS_SUFFIX}' are name modifiers"
        )
    existing = METRICS.specs.get(name)
    if existing is None and spec.parameter:
        existing = next((s for s in METRICS.specs.values() if s.pattern[:-1] == name[:-1]), None)
    if existing is None and not spec.parameter:
        try:
            found = _parse_core(name)
        except ConfigError:
            found = (name, None)
        existing = None if found is None else METRICS.specs[found[0]]
    if existing is not None:
        what = "a built-in metric" if existing.builtin else "already registered (unregister_metric first)"
        raise ConfigError(f"cannot register metric '{name}': '{existing.pattern}' is {what}")


def register_metric(
    name: str,
    fn: Callable[..., Any] | None = None,
    *,
    kind: Literal["query", "results"] = "query",
    higher_is_better: bool = True,
    depth: int | str | None = None,
) -> Any:
    """Register metric ``name`` (usable in :func:`evaluate`, :func:`compute`, ``--metrics``, with the
    ``c_``/``e_`` prefixes and, for ``kind="query"``, the ``@class`` suffix); returns ``fn``, or a decorator
    when ``fn`` is None.

    - ``kind="query"``: ``fn(context, K) -> float64 tensor [nq]``, one value per query of a block
      (:class:`RetrievalContext`: relevance of the top-k, R, N, cumulative sums), averaged over the queries
      with R > 0 and per class, like the built-in retrieval metrics.
    - ``kind="results"``: ``fn(results) -> float`` (``fn(results, K)`` for a pattern), one value of the
      whole :class:`~dmlkit.search.RetrievalResults` (e.g. :func:`dmlkit.metrics.relevance` of it).
    - ``name``: lower-case; a trailing ``@K``/``=K`` (integer) or ``@F``/``=F`` (number in [0, 1]) makes a
      pattern (``hits@K`` answers ``hits@5``, with K = 5).
    - ``depth``: neighbours the search must keep: ``"K"`` (default for ``@K`` patterns), ``"R"`` (every
      relevant item; default otherwise), ``"N"`` (the largest N), ``"all"`` (every retrievable item) or a
      number. ``higher_is_better``: its direction (``--select-metric``, sweeps).

    Names already taken, or starting with ``c_``/``e_`` or ending with ``@class``, raise ``ConfigError``.
    """
    if fn is None:

        def decorator(function: Callable[..., Any]) -> Callable[..., Any]:
            return register_metric(name, function, kind=kind, higher_is_better=higher_is_better, depth=depth)

        return decorator
    _check_new_name(name)
    if kind not in REGISTRABLE_KINDS:
        raise ConfigError(f"metric kind must be one of {', '.join(REGISTRABLE_KINDS)}, got {kind!r}")
    if not callable(fn):
        raise ConfigError(f"metric '{name}': fn must be callable, got {type(fn).__name__}")
    parameter = MetricSpec(name, kind).parameter
    if depth is None:
        depth = "K" if parameter == "K" else "R"
    valid_number = isinstance(depth, int) and not isinstance(depth, bool) and depth >= 0
    if not (valid_number or depth in DEPTHS) or (depth == "K" and parameter != "K"):
        raise ConfigError(
            f"metric '{name}': depth must be a non-negative number of neighbours or one of "
            f"{', '.join(DEPTHS)} ('K' only for an '@K' pattern), got {depth!r}"
        )
    METRICS.add(MetricSpec(name, kind, bool(higher_is_better), depth, builtin=False), fn)
    return fn


def unregister_metric(name: str) -> None:
    """Remove a metric :func:`register_metric` added (built-in metrics stay)."""
    spec = METRICS.specs.get(name)
    if spec is None:
        raise UnknownNameError(f"metric '{name}' is not registered")
    if spec.builtin:
        raise ConfigError(f"metric '{name}' is built in and cannot be unregistered")
    METRICS.remove(name)


# ---------------------------------------------------------------------------------------------------------
# Depths and options


def required_depth(base: str, K: int | float | None, n_gallery: int, largest_class: int) -> int:
    """Neighbours metric ``base`` needs (r_precision/map@r and other ``"R"`` metrics are checked against R
    separately); fixed depths (Roth et al.'s 1,000 and 1,023, a registered number) are capped at
    ``n_gallery`` (the most a query can retrieve), ``"all"`` is ``n_gallery``."""
    spec = METRICS.specs.get(base)
    depth = None if spec is None else spec.depth
    if depth == "K":
        assert isinstance(K, int)
        return K
    if depth == "N":
        return min(largest_class, n_gallery)
    if depth == "all":
        return n_gallery
    if isinstance(depth, int):
        return min(depth, n_gallery)
    return 0


def needs_all_relevant(base: str) -> bool:
    """Whether metric pattern ``base`` needs every relevant item in the top-k (k ≥ R)."""
    spec = METRICS.specs.get(base)
    return base in NEEDS_ALL_RELEVANT or (spec is not None and spec.depth == "R")


def check_options(
    metrics: Sequence[str] | str, distance: DistanceLike = "cosine", backend: str = "torch"
) -> list[str]:
    """Check that ``metrics`` can be computed with ``distance`` and ``backend``, before any work.

    Raises (naming the culprit) on an unknown metric, distance or backend, a distance no index can rank by
    (``snr``), a faiss backend without faiss installed, ``mrr`` (full-ranking) with a backend that cannot
    rank the whole gallery, or ``dists@*`` with a similarity (``c_dists@*`` use cosine, ``e_dists@*``
    Euclidean, whatever ``distance`` is). Returns the metric names, deduplicated.
    :func:`~dmlkit.metrics.evaluate`, ``dmlkit eval`` and the training configuration all call it, so a bad
    combination fails before embeddings are computed.
    """
    metric = search.check_searchable(distance)
    search.build(backend)  # an unknown name, or faiss missing, fails here
    names = _dedupe([metrics] if isinstance(metrics, str) else list(metrics))
    parsed = [parse_name(name) for name in names]
    for name in parsed:
        if name.base.startswith("dists@"):
            embedding_space.check_dist_distance(name.variant or metric.name)
    if any(name.base == "mrr" for name in parsed):
        search.check_full_ranking(backend)
    return names


def variant_distance(variant: str | None, distance: DistanceLike) -> distances.Distance:
    """The distance a metric name ranks by: its ``c_``/``e_`` variant's, else ``distance``."""
    return distances.resolve(distance if variant is None else variant)


def kind_of(base: str) -> str:
    """``"query"``, ``"results"``, ``"clustering"`` or ``"embedding"``: how pattern ``base`` is computed."""
    return METRICS.specs[base].kind


def is_retrieval(base: str) -> bool:
    """Whether metric pattern ``base`` is computed from the ranking (per-query or whole-results; not
    clustering, not the embeddings)."""
    return kind_of(base) in ("query", "results")


def is_per_query(base: str) -> bool:
    """Whether metric pattern ``base`` is a per-query retrieval metric (averaged over queries, per class)."""
    return kind_of(base) == "query"


def _dedupe(names: list[str]) -> list[str]:
    return list(dict.fromkeys(names))
