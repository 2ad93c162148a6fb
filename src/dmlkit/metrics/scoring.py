"""Metrics as functions of a :class:`~dmlkit.search.RetrievalResults`: :func:`compute`; and
:func:`evaluate` = choose k from the metric names (:func:`choose_k`), :func:`dmlkit.search.search` (once per
distance the names rank by: the evaluation's, and cosine / Euclidean for ``c_`` / ``e_`` names),
:func:`compute`.

Retrieval metrics are computed from the top-k, R, N (class sizes) and, for ``mrr``, the first relevant
rank, in row blocks on the device the search ran on; only per-class sums come back, so memory stays
O(block + classes · metrics) whatever the number of queries and metrics. Definitions:
:mod:`dmlkit.metrics.retrieval`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Literal

import numpy as np
import torch

from dmlkit import distances, search
from dmlkit.distances import Distance, DistanceLike
from dmlkit.errors import ConfigError
from dmlkit.metrics import clustering
from dmlkit.metrics.label_relevance import (
    EvaluationResults,
    LabelComparison,
    Relevance,
    class_codes,
    label_values,
)
from dmlkit.metrics.retrieval import (
    DEFAULT_METRICS,
    METRICS,
    MetricName,
    RetrievalContext,
    check_options,
    is_per_query,
    is_retrieval,
    needs_all_relevant,
    parse_name,
    required_depth,
)
from dmlkit.search import RetrievalResults
from dmlkit.search.encoding import ArrayLike, encode_pair
from dmlkit.search.exclusion import IgnoreSpec
from dmlkit.search.results import Label

#: Per-query metric values are computed on row blocks of at most this many top-k entries.
METRIC_BLOCK_ELEMENTS = 2**22
#: How per-query values are averaged: over the queries (default), or over the classes of the per-class
#: means (PML's ``avg_of_avgs``).
Average = Literal["query", "class"]
AVERAGES: tuple[str, ...] = ("query", "class")


def _parse(metrics: Sequence[str] | str) -> list[MetricName]:
    return [parse_name(name) for name in ([metrics] if isinstance(metrics, str) else metrics)]


def _depths(
    parsed: list[MetricName], class_size: torch.Tensor, n_gallery: int, leave_one_out: bool
) -> dict[str, int]:
    """Neighbours each ranking metric needs (its K, 1000/1023 for ``map_1000``/``map_lim``, the largest
    class for ``map_c``, every retrievable item for ``fnmr@fmr=F``; r_precision/map@r are checked against R
    separately)."""
    largest_class = int(class_size.max()) if len(class_size) else 0
    retrievable = n_gallery - int(leave_one_out)  # an upper bound of the items a query can retrieve
    return {
        name.name: required_depth(name.base, name.K, retrievable, largest_class)
        for name in parsed
        if is_retrieval(name.base)
    }


def _too_small(k: int, needed: dict[str, int]) -> ConfigError | None:
    if not needed or k >= max(needed.values()):
        return None
    worst = max(needed, key=lambda name: needed[name])
    return ConfigError(
        f"k={k} is smaller than the largest K asked: '{worst}' needs {needed[worst]} neighbours"
    )


def _check_average(average: str) -> None:
    if average not in AVERAGES:
        raise ConfigError(f"average must be one of {', '.join(AVERAGES)}, got {average!r}")


def choose_k(
    metrics: Sequence[str] | str,
    query_labels: ArrayLike,
    gallery_labels: ArrayLike | None = None,
    *,
    k: int | None = None,
) -> int:
    """The neighbours :func:`evaluate` keeps for ``metrics`` (``gallery_labels`` None: leave-one-out).

    ``k`` None: the largest depth any metric needs (its K, 1000/1023 for ``map_1000``/``map_lim``, the
    largest class for ``map_c``, the largest R for ``r_precision``/``map@r``, every retrievable item for
    ``fnmr@fmr=F``); otherwise ``k`` itself, checked to be a positive integer at least as large as every K
    asked.
    """
    parsed = _parse(metrics)
    leave_one_out = gallery_labels is None
    other = query_labels if leave_one_out else gallery_labels
    q_lab, g_lab, _ = encode_pair(query_labels, other, "query_labels", "gallery_labels")  # type: ignore[arg-type]
    return choose_depth(
        parsed,
        _class_size(q_lab, g_lab),
        lambda: _max_relevant_upper_bound(q_lab, g_lab, leave_one_out),
        len(g_lab),
        leave_one_out,
        k,
    )


def choose_depth(
    parsed: Sequence[MetricName],
    class_size: torch.Tensor,
    max_relevant: Callable[[], int],
    n_gallery: int,
    leave_one_out: bool,
    k: int | None,
) -> int:
    """:func:`choose_k` from what :func:`prepare_evaluation` returns (``class_size``, ``max_relevant``)."""
    needed = _depths(parsed, class_size, n_gallery, leave_one_out)
    if k is None:
        k = max(needed.values(), default=0)
        if any(needs_all_relevant(name.base) for name in parsed):
            k = max(k, max_relevant())
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


def compute(
    results: RetrievalResults,
    metrics: Sequence[str] | str,
    *,
    seed: int = 0,
    average: Average = "query",
) -> RetrievalResults:
    """``results`` with ``metrics`` computed: a copy (tensors shared, not copied) whose ``metrics``,
    ``per_class`` and ``cluster_assignments`` are filled; ``results`` itself is left as it is.

    Needs labels; ranking metrics need k at least their depth (and at least R for ``r_precision`` /
    ``map@r``), ``mrr`` needs a search with ``first_relevant=True``, clustering and embedding metrics the
    query embeddings (kept by the search). ``c_``/``e_`` names rank by cosine/Euclidean: by ``results``
    itself when it was searched so, else by the search of that distance that an
    :class:`~dmlkit.metrics.EvaluationResults` holds (:func:`evaluate` makes one). Relevance is the same
    label, or the ``label_comparison`` an ``EvaluationResults`` holds. ``average="class"``: every per-query
    metric is the mean of its per-class means (as its ``@class`` name). ``seed``: k-means seed for
    ``nmi``/``ami``/``f1``.
    """
    names = check_options(metrics, results.distance, results.backend)
    _check_average(average)
    parsed = [parse_name(name) for name in names]
    if results.query_labels is None or results.gallery_labels is None or results.num_relevant is None:
        raise ConfigError("metrics need labels: search with query_labels (and gallery_labels with a gallery)")
    relevance: Relevance | None = getattr(results, "relevance", None)
    groups: dict[str | None, list[MetricName]] = {}
    for name in parsed:
        groups.setdefault(_variant_key(name.variant, results.distance), []).append(name)
    values: dict[str, float] = {}
    per_class: dict[str, dict[Label, float]] = {}
    assignments = None
    for variant, group in sorted(groups.items(), key=lambda item: item[0] is not None):
        ranking = [name for name in group if is_retrieval(name.base)]
        if ranking:
            source = _searched_by(results, variant, ranking[0].name)
            found, by_class = _ranking_values(source, ranking, relevance, average)
            values |= found
            per_class |= by_class
        other = [name for name in group if not is_retrieval(name.base)]
        if other:
            distance = results.distance if variant is None else distances.resolve(variant)
            found, clusters = _embedding_values(results, other, seed, distance)
            values |= found
            assignments = clusters if assignments is None else assignments
    ordered = {name: values[name] for name in names}
    ordered_per_class = {name: per_class[name] for name in names if name in per_class}
    return replace(results, metrics=ordered, per_class=ordered_per_class, cluster_assignments=assignments)


def _variant_key(variant: str | None, distance: Distance) -> str | None:
    """None when a name ranks by ``distance`` (no prefix, or the prefix's distance is ``distance``)."""
    if variant is None or distances.resolve(variant) == distance:
        return None
    return variant


def _searched_by(results: RetrievalResults, variant: str | None, name: str) -> RetrievalResults:
    """The search a ranking metric of ``variant`` reads: ``results``, or its search of that distance."""
    if variant is None:
        return results
    found = getattr(results, "variants", {}).get(variant)
    if found is None:
        raise ConfigError(
            f"metric '{name}' ranks by the {variant} distance but these results were searched with "
            f"'{results.distance}' alone: dmlkit.metrics.evaluate runs one search per distance the names ask "
            "for"
        )
    return found


def per_group(
    results: RetrievalResults,
    groups: torch.Tensor | np.ndarray,
    metrics: Sequence[str] | str,
    group_names: Sequence[str] | None = None,
    *,
    average: Average = "query",
) -> dict[str, dict[Label, float]]:
    """Every per-query retrieval metric of ``metrics`` averaged over the queries of each group: metric →
    {group → value} (group codes ``groups[q]`` per query, named by ``group_names`` when given), e.g. per
    category (SOP's super-classes, an OML ``category``). Each group's value is what :func:`compute` gives for
    its queries alone against the whole gallery (queries without a relevant item left out, as always)."""
    names = [
        n
        for n in check_options(metrics, results.distance, results.backend)
        if is_per_query(parse_name(n).base)
    ]
    codes = torch.as_tensor(np.asarray(groups), dtype=torch.int64).reshape(-1)
    if len(codes) != results.num_queries:
        raise ConfigError(f"per_group: {len(codes)} group codes for {results.num_queries} queries")
    found: dict[str, dict[Label, float]] = {name: {} for name in names}
    for code in torch.unique(codes).tolist():
        part = compute(results.select_queries(codes == code), names, average=average)
        key: Label = group_names[code] if group_names is not None else int(code)
        for name in names:
            found[name][key] = float(part.metrics[name])
    return found


def _check_depth(
    results: RetrievalResults, ranking: list[MetricName], class_size: torch.Tensor, custom: bool
) -> None:
    """Raise when ``results`` kept too few neighbours (or no first relevant rank) for ``ranking``."""
    n_gallery = len(results.gallery_labels) if results.gallery_labels is not None else 0
    error = _too_small(results.k, _depths(ranking, class_size, n_gallery, results.leave_one_out))
    if error is not None:
        raise error
    num_relevant = results.num_relevant
    assert num_relevant is not None
    needing = [name.name for name in ranking if needs_all_relevant(name.base)]
    largest = int(num_relevant.max()) if len(num_relevant) else 0
    if needing and largest > results.k:
        raise ConfigError(
            f"k={results.k} is smaller than the largest number of relevant items R={largest}; "
            f"r_precision and map@r need k ≥ R (asked: {', '.join(needing)}; leave k=None to choose it "
            "automatically)"
        )
    if any(name.base == "mrr" for name in ranking):
        if custom:
            raise ConfigError(
                "metric 'mrr' finds the first relevant item in the whole ranking by label equality; with a "
                "label_comparison use mrr@K (the top K)"
            )
        if results.first_relevant_rank is None:
            raise ConfigError(
                "metric 'mrr' needs each query's first relevant item in the whole ranking: search with "
                "first_relevant=True"
            )


def _ranking_values(
    results: RetrievalResults, ranking: list[MetricName], relevance: Relevance | None, average: str
) -> tuple[dict[str, float], dict[str, dict[Label, float]]]:
    """Values (and per-class means) of the per-query and whole-results metrics of one search."""
    assert results.query_labels is not None and results.gallery_labels is not None
    class_size = (
        relevance.class_size
        if relevance is not None
        else _class_size(results.query_labels, results.gallery_labels)
    )
    _check_depth(results, ranking, class_size, relevance is not None)
    values: dict[str, float] = {}
    per_class: dict[str, dict[Label, float]] = {}
    per_query = [name for name in ranking if is_per_query(name.base)]
    if per_query:
        values, per_class = _retrieval_values(results, per_query, class_size, relevance, average)
    for name in ranking:
        if not is_per_query(name.base):
            values[name.name] = _results_value(results, name)
    return values, per_class


def _results_value(results: RetrievalResults, name: MetricName) -> float:
    fn = METRICS.get(name.base)
    out = fn(results, name.K) if name.spec.parameter else fn(results)
    try:
        return float(out)
    except (TypeError, ValueError):
        raise ConfigError(f"metric '{name.name}' must return a number, got {type(out).__name__}") from None


def _retrieval_values(
    results: RetrievalResults,
    per_query: list[MetricName],
    class_size: torch.Tensor,
    relevance: Relevance | None,
    average: str,
) -> tuple[dict[str, float], dict[str, dict[Label, float]]]:
    """Mean over the queries with R > 0 (or of the per-class means), and the mean per class, of every
    per-query metric; metrics that differ only by modifiers share one computation."""
    assert results.num_relevant is not None and results.query_labels is not None
    has_relevant = results.num_relevant > 0
    scored_classes, scored_counts = torch.unique(results.query_labels[has_relevant], return_counts=True)
    computed = list(dict.fromkeys((name.base, name.K) for name in per_query))
    class_sums = _class_sums(results, computed, class_size, scored_classes, relevance)
    scored = int(scored_counts.sum())
    values: dict[str, float] = {}
    per_class: dict[str, dict[Label, float]] = {}
    for name in per_query:
        sums = class_sums[(name.base, name.K)]
        if name.by_class or average == "class":
            means = sums / scored_counts.double()
            values[name.name] = float(means.mean()) if len(means) else math.nan
        else:
            values[name.name] = float(sums.sum() / scored) if scored else math.nan
        per_class[name.name] = _per_class_means(sums, scored_classes, scored_counts, results.label_values)
    return values, per_class


def _class_sums(
    results: RetrievalResults,
    computed: list[tuple[str, int | float | None]],
    class_size: torch.Tensor,
    scored: torch.Tensor,
    relevance: Relevance | None,
) -> dict[tuple[str, int | float | None], torch.Tensor]:
    """Per (pattern, K) of ``computed``, the sum of its per-query values over the queries with R > 0 of
    each label of ``scored`` (``torch.unique(q_lab[R > 0])``; float64, on the CPU, in that order).

    Per-query values are computed on the search's device in row blocks and summed per class at once, so
    neither the temporaries (O(block · k)) nor the result (O(classes)) grow with the number of queries."""
    dev = results.device
    assert results.num_relevant is not None
    assert results.query_labels is not None and results.gallery_labels is not None
    num_relevant, class_size = results.num_relevant.to(dev), class_size.to(dev)
    first_rank = None if results.first_relevant_rank is None else results.first_relevant_rank.to(dev)
    q_lab, g_lab = results.query_labels.to(dev), results.gallery_labels.to(dev)
    classes, class_of_query = torch.unique(q_lab, return_inverse=True)
    sums = {key: torch.zeros(len(classes), dtype=torch.float64, device=dev) for key in computed}
    n, k = results.topk_indices.shape
    rows = max(1, METRIC_BLOCK_ELEMENTS // max(k, 1))
    for start in range(0, n, rows):
        end = min(start + rows, n)
        keep = num_relevant[start:end] > 0
        idx = results.topk_indices[start:end].to(dev)[keep]
        if relevance is None:
            relevant = (idx >= 0) & (g_lab[idx.clamp_min(0)] == q_lab[start:end][keep][:, None])
        else:
            relevant = relevance.topk(torch.arange(start, end)[keep.cpu()], idx)
        ctx = RetrievalContext(
            relevant=relevant,
            num_relevant=num_relevant[start:end][keep],
            first_relevant_rank=None if first_rank is None else first_rank[start:end][keep],
            class_size=class_size[start:end][keep],
        )
        block_classes = class_of_query[start:end][keep]
        for base, K in computed:
            value = _per_query_output(base, K, METRICS.get(base)(ctx, K), len(idx), dev)
            sums[(base, K)].index_add_(0, block_classes, value)
    # Only the classes that have a scored query: searchsorted maps them into the sorted ``classes``.
    position = torch.searchsorted(classes, scored.to(dev))
    return {key: total[position].cpu() for key, total in sums.items()}


def _per_query_output(
    base: str, K: int | float | None, out: Any, rows: int, device: torch.device
) -> torch.Tensor:
    """A per-query metric's block of values as float64 ``[rows]`` on ``device``; anything else raises."""
    value = out if isinstance(out, torch.Tensor) else torch.as_tensor(np.asarray(out))
    if tuple(value.shape) != (rows,):
        name = base if K is None else f"{base} (K={K})"
        raise ConfigError(
            f"metric '{name}' must return one value per query of the block, shape ({rows},); got "
            f"{tuple(value.shape)}"
        )
    return value.to(device=device, dtype=torch.float64)


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
    results: RetrievalResults, parsed: list[MetricName], seed: int, distance: Distance
) -> tuple[dict[str, float], torch.Tensor | None]:
    """(name → value of the clustering and embedding-space metrics with ``distance``, the k-means
    clusters if made)."""
    q, q_lab = results.query_embeddings, results.query_labels
    assert q_lab is not None
    if q is None:
        raise ConfigError(
            f"metric '{parsed[0].name}' needs the query embeddings, which these results do not hold"
        )
    # The rows as the index sees them (L2-normalised for cosine): clustering, ρ and pcf see these; dists@*
    # normalise themselves for cosine (in float64) and see these rows otherwise.
    prepared = distance.prepare(q)
    values: dict[str, float] = {}
    assignments = None
    for name in parsed:
        if name.kind == "clustering":
            if assignments is None:
                num_classes = int(torch.unique(q_lab).numel())
                assignments = clustering.kmeans(prepared, num_classes, seed=seed)
            values[name.name] = METRICS.get(name.base)(q_lab, assignments)
        else:
            x = q if name.base.startswith("dists@") and distance == "cosine" else prepared
            values[name.name] = METRICS.get(name.base)(x, q_lab, distance.name, name.K)
    return values, assignments


def prepare_evaluation(
    query: torch.Tensor | np.ndarray,
    query_labels: ArrayLike,
    gallery: torch.Tensor | np.ndarray | None,
    gallery_labels: ArrayLike | None,
    parsed: Sequence[MetricName],
    *,
    query_ids: ArrayLike | None = None,
    gallery_ids: ArrayLike | None = None,
    ignore: IgnoreSpec = None,
    label_comparison: LabelComparison | None = None,
) -> tuple[search.SearchInputs, Relevance | None, torch.Tensor, Callable[[], int]]:
    """What every evaluation needs before it searches (:func:`evaluate`, and
    :func:`dmlkit.search.rerank.evaluate` with post-processing): the search inputs (encoded labels,
    exclusions), the relevance counts under a ``label_comparison`` (None: label equality), N per query
    (the class size) and a callable giving the largest number of relevant items of any query."""
    if label_comparison is None:
        inputs = search.prepare(
            query, gallery, query_labels, gallery_labels, query_ids, gallery_ids, ignore, require_queries=True
        )
        if inputs.query_labels is None or inputs.gallery_labels is None:
            raise ConfigError("evaluate needs query_labels (and gallery_labels with a gallery)")
        q_lab, g_lab, loo = inputs.query_labels, inputs.gallery_labels, inputs.leave_one_out
        return inputs, None, _class_size(q_lab, g_lab), lambda: _max_relevant_upper_bound(q_lab, g_lab, loo)
    if any(name.base == "mrr" for name in parsed):
        raise ConfigError(
            "metric 'mrr' finds the first relevant item in the whole ranking by label equality; with a "
            "label_comparison use mrr@K (the top K)"
        )
    if query_labels is None:
        raise ConfigError("evaluate needs query_labels (and gallery_labels with a gallery)")
    q_values = label_values(query_labels, "query_labels")
    g_values = None if gallery_labels is None else label_values(gallery_labels, "gallery_labels")
    q_codes, g_codes, row_names = class_codes(q_values, g_values)
    inputs = search.prepare(
        query, gallery, q_codes, g_codes, query_ids, gallery_ids, ignore, require_queries=True
    )
    if row_names is not None:
        inputs.label_values = row_names
    gallery_values = q_values if inputs.leave_one_out else g_values
    assert gallery_values is not None
    counted = Relevance.count(label_comparison, q_values, gallery_values, inputs.exclusion)

    def max_relevant() -> int:
        return int(counted.num_relevant.max()) if len(counted.num_relevant) else 0

    return inputs, counted, counted.class_size, max_relevant


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
    label_comparison: LabelComparison | None = None,
    average: Average = "query",
) -> EvaluationResults:
    """Retrieve every query's nearest gallery items and compute ``metrics``: :func:`choose_k`, then
    :func:`dmlkit.search.search` (once per distance: ``distance``, and cosine / Euclidean when ``c_`` /
    ``e_`` names ask for another one), then :func:`compute` (definitions: :mod:`dmlkit.metrics.retrieval`).

    - No ``gallery``: leave-one-out: the gallery is the query set and a query never retrieves itself,
      matched by id (``query_ids``, default positions), so a duplicate vector with another id is retrieved.
    - With a ``gallery``: ids exclude pairs only when both ``query_ids`` and ``gallery_ids`` are given
      (e.g. a gallery that contains the queries).
    - ``ignore``: ``(query_groups, gallery_groups)``, pairs with equal group are excluded; in leave-one-out
      a single group array; or a callable ``ignore(query_index[c], gallery_index[g]) -> bool[c, g]``
      (True = excluded; called per block). Excluded items are never retrieved and never relevant.
    - ``k``: neighbours kept; default: the largest depth any asked metric needs (its K, 1000/1023 for
      ``map_1000``/``map_lim``, the largest class for ``map_c``, the largest R for ``r_precision``/``map@r``,
      every retrievable item for ``fnmr@fmr=F``).
    - ``chunk_size``: queries per block (default: ≤ 2**24 scores per block); ``device``: where to search
      (default: the query's device); ``seed``: k-means seed for ``nmi``/``ami``/``f1``.
    - ``backend``: ``"torch"`` (exact, default), ``"faiss-flat"`` (exact), ``"faiss-ivf"`` or
      ``"faiss-hnsw"`` (approximate), with ``backend_options`` (see :mod:`dmlkit.search`).
    - ``label_comparison``: relevance by ``label_comparison(query_labels[:, None], gallery_labels_block) ->
      bool`` instead of label equality (PML's ``label_comparison_fn``); labels may then be rows of tags
      (2-D integer/boolean arrays). R and N are counted over every pair once (O(n_query · n_gallery) time,
      in blocks); ``mrr`` is refused (use ``mrr@K``).
    - ``average="class"``: every per-query metric is the mean over classes of its per-class means (PML's
      ``avg_of_avgs``; the ``@class`` suffix does it for one name).
    """
    names = check_options(metrics, distance, backend)
    _check_average(average)
    parsed = [parse_name(name) for name in names]
    metric = search.check_searchable(distance)
    inputs, relevance, class_size, max_relevant = prepare_evaluation(
        query, query_labels, gallery, gallery_labels, parsed,
        query_ids=query_ids, gallery_ids=gallery_ids, ignore=ignore, label_comparison=label_comparison,
    )  # fmt: skip
    assert inputs.gallery_labels is not None
    ranking: dict[str | None, list[MetricName]] = {None: []}
    for name in parsed:
        if is_retrieval(name.base):
            ranking.setdefault(_variant_key(name.variant, metric), []).append(name)
    # Names that all rank by another distance need no search by ``distance``: its results (returned, with
    # the metrics) then hold no neighbours, as a search with k = 0 would.
    skip_main = not ranking[None] and k is None and len(ranking) > 1
    searches: dict[str | None, RetrievalResults] = {}
    for variant, group in ranking.items():
        if variant is None and skip_main:
            continue
        depth = choose_depth(
            group, class_size, max_relevant, len(inputs.gallery_labels), inputs.leave_one_out, k
        )
        wants_mrr = relevance is None and any(name.base == "mrr" for name in group)
        searched_by = metric if variant is None else variant
        searches[variant] = search.run(
            inputs, depth, searched_by, backend, backend_options, device, chunk_size, wants_mrr
        )
    if skip_main:
        other = next(iter(searches.values()))
        empty = other.topk_indices[:, :0], other.topk_distances[:, :0]
        main = replace(
            other,
            topk_indices=empty[0],
            topk_distances=empty[1],
            distance=metric,
            k=0,
            first_relevant_rank=None,
        )
    else:
        main = searches.pop(None)
    variants = {name: EvaluationResults.wrap(found, relevance=relevance) for name, found in searches.items()}
    results = EvaluationResults.wrap(main, variants, relevance)
    computed = compute(results, names, seed=seed, average=average)
    assert isinstance(computed, EvaluationResults)
    return computed
