"""Which (query, gallery) pairs a search never returns, and how many items that leaves each query.

Items a query must not retrieve are *excluded*: the query itself (matched by id) and pairs rejected by
``ignore`` (equal group ids, or a callable ``ignore(query_index[c], gallery_index[g]) -> bool[c, g]``). An
excluded item never appears in the top-k and never counts as relevant.

R, the number of relevant (same-label, not excluded) gallery items per query, is counted from labels, ids
and groups (:func:`count_relevant`, by inclusion–exclusion over sorted keys, never an ``n_query × n_gallery``
comparison) rather than during the search, unless a callable ``ignore`` makes that impossible.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TypeAlias

import torch

from dmlkit.errors import ConfigError
from dmlkit.search.encoding import ArrayLike, check_length, encode_pair, is_array_like

IgnoreFn: TypeAlias = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
IgnoreSpec: TypeAlias = IgnoreFn | tuple[ArrayLike, ArrayLike] | ArrayLike | None


@dataclass
class Exclusion:
    """Which of the ``n_query × n_gallery`` (query, gallery) pairs are never retrieved.

    ``query_ids``/``gallery_ids``: pairs with equal id are excluded (the query itself).
    ``query_groups``/``gallery_groups``: pairs with equal group are excluded.
    ``fn``: ``fn(query_index[c], gallery_index[g]) -> bool[c, g]``, True = excluded.
    """

    n_query: int
    n_gallery: int
    query_ids: torch.Tensor | None = None
    gallery_ids: torch.Tensor | None = None
    query_groups: torch.Tensor | None = None
    gallery_groups: torch.Tensor | None = None
    fn: IgnoreFn | None = None
    _sorted_ids: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False, compare=False)

    @property
    def by_ids(self) -> bool:
        return self.query_ids is not None and self.gallery_ids is not None

    @property
    def by_groups(self) -> bool:
        return self.query_groups is not None and self.gallery_groups is not None

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
        """The same exclusion with its id and group tensors on ``device``."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return replace(
            self,
            query_ids=move(self.query_ids),
            gallery_ids=move(self.gallery_ids),
            query_groups=move(self.query_groups),
            gallery_groups=move(self.gallery_groups),
            _sorted_ids=None,
        )

    def take(self, start: int, end: int) -> Exclusion:
        """The exclusion of the queries ``start:end`` alone (query positions renumbered from 0)."""
        fn = self.fn
        if fn is not None:
            outer = fn

            def fn(query_index: torch.Tensor, gallery_index: torch.Tensor) -> torch.Tensor:
                return outer(query_index + start, gallery_index)

        return replace(
            self,
            n_query=max(0, min(end, self.n_query) - start),
            query_ids=None if self.query_ids is None else self.query_ids[start:end],
            query_groups=None if self.query_groups is None else self.query_groups[start:end],
            fn=fn,
            _sorted_ids=self._sorted_ids,
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
    ids: tuple[ArrayLike, ArrayLike] | None,
    ignore: IgnoreSpec,
    same_set: bool,
) -> Exclusion:
    """An :class:`Exclusion` from ``(query_ids, gallery_ids)`` (pairs with equal id excluded; None: no id
    exclusion) and
    ``ignore`` (a callable, a ``(query_groups, gallery_groups)`` pair, or — when ``same_set``, the gallery
    being the query set — a single group array), checking lengths."""
    exclusion = Exclusion(n_query, n_gallery)
    if ids is not None:
        q_ids, g_ids, _ = encode_pair(ids[0], ids[1], "query_ids", "gallery_ids")
        check_length(q_ids, n_query, "query_ids", "query")
        check_length(g_ids, n_gallery, "gallery_ids", "gallery")
        exclusion.query_ids, exclusion.gallery_ids = q_ids, g_ids
    if ignore is None:
        return exclusion
    if callable(ignore):
        exclusion.fn = ignore
        return exclusion
    if isinstance(ignore, tuple) and len(ignore) == 2 and all(is_array_like(x) for x in ignore):
        q, g, _ = encode_pair(ignore[0], ignore[1], "ignore[0] (query groups)", "ignore[1] (gallery groups)")
    elif same_set:
        q, g, _ = encode_pair(ignore, ignore, "ignore (groups)", "ignore (groups)")
    else:
        raise ConfigError(
            "ignore must be a callable, or a (query_groups, gallery_groups) pair; a single group array is "
            "only accepted in leave-one-out mode (no gallery)"
        )
    check_length(q, n_query, "ignore query groups", "query")
    check_length(g, n_gallery, "ignore gallery groups", "gallery")
    exclusion.query_groups, exclusion.gallery_groups = q, g
    return exclusion


# ---------------------------------------------------------------------------------------------------------
# Counting


def count_matches(query_keys: list[torch.Tensor], gallery_keys: list[torch.Tensor]) -> torch.Tensor:
    """For every query, the number of gallery items whose key tuple equals the query's (int64 [n_query]).

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


def _count_retrievable(
    query_keys: list[torch.Tensor], gallery_keys: list[torch.Tensor], exclusion: Exclusion, what: str
) -> torch.Tensor:
    """Per query, the gallery items matching its keys (every item when there are no keys) that are not
    excluded, by inclusion–exclusion: #K − #(K, id) − #(K, group) + #(K, id, group)."""
    if exclusion.fn is not None:
        raise ConfigError(f"counting {what} needs id/group exclusions; a callable ignore needs a pass")

    def matching(extra_q: list[torch.Tensor], extra_g: list[torch.Tensor]) -> torch.Tensor:
        qk, gk = [*query_keys, *extra_q], [*gallery_keys, *extra_g]
        if not qk:
            return torch.full((exclusion.n_query,), exclusion.n_gallery, dtype=torch.int64)
        return count_matches(qk, gk)

    total = matching([], [])
    ids = [exclusion.query_ids], [exclusion.gallery_ids]
    groups = [exclusion.query_groups], [exclusion.gallery_groups]
    if exclusion.by_ids:
        total = total - matching(*ids)  # type: ignore[arg-type]
    if exclusion.by_groups:
        total = total - matching(*groups)  # type: ignore[arg-type]
    if exclusion.by_ids and exclusion.by_groups:
        total = total + matching(ids[0] + groups[0], ids[1] + groups[1])  # type: ignore[arg-type]
    return total


def count_relevant(
    query_labels: torch.Tensor, gallery_labels: torch.Tensor, exclusion: Exclusion
) -> torch.Tensor:
    """R per query: gallery items with the query's label that are not excluded, by counting (ids and
    groups only; equal to what a pass over every pair finds)."""
    return _count_retrievable([query_labels.cpu()], [gallery_labels.cpu()], exclusion, "relevant items")


def count_excluded(exclusion: Exclusion) -> torch.Tensor:
    """Number of gallery items each query may not retrieve (ids and groups; no callable)."""
    return exclusion.n_gallery - _count_retrievable([], [], exclusion, "excluded items")
