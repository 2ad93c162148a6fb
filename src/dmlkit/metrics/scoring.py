"""Metrics as functions of a :class:`~dmlkit.search.RetrievalResults`: :func:`compute`; and
:func:`evaluate` = choose k from the metric names (:func:`choose_k`), :func:`dmlkit.search.search`,
:func:`compute`.

Retrieval metrics are computed from the top-k, R, N (class sizes) and, for ``mrr``, the first relevant
rank, in row blocks on the device the search ran on; only per-class sums come back, so memory stays
O(block + classes · metrics) whatever the number of queries and metrics. Definitions:
:mod:`dmlkit.metrics.retrieval`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from dmlkit import search
from dmlkit.distances import DistanceLike
from dmlkit.errors import ConfigError
from dmlkit.metrics import clustering
from dmlkit.metrics.retrieval import (
    CLUSTERING_METRICS,
    DEFAULT_METRICS,
    METRICS,
    NEEDS_ALL_RELEVANT,
    RetrievalContext,
    check_options,
    is_retrieval,
    parse_metric,
    required_depth,
)
from dmlkit.search import RetrievalResults
from dmlkit.search.encoding import ArrayLike, encode_pair
from dmlkit.search.exclusion import IgnoreSpec
from dmlkit.search.results import Label

#: Per-query metric values are computed on row blocks of at most this many top-k entries.
METRIC_BLOCK_ELEMENTS = 2**22

Parsed = list[tuple[str, str, int | None]]  # (name, pattern, K)


def _depths(parsed: Parsed, class_size: torch.Tensor, n_gallery: int, leave_one_out: bool) -> dict[str, int]:
    """Neighbours each retrieval metric needs (its K, 1000/1023 for ``map_1000``/``map_lim``, the largest
    class for ``map_c``; r_precision/map@r are checked against R separately)."""
    largest_class = int(class_size.max()) if len(class_size) else 0
    retrievable = n_gallery - int(leave_one_out)  # an upper bound of the items a query can retrieve
    return {
        name: required_depth(base, K, retrievable, largest_class)
        for name, base, K in parsed
        if is_retrieval(base)
    }


def _too_small(k: int, needed: dict[str, int]) -> ConfigError | None:
    if not needed or k >= max(needed.values()):
        return None
    worst = max(needed, key=lambda name: needed[name])
    return ConfigError(
        f"k={k} is smaller than the largest K asked: '{worst}' needs {needed[worst]} neighbours"
    )


def choose_k(
    metrics: Sequence[str] | str,
    query_labels: ArrayLike,
    gallery_labels: ArrayLike | None = None,
    *,
    k: int | None = None,
) -> int:
    """The neighbours :func:`evaluate` keeps for ``metrics`` (``gallery_labels`` None: leave-one-out).

    ``k`` None: the largest depth any metric needs (its K, 1000/1023 for ``map_1000``/``map_lim``, the
    largest class for ``map_c``, the largest R for ``r_precision``/``map@r``); otherwise ``k`` itself,
    checked to be a positive integer at least as large as every K asked.
    """
    parsed = [(name, *parse_metric(name)) for name in ([metrics] if isinstance(metrics, str) else metrics)]
    leave_one_out = gallery_labels is None
    other = query_labels if leave_one_out else gallery_labels
    q_lab, g_lab, _ = encode_pair(query_labels, other, "query_labels", "gallery_labels")  # type: ignore[arg-type]
    needed = _depths(parsed, _class_size(q_lab, g_lab), len(g_lab), leave_one_out)
    if k is None:
        k = max(needed.values(), default=0)
        if any(base in NEEDS_ALL_RELEVANT for _, base, _ in parsed):
            k = max(k, _max_relevant_upper_bound(q_lab, g_lab, leave_one_out))
        return k
    if not isinstance(k, int) or k < 1:
        raise ConfigError(f"k must be a positive integer or None, got {k!r}")
    error = _too_small(k, needed)
    if error is not None:
        raise error
    return k


def _class_size(q_lab: torch.Tensor, g_lab: torch.Tensor) -> torch.Tensor:
    """N per query: gallery items with the query's label before exclusions (Roth et al.'s class size)."""
    return search.count_matches([q_lab], [g_lab])


def _max_relevant_upper_bound(q_lab: torch.Tensor, g_lab: torch.Tensor, leave_one_out: bool) -> int:
    """max over queries of |gallery items with the query's label| (− 1 for the query itself in
    leave-one-out): an upper bound of R, exact when nothing but the query itself is excluded."""
    if len(q_lab) == 0 or len(g_lab) == 0:
        return 0
    classes, counts = torch.unique(g_lab, return_counts=True)
    position = torch.searchsorted(classes, q_lab).clamp_max(len(classes) - 1)
    per_query = torch.where(classes[position] == q_lab, counts[position], torch.zeros_like(q_lab))
    return max(int(per_query.max()) - int(leave_one_out), 0)


def compute(results: RetrievalResults, metrics: Sequence[str] | str, *, seed: int = 0) -> RetrievalResults:
    """``results`` with ``metrics`` computed: a copy (tensors shared, not copied) whose ``metrics``,
    ``per_class`` and ``cluster_assignments`` are filled; ``results`` itself is left as it is.

    Needs labels; retrieval metrics need k at least their depth (and at least R for ``r_precision`` /
    ``map@r``), ``mrr`` needs a search with ``first_relevant=True``, clustering and embedding metrics the
    query embeddings (kept by the search). ``seed``: k-means seed for ``nmi``/``ami``/``f1``.
    """
    names = check_options(metrics, results.distance, results.backend)
    parsed = [(name, *parse_metric(name)) for name in names]
    q_lab, g_lab = results.query_labels, results.gallery_labels
    if q_lab is None or g_lab is None or results.num_relevant is None:
        raise ConfigError("metrics need labels: search with query_labels (and gallery_labels with a gallery)")
    retrieval = [(name, base, K) for name, base, K in parsed if is_retrieval(base)]
    class_size = _class_size(q_lab, g_lab)
    _check_depth(results, retrieval, class_size)
    values: dict[str, float] = {}
    per_class: dict[str, dict[Label, float]] = {}
    if retrieval:
        values, per_class = _retrieval_values(results, retrieval, class_size)
    other, assignments = _embedding_values(results, [p for p in parsed if not is_retrieval(p[1])], seed)
    values |= other
    ordered = {name: values[name] for name in names}
    return replace(results, metrics=ordered, per_class=per_class, cluster_assignments=assignments)


def per_group(
    results: RetrievalResults,
    groups: torch.Tensor | np.ndarray,
    metrics: Sequence[str] | str,
    group_names: Sequence[str] | None = None,
) -> dict[str, dict[Label, float]]:
    """Every retrieval metric of ``metrics`` averaged over the queries of each group: metric → {group →
    value} (group codes ``groups[q]`` per query, named by ``group_names`` when given), e.g. per category
    (SOP's super-classes, an OML ``category``). Each group's value is what :func:`compute` gives for its
    queries alone against the whole gallery (queries without a relevant item left out, as always)."""
    names = [
        n
        for n in check_options(metrics, results.distance, results.backend)
        if is_retrieval(parse_metric(n)[0])
    ]
    codes = torch.as_tensor(np.asarray(groups), dtype=torch.int64).reshape(-1)
    if len(codes) != results.num_queries:
        raise ConfigError(f"per_group: {len(codes)} group codes for {results.num_queries} queries")
    found: dict[str, dict[Label, float]] = {name: {} for name in names}
    for code in torch.unique(codes).tolist():
        part = compute(results.select_queries(codes == code), names)
        key: Label = group_names[code] if group_names is not None else int(code)
        for name in names:
            found[name][key] = float(part.metrics[name])
    return found


def _check_depth(results: RetrievalResults, retrieval: Parsed, class_size: torch.Tensor) -> None:
    """Raise when ``results`` kept too few neighbours (or no first relevant rank) for ``retrieval``."""
    n_gallery = len(results.gallery_labels) if results.gallery_labels is not None else 0
    error = _too_small(results.k, _depths(retrieval, class_size, n_gallery, results.leave_one_out))
    if error is not None:
        raise error
    num_relevant = results.num_relevant
    assert num_relevant is not None
    needs_all = any(base in NEEDS_ALL_RELEVANT for _, base, _ in retrieval)
    largest = int(num_relevant.max()) if len(num_relevant) else 0
    if needs_all and largest > results.k:
        raise ConfigError(
            f"k={results.k} is smaller than the largest number of relevant items R={largest}; "
            "r_precision and map@r need k ≥ R (leave k=None to choose it automatically)"
        )
    if any(base == "mrr" for _, base, _ in retrieval) and results.first_relevant_rank is None:
        raise ConfigError(
            "metric 'mrr' needs each query's first relevant item in the whole ranking: search with "
            "first_relevant=True"
        )


def _retrieval_values(
    results: RetrievalResults, retrieval: Parsed, class_size: torch.Tensor
) -> tuple[dict[str, float], dict[str, dict[Label, float]]]:
    """Mean over the queries with R > 0, and the mean per class, of every retrieval metric."""
    assert results.num_relevant is not None and results.query_labels is not None
    has_relevant = results.num_relevant > 0
    scored_classes, scored_counts = torch.unique(results.query_labels[has_relevant], return_counts=True)
    class_sums = _class_sums(results, retrieval, class_size, scored_classes)
    scored = int(scored_counts.sum())
    values = {
        name: float(sums.sum() / scored) if scored else float("nan") for name, sums in class_sums.items()
    }
    per_class = {
        name: _per_class_means(sums, scored_classes, scored_counts, results.label_values)
        for name, sums in class_sums.items()
    }
    return values, per_class


def _class_sums(
    results: RetrievalResults, retrieval: Parsed, class_size: torch.Tensor, scored: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per retrieval metric, the sum of its per-query values over the queries with R > 0 of each label of
    ``scored`` (``torch.unique(q_lab[R > 0])``; float64, on the CPU, in that order).

    Per-query values are computed on the search's device in row blocks and summed per class at once, so
    neither the temporaries (O(block · k)) nor the result (O(classes)) grow with the number of queries."""
    dev = results.device
    assert results.num_relevant is not None
    assert results.query_labels is not None and results.gallery_labels is not None
    num_relevant, class_size = results.num_relevant.to(dev), class_size.to(dev)
    first_rank = None if results.first_relevant_rank is None else results.first_relevant_rank.to(dev)
    q_lab, g_lab = results.query_labels.to(dev), results.gallery_labels.to(dev)
    classes, class_of_query = torch.unique(q_lab, return_inverse=True)
    sums = {name: torch.zeros(len(classes), dtype=torch.float64, device=dev) for name, _, _ in retrieval}
    n, k = results.topk_indices.shape
    rows = max(1, METRIC_BLOCK_ELEMENTS // max(k, 1))
    for start in range(0, n, rows):
        end = min(start + rows, n)
        keep = num_relevant[start:end] > 0
        idx = results.topk_indices[start:end].to(dev)[keep]
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
    position = torch.searchsorted(classes, scored.to(dev))
    return {name: total[position].cpu() for name, total in sums.items()}


def _per_class_means(
    sums: torch.Tensor, classes: torch.Tensor, counts: torch.Tensor, label_values: list[str] | None
) -> dict[Label, float]:
    """label → mean per-query value of that class (``sums``/``counts`` aligned with ``classes``)."""
    means = (sums / counts.double()).tolist()
    keys = classes.tolist()
    if label_values is not None:
        return {label_values[c]: m for c, m in zip(keys, means, strict=True)}
    return {int(c): m for c, m in zip(keys, means, strict=True)}


def _embedding_values(
    results: RetrievalResults, parsed: Parsed, seed: int
) -> tuple[dict[str, float], torch.Tensor | None]:
    """(name → value of the clustering and embedding-space metrics, the k-means clusters if made)."""
    if not parsed:
        return {}, None
    q, q_lab = results.query_embeddings, results.query_labels
    assert q_lab is not None
    if q is None:
        raise ConfigError(
            f"metric '{parsed[0][0]}' needs the query embeddings, which these results do not hold"
        )
    # The rows as the index sees them (L2-normalised for cosine): clustering and ρ see these; dists@*
    # normalise themselves for cosine (in float64) and see these rows otherwise.
    prepared = results.distance.prepare(q)
    values: dict[str, float] = {}
    assignments = None
    for name, base, K in parsed:
        if base in CLUSTERING_METRICS:
            if assignments is None:
                num_classes = int(torch.unique(q_lab).numel())
                assignments = clustering.kmeans(prepared, num_classes, seed=seed)
            values[name] = METRICS.get(base)(q_lab, assignments)
        else:
            x = q if base.startswith("dists@") and results.distance == "cosine" else prepared
            values[name] = METRICS.get(base)(x, q_lab, results.distance.name, K)
    return values, assignments


def evaluate(
    query: torch.Tensor | np.ndarray,
    query_labels: ArrayLike,
    gallery: torch.Tensor | np.ndarray | None = None,
    gallery_labels: ArrayLike | None = None,
    *,
    metrics: Sequence[str] | str = DEFAULT_METRICS,
    k: int | None = None,
    distance: DistanceLike = "cosine",
    query_ids: ArrayLike | None = None,
    gallery_ids: ArrayLike | None = None,
    ignore: IgnoreSpec = None,
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
    seed: int = 0,
    backend: str = "torch",
    backend_options: Mapping[str, Any] | None = None,
) -> RetrievalResults:
    """Retrieve every query's nearest gallery items and compute ``metrics``: :func:`choose_k`, then
    :func:`dmlkit.search.search`, then :func:`compute` (definitions: :mod:`dmlkit.metrics.retrieval`).

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
      ``"faiss-hnsw"`` (approximate), with ``backend_options`` (see :mod:`dmlkit.search`).
    """
    names = check_options(metrics, distance, backend)
    inputs = search.prepare(
        query, gallery, query_labels, gallery_labels, query_ids, gallery_ids, ignore, require_queries=True
    )
    if inputs.query_labels is None or inputs.gallery_labels is None:
        raise ConfigError("evaluate needs query_labels (and gallery_labels with a gallery)")
    k = choose_k(names, inputs.query_labels, None if inputs.leave_one_out else inputs.gallery_labels, k=k)
    wants_mrr = any(parse_metric(name)[0] == "mrr" for name in names)
    results = search.run(inputs, k, distance, backend, backend_options, device, chunk_size, wants_mrr)
    return compute(results, names, seed=seed)
