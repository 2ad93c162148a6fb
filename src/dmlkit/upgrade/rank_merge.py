"""Search a partly backfilled gallery: the old-space part with an old-space query, the new-space part with a
new-space query, and merge the two rankings by distance (*distance rank merge*).

While a gallery is re-embedded by a new model ("backfilled"), item ``g`` is stored either as
``φ_old(g)`` (not yet backfilled) or ``φ_new(g)`` (backfilled). Without a compatible new model, the two
spaces cannot be compared with one query, so each part is searched in its own space and the two top-k
lists are merged by their distances (Seo et al., "Online Backfilling with No Regret for Large-Scale Image
Retrieval", CVPR 2023, §3.1: distance rank merge)::

    d(q, g) = d_old(q_old, φ_old(g))  if g is not backfilled      (q_old = φ_old(q), or ρ(φ_new(q)))
            = d_new(q_new, φ_new(g))  if g is backfilled           (q_new = φ_new(q))

    top-k(q) = the k smallest d(q, ·) (largest for a similarity), ties by lower gallery position

The top-k of the union is inside the union of the two parts' top-k, so the merge only ever holds
``n_query × 2k`` candidates: memory is O(n_query · k) (plus the search's own blocks), never
O(n_query · n_gallery).

:func:`mixed_gallery` builds the single mixed gallery that methods without a merge search (new-naive,
BCT), which needs both spaces to share a dimension.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from dmlkit import distances, search
from dmlkit.distances import DistanceLike
from dmlkit.errors import ConfigError, DataError
from dmlkit.search.encoding import ArrayLike, check_length, encode_pair
from dmlkit.search.results import RetrievalResults

__all__ = ["merge_topk", "merged_search", "mixed_gallery"]

#: Sort key of an empty slot's index: after every real gallery position.
_EMPTY_LAST = torch.iinfo(torch.int64).max


def merge_topk(
    distances_a: torch.Tensor,
    indices_a: torch.Tensor,
    distances_b: torch.Tensor,
    indices_b: torch.Tensor,
    k: int,
    distance: DistanceLike,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two per-query top lists (``[nq, ka]`` and ``[nq, kb]``, global gallery indices, ``-1`` =
    empty slot) into one top-``k``: ``(distances [nq, k], indices [nq, k])``.

    Order: best distance first (descending for a similarity, ascending for a distance), ties broken by the
    smaller gallery index (the ``torch`` search backend's rule), empty slots last (index ``-1``, distance
    ``distance.worst``); padded with empty slots when ``ka + kb < k``. Vectorised over queries: the
    ``nq × (ka + kb)`` candidates are sorted by index, then stably by distance — a lexicographic
    (distance, index) sort in O(nq · (ka + kb)) memory.
    """
    metric = distances.resolve(distance)
    if not isinstance(k, int) or k < 0:
        raise ConfigError(f"k must be a non-negative integer, got {k!r}")
    if len(distances_a) != len(distances_b):
        raise DataError(
            f"the two top lists have different numbers of queries: {len(distances_a)} vs {len(distances_b)}"
        )
    dtype = torch.promote_types(distances_a.dtype, distances_b.dtype)
    values = torch.cat([distances_a.to(dtype), distances_b.to(dtype)], dim=1)
    index = torch.cat([indices_a.long(), indices_b.long()], dim=1)
    empty = index < 0
    # One ascending key whatever the distance: a similarity is negated; an empty slot sorts after every
    # real candidate, even one at the worst value.
    key = (-values if metric.is_similarity else values).masked_fill(empty, float("inf"))
    by_index = index.masked_fill(empty, _EMPTY_LAST).argsort(dim=1, stable=True)
    by_key = key.gather(1, by_index).argsort(dim=1, stable=True)
    order = by_index.gather(1, by_key)[:, :k]
    out_values = values.gather(1, order)
    out_index = index.gather(1, order)
    missing = k - out_index.shape[1]
    if missing > 0:
        out_values = torch.cat([out_values, out_values.new_full((len(out_values), missing), metric.worst)], 1)
        out_index = torch.cat([out_index, out_index.new_full((len(out_index), missing), -1)], 1)
    out_empty = out_index < 0
    return out_values.masked_fill(out_empty, metric.worst), out_index


def mixed_gallery(
    gallery_old: torch.Tensor, gallery_new: torch.Tensor, backfilled: torch.Tensor
) -> torch.Tensor:
    """The gallery as stored mid-backfill: row ``g`` is ``gallery_new[g]`` where ``backfilled[g]``, else
    ``gallery_old[g]`` — one gallery, searched with one query (new-naive, BCT), so both spaces need the
    same dimension."""
    mask = _backfilled_mask(backfilled, len(gallery_old))
    if gallery_old.ndim != 2 or gallery_new.ndim != 2:
        raise DataError(
            f"galleries must be 2-D, got gallery_old {tuple(gallery_old.shape)}, "
            f"gallery_new {tuple(gallery_new.shape)}"
        )
    if gallery_old.shape[1] != gallery_new.shape[1]:
        raise ConfigError(
            f"a mixed gallery needs old and new embeddings of one dimension: gallery_old has "
            f"{gallery_old.shape[1]}, gallery_new {gallery_new.shape[1]} (use a rank merge instead)"
        )
    check_length(gallery_new, len(gallery_old), "gallery_new", "gallery_old")
    dtype = torch.promote_types(gallery_old.dtype, gallery_new.dtype)
    return torch.where(mask[:, None].to(gallery_old.device), gallery_new.to(dtype), gallery_old.to(dtype))


def _backfilled_mask(backfilled: torch.Tensor | np.ndarray, n_gallery: int | None) -> torch.Tensor:
    """``backfilled`` as a 1-D bool tensor on the CPU (of length ``n_gallery`` when given)."""
    mask = torch.as_tensor(backfilled)
    if mask.dtype != torch.bool or mask.ndim != 1:
        raise DataError(
            f"backfilled must be a 1-D bool tensor, got {mask.dtype} of shape {tuple(mask.shape)}"
        )
    if n_gallery is not None:
        check_length(mask, n_gallery, "backfilled", "gallery")
    return mask.cpu()


def merged_search(
    query_old: torch.Tensor | None,
    query_new: torch.Tensor | None,
    gallery_old: torch.Tensor | None,
    gallery_new: torch.Tensor | None,
    backfilled: torch.Tensor,
    *,
    k: int,
    distance: DistanceLike = "cosine",
    query_labels: ArrayLike | None = None,
    gallery_labels: ArrayLike | None = None,
    leave_one_out: bool = False,
    backend: str = "torch",
    backend_options: Mapping[str, Any] | None = None,
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
) -> RetrievalResults:
    """Top-``k`` of every query in a partly backfilled gallery (distance rank merge, see the module).

    - ``backfilled`` (bool ``[n_gallery]``): True where the item is already re-embedded (new space).
    - ``gallery_old`` ``[n_gallery, d_old]`` (rows of backfilled items ignored) is searched with
      ``query_old`` (``φ_old(q)``, or ``ρ(φ_new(q))`` mapped into the old space); ``gallery_new``
      ``[n_gallery, d_new]`` (rows of items not backfilled ignored) with ``query_new``. A part with no item
      (nothing or everything backfilled) needs neither its query nor its gallery (``None``).
    - ``leave_one_out``: the queries *are* the gallery items (query ``i`` = gallery item ``i``): query ``i``
      never retrieves item ``i`` (excluded by equal ids), ``gallery_labels`` is not given (the query labels
      are the gallery's).
    - Each part is searched by :func:`dmlkit.search.run` with ``backend`` (any: ``torch``, ``faiss-flat``,
      ``faiss-ivf``, ``faiss-hnsw``) on its subset only; its indices are mapped back to global gallery
      positions and the two lists merged by :func:`merge_topk`.

    Returns a :class:`~dmlkit.search.RetrievalResults` over the whole gallery: global positions, merged
    distances, the labels and ids of the whole gallery, R = R_old part + R_new part (that of the whole
    gallery), ready for :func:`dmlkit.metrics.compute`. Its ``query_embeddings`` are the query of the part
    that holds the whole gallery, ``None`` when both parts are used (no single query space).
    """
    if not isinstance(k, int) or k < 0:
        raise ConfigError(f"k must be a non-negative integer, got {k!r}")
    metric = search.check_searchable(distance)
    mask = _backfilled_mask(backfilled, None)
    n_gallery = len(mask)
    if n_gallery == 0:
        raise DataError("gallery is empty: there is nothing to retrieve")
    parts = {"old": (~mask, query_old, gallery_old), "new": (mask, query_new, gallery_new)}
    n_query = _query_count(parts, leave_one_out, n_gallery)
    q_codes, g_codes, label_values = _labels(query_labels, gallery_labels, leave_one_out, n_query, n_gallery)
    tops: list[tuple[torch.Tensor, torch.Tensor]] = []
    relevant: list[torch.Tensor] = []
    search_device = None
    for name, (members, query, gallery) in parts.items():
        positions = members.nonzero().squeeze(1)
        if len(positions) == 0:
            continue
        assert query is not None
        if gallery is None:
            raise ConfigError(
                f"gallery_{name} is needed: {len(positions)} gallery item(s) are in the {name} space"
            )
        if len(gallery) != n_gallery:
            raise DataError(f"gallery_{name} has {len(gallery)} rows, backfilled has {n_gallery}")
        inputs = search.prepare(
            query,
            gallery[positions.to(gallery.device)],
            q_codes,
            None if g_codes is None else g_codes[positions],
            torch.arange(n_query) if leave_one_out else None,
            positions if leave_one_out else None,
        )
        found = search.run(
            inputs, min(k, len(positions)), metric, backend, backend_options, device, chunk_size
        )
        hits = found.topk_indices
        tops.append((found.topk_distances, torch.where(hits >= 0, positions[hits.clamp_min(0)], hits)))
        if found.num_relevant is not None:
            relevant.append(found.num_relevant)
        search_device = found.device
    if len(tops) == 1:  # one part holds the whole gallery: merge with an empty list (pads to k)
        tops.append((tops[0][0][:, :0], tops[0][1][:, :0]))
    (d_a, i_a), (d_b, i_b) = tops
    top_distances, top_indices = merge_topk(d_a, i_a, d_b, i_b, k, metric)
    whole = [q for members, q, _ in parts.values() if bool(members.all())]
    return RetrievalResults(
        topk_indices=top_indices,
        topk_distances=top_distances,
        distance=metric,
        query_ids=torch.arange(n_query),
        gallery_ids=torch.arange(n_gallery),
        query_labels=q_codes,
        gallery_labels=g_codes,
        num_relevant=None if q_codes is None else torch.stack(relevant).sum(dim=0),
        k=k,
        leave_one_out=leave_one_out,
        label_values=label_values,
        backend=backend,
        device=search_device if search_device is not None else torch.device("cpu"),
        query_embeddings=search.as_embeddings(whole[0], "query") if whole else None,
    )


def _query_count(
    parts: dict[str, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]],
    leave_one_out: bool,
    n_gallery: int,
) -> int:
    """The number of queries, checking that every part with gallery items has a query and that the
    queries agree in number (and equal the gallery in leave-one-out)."""
    counts = {}
    for name, (members, query, _) in parts.items():
        if query is not None:
            counts[f"query_{name}"] = len(query)
        elif bool(members.any()):
            raise ConfigError(
                f"query_{name} is needed: {int(members.sum())} gallery item(s) are in the {name} space"
            )
    if len(set(counts.values())) > 1:
        raise DataError(f"the queries differ in number: {counts}")
    n_query = next(iter(counts.values()))
    if leave_one_out and n_query != n_gallery:
        raise DataError(
            f"leave-one-out needs one query per gallery item: {n_query} queries, {n_gallery} gallery items"
        )
    return n_query


def _labels(
    query_labels: ArrayLike | None,
    gallery_labels: ArrayLike | None,
    leave_one_out: bool,
    n_query: int,
    n_gallery: int,
) -> tuple[torch.Tensor | None, torch.Tensor | None, list[str] | None]:
    """Label codes of the queries and of the whole gallery, encoded once (so string labels keep one
    vocabulary across the two parts' searches)."""
    if leave_one_out:
        if gallery_labels is not None:
            raise ConfigError(
                "gallery_labels were given in leave-one-out mode (the query labels are the gallery's)"
            )
        if query_labels is None:
            return None, None, None
        q_codes, _, values = encode_pair(query_labels, query_labels, "query_labels", "query_labels")
        check_length(q_codes, n_query, "query_labels", "query")
        return q_codes, q_codes, values
    if (query_labels is None) != (gallery_labels is None):
        raise ConfigError("give both query_labels and gallery_labels, or neither")
    if query_labels is None or gallery_labels is None:
        return None, None, None
    q_codes, g_codes, values = encode_pair(query_labels, gallery_labels, "query_labels", "gallery_labels")
    check_length(q_codes, n_query, "query_labels", "query")
    check_length(g_codes, n_gallery, "gallery_labels", "gallery")
    return q_codes, g_codes, values
