"""Exact, chunked k-nearest-neighbour search in torch.

The query side is processed in chunks so that only one ``chunk × n_gallery`` block of scores exists at a
time: memory is O(chunk·n_gallery + n_query·k), never O(n_query·n_gallery). Within a block the top-k is
found with :func:`torch.topk`; exact ties are broken by gallery index (lower first), whatever the chunk
size or top-k implementation. (The scores themselves come from a matrix product whose last bit can depend on
the block shape BLAS is given, so values that differ by a rounding error may rank differently across chunk
sizes or devices; on continuous data the neighbours are the same and distances agree to rounding.)

Items a query must not retrieve are *excluded*: the query itself (matched by id, see ``exclude_self_ids``)
and pairs rejected by ``ignore`` (equal group ids, or a callable). An excluded item never appears in the
top-k and never counts as relevant. When fewer than ``k`` gallery items remain for a query, the missing
slots hold index ``-1`` and distance ``+inf`` (``-inf`` for similarities).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np
import torch
import torch.nn.functional as F

from dmlkit.distances import check_distance, is_similarity, pairwise
from dmlkit.errors import ConfigError, DataError

ArrayLike: TypeAlias = torch.Tensor | np.ndarray | Sequence[Any]
IgnoreFn: TypeAlias = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
IgnoreSpec: TypeAlias = IgnoreFn | tuple[ArrayLike, ArrayLike] | ArrayLike | None

#: Largest number of entries of one ``chunk × n_gallery`` score block. 2**24 float32 scores are 64 MiB;
#: with the boolean masks and the top-k temporaries a block peaks at roughly 256 MB.
MAX_BLOCK_ELEMENTS = 2**24


# ---------------------------------------------------------------------------------------------------------
# Input conversion
# ---------------------------------------------------------------------------------------------------------


def as_embeddings(x: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    """``x`` as a detached 2-D floating-point tensor (float16/bfloat16 are widened to float32)."""
    if isinstance(x, np.ndarray):
        if x.dtype.kind != "f":
            raise DataError(f"{name} must hold floating-point embeddings, got numpy dtype {x.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(x))
    elif isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        raise DataError(f"{name} must be a torch tensor or numpy array (n × d), got {type(x).__name__}")
    if not t.is_floating_point():
        raise DataError(f"{name} must hold floating-point embeddings, got dtype {t.dtype}")
    if t.ndim != 2:
        raise DataError(f"{name} must be 2-D (n × d), got shape {tuple(t.shape)}")
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    if t.numel() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).any(dim=1).sum())
        raise DataError(f"{name} has {bad} row(s) with NaN or infinite values")
    return t


def encode_values(values: ArrayLike, name: str) -> tuple[torch.Tensor | None, np.ndarray | None]:
    """Split ``values`` (labels, ids, groups) into int64 values *or* an array of strings.

    Returns ``(int64 tensor, None)`` for integer input and ``(None, str array)`` for string input.
    Floating-point input is rejected: labels are never cast from or to float.
    """
    if isinstance(values, torch.Tensor):
        if values.ndim != 1:
            raise DataError(f"{name} must be 1-D, got shape {tuple(values.shape)}")
        if values.is_floating_point() or values.is_complex():
            raise DataError(f"{name} must be integers or strings, got dtype {values.dtype}")
        return values.detach().to("cpu", torch.int64), None
    array = values if isinstance(values, np.ndarray) else np.asarray(list(values))
    if array.ndim != 1:
        raise DataError(f"{name} must be 1-D, got shape {array.shape}")
    if array.size == 0:
        return torch.zeros(0, dtype=torch.int64), None
    if array.dtype.kind in "iub":
        if array.dtype.kind == "u" and array.size and int(array.max()) > np.iinfo(np.int64).max:
            raise DataError(f"{name} has values above the int64 range")
        return torch.from_numpy(array.astype(np.int64)), None
    if array.dtype.kind == "U":
        return None, array
    if array.dtype.kind == "O" and all(isinstance(v, str) for v in array):
        return None, array.astype(str)
    if array.dtype.kind == "O" and all(isinstance(v, int | np.integer) for v in array):
        return torch.from_numpy(array.astype(np.int64)), None
    raise DataError(f"{name} must be integers or strings, got dtype {array.dtype}")


def encode_pair(
    a: ArrayLike, b: ArrayLike, name_a: str, name_b: str
) -> tuple[torch.Tensor, torch.Tensor, list[str] | None]:
    """Encode two value arrays on a shared int64 code space.

    Integer values are their own codes. Strings are mapped to their index in the sorted union of both
    arrays, which is returned as the vocabulary (``None`` for integers).
    """
    ia, sa = encode_values(a, name_a)
    ib, sb = encode_values(b, name_b)
    # An empty array has no type of its own: it takes the other one's.
    if ia is not None and len(ia) == 0 and sb is not None:
        ia, sa = None, np.zeros(0, dtype=str)
    if ib is not None and len(ib) == 0 and sa is not None:
        ib, sb = None, np.zeros(0, dtype=str)
    if ia is not None and ib is not None:
        return ia, ib, None
    if sa is not None and sb is not None:
        vocabulary = np.unique(np.concatenate([sa, sb]))
        codes_a = torch.from_numpy(np.searchsorted(vocabulary, sa).astype(np.int64))
        codes_b = torch.from_numpy(np.searchsorted(vocabulary, sb).astype(np.int64))
        return codes_a, codes_b, [str(v) for v in vocabulary]
    raise DataError(f"{name_a} and {name_b} must both be integers or both be strings")


def _is_array_like(x: object) -> bool:
    return isinstance(x, torch.Tensor | np.ndarray | list | tuple)


# ---------------------------------------------------------------------------------------------------------
# Exclusion of (query, gallery) pairs
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Exclusion:
    """Which (query, gallery) pairs are never retrieved.

    ``query_ids``/``gallery_ids``: pairs with equal id are excluded (the query itself).
    ``query_groups``/``gallery_groups``: pairs with equal group are excluded.
    ``fn``: ``fn(query_index[c], gallery_index[n_gallery]) -> bool[c, n_gallery]``, True = excluded.
    """

    query_ids: torch.Tensor | None = None
    gallery_ids: torch.Tensor | None = None
    query_groups: torch.Tensor | None = None
    gallery_groups: torch.Tensor | None = None
    fn: IgnoreFn | None = None

    def to(self, device: torch.device) -> Exclusion:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return Exclusion(
            move(self.query_ids),
            move(self.gallery_ids),
            move(self.query_groups),
            move(self.gallery_groups),
            self.fn,
        )

    def mask(self, start: int, end: int, n_gallery: int, device: torch.device) -> torch.Tensor | None:
        """Boolean ``(end − start) × n_gallery`` block, True where excluded; None when nothing is."""
        mask: torch.Tensor | None = None
        if self.query_ids is not None and self.gallery_ids is not None:
            mask = self.query_ids[start:end, None] == self.gallery_ids[None, :]
        if self.query_groups is not None and self.gallery_groups is not None:
            same_group = self.query_groups[start:end, None] == self.gallery_groups[None, :]
            mask = same_group if mask is None else mask | same_group
        if self.fn is not None:
            query_index = torch.arange(start, end, device=device)
            gallery_index = torch.arange(n_gallery, device=device)
            custom = torch.as_tensor(self.fn(query_index, gallery_index), device=device)
            if custom.dtype != torch.bool or custom.shape != (end - start, n_gallery):
                raise ConfigError(
                    f"ignore callable must return a bool tensor of shape {(end - start, n_gallery)}, "
                    f"got {custom.dtype} {tuple(custom.shape)}"
                )
            mask = custom if mask is None else mask | custom
        return mask


def build_exclusion(
    n_query: int,
    n_gallery: int,
    *,
    exclude_self_ids: bool | tuple[ArrayLike, ArrayLike] | None,
    ignore: IgnoreSpec,
    same_set: bool,
) -> Exclusion:
    """Parse ``exclude_self_ids`` and ``ignore`` into an :class:`Exclusion` (checking lengths).

    ``same_set``: the gallery is the query set (leave-one-out), so a single group array is allowed.
    """
    exclusion = Exclusion()
    if exclude_self_ids is True:
        exclusion.query_ids = torch.arange(n_query)
        exclusion.gallery_ids = torch.arange(n_gallery)
    elif exclude_self_ids is not None and exclude_self_ids is not False:
        if not (isinstance(exclude_self_ids, tuple) and len(exclude_self_ids) == 2):
            raise ConfigError("exclude_self_ids must be True or a (query_ids, gallery_ids) pair")
        q, g, _ = encode_pair(*exclude_self_ids, "query_ids", "gallery_ids")
        _check_length(q, n_query, "query_ids", "query")
        _check_length(g, n_gallery, "gallery_ids", "gallery")
        exclusion.query_ids, exclusion.gallery_ids = q, g
    if ignore is None:
        return exclusion
    if callable(ignore):
        exclusion.fn = ignore
        return exclusion
    if isinstance(ignore, tuple) and len(ignore) == 2 and all(_is_array_like(x) for x in ignore):
        q, g, _ = encode_pair(ignore[0], ignore[1], "ignore[0] (query groups)", "ignore[1] (gallery groups)")
    elif same_set:
        q, g, _ = encode_pair(ignore, ignore, "ignore (groups)", "ignore (groups)")
    else:
        raise ConfigError(
            "ignore must be a callable, or a (query_groups, gallery_groups) pair; a single group array is "
            "only accepted in leave-one-out mode (no gallery)"
        )
    _check_length(q, n_query, "ignore query groups", "query")
    _check_length(g, n_gallery, "ignore gallery groups", "gallery")
    exclusion.query_groups, exclusion.gallery_groups = q, g
    return exclusion


def _check_length(values: torch.Tensor, n: int, name: str, of: str) -> None:
    if len(values) != n:
        raise DataError(f"{name} has {len(values)} entries but {of} has {n} rows")


# ---------------------------------------------------------------------------------------------------------
# Counting gallery items by key, without a pass over (query, gallery) pairs
# ---------------------------------------------------------------------------------------------------------


def count_matches(query_keys: Sequence[torch.Tensor], gallery_keys: Sequence[torch.Tensor]) -> torch.Tensor:
    """For every query row, the number of gallery rows whose key tuple equals the query's.

    ``query_keys``/``gallery_keys`` are parallel lists of int64 columns (e.g. ``[labels]`` or ``[labels,
    ids]``). O((n_query + n_gallery) log(n_query + n_gallery)): the tuples are densified column by column
    with :func:`torch.unique`, so no ``n_query × n_gallery`` comparison is made and nothing overflows.
    """
    if len(query_keys) != len(gallery_keys) or not query_keys:
        raise ValueError("count_matches needs the same (non-zero) number of query and gallery key columns")
    n_query = len(query_keys[0])
    code: torch.Tensor | None = None
    for qk, gk in zip(query_keys, gallery_keys, strict=True):
        column = torch.unique(torch.cat([qk.cpu(), gk.cpu()]), return_inverse=True)[1]
        # Both codes are < n_query + n_gallery, so the mixed-radix key stays far below 2**63.
        code = column if code is None else code * (int(column.max()) + 1) + column
        code = torch.unique(code, return_inverse=True)[1]
    assert code is not None
    counts = torch.bincount(code[n_query:], minlength=int(code.max()) + 1 if len(code) else 0)
    return counts[code[:n_query]]


def count_relevant(
    query_labels: torch.Tensor, gallery_labels: torch.Tensor, exclusion: Exclusion
) -> torch.Tensor:
    """R per query: gallery items with the query's label that are not excluded, by counting.

    Equal to :func:`search`'s ``num_relevant`` whenever the exclusion holds no callable (ids and groups
    only), by inclusion–exclusion: R = #L − #(L, id) − #(L, group) + #(L, id, group).
    """
    if exclusion.fn is not None:
        raise ConfigError("counting relevant items needs id/group exclusions; a callable ignore needs a pass")
    ql, gl = query_labels.cpu(), gallery_labels.cpu()
    total = count_matches([ql], [gl])
    ids = exclusion.query_ids is not None and exclusion.gallery_ids is not None
    groups = exclusion.query_groups is not None and exclusion.gallery_groups is not None
    if ids:
        assert exclusion.query_ids is not None and exclusion.gallery_ids is not None
        total = total - count_matches([ql, exclusion.query_ids], [gl, exclusion.gallery_ids])
    if groups:
        assert exclusion.query_groups is not None and exclusion.gallery_groups is not None
        total = total - count_matches([ql, exclusion.query_groups], [gl, exclusion.gallery_groups])
    if ids and groups:
        assert exclusion.query_ids is not None and exclusion.gallery_ids is not None
        assert exclusion.query_groups is not None and exclusion.gallery_groups is not None
        total = total + count_matches(
            [ql, exclusion.query_ids, exclusion.query_groups],
            [gl, exclusion.gallery_ids, exclusion.gallery_groups],
        )
    return total


def count_excluded(n_query: int, exclusion: Exclusion) -> torch.Tensor:
    """Number of gallery items each query may not retrieve (ids and groups; no callable)."""
    if exclusion.fn is not None:
        raise ConfigError("counting excluded items needs id/group exclusions; a callable ignore needs a pass")
    total = torch.zeros(n_query, dtype=torch.int64)
    ids = exclusion.query_ids is not None and exclusion.gallery_ids is not None
    groups = exclusion.query_groups is not None and exclusion.gallery_groups is not None
    if ids:
        assert exclusion.query_ids is not None and exclusion.gallery_ids is not None
        total = total + count_matches([exclusion.query_ids], [exclusion.gallery_ids])
    if groups:
        assert exclusion.query_groups is not None and exclusion.gallery_groups is not None
        total = total + count_matches([exclusion.query_groups], [exclusion.gallery_groups])
    if ids and groups:
        assert exclusion.query_ids is not None and exclusion.gallery_ids is not None
        assert exclusion.query_groups is not None and exclusion.gallery_groups is not None
        total = total - count_matches(
            [exclusion.query_ids, exclusion.query_groups], [exclusion.gallery_ids, exclusion.gallery_groups]
        )
    return total


# ---------------------------------------------------------------------------------------------------------
# Search
# ---------------------------------------------------------------------------------------------------------


@dataclass
class SearchOutput:
    """Result of :func:`search`; ``num_relevant``/``first_relevant_rank`` only when labels were given."""

    distances: torch.Tensor  # [nq, k] in the distance's own units, best first
    indices: torch.Tensor  # [nq, k] int64 gallery positions, -1 for empty slots
    num_relevant: torch.Tensor | None  # [nq] int64: non-excluded gallery items with the query's label
    first_relevant_rank: torch.Tensor | None  # [nq] int64, 1-based rank of the best relevant item; 0 if none


def topk_stable(score: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` of each row of ``score`` (larger is better), best first, ties broken by lower column index.

    :func:`torch.topk` does not specify which of several equal values it returns, so rows where the k-th
    value is tied beyond the boundary are re-selected: every value above the k-th, then the tied values in
    column order. The k selected entries are then ordered by (value descending, column ascending).
    """
    values, indices = torch.topk(score, k, dim=1, largest=True, sorted=True)
    kth = values[:, -1:]
    straddling = (score >= kth).sum(dim=1) > k
    if bool(straddling.any()):
        rows = straddling.nonzero().squeeze(1)
        sub, sub_kth = score[rows], kth[rows]
        above = sub > sub_kth
        tied = sub == sub_kth
        room = k - above.sum(dim=1, keepdim=True)
        take = above | (tied & (tied.cumsum(dim=1, dtype=torch.int32) <= room))
        # Every row of ``take`` has exactly k True entries, so nonzero() (row-major) reshapes cleanly.
        indices[rows] = take.nonzero()[:, 1].view(len(rows), k)
    indices, _ = indices.sort(dim=1)
    values = score.gather(1, indices)
    values, order = values.sort(dim=1, descending=True, stable=True)
    return values, indices.gather(1, order)


def auto_chunk_size(n_query: int, n_gallery: int) -> int:
    """Queries per block so that one block holds at most :data:`MAX_BLOCK_ELEMENTS` scores."""
    return max(1, min(max(n_query, 1), MAX_BLOCK_ELEMENTS // max(n_gallery, 1)))


def search(
    query: torch.Tensor,
    gallery: torch.Tensor,
    k: int,
    distance: str,
    exclusion: Exclusion,
    *,
    query_labels: torch.Tensor | None = None,
    gallery_labels: torch.Tensor | None = None,
    first_relevant: bool = False,
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
) -> SearchOutput:
    """One chunked pass over the gallery: exact top-``k`` plus, given labels, per-query relevance counts.

    ``num_relevant[q]`` = |{g : label(g) = label(q), (q, g) not excluded}|, and with ``first_relevant``
    the 1-based rank of the best relevant item in the full ranking (1 + number of non-excluded items
    ordered before it, ties by gallery index) — exact, without materialising the ranking.
    """
    check_distance(distance)
    if k < 0:
        raise ConfigError(f"k must be ≥ 0, got {k}")
    if query.shape[1] != gallery.shape[1]:
        raise DataError(
            f"query and gallery dimensions differ: {query.shape[1]} vs {gallery.shape[1]} (columns)"
        )
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ConfigError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    dev = torch.device(device) if device is not None else query.device
    dtype = torch.promote_types(query.dtype, gallery.dtype)
    n_query, n_gallery = len(query), len(gallery)
    k_found = min(k, n_gallery)
    with_labels = query_labels is not None and gallery_labels is not None
    chunk = chunk_size or auto_chunk_size(n_query, n_gallery)

    similarity = is_similarity(distance)
    mode = distance
    g = gallery.to(dev, dtype)
    if distance == "cosine":
        # Normalise once instead of once per chunk; cosine is then the dot product.
        g, mode = F.normalize(g, dim=1), "dot"
    exclusion = exclusion.to(dev)
    if with_labels:
        assert query_labels is not None and gallery_labels is not None
        q_lab, g_lab = query_labels.to(dev), gallery_labels.to(dev)
    gallery_index = torch.arange(n_gallery, device=dev)

    values_out, indices_out, relevant_out, rank_out = [], [], [], []
    with torch.no_grad():
        for start in range(0, n_query, chunk):
            end = min(start + chunk, n_query)
            q = query[start:end].to(dev, dtype)
            if distance == "cosine":
                q = F.normalize(q, dim=1)
            score = pairwise(q, g, mode)
            if not similarity:
                score = score.neg_()
            excluded = exclusion.mask(start, end, n_gallery, dev)
            if excluded is not None:
                score = score.masked_fill_(excluded, float("-inf"))
            if with_labels:
                relevant = q_lab[start:end, None] == g_lab[None, :]
                if excluded is not None:
                    relevant &= ~excluded
                del excluded
                count = relevant.sum(dim=1)
                relevant_out.append(count)
                if first_relevant:
                    rank_out.append(_first_relevant_rank(score, relevant, count, gallery_index))
                del relevant
            if k_found > 0:
                values, indices = topk_stable(score, k_found)
                indices = indices.masked_fill_(values == float("-inf"), -1)
                values_out.append(values)
                indices_out.append(indices)
            del score

    distances = torch.cat(values_out) if values_out else torch.zeros(n_query, 0, dtype=dtype, device=dev)
    indices = torch.cat(indices_out) if indices_out else torch.zeros(n_query, 0, dtype=torch.long, device=dev)
    if k > k_found:
        pad = k - k_found
        distances = torch.cat([distances, distances.new_full((n_query, pad), float("-inf"))], dim=1)
        indices = torch.cat([indices, indices.new_full((n_query, pad), -1)], dim=1)
    if not similarity:
        distances = distances.neg()
    num_relevant = torch.cat(relevant_out) if with_labels and relevant_out else None
    if with_labels and num_relevant is None:
        num_relevant = torch.zeros(n_query, dtype=torch.long, device=dev)
    first_rank = None
    if with_labels and first_relevant:
        first_rank = torch.cat(rank_out) if rank_out else torch.zeros(n_query, dtype=torch.long, device=dev)
    return SearchOutput(distances, indices, num_relevant, first_rank)


def _first_relevant_rank(
    score: torch.Tensor, relevant: torch.Tensor, count: torch.Tensor, gallery_index: torch.Tensor
) -> torch.Tensor:
    """1-based rank of the best relevant column of each row under (score desc, index asc); 0 if none."""
    best = score.masked_fill(~relevant, float("-inf")).max(dim=1, keepdim=True).values
    # argmax returns the first maximal position: the lowest-index relevant item with the best score.
    best_index = (relevant & (score == best)).to(torch.uint8).argmax(dim=1, keepdim=True)
    # Excluded columns hold -inf and a relevant score is finite, so they never count as "before".
    before = (score > best) | ((score == best) & (gallery_index < best_index))
    rank = before.sum(dim=1) + 1
    return torch.where(count > 0, rank, torch.zeros_like(rank))


def knn(
    query: torch.Tensor | np.ndarray,
    gallery: torch.Tensor | np.ndarray,
    k: int,
    distance: str = "cosine",
    *,
    exclude_self_ids: bool | tuple[ArrayLike, ArrayLike] | None = None,
    ignore: IgnoreSpec = None,
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
    backend: str = "torch",
    backend_options: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """k nearest gallery rows of every query row: ``(distances [nq, k], indices [nq, k])``.

    ``distances`` are in the units of ``distance`` (``dmlkit.distances.pairwise``): a similarity for
    ``cosine``/``dot`` (sorted descending), a distance for ``euclidean``/``squared_euclidean`` (sorted
    ascending). Ties are broken by gallery index. Slots beyond the number of non-excluded gallery items
    hold index ``-1`` and distance ``+inf`` (``-inf`` for similarities).

    ``exclude_self_ids``: ``True`` when query row i *is* gallery row i (exclude by position), or a
    ``(query_ids, gallery_ids)`` pair: pairs with equal ids are never returned.
    ``ignore``: ``(query_groups, gallery_groups)`` (pairs with equal group are never returned), a single
    group array when ``exclude_self_ids is True`` (same set), or a callable
    ``ignore(query_index[c], gallery_index[n_gallery]) -> bool[c, n_gallery]`` (True = excluded).
    ``chunk_size``: queries per block (default: blocks of at most :data:`MAX_BLOCK_ELEMENTS` scores).
    Outputs live on ``device`` (default: the query's device).
    ``backend``: ``"torch"`` (exact, this module) or ``"faiss-flat"`` (exact), ``"faiss-ivf"``,
    ``"faiss-hnsw"`` (approximate), see :mod:`dmlkit.metrics.faiss_backend`; faiss results are on the CPU.
    """
    q = as_embeddings(query, "query")
    g = as_embeddings(gallery, "gallery")
    if len(g) == 0:
        raise DataError("gallery is empty: there is nothing to search")
    if not isinstance(k, int) or k < 1:
        raise ConfigError(f"k must be a positive integer, got {k!r}")
    exclusion = build_exclusion(
        len(q), len(g), exclude_self_ids=exclude_self_ids, ignore=ignore, same_set=exclude_self_ids is True
    )
    from dmlkit.metrics import faiss_backend

    faiss_backend.check_backend(backend)
    if backend == "torch":
        out = search(q, g, k, distance, exclusion, chunk_size=chunk_size, device=device)
    else:
        out = faiss_backend.search(q, g, k, distance, exclusion, backend=backend, options=backend_options)
    return out.distances, out.indices
