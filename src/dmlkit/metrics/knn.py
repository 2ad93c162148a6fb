"""Exact, blocked k-nearest-neighbour search in torch.

Queries are processed in chunks and the gallery in tiles (:data:`GALLERY_TILE` items; a smaller gallery is
one tile), so only one ``chunk × tile`` block of scores exists at a time and each query's running top-k is
merged tile by tile: memory is O(block + n_query·k), never O(n_query·n_gallery). Within a block the top-k is
found with :func:`torch.topk`; exact ties are broken by gallery index (lower first), whatever the chunk or
tile size. (The scores themselves come from a matrix product whose last bit can depend on the block shape
BLAS is given, so values that differ by a rounding error may rank differently across chunk sizes or
devices; on continuous data the neighbours are the same and distances agree to rounding.)

Items a query must not retrieve are *excluded*: the query itself (matched by id, see ``exclude_self_ids``)
and pairs rejected by ``ignore`` (equal group ids, or a callable). An excluded item never appears in the
top-k and never counts as relevant. When fewer than ``k`` gallery items remain for a query, the missing
slots hold index ``-1`` and distance ``+inf`` (``-inf`` for similarities).

R, the number of relevant (same-label, not excluded) gallery items per query, is counted from labels, ids
and groups (:func:`count_relevant`) rather than during the pass, unless a callable ``ignore`` makes that
impossible.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import numpy as np
import torch
import torch.nn.functional as F

from dmlkit.distances import check_distance, is_similarity
from dmlkit.errors import ConfigError, DataError

ArrayLike: TypeAlias = torch.Tensor | np.ndarray | Sequence[Any]
IgnoreFn: TypeAlias = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
IgnoreSpec: TypeAlias = IgnoreFn | tuple[ArrayLike, ArrayLike] | ArrayLike | None

#: Largest number of entries of one ``queries × gallery tile`` score block. 2**24 float32 scores are
#: 64 MiB; with the boolean masks and the top-k temporaries a block peaks at roughly 256 MB.
MAX_BLOCK_ELEMENTS = 2**24
#: Gallery items per tile: galleries up to this size are scored in one tile (queries × whole gallery);
#: larger ones in tiles of this width, merging each query's running top-k (256 × 65,536 blocks).
GALLERY_TILE = 2**16


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
    ``fn``: ``fn(query_index[c], gallery_index[g]) -> bool[c, g]``, True = excluded.
    """

    query_ids: torch.Tensor | None = None
    gallery_ids: torch.Tensor | None = None
    query_groups: torch.Tensor | None = None
    gallery_groups: torch.Tensor | None = None
    fn: IgnoreFn | None = None
    _sorted_ids: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False, compare=False)

    def id_pairs(
        self, query_index: torch.Tensor, g_start: int, g_end: int
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(row in ``query_index``, column in ``g_start:g_end``) of every pair with equal ids, or None
        without ids. Such pairs are sparse (usually the query itself), so they are found by binary search
        in the sorted gallery ids instead of an equality mask over the block."""
        if self.query_ids is None or self.gallery_ids is None:
            return None
        if self._sorted_ids is None:
            self._sorted_ids = torch.sort(self.gallery_ids)
        ordered, order = self._sorted_ids
        ids = self.query_ids[query_index]
        low = torch.searchsorted(ordered, ids)
        counts = torch.searchsorted(ordered, ids, right=True) - low
        rows = torch.repeat_interleave(torch.arange(len(ids), device=ids.device), counts)
        offsets = torch.arange(len(rows), device=ids.device) - torch.repeat_interleave(
            counts.cumsum(0) - counts, counts
        )
        columns = order[torch.repeat_interleave(low, counts) + offsets]
        inside = (columns >= g_start) & (columns < g_end)
        return rows[inside], columns[inside] - g_start

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

    def mask(
        self, query_index: torch.Tensor, g_start: int, g_end: int, device: torch.device, ids: bool = True
    ) -> torch.Tensor | None:
        """Boolean ``len(query_index) × (g_end − g_start)`` block of the queries ``query_index`` (int64
        positions) against gallery items ``g_start:g_end``, True where excluded; None when nothing is.
        ``ids=False`` leaves the id exclusion out (the caller applies it another way)."""
        mask: torch.Tensor | None = None
        if ids and self.query_ids is not None and self.gallery_ids is not None:
            mask = self.query_ids[query_index, None] == self.gallery_ids[None, g_start:g_end]
        if self.query_groups is not None and self.gallery_groups is not None:
            same_group = self.query_groups[query_index, None] == self.gallery_groups[None, g_start:g_end]
            mask = same_group if mask is None else mask | same_group
        if self.fn is not None:
            gallery_index = torch.arange(g_start, g_end, device=device)
            custom = torch.as_tensor(self.fn(query_index, gallery_index), device=device)
            shape = (len(query_index), g_end - g_start)
            if custom.dtype != torch.bool or custom.shape != shape:
                raise ConfigError(
                    f"ignore callable must return a bool tensor of shape {shape}, "
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
    value is tied beyond the boundary (the (k+1)-th largest equals the k-th) are re-selected: every value
    above the k-th, then the tied values in column order. The k selected entries are then ordered by
    (value descending, column ascending).
    """
    width = score.shape[1]
    values, indices = torch.topk(score, min(k + 1, width), dim=1, largest=True, sorted=True)
    if width > k:
        # Asking for one more than k finds the rows whose boundary is tied without a pass over the row.
        straddling = values[:, k] == values[:, k - 1]
        values, indices = values[:, :k], indices[:, :k]
        if bool(straddling.any()):
            rows = straddling.nonzero().squeeze(1)
            sub, sub_kth = score[rows], values[rows, -1:]
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
    """Queries per block so that one block (queries × one gallery tile) holds at most
    :data:`MAX_BLOCK_ELEMENTS` scores."""
    tile = min(max(n_gallery, 1), GALLERY_TILE)
    return max(1, min(max(n_query, 1), MAX_BLOCK_ELEMENTS // tile))


def _merge_topk(
    values: torch.Tensor | None,
    indices: torch.Tensor | None,
    new_values: torch.Tensor,
    new_indices: torch.Tensor,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of the union of a running top-k and a tile's top-k, order (value desc, index asc).

    The running entries come from earlier tiles, so they have lower gallery indices: placing them first
    makes :func:`topk_stable`'s column tie-break the gallery-index tie-break.
    """
    if values is None or indices is None:
        return new_values, new_indices
    both_values = torch.cat([values, new_values], dim=1)
    both_indices = torch.cat([indices, new_indices], dim=1)
    top_values, columns = topk_stable(both_values, min(k, both_values.shape[1]))
    return top_values, both_indices.gather(1, columns)


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
    gallery_tile: int | None = None,
) -> SearchOutput:
    """One blocked pass over the gallery: exact top-``k`` plus, given labels, per-query relevance counts.

    Blocks are ``chunk_size`` queries × ``gallery_tile`` gallery items (default: the whole gallery up to
    :data:`GALLERY_TILE` items, and as many queries as fit in :data:`MAX_BLOCK_ELEMENTS` scores); with
    several tiles the running top-k of each query is merged tile by tile, so memory stays
    O(block + n_query · k) and a large gallery is streamed through wide, BLAS-friendly blocks.

    Scores are ranked in a form that costs one matrix product: ⟨q, g⟩ for ``dot``/``cosine`` (rows
    normalised once) and 2⟨q, g⟩ − ‖g‖² for ``euclidean``/``squared_euclidean`` (= ‖q‖² − ‖q − g‖²: the
    same order; both sides centred on the gallery mean when the data sit far from the origin); only the k
    kept values are turned into distances.

    ``num_relevant[q]`` = |{g : label(g) = label(q), (q, g) not excluded}| (counted from labels, ids and
    groups; during the pass only when a callable ``ignore`` is given), and with ``first_relevant`` the
    1-based rank of the best relevant item in the full ranking (1 + number of non-excluded items ordered
    before it, ties by gallery index) — exact, without materialising the ranking: read from the top-k when
    a relevant item is in it, else found by two more passes over those queries only.
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
    if gallery_tile is not None and (not isinstance(gallery_tile, int) or gallery_tile < 1):
        raise ConfigError(f"gallery_tile must be a positive integer or None, got {gallery_tile!r}")
    dev = torch.device(device) if device is not None else query.device
    dtype = torch.promote_types(query.dtype, gallery.dtype)
    n_query, n_gallery = len(query), len(gallery)
    k_found = min(k, n_gallery)
    with_labels = query_labels is not None and gallery_labels is not None
    tile = min(gallery_tile or GALLERY_TILE, max(n_gallery, 1))
    chunk = chunk_size or max(1, min(max(n_query, 1), MAX_BLOCK_ELEMENTS // tile))
    block = _BlockScorer(query, gallery, distance, exclusion, dev, dtype)
    count_in_pass = with_labels and exclusion.fn is not None
    q_lab = g_lab = None
    if with_labels:
        assert query_labels is not None and gallery_labels is not None
        q_lab, g_lab = query_labels.to(dev), gallery_labels.to(dev)

    # Filled in place (a list of blocks and a torch.cat would hold the top-k twice at the end).
    empty = float("-inf") if is_similarity(distance) else float("inf")
    distances = torch.full((n_query, k), empty, dtype=dtype, device=dev)
    indices = torch.full((n_query, k), -1, dtype=torch.long, device=dev)
    relevant_out = []
    with torch.no_grad():
        for start in range(0, n_query, chunk):
            end = min(start + chunk, n_query)
            rows = torch.arange(start, end, device=dev)
            q = block.queries(rows)
            top_values = top_indices = None
            count = torch.zeros(end - start, dtype=torch.long, device=dev)
            for g_start in range(0, n_gallery, tile):
                g_end = min(g_start + tile, n_gallery)
                score, excluded = block(rows, q, g_start, g_end, want_mask=count_in_pass)
                if count_in_pass:
                    assert q_lab is not None and g_lab is not None
                    relevant = q_lab[start:end, None] == g_lab[None, g_start:g_end]
                    if excluded is not None:
                        relevant &= ~excluded
                    count += relevant.sum(dim=1)
                    del relevant
                del excluded
                if k_found > 0:
                    values, columns = topk_stable(score, min(k_found, g_end - g_start))
                    top_values, top_indices = _merge_topk(
                        top_values, top_indices, values, columns + g_start, k_found
                    )
                del score
            if count_in_pass:
                relevant_out.append(count)
            if k_found > 0:
                assert top_values is not None and top_indices is not None
                top_indices = top_indices.masked_fill_(top_values == float("-inf"), -1)
                top_values, top_indices = block.finish(rows, q, top_values, top_indices)
                distances[start:end, :k_found] = top_values
                indices[start:end, :k_found] = top_indices
                del top_values, top_indices

    num_relevant = None
    if with_labels:
        assert q_lab is not None and g_lab is not None
        if count_in_pass:
            num_relevant = torch.cat(relevant_out) if relevant_out else torch.zeros(0, dtype=torch.long)
            num_relevant = num_relevant.to(dev)
        else:
            num_relevant = count_relevant(q_lab, g_lab, exclusion).to(dev)
    first_rank = None
    if with_labels and first_relevant:
        assert num_relevant is not None and q_lab is not None and g_lab is not None
        first_rank = _first_relevant_rank(indices, q_lab, g_lab, num_relevant, block, chunk, tile)
    return SearchOutput(distances, indices, num_relevant, first_rank)


class _BlockScorer:
    """Scores of query rows against a gallery tile (larger = better; excluded pairs −inf)."""

    def __init__(
        self,
        query: torch.Tensor,
        gallery: torch.Tensor,
        distance: str,
        exclusion: Exclusion,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.query, self.distance, self.device, self.dtype = query, distance, device, dtype
        self.similarity = is_similarity(distance)
        g = gallery.to(device, dtype)
        if distance == "cosine":
            g = F.normalize(g, dim=1)  # once, instead of once per block
        self.center: torch.Tensor | None = None
        if not self.similarity and len(g):
            # Distances do not change under translation, but the rounding error of ‖q‖² − 2⟨q, g⟩ + ‖g‖²
            # grows with ‖g‖²: when the data sit far from the origin (offset larger than spread), centre
            # both sides on the gallery mean. (Data near the origin, e.g. small integers, are left as is.)
            total = torch.zeros(g.shape[1], dtype=torch.float64, device=device)
            square = torch.zeros((), dtype=torch.float64, device=device)
            for a in range(0, len(g), 65536):
                part = g[a : a + 65536].double()
                total += part.sum(dim=0)
                square += part.pow(2).sum()
            mean = total / len(g)
            offset = float(mean.pow(2).sum())
            if offset > float(square / len(g)) - offset:
                self.center = mean.to(dtype)
                g = g - self.center
        self.gallery = g
        self.gallery_sq = None if self.similarity else g.pow(2).sum(dim=1)
        self.exclusion = exclusion.to(device)

    def queries(self, rows: torch.Tensor) -> torch.Tensor:
        q = self.query[rows.cpu() if self.query.device.type == "cpu" else rows].to(self.device, self.dtype)
        if self.center is not None:
            q = q - self.center
        return F.normalize(q, dim=1) if self.distance == "cosine" else q

    def __call__(
        self, rows: torch.Tensor, q: torch.Tensor, g_start: int, g_end: int, want_mask: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(scores, exclusion mask or None); ``want_mask=False`` may skip building the mask."""
        tile = self.gallery[g_start:g_end].T
        if self.similarity:
            score = q @ tile
        else:
            # 2⟨q, g⟩ − ‖g‖² = ‖q‖² − ‖q − g‖²: ordered like −distance, in one fused product.
            assert self.gallery_sq is not None
            score = torch.addmm(-self.gallery_sq[None, g_start:g_end], q, tile, alpha=2)
        excluded = self.exclusion.mask(rows, g_start, g_end, self.device, ids=False)
        if excluded is not None:
            score = score.masked_fill_(excluded, float("-inf"))
        pairs = self.exclusion.id_pairs(rows, g_start, g_end)
        if pairs is not None:
            score[pairs] = float("-inf")
            if want_mask:
                if excluded is None:
                    excluded = torch.zeros_like(score, dtype=torch.bool)
                excluded[pairs] = True
        return score, excluded

    def finish(
        self, rows: torch.Tensor, q: torch.Tensor, values: torch.Tensor, indices: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept top-k in the distance's own units, best first.

        Similarities are the scores themselves. A squared distance is ‖q‖² − score, which loses precision
        when it is small against ‖q‖² + ‖g‖² (near-duplicates); those entries (d² < 30·√eps·(‖q‖² + ‖g‖²))
        are recomputed from the vectors, and only their rows re-sorted by (distance, index), so a duplicate
        of the query is at distance 0 and distances ascend. Elsewhere ‖q‖² − score is monotone in the score,
        so the order is unchanged.
        """
        if self.similarity:
            return values, indices
        assert self.gallery_sq is not None
        valid = indices >= 0
        safe = indices.clamp_min(0)
        q_sq = q.pow(2).sum(dim=1, keepdim=True)
        squared = (q_sq - values).clamp_min_(0)  # +inf in empty slots (score −inf)
        tolerance = 30 * math.sqrt(torch.finfo(squared.dtype).eps)
        imprecise = valid & (squared < tolerance * (q_sq + self.gallery_sq[safe]))
        if bool(imprecise.any()):
            r, c = imprecise.nonzero(as_tuple=True)
            part = max(1, MAX_BLOCK_ELEMENTS // 4 // max(q.shape[1], 1))
            for a in range(0, len(r), part):
                ra, ca = r[a : a + part], c[a : a + part]
                squared[ra, ca] = (q[ra] - self.gallery[safe[ra, ca]]).pow(2).sum(dim=1)
            changed = torch.unique(r)
            sub_d, sub_i = squared[changed], indices[changed]
            by_index = torch.where(sub_i < 0, len(self.gallery), sub_i).argsort(dim=1)
            sub_d, sub_i = sub_d.gather(1, by_index), sub_i.gather(1, by_index)
            order = sub_d.argsort(dim=1, stable=True)
            squared[changed], indices[changed] = sub_d.gather(1, order), sub_i.gather(1, order)
        return (squared if self.distance == "squared_euclidean" else squared.sqrt_()), indices


def _first_relevant_rank(
    indices: torch.Tensor,
    q_lab: torch.Tensor,
    g_lab: torch.Tensor,
    num_relevant: torch.Tensor,
    block: _BlockScorer,
    chunk: int,
    tile: int,
) -> torch.Tensor:
    """1-based rank of the best relevant item under (score desc, index asc); 0 for queries with R = 0.

    The top-k is an exact prefix of the ranking, so a relevant item in it is the first one. For the other
    queries with R > 0, one pass finds the best relevant item (score s*, lowest index i* among equals) and
    a second counts the items ordered before it: 1 + |{j : s_j > s*} ∪ {j : s_j = s*, j < i*}| (excluded
    items score −inf and never count). Both passes score the same blocks, so s* is compared bit for bit.
    """
    dev = indices.device
    n_gallery = len(g_lab)
    rank = torch.zeros_like(num_relevant)
    in_top = torch.zeros_like(num_relevant, dtype=torch.bool)
    if indices.shape[1] > 0:
        step = max(1, MAX_BLOCK_ELEMENTS // 4 // indices.shape[1])  # row blocks: no n_query × k temporaries
        for a in range(0, len(indices), step):
            idx = indices[a : a + step]
            relevant_top = (idx >= 0) & (g_lab[idx.clamp_min(0)] == q_lab[a : a + step, None])
            found = relevant_top.any(dim=1)
            in_top[a : a + step] = found
            first = relevant_top.to(torch.uint8).argmax(dim=1) + 1
            rank[a : a + step] = torch.where(found, first, rank[a : a + step])
    pending = ((num_relevant > 0) & ~in_top).nonzero().squeeze(1)
    with torch.no_grad():
        for part in range(0, len(pending), chunk):
            rows = pending[part : part + chunk]
            q = block.queries(rows)
            best = torch.full((len(rows), 1), float("-inf"), dtype=block.dtype, device=dev)
            best_index = torch.full((len(rows), 1), n_gallery, dtype=torch.long, device=dev)
            for g_start in range(0, n_gallery, tile):
                g_end = min(g_start + tile, n_gallery)
                score, excluded = block(rows, q, g_start, g_end)
                relevant = q_lab[rows, None] == g_lab[None, g_start:g_end]
                if excluded is not None:
                    relevant &= ~excluded
                tile_best = score.masked_fill(~relevant, float("-inf")).max(dim=1, keepdim=True).values
                first = (relevant & (score == tile_best)).to(torch.uint8).argmax(dim=1, keepdim=True)
                # Tiles come in index order: a later tile wins only with a strictly larger score.
                better = tile_best > best
                best = torch.where(better, tile_best, best)
                best_index = torch.where(better, first + g_start, best_index)
            before = torch.zeros(len(rows), dtype=torch.long, device=dev)
            for g_start in range(0, n_gallery, tile):
                g_end = min(g_start + tile, n_gallery)
                score, _ = block(rows, q, g_start, g_end, want_mask=False)
                columns = torch.arange(g_start, g_end, device=dev)[None, :]
                before += ((score > best) | ((score == best) & (columns < best_index))).sum(dim=1)
            rank[rows] = before + 1
    return rank


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
    ``ignore(query_index[c], gallery_index[g]) -> bool[c, g]`` (True = excluded).
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
        out = faiss_backend.search(
            q, g, k, distance, exclusion, backend=backend, options=backend_options, device=device
        )
    return out.distances, out.indices
