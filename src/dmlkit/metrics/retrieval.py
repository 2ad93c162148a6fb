"""Retrieval evaluation: one chunked k-NN pass, then every metric from the top-k and R.

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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dmlkit.distances import check_distance
from dmlkit.errors import ConfigError, DataError, UnknownNameError, closest
from dmlkit.metrics import clustering, embedding_space, faiss_backend
from dmlkit.metrics.knn import (
    ArrayLike,
    IgnoreSpec,
    as_embeddings,
    build_exclusion,
    count_matches,
    encode_pair,
    search,
)
from dmlkit.metrics.results import Label, RetrievalResults
from dmlkit.registry import Registry

DEFAULT_METRICS: tuple[str, ...] = ("recall@1", "recall@2", "recall@4", "recall@8", "map@r", "nmi")

#: Truncation depths of Roth et al.'s ``mAP_1000`` and ``mAP_lim`` (1023: faiss-GPU's former k limit).
ROTH_MAP_1000_DEPTH = 1000
ROTH_MAP_LIM_DEPTH = 1023
#: Per-query metric values are computed on row blocks of at most this many top-k entries.
METRIC_BLOCK_ELEMENTS = 2**22


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


def _required_k(base: str, K: int | None, n_gallery: int, largest_class: int) -> int:
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
    metrics: Sequence[str] | str, distance: str = "cosine", backend: str = "torch"
) -> list[str]:
    """Check that ``metrics`` can be computed with ``distance`` and ``backend``, before any work.

    Raises (naming the culprit) on an unknown metric, distance or backend, a faiss backend without faiss
    installed, ``mrr`` (full-ranking) with a faiss backend, or ``dists@*`` with a similarity. Returns the
    metric names, deduplicated. :func:`evaluate`, ``dmlkit eval`` and the training
    configuration all call it, so a bad combination fails before embeddings are computed.
    """
    check_distance(distance)
    faiss_backend.check_backend(backend)
    names = _dedupe([metrics] if isinstance(metrics, str) else list(metrics))
    bases = [parse_metric(name)[0] for name in names]
    if any(base.startswith("dists@") for base in bases):
        embedding_space.check_dist_distance(distance)
    if backend in faiss_backend.FAISS_BACKENDS:
        faiss_backend.import_faiss(backend)
        if "mrr" in bases:
            raise ConfigError(
                f"metric 'mrr' ranks the whole gallery, which backend '{backend}' does not do; use 'mrr@K' "
                "(reciprocal rank within the top K) or backend 'torch'"
            )
    return names


def evaluate(
    query: torch.Tensor | np.ndarray,
    query_labels: ArrayLike,
    gallery: torch.Tensor | np.ndarray | None = None,
    gallery_labels: ArrayLike | None = None,
    *,
    metrics: Sequence[str] | str = DEFAULT_METRICS,
    k: int | None = None,
    distance: str = "cosine",
    query_ids: ArrayLike | None = None,
    gallery_ids: ArrayLike | None = None,
    ignore: IgnoreSpec = None,
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
    seed: int = 0,
    backend: str = "torch",
    backend_options: Mapping[str, Any] | None = None,
) -> RetrievalResults:
    """Retrieve every query's nearest gallery items and compute ``metrics`` (see module docstring).

    - No ``gallery``: leave-one-out: the gallery is the query set and a query never retrieves itself,
      matched by id (``query_ids``, default positions), so a duplicate vector with another id is retrieved.
    - With a ``gallery``: ids exclude pairs only when both ``query_ids`` and ``gallery_ids`` are given
      (e.g. a gallery that contains the queries).
    - ``ignore``: ``(query_groups, gallery_groups)``, pairs with equal group are excluded; in leave-one-out
      a single group array; or a callable ``ignore(query_index[c], gallery_index[g]) -> bool[c, g]``
      (True = excluded; called per block). Excluded items are never retrieved and never relevant.
    - ``k``: neighbours kept; default: the largest depth any asked metric needs (its K, 1000/1023 for
      ``map_1000``/``map_lim``, the largest class for ``map_c``, the largest R for ``r_precision``/``map@r``).
    - ``chunk_size``: queries per block (default: ≤ 2**24 scores per block); ``device``: where to search
      (default: the query's device); ``seed``: k-means seed for ``nmi``/``ami``/``f1``.
    - ``backend``: ``"torch"`` (exact, default), ``"faiss-flat"`` (exact), ``"faiss-ivf"`` or
      ``"faiss-hnsw"`` (approximate), with ``backend_options`` (see :mod:`dmlkit.metrics.faiss_backend`).
    """
    names = check_options(metrics, distance, backend)
    parsed = [(name, *parse_metric(name)) for name in names]

    q = as_embeddings(query, "query")
    if len(q) == 0:
        raise DataError("query is empty: there is nothing to evaluate")
    leave_one_out = gallery is None
    if leave_one_out:
        if gallery_labels is not None or gallery_ids is not None:
            raise ConfigError("gallery_labels/gallery_ids were given without a gallery (leave-one-out mode)")
        g = q
    else:
        if gallery_labels is None:
            raise ConfigError("gallery was given without gallery_labels")
        g = as_embeddings(gallery, "gallery")
    if len(g) == 0:
        raise DataError("gallery is empty: there is nothing to retrieve")
    if q.shape[1] != g.shape[1]:
        raise DataError(f"query and gallery dimensions differ: {q.shape[1]} vs {g.shape[1]}")

    q_lab, g_lab, label_values = encode_pair(
        query_labels,
        query_labels if leave_one_out else gallery_labels,  # type: ignore[arg-type]
        "query_labels",
        "gallery_labels",
    )
    _check_length(q_lab, len(q), "query_labels", "query")
    _check_length(g_lab, len(g), "gallery_labels", "gallery")

    q_ids, g_ids, id_values, exclude_ids = _ids(query_ids, gallery_ids, len(q), len(g), leave_one_out)
    exclusion = build_exclusion(
        len(q),
        len(g),
        exclude_self_ids=(q_ids, g_ids) if exclude_ids else None,
        ignore=ignore,
        same_set=leave_one_out,
    )

    retrieval = [(name, base, K) for name, base, K in parsed if _is_retrieval(base)]
    # N: gallery items with the query's label before exclusions (Roth et al.'s class frequency).
    class_size = count_matches([q_lab], [g_lab])
    largest_class = int(class_size.max())
    retrievable = len(g) - int(leave_one_out)  # an upper bound of the items a query can retrieve
    needed = {name: _required_k(base, K, retrievable, largest_class) for name, base, K in retrieval}
    largest_k = max(needed.values(), default=0)
    needs_all = any(base in NEEDS_ALL_RELEVANT for _, base, _ in retrieval)
    if k is None:
        k = largest_k
        if needs_all:
            k = max(k, _max_relevant_upper_bound(q_lab, g_lab, leave_one_out))
    elif not isinstance(k, int) or k < 1:
        raise ConfigError(f"k must be a positive integer or None, got {k!r}")
    elif k < largest_k:
        worst = max(needed, key=lambda name: needed[name])
        raise ConfigError(
            f"k={k} is smaller than the largest K asked: '{worst}' needs {needed[worst]} neighbours"
        )

    wants_mrr = any(base == "mrr" for _, base, _ in retrieval)
    if backend == "torch":
        if backend_options:
            raise ConfigError(f"backend 'torch' takes no backend_options, got {sorted(backend_options)}")
        out = search(
            q,
            g,
            k,
            distance,
            exclusion,
            query_labels=q_lab,
            gallery_labels=g_lab,
            first_relevant=wants_mrr,
            chunk_size=chunk_size,
            device=device,
        )
    else:
        out = faiss_backend.search(
            q,
            g,
            k,
            distance,
            exclusion,
            backend=backend,
            options=dict(backend_options or {}),
            query_labels=q_lab,
            gallery_labels=g_lab,
            first_relevant=wants_mrr,
            device=device,
        )
    indices = out.indices.cpu()
    distances = out.distances.cpu()
    assert out.num_relevant is not None
    num_relevant = out.num_relevant.cpu()
    if needs_all and len(num_relevant) and int(num_relevant.max()) > k:
        raise ConfigError(
            f"k={k} is smaller than the largest number of relevant items R={int(num_relevant.max())}; "
            "r_precision and map@r need k ≥ R (leave k=None to choose it automatically)"
        )
    first_rank = None if out.first_relevant_rank is None else out.first_relevant_rank.cpu()
    has_relevant = num_relevant > 0
    # On the search's device (the top-k is already there); only per-class sums come back, so memory
    # stays O(block + classes · metrics) whatever the number of queries and metrics.
    scored_classes, scored_counts = torch.unique(q_lab[has_relevant], return_counts=True)
    class_sums = _class_sums(
        retrieval,
        out.indices,
        q_lab,
        g_lab,
        num_relevant,
        first_rank,
        class_size,
        has_relevant,
        scored_classes,
    )

    values: dict[str, float] = {}
    per_class: dict[str, dict[Label, float]] = {}
    assignments = None
    embedded: list[torch.Tensor] = []

    def embeddings() -> torch.Tensor:
        """The query embeddings as clustering and ρ see them (L2-normalised for cosine), made once."""
        if not embedded:
            embedded.append(F.normalize(q, dim=1) if distance == "cosine" else q)
        return embedded[0]

    for name, base, K in parsed:
        if base in CLUSTERING_METRICS:
            if assignments is None:
                num_classes = int(torch.unique(q_lab).numel())
                assignments = clustering.kmeans(embeddings(), num_classes, seed=seed)
            values[name] = METRICS.get(base)(q_lab, assignments)
        elif base in EMBEDDING_METRICS:
            # dists@* normalise themselves for cosine; ρ sees what the clustering sees.
            x = q if base.startswith("dists@") else embeddings()
            values[name] = METRICS.get(base)(x, q_lab, distance, K)
        else:
            sums = class_sums[name]
            scored = int(scored_counts.sum())
            values[name] = float(sums.sum() / scored) if scored else float("nan")
            per_class[name] = _per_class_means(sums, scored_classes, scored_counts, label_values)

    return RetrievalResults(
        topk_indices=indices,
        topk_distances=distances,
        query_labels=q_lab,
        gallery_labels=g_lab,
        query_ids=q_ids,
        gallery_ids=g_ids,
        distance=distance,
        metrics=values,
        per_class=per_class,
        num_queries=len(q),
        num_queries_without_relevant=int((~has_relevant).sum()),
        num_relevant=num_relevant,
        k=k,
        leave_one_out=leave_one_out,
        label_values=label_values,
        id_values=id_values,
        cluster_assignments=assignments,
        backend=backend,
    )


def _is_retrieval(base: str) -> bool:
    return base not in CLUSTERING_METRICS and base not in EMBEDDING_METRICS


def _class_sums(
    retrieval: list[tuple[str, str, int | None]],
    indices: torch.Tensor,
    q_lab: torch.Tensor,
    g_lab: torch.Tensor,
    num_relevant: torch.Tensor,
    first_rank: torch.Tensor | None,
    class_size: torch.Tensor,
    has_relevant: torch.Tensor,
    scored_classes: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Per retrieval metric, the sum of its per-query values over the queries with R > 0 of each label of
    ``scored_classes`` (``torch.unique(q_lab[has_relevant])``; float64, on the CPU, in that order).

    Per-query values are computed on ``indices``' device in row blocks and summed per class at once, so
    neither the temporaries (O(block · k)) nor the result (O(classes)) grow with the number of queries."""
    if not retrieval:
        return {}
    dev = indices.device
    q_lab, g_lab, num_relevant, class_size = (t.to(dev) for t in (q_lab, g_lab, num_relevant, class_size))
    has_relevant = has_relevant.to(dev)
    first_rank = None if first_rank is None else first_rank.to(dev)
    classes, class_of_query = torch.unique(q_lab, return_inverse=True)
    sums = {name: torch.zeros(len(classes), dtype=torch.float64, device=dev) for name, _, _ in retrieval}
    n, k = indices.shape
    rows = max(1, METRIC_BLOCK_ELEMENTS // max(k, 1))
    for start in range(0, n, rows):
        end = min(start + rows, n)
        keep = has_relevant[start:end]
        idx = indices[start:end][keep]
        relevant = (idx >= 0) & (g_lab[idx.clamp_min(0)] == q_lab[start:end][keep][:, None])
        ctx = RetrievalContext(
            relevant=relevant,
            num_relevant=num_relevant[start:end][keep],
            first_relevant_rank=None if first_rank is None else first_rank[start:end][keep],
            class_size=class_size[start:end][keep],
        )
        block_classes = class_of_query[start:end][keep]
        for name, base, K in retrieval:
            sums[name].index_add_(0, block_classes, METRICS.get(base)(ctx, K).to(torch.float64))
    # Only the classes that have a scored query: searchsorted maps them into the sorted ``classes``.
    position = torch.searchsorted(classes, scored_classes.to(dev))
    return {name: total[position].cpu() for name, total in sums.items()}


def _dedupe(names: list[str]) -> list[str]:
    return list(dict.fromkeys(names))


def _check_length(values: torch.Tensor, n: int, name: str, of: str) -> None:
    if len(values) != n:
        raise DataError(f"{name} has {len(values)} entries but {of} has {n} rows")


def _ids(
    query_ids: ArrayLike | None, gallery_ids: ArrayLike | None, n_query: int, n_gallery: int, loo: bool
) -> tuple[torch.Tensor, torch.Tensor, list[str] | None, bool]:
    """(query id codes, gallery id codes, string vocabulary, whether equal ids exclude a pair)."""
    if loo:
        if query_ids is None:
            ids = torch.arange(n_query)
            return ids, ids, None, True
        q, _, vocabulary = encode_pair(query_ids, query_ids, "query_ids", "query_ids")
        _check_length(q, n_query, "query_ids", "query")
        return q, q, vocabulary, True
    if query_ids is None and gallery_ids is None:
        return torch.arange(n_query), torch.arange(n_gallery), None, False
    if query_ids is None or gallery_ids is None:
        raise ConfigError("pass both query_ids and gallery_ids (or neither) when a gallery is given")
    q, g, vocabulary = encode_pair(query_ids, gallery_ids, "query_ids", "gallery_ids")
    _check_length(q, n_query, "query_ids", "query")
    _check_length(g, n_gallery, "gallery_ids", "gallery")
    return q, g, vocabulary, True


def _max_relevant_upper_bound(q_lab: torch.Tensor, g_lab: torch.Tensor, leave_one_out: bool) -> int:
    """max over queries of |gallery items with the query's label| (− 1 for the query itself in
    leave-one-out): an upper bound of R, exact when nothing but the query itself is excluded."""
    classes, counts = torch.unique(g_lab, return_counts=True)
    position = torch.searchsorted(classes, q_lab).clamp_max(len(classes) - 1)
    per_query = torch.where(classes[position] == q_lab, counts[position], torch.zeros_like(q_lab))
    return max(int(per_query.max()) - int(leave_one_out), 0)


def _per_class_means(
    sums: torch.Tensor, classes: torch.Tensor, counts: torch.Tensor, label_values: list[str] | None
) -> dict[Label, float]:
    """label → mean per-query value of that class (``sums``/``counts`` aligned with ``classes``)."""
    means = (sums / counts.double()).tolist()
    keys = classes.tolist()
    if label_values is not None:
        return {label_values[c]: m for c, m in zip(keys, means, strict=True)}
    return {int(c): m for c, m in zip(keys, means, strict=True)}
