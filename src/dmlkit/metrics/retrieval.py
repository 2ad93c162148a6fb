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
- ``rho_spectrum@K``, ``dists@intra``, ``dists@inter``, ``dists@intra_over_inter``: diagnostics of the
  query embeddings (:mod:`dmlkit.metrics.embedding_space`).

Each retrieval metric is averaged over the queries with R > 0; queries with R = 0 are excluded from every
average and counted in ``num_queries_without_relevant`` (the rule of PML's ``AccuracyCalculator``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from dmlkit import search
from dmlkit.distances import DistanceLike
from dmlkit.errors import ConfigError, UnknownNameError, closest
from dmlkit.metrics import clustering, embedding_space
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

#: Every metric name. Retrieval metrics: ``fn(context, K) -> float64 [nq]`` per-query values (K is None
#: for fixed names); clustering metrics: ``fn(labels, assignments) -> float``; embedding metrics:
#: ``fn(embeddings, labels, distance, K) -> float``.
METRICS: Registry[torch.Tensor | float] = Registry("metric")
#: Names whose value comes from clustering, not from the k-NN ranking.
CLUSTERING_METRICS: tuple[str, ...] = ("nmi", "ami", "f1")
#: Names computed from the query embeddings alone (no ranking, no per-class values).
EMBEDDING_METRICS: tuple[str, ...] = (
    "rho_spectrum@K",
    "dists@intra",
    "dists@inter",
    "dists@intra_over_inter",
)
#: Metrics that need every relevant item in the top-k (k ≥ R).
NEEDS_ALL_RELEVANT: tuple[str, ...] = ("r_precision", "map@r")
#: Patterns whose K may be negative (Roth et al.'s ``rho_spectrum@-1`` is KL(p ‖ u)).
SIGNED_K: tuple[str, ...] = ("rho_spectrum@K",)
#: Names where a smaller value is better (everything else: larger is better).
LOWER_IS_BETTER: tuple[str, ...] = ("rho_spectrum@K", "dists@intra", "dists@intra_over_inter")

_AT_K = re.compile(r"^([a-z_]+)@(-?\d+)$")


@METRICS.register("recall@K")
def recall_at_k(ctx: RetrievalContext, K: int | None) -> torch.Tensor:
    """1 if any of the top K is relevant, else 0 (the DML "Recall@K" of Song et al. 2016)."""
    assert K is not None
    return (ctx.first_hit() <= K).double()


@METRICS.register("precision@K")
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


@METRICS.register("r_precision")
def r_precision(ctx: RetrievalContext, K: int | None = None) -> torch.Tensor:
    """(1/R) Σ_{i≤R} rel(i)."""
    return ctx.hits(ctx.num_relevant).double() / ctx.num_relevant.clamp_min(1).double()


@METRICS.register("map@r")
def map_at_r(ctx: RetrievalContext, K: int | None = None) -> torch.Tensor:
    """MAP@R (Musgrave, Belongie & Lim, "A Metric Learning Reality Check", ECCV 2020):
    (1/R) Σ_{i≤R} P(i)·rel(i) with P(i) the precision of the top i."""
    return ctx.precision_hits(ctx.num_relevant) / ctx.num_relevant.clamp_min(1).double()


@METRICS.register("map@K")
def map_at_k(ctx: RetrievalContext, K: int | None) -> torch.Tensor:
    """AP@K = (1/min(K, R)) Σ_{i≤K} P(i)·rel(i): 1 when the top K holds min(K, R) relevant items first
    (the mAP@100 of Google Landmarks v2, Weyand et al. CVPR 2020, for K = 100)."""
    assert K is not None
    return ctx.precision_hits(K) / ctx.num_relevant.clamp(1, K).double()


@METRICS.register("map_pml@K")
def map_pml_at_k(ctx: RetrievalContext, K: int | None) -> torch.Tensor:
    """(1/R) Σ_{i≤K} P(i)·rel(i): pytorch-metric-learning's ``mean_average_precision`` with k = K, whose
    denominator is R even when K < R (so at most K/R)."""
    assert K is not None
    return ctx.precision_hits(K) / ctx.num_relevant.clamp_min(1).double()


def _roth_denominator(ctx: RetrievalContext) -> torch.Tensor:
    assert ctx.class_size is not None
    return ctx.class_size.clamp_min(1).double()


@METRICS.register("map_1000")
def map_1000(ctx: RetrievalContext, K: int | None = None) -> torch.Tensor:
    """Roth et al. 2020 ``mAP_1000``: (1/N) Σ_{i≤1000} P(i)·rel(i), N = gallery items with the query's
    label before exclusions (the class size in leave-one-out, so a perfect ranking scores R/(R+1))."""
    return ctx.precision_hits(ROTH_MAP_1000_DEPTH) / _roth_denominator(ctx)


@METRICS.register("map_lim")
def map_lim(ctx: RetrievalContext, K: int | None = None) -> torch.Tensor:
    """Roth et al. 2020 ``mAP_lim``: (1/N) Σ_{i≤1023} P(i)·rel(i) (N as for ``map_1000``)."""
    return ctx.precision_hits(ROTH_MAP_LIM_DEPTH) / _roth_denominator(ctx)


@METRICS.register("map_c")
def map_c(ctx: RetrievalContext, K: int | None = None) -> torch.Tensor:
    """Roth et al. 2020 ``mAP_c``: (1/N) Σ_{i≤N} P(i)·rel(i) (N as for ``map_1000``)."""
    assert ctx.class_size is not None
    return ctx.precision_hits(ctx.class_size) / _roth_denominator(ctx)


@METRICS.register("mrr")
def mean_reciprocal_rank(ctx: RetrievalContext, K: int | None = None) -> torch.Tensor:
    """1 / rank of the first relevant item in the full ranking (not truncated at k)."""
    assert ctx.first_relevant_rank is not None
    return 1.0 / ctx.first_relevant_rank.clamp_min(1).double()


@METRICS.register("mrr@K")
def mean_reciprocal_rank_at_k(ctx: RetrievalContext, K: int | None) -> torch.Tensor:
    """1 / rank of the first relevant item if it is within the top K, else 0 (PML's MRR with k = K)."""
    assert K is not None
    first = ctx.first_hit().double()
    return torch.where(first <= K, 1.0 / first, torch.zeros_like(first))


@METRICS.register("nmi")
def _nmi(labels: torch.Tensor, assignments: torch.Tensor) -> float:
    return clustering.nmi(labels, assignments)


@METRICS.register("ami")
def _ami(labels: torch.Tensor, assignments: torch.Tensor) -> float:
    return clustering.ami(labels, assignments)


@METRICS.register("f1")
def _f1(labels: torch.Tensor, assignments: torch.Tensor) -> float:
    return clustering.f1(labels, assignments)


@METRICS.register("rho_spectrum@K")
def _rho(embeddings: torch.Tensor, labels: torch.Tensor, distance: str, K: int | None) -> float:
    assert K is not None
    return embedding_space.rho_spectrum(embeddings, K)


@METRICS.register("dists@intra")
def _intra(embeddings: torch.Tensor, labels: torch.Tensor, distance: str, K: int | None = None) -> float:
    return embedding_space.intra_class_distance(embeddings, labels, distance)


@METRICS.register("dists@inter")
def _inter(embeddings: torch.Tensor, labels: torch.Tensor, distance: str, K: int | None = None) -> float:
    return embedding_space.inter_class_distance(embeddings, labels, distance)


@METRICS.register("dists@intra_over_inter")
def _ratio(embeddings: torch.Tensor, labels: torch.Tensor, distance: str, K: int | None = None) -> float:
    return embedding_space.intra_over_inter(embeddings, labels, distance)


def available() -> list[str]:
    """Metric names accepted by :func:`evaluate`; ``K`` stands for a positive integer (``recall@5``;
    ``rho_spectrum@K`` also takes a negative one)."""
    return METRICS.available()


def parse_metric(name: str) -> tuple[str, int | None]:
    """``"recall@5"`` → ``("recall@K", 5)``; ``"map@r"`` → ``("map@r", None)``; unknown names raise."""
    if not isinstance(name, str):
        raise ConfigError(f"metric names are strings, got {name!r}")
    if name in METRICS and not name.endswith("@K"):
        return name, None
    match = _AT_K.match(name)
    if match and f"{match.group(1)}@K" in METRICS:
        pattern, K = f"{match.group(1)}@K", int(match.group(2))
        if pattern in SIGNED_K:
            if K == 0:
                raise ConfigError(
                    f"metric '{name}': K must be a non-zero integer (K = 0 is Roth et al.'s whole "
                    "spectrum, not a number: use dmlkit.metrics.singular_values)"
                )
        elif K < 1:
            raise ConfigError(f"metric '{name}': K must be a positive integer, got {K}")
        return pattern, K
    raise UnknownNameError(_unknown_metric_message(name))


def higher_is_better(name: str) -> bool:
    """Whether a larger value of metric ``name`` is better (False for ``rho_spectrum@K``, ``dists@intra``
    and ``dists@intra_over_inter``); unknown names raise."""
    return parse_metric(name)[0] not in LOWER_IS_BETTER


def _unknown_metric_message(name: str) -> str:
    patterns = available()
    number = re.search(r"@(\d+)$", name)
    # Suggest a concrete name ("recall@5" for "recal@5"), listing the patterns as the valid names.
    concrete = [p.replace("@K", f"@{number.group(1) if number else 1}") for p in patterns]
    suggestion = closest(name, concrete) or closest(name.lower(), concrete)
    hint = f"; did you mean '{suggestion}'?" if suggestion else ""
    return f"unknown metric '{name}'{hint} Valid metrics: {', '.join(patterns)} (K a positive integer)"


def required_depth(base: str, K: int | None, n_gallery: int, largest_class: int) -> int:
    """Neighbours metric ``base`` needs (r_precision/map@r are checked against R separately); the fixed
    depths of Roth et al.'s metrics are capped at ``n_gallery`` (the most a query can retrieve)."""
    if base in ("recall@K", "precision@K", "map@K", "map_pml@K", "mrr@K"):
        assert K is not None
        return K
    if base == "map_1000":
        return min(ROTH_MAP_1000_DEPTH, n_gallery)
    if base == "map_lim":
        return min(ROTH_MAP_LIM_DEPTH, n_gallery)
    if base == "map_c":
        return min(largest_class, n_gallery)
    return 0


def check_options(
    metrics: Sequence[str] | str, distance: DistanceLike = "cosine", backend: str = "torch"
) -> list[str]:
    """Check that ``metrics`` can be computed with ``distance`` and ``backend``, before any work.

    Raises (naming the culprit) on an unknown metric, distance or backend, a distance no index can rank by
    (``snr``), a faiss backend without faiss installed, ``mrr`` (full-ranking) with a backend that cannot
    rank the whole gallery, or ``dists@*`` with a similarity. Returns the metric names, deduplicated.
    :func:`~dmlkit.metrics.evaluate`, ``dmlkit eval`` and the training configuration all call it, so a bad
    combination fails before embeddings are computed.
    """
    metric = search.check_searchable(distance)
    search.build(backend)  # an unknown name, or faiss missing, fails here
    names = _dedupe([metrics] if isinstance(metrics, str) else list(metrics))
    bases = [parse_metric(name)[0] for name in names]
    if any(base.startswith("dists@") for base in bases):
        embedding_space.check_dist_distance(metric.name)
    if "mrr" in bases:
        search.check_full_ranking(backend)
    return names


def is_retrieval(base: str) -> bool:
    """Whether metric pattern ``base`` is computed from the ranking (not clustering, not the embeddings)."""
    return base not in CLUSTERING_METRICS and base not in EMBEDDING_METRICS


def _dedupe(names: list[str]) -> list[str]:
    return list(dict.fromkeys(names))
