"""Retrieval evaluation: one exact chunked k-NN pass, then every metric from the top-k and R.

Definitions (see ``docs/metrics.md``). For a query q let rel(i) ∈ {0, 1} say whether the i-th retrieved
gallery item (1-based, best first, excluded items skipped) has q's label, and R the number of retrievable
gallery items with q's label.

- ``recall@K``    = 1[Σ_{i≤K} rel(i) ≥ 1]                      (DML Recall@K, Song et al. 2016)
- ``precision@K`` = (1/K) Σ_{i≤K} rel(i)
- ``r_precision`` = (1/R) Σ_{i≤R} rel(i)
- ``map@r``       = (1/R) Σ_{i≤R} P(i)·rel(i), P(i) = (1/i) Σ_{j≤i} rel(j)   (Musgrave et al. 2020)
- ``mrr``         = 1 / (rank of the first relevant item in the full ranking)
- ``nmi``/``ami`` : k-means on the query embeddings (k = number of query classes) scored against labels.

Each retrieval metric is averaged over the queries with R > 0; queries with R = 0 are excluded from every
average and counted in ``num_queries_without_relevant`` (the rule of PML's ``AccuracyCalculator``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dmlkit.distances import check_distance
from dmlkit.errors import ConfigError, DataError, UnknownNameError, closest
from dmlkit.metrics import clustering
from dmlkit.metrics.knn import ArrayLike, IgnoreSpec, as_embeddings, build_exclusion, encode_pair, search
from dmlkit.metrics.results import Label, RetrievalResults
from dmlkit.registry import Registry

DEFAULT_METRICS: tuple[str, ...] = ("recall@1", "recall@2", "recall@4", "recall@8", "map@r", "nmi")


@dataclass
class RetrievalContext:
    """What a retrieval metric sees: relevance of the top-k, R per query, rank of the first relevant."""

    relevant: torch.Tensor  # bool [nq, k]
    num_relevant: torch.Tensor  # int64 [nq]
    first_relevant_rank: torch.Tensor | None  # int64 [nq] (only when "mrr" was requested)


RetrievalMetric = Callable[[RetrievalContext, int | None], torch.Tensor]

#: Retrieval metrics: ``fn(context, K) -> float64 [nq]`` per-query values (K is None for fixed names).
METRICS: Registry[torch.Tensor | float] = Registry("metric")
#: Names whose value comes from clustering, not from the k-NN ranking.
CLUSTERING_METRICS: tuple[str, ...] = ("nmi", "ami")
#: Metrics that need every relevant item in the top-k (k ≥ R).
NEEDS_ALL_RELEVANT: tuple[str, ...] = ("r_precision", "map@r")

_AT_K = re.compile(r"^([a-z_]+)@(-?\d+)$")


@METRICS.register("recall@K")
def recall_at_k(ctx: RetrievalContext, K: int | None) -> torch.Tensor:
    """1 if any of the top K is relevant, else 0 (the DML "Recall@K" of Song et al. 2016)."""
    return ctx.relevant[:, :K].any(dim=1).double()


@METRICS.register("precision@K")
def precision_at_k(ctx: RetrievalContext, K: int | None) -> torch.Tensor:
    """(1/K) Σ_{i≤K} rel(i): the denominator is K even when R < K."""
    assert K is not None
    return ctx.relevant[:, :K].sum(dim=1).double() / K


def _within_r(ctx: RetrievalContext) -> torch.Tensor:
    k = ctx.relevant.shape[1]
    first_r = torch.arange(k, device=ctx.relevant.device)[None, :] < ctx.num_relevant[:, None]
    return ctx.relevant & first_r


@METRICS.register("r_precision")
def r_precision(ctx: RetrievalContext, K: int | None = None) -> torch.Tensor:
    """(1/R) Σ_{i≤R} rel(i)."""
    return _within_r(ctx).sum(dim=1).double() / ctx.num_relevant.clamp_min(1).double()


@METRICS.register("map@r")
def map_at_r(ctx: RetrievalContext, K: int | None = None) -> torch.Tensor:
    """MAP@R (Musgrave, Belongie & Lim, "A Metric Learning Reality Check", ECCV 2020):
    (1/R) Σ_{i≤R} P(i)·rel(i) with P(i) the precision of the top i."""
    rel = _within_r(ctx)
    ranks = torch.arange(1, rel.shape[1] + 1, device=rel.device, dtype=torch.float64)
    precision = rel.cumsum(dim=1).double() / ranks
    return (precision * rel).sum(dim=1) / ctx.num_relevant.clamp_min(1).double()


@METRICS.register("mrr")
def mean_reciprocal_rank(ctx: RetrievalContext, K: int | None = None) -> torch.Tensor:
    """1 / rank of the first relevant item in the full ranking (not truncated at k)."""
    assert ctx.first_relevant_rank is not None
    return 1.0 / ctx.first_relevant_rank.clamp_min(1).double()


@METRICS.register("nmi")
def _nmi(labels: torch.Tensor, assignments: torch.Tensor) -> float:
    return clustering.nmi(labels, assignments)


@METRICS.register("ami")
def _ami(labels: torch.Tensor, assignments: torch.Tensor) -> float:
    return clustering.ami(labels, assignments)


def available() -> list[str]:
    """Metric names accepted by :func:`evaluate`; ``K`` stands for a positive integer (``recall@5``)."""
    return METRICS.available()


def parse_metric(name: str) -> tuple[str, int | None]:
    """``"recall@5"`` → ``("recall@K", 5)``; ``"map@r"`` → ``("map@r", None)``; unknown names raise."""
    if not isinstance(name, str):
        raise ConfigError(f"metric names are strings, got {name!r}")
    if name in METRICS and not name.endswith("@K"):
        return name, None
    match = _AT_K.match(name)
    if match and f"{match.group(1)}@K" in METRICS:
        K = int(match.group(2))
        if K < 1:
            raise ConfigError(f"metric '{name}': K must be a positive integer, got {K}")
        return f"{match.group(1)}@K", K
    raise UnknownNameError(_unknown_metric_message(name))


def _unknown_metric_message(name: str) -> str:
    patterns = available()
    number = re.search(r"@(\d+)$", name)
    # Suggest a concrete name ("recall@5" for "recal@5"), listing the patterns as the valid names.
    concrete = [p.replace("@K", f"@{number.group(1) if number else 1}") for p in patterns]
    suggestion = closest(name, concrete) or closest(name.lower(), concrete)
    hint = f"; did you mean '{suggestion}'?" if suggestion else ""
    return f"unknown metric '{name}'{hint} Valid metrics: {', '.join(patterns)} (K a positive integer)"


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
) -> RetrievalResults:
    """Retrieve every query's nearest gallery items and compute ``metrics`` (see module docstring).

    - No ``gallery``: leave-one-out: the gallery is the query set and a query never retrieves itself,
      matched by id (``query_ids``, default positions), so a duplicate vector with another id is retrieved.
    - With a ``gallery``: ids exclude pairs only when both ``query_ids`` and ``gallery_ids`` are given
      (e.g. a gallery that contains the queries).
    - ``ignore``: ``(query_groups, gallery_groups)``, pairs with equal group are excluded; in leave-one-out
      a single group array; or a callable ``ignore(query_index[c], gallery_index[n_gallery]) -> bool[c,
      n_gallery]`` (True = excluded). Excluded items are never retrieved and never relevant.
    - ``k``: neighbours kept; default max(largest K asked, largest R if ``r_precision``/``map@r`` asked).
    - ``chunk_size``: queries per block (default: ≤ 2**24 scores per block); ``device``: where to search
      (default: the query's device); ``seed``: k-means seed for ``nmi``/``ami``.
    """
    check_distance(distance)
    names = _dedupe([metrics] if isinstance(metrics, str) else list(metrics))
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

    retrieval = [(name, base, K) for name, base, K in parsed if base not in CLUSTERING_METRICS]
    largest_k = max((K for _, _, K in retrieval if K is not None), default=0)
    needs_all = any(base in NEEDS_ALL_RELEVANT for _, base, _ in retrieval)
    if k is None:
        k = largest_k
        if needs_all:
            k = max(k, _max_relevant_upper_bound(q_lab, g_lab, leave_one_out))
    elif not isinstance(k, int) or k < 1:
        raise ConfigError(f"k must be a positive integer or None, got {k!r}")
    elif k < largest_k:
        raise ConfigError(f"k={k} is smaller than the largest K asked ({largest_k})")

    out = search(
        q,
        g,
        k,
        distance,
        exclusion,
        query_labels=q_lab,
        gallery_labels=g_lab,
        first_relevant=any(base == "mrr" for _, base, _ in retrieval),
        chunk_size=chunk_size,
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

    valid = indices >= 0
    relevant = valid & (g_lab[indices.clamp_min(0)] == q_lab[:, None])
    ctx = RetrievalContext(
        relevant=relevant,
        num_relevant=num_relevant,
        first_relevant_rank=None if out.first_relevant_rank is None else out.first_relevant_rank.cpu(),
    )
    has_relevant = num_relevant > 0
    values: dict[str, float] = {}
    per_class: dict[str, dict[Label, float]] = {}
    assignments = None
    for name, base, K in parsed:
        if base in CLUSTERING_METRICS:
            if assignments is None:
                embeddings = F.normalize(q, dim=1) if distance == "cosine" else q
                num_classes = int(torch.unique(q_lab).numel())
                assignments = clustering.kmeans(embeddings, num_classes, seed=seed)
            values[name] = METRICS.get(base)(q_lab, assignments)
            continue
        per_query = METRICS.get(base)(ctx, K)[has_relevant]
        values[name] = float(per_query.mean()) if len(per_query) else float("nan")
        per_class[name] = _per_class_mean(per_query, q_lab[has_relevant], label_values)

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
    )


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


def _per_class_mean(
    values: torch.Tensor, labels: torch.Tensor, label_values: list[str] | None
) -> dict[Label, float]:
    if len(values) == 0:
        return {}
    classes, inverse = torch.unique(labels, return_inverse=True)
    sums = torch.zeros(len(classes), dtype=torch.float64).index_add_(0, inverse, values)
    counts = torch.bincount(inverse, minlength=len(classes)).double()
    means = (sums / counts).tolist()
    keys = classes.tolist()
    if label_values is not None:
        return {label_values[c]: m for c, m in zip(keys, means, strict=True)}
    return {int(c): m for c, m in zip(keys, means, strict=True)}
