"""The one search entry point: validate and encode the inputs once (:func:`prepare`), search with a
registered backend (:func:`run`), return a :class:`~dmlkit.search.results.RetrievalResults`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from dmlkit import distances
from dmlkit.distances import Distance, DistanceLike
from dmlkit.errors import ConfigError, DataError
from dmlkit.search import base
from dmlkit.search.base import SearchInputs, SearchRequest
from dmlkit.search.encoding import ArrayLike, as_embeddings, check_length, encode_pair
from dmlkit.search.exclusion import IgnoreSpec, build_exclusion
from dmlkit.search.results import RetrievalResults


def check_searchable(distance: DistanceLike) -> Distance:
    """``distance`` as an object (a name is built), or a ``ConfigError`` when no index can rank by it."""
    resolved = distances.resolve(distance)
    if resolved.index_metric is None:
        raise ConfigError(
            f"distance '{resolved}' cannot be searched (no inner-product or L2 form to rank by); "
            f"use one of {', '.join(distances.available(indexable=True))}"
        )
    return resolved


def prepare(
    query: torch.Tensor | np.ndarray,
    gallery: torch.Tensor | np.ndarray | None = None,
    query_labels: ArrayLike | None = None,
    gallery_labels: ArrayLike | None = None,
    query_ids: ArrayLike | None = None,
    gallery_ids: ArrayLike | None = None,
    ignore: IgnoreSpec = None,
    *,
    same_set: bool | None = None,
    require_queries: bool = False,
) -> SearchInputs:
    """Check and encode the inputs of a search.

    - No ``gallery``: leave-one-out: the gallery is the query set and a query never retrieves itself,
      matched by id (``query_ids``, default positions), so a duplicate vector with another id is retrieved.
    - With a ``gallery``: ids exclude pairs only when both ``query_ids`` and ``gallery_ids`` are given.
    - ``ignore``: ``(query_groups, gallery_groups)``; in leave-one-out (or ``same_set``) a single group
      array; or a callable ``ignore(query_index[c], gallery_index[g]) -> bool[c, g]`` (True = excluded).
    - Labels and ids are integers or strings (strings are coded by their sorted vocabulary).
    - ``require_queries``: an empty query set is an error (for an evaluation) rather than an empty result.
    """
    q = as_embeddings(query, "query")
    if require_queries and len(q) == 0:
        raise DataError("query is empty: there is nothing to evaluate")
    leave_one_out = gallery is None
    if leave_one_out:
        if gallery_labels is not None or gallery_ids is not None:
            raise ConfigError("gallery_labels/gallery_ids were given without a gallery (leave-one-out mode)")
        g = q
    else:
        if query_labels is not None and gallery_labels is None:
            raise ConfigError("gallery was given without gallery_labels")
        if gallery_labels is not None and query_labels is None:
            raise ConfigError("gallery_labels were given without query_labels")
        g = as_embeddings(gallery, "gallery")  # type: ignore[arg-type]
    if len(g) == 0:
        raise DataError("gallery is empty: there is nothing to retrieve")
    if q.shape[1] != g.shape[1]:
        raise DataError(f"query and gallery dimensions differ: {q.shape[1]} vs {g.shape[1]}")
    q_lab = g_lab = label_values = None
    if query_labels is not None:
        other = query_labels if leave_one_out else gallery_labels
        q_lab, g_lab, label_values = encode_pair(query_labels, other, "query_labels", "gallery_labels")  # type: ignore[arg-type]
        check_length(q_lab, len(q), "query_labels", "query")
        check_length(g_lab, len(g), "gallery_labels", "gallery")
    inputs = _identities(q, g, query_ids, gallery_ids, ignore, leave_one_out, same_set)
    inputs.query_labels, inputs.gallery_labels, inputs.label_values = q_lab, g_lab, label_values
    return inputs


def _identities(
    q: torch.Tensor,
    g: torch.Tensor,
    query_ids: ArrayLike | None,
    gallery_ids: ArrayLike | None,
    ignore: IgnoreSpec,
    leave_one_out: bool,
    same_set: bool | None,
) -> SearchInputs:
    """Inputs with id codes and the exclusion (labels still unset)."""
    n_query, n_gallery = len(q), len(g)
    vocabulary = None
    if leave_one_out:
        if query_ids is None:
            q_ids = g_ids = torch.arange(n_query)
        else:
            q_ids, _, vocabulary = encode_pair(query_ids, query_ids, "query_ids", "query_ids")
            check_length(q_ids, n_query, "query_ids", "query")
            g_ids = q_ids
        exclude_ids = True
    elif query_ids is None and gallery_ids is None:
        q_ids, g_ids, exclude_ids = torch.arange(n_query), torch.arange(n_gallery), False
    elif query_ids is None or gallery_ids is None:
        raise ConfigError("pass both query_ids and gallery_ids (or neither) when a gallery is given")
    else:
        q_ids, g_ids, vocabulary = encode_pair(query_ids, gallery_ids, "query_ids", "gallery_ids")
        exclude_ids = True
    exclusion = build_exclusion(
        n_query,
        n_gallery,
        ids=(q_ids, g_ids) if exclude_ids else None,
        ignore=ignore,
        same_set=leave_one_out if same_set is None else same_set,
    )
    return SearchInputs(q, g, q_ids, g_ids, exclusion, leave_one_out, id_values=vocabulary)


def run(
    inputs: SearchInputs,
    k: int,
    distance: DistanceLike = "cosine",
    backend: str = "torch",
    backend_options: Mapping[str, Any] | None = None,
    device: torch.device | str | None = None,
    chunk_size: int | None = None,
    first_relevant: bool = False,
) -> RetrievalResults:
    """Search ``inputs`` for the top ``k`` with ``backend`` (built with ``backend_options``); the other
    arguments as in :func:`search`."""
    if not isinstance(k, int) or k < 0:
        raise ConfigError(f"k must be a non-negative integer, got {k!r}")
    metric = check_searchable(distance)
    searcher = base.build(backend, **dict(backend_options or {}))
    if first_relevant:
        if inputs.query_labels is None:
            raise ConfigError("first_relevant needs labels (query_labels, and gallery_labels with a gallery)")
        base.check_full_ranking(backend)
    dev = torch.device(device) if device is not None else inputs.query.device
    found = searcher.search(inputs, SearchRequest(k, metric, first_relevant, chunk_size, dev))
    return RetrievalResults(
        topk_indices=found.indices.cpu(),
        topk_distances=found.distances.cpu(),
        distance=metric,
        query_ids=inputs.query_ids,
        gallery_ids=inputs.gallery_ids,
        query_labels=inputs.query_labels,
        gallery_labels=inputs.gallery_labels,
        num_relevant=None if found.num_relevant is None else found.num_relevant.cpu(),
        first_relevant_rank=None if found.first_relevant_rank is None else found.first_relevant_rank.cpu(),
        k=k,
        leave_one_out=inputs.leave_one_out,
        label_values=inputs.label_values,
        id_values=inputs.id_values,
        backend=backend,
        device=found.indices.device,
        query_embeddings=inputs.query,
    )


def search(
    query: torch.Tensor | np.ndarray,
    gallery: torch.Tensor | np.ndarray | None = None,
    *,
    k: int,
    distance: DistanceLike = "cosine",
    query_labels: ArrayLike | None = None,
    gallery_labels: ArrayLike | None = None,
    query_ids: ArrayLike | None = None,
    gallery_ids: ArrayLike | None = None,
    ignore: IgnoreSpec = None,
    backend: str = "torch",
    backend_options: Mapping[str, Any] | None = None,
    device: torch.device | str | None = None,
    chunk_size: int | None = None,
    first_relevant: bool = False,
) -> RetrievalResults:
    """The ``k`` nearest gallery rows of every query row, as a :class:`RetrievalResults` with no metric
    values yet (:func:`dmlkit.metrics.compute` adds them).

    Inputs as in :func:`prepare` (no ``gallery``: leave-one-out). ``distance``: a registered name or a
    :class:`~dmlkit.distances.Distance` that an index can rank by (not ``snr``). ``backend``: a name of
    :func:`dmlkit.search.available` (``torch`` exact, default; ``faiss-flat`` exact; ``faiss-ivf``,
    ``faiss-hnsw`` approximate) with ``backend_options``. ``device``: where to search (default: the query's;
    faiss backends run on the CPU); ``chunk_size``: queries per block of the torch search. With labels, R
    is counted; ``first_relevant`` also finds each query's first relevant item in the full ranking
    (``torch`` only). Ties are broken by gallery index (``torch``); empty slots hold index ``-1`` and
    ``distance.worst``.
    """
    inputs = prepare(query, gallery, query_labels, gallery_labels, query_ids, gallery_ids, ignore)
    return run(inputs, k, distance, backend, backend_options, device, chunk_size, first_relevant)


def knn(
    query: torch.Tensor | np.ndarray,
    gallery: torch.Tensor | np.ndarray,
    k: int,
    distance: DistanceLike = "cosine",
    *,
    exclude_self_ids: bool | tuple[ArrayLike, ArrayLike] | None = None,
    ignore: IgnoreSpec = None,
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
    backend: str = "torch",
    backend_options: Mapping[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """k nearest gallery rows of every query row: ``(distances [nq, k], indices [nq, k])`` — the top-k of
    :func:`search`, for callers that want the tensors alone, on the device the search ran on (``device``,
    default the query's; the CPU for faiss backends).

    ``exclude_self_ids``: ``True`` when query row i *is* gallery row i (exclude by position; ``ignore`` may
    then be a single group array), or a ``(query_ids, gallery_ids)`` pair: pairs with equal ids are never
    returned. Other arguments as in :func:`search`.
    """
    ids: tuple[ArrayLike | None, ArrayLike | None] = (None, None)
    if exclude_self_ids is True:
        sizes = [len(x) if isinstance(x, torch.Tensor | np.ndarray) else 0 for x in (query, gallery)]
        ids = (torch.arange(sizes[0]), torch.arange(sizes[1]))
    elif exclude_self_ids is not None and exclude_self_ids is not False:
        if not (isinstance(exclude_self_ids, tuple) and len(exclude_self_ids) == 2):
            raise ConfigError("exclude_self_ids must be True or a (query_ids, gallery_ids) pair")
        ids = exclude_self_ids
    inputs = prepare(
        query, gallery, query_ids=ids[0], gallery_ids=ids[1], ignore=ignore, same_set=exclude_self_ids is True
    )
    if not isinstance(k, int) or k < 1:
        raise ConfigError(f"k must be a positive integer, got {k!r}")
    found = run(inputs, k, distance, backend, backend_options, device, chunk_size)
    return found.topk_distances.to(found.device), found.topk_indices.to(found.device)
