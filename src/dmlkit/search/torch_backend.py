"""``torch``: exact, blocked k-nearest-neighbour search (CPU or GPU).

Queries are processed in chunks and the gallery in tiles (:data:`GALLERY_TILE` items, or ``k`` when the
top-k is wider; a smaller gallery is one tile), so only one ``chunk × tile`` block of scores exists at a
time and each query's running top-k is merged tile by tile: memory is O(block + n_query·k), never
O(n_query·n_gallery). Within a block the top-k is found with :func:`torch.topk`; exact ties are broken by
gallery index (lower first), whatever the chunk or tile size. (The scores themselves come from a matrix
product whose last bit can depend on the block shape BLAS is given, so values that differ by a rounding
error may rank differently across chunk sizes or devices; on continuous data the neighbours are the same
and distances agree to rounding.)

Scores are ranked in a form that costs one matrix product, asked of the :class:`~dmlkit.distances.Distance`
(its ``index_metric`` on :meth:`~dmlkit.distances.Distance.prepare`-d rows): ⟨q, g⟩ for an inner product
(``dot``, ``cosine``: rows normalised once) and 2⟨q, g⟩ − ‖g‖² (= ‖q‖² − ‖q − g‖², the same order) for a
squared L2 distance (both sides centred on the gallery mean when the data sit far from the origin); only
the k kept values are turned into the distance's units (:meth:`~dmlkit.distances.Distance.from_index`).
"""

from __future__ import annotations

import math

import torch

from dmlkit.distances import Distance
from dmlkit.search.base import REGISTRY, Neighbours, SearchInputs, SearchRequest, positive_int
from dmlkit.search.exclusion import Exclusion, count_relevant

#: Largest number of entries of one ``queries × gallery tile`` score block. 2**24 float32 scores are
#: 64 MiB; with the boolean masks and the top-k temporaries a block peaks at roughly 256 MB.
MAX_BLOCK_ELEMENTS = 2**24
#: Gallery items per tile: galleries up to this size are scored in one tile (queries × whole gallery);
#: larger ones in tiles of this width (or of ``k`` when it is wider: merging a running top-k wider than a
#: tile would cost more than scoring a wider tile), merging each query's running top-k.
GALLERY_TILE = 2**16


def topk_stable(score: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` of each row of ``score`` (larger is better), best first, ties broken by lower column index.

    :func:`torch.topk` does not specify which of several equal values it returns, so rows where the k-th
    value is tied beyond the boundary (the (k+1)-th largest equals the k-th) are re-selected: every value
    above the k-th, then the tied values in column order. The k selected entries are then ordered by
    (value descending, column ascending). A whole row (``k`` ≥ its width) is one stable descending sort.
    """
    width = score.shape[1]
    if k >= width:
        values, indices = score.sort(dim=1, descending=True, stable=True)
        return values, indices
    values, indices = torch.topk(score, k + 1, dim=1, largest=True, sorted=True)
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


class _BlockScorer:
    """Scores of query rows against a gallery tile (larger = better; excluded pairs −inf)."""

    def __init__(
        self,
        query: torch.Tensor,
        gallery: torch.Tensor,
        distance: Distance,
        exclusion: Exclusion,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.query, self.distance, self.device, self.dtype = query, distance, device, dtype
        self.similarity = distance.index_metric == "inner_product"
        g = distance.prepare(gallery.to(device, dtype))  # normalised once, instead of once per block
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
        q = self.distance.prepare(q)
        return q - self.center if self.center is not None else q

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
        self, q: torch.Tensor, values: torch.Tensor, indices: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept top-k in the distance's own units, best first.

        Inner products are the scores themselves. A squared distance is ‖q‖² − score, which loses precision
        when it is small against ‖q‖² + ‖g‖² (near-duplicates); those entries (d² < 30·√eps·(‖q‖² + ‖g‖²))
        are recomputed from the vectors, and only their rows re-sorted by (distance, index), so a duplicate
        of the query is at distance 0 and distances ascend. Elsewhere ‖q‖² − score is monotone in the score,
        so the order is unchanged.
        """
        if self.similarity:
            return self.distance.from_index(values), indices
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
        return self.distance.from_index(squared), indices


@REGISTRY.register("torch")
class TorchSearch:
    """Exact search in torch on any device: blocked scoring, O(n_query·k) memory, ties by gallery index;
    it can also rank the whole gallery for the first relevant item (``first_relevant``). No options:
    ``chunk_size`` (queries per block) and ``device`` are arguments of the search itself."""

    name = "torch"
    exact = True
    full_ranking = True

    def search(self, inputs: SearchInputs, request: SearchRequest) -> Neighbours:
        """One blocked pass over the gallery: exact top-``k`` plus, given labels, R per query.

        Blocks are ``chunk_size`` queries × one gallery tile (default: as many queries as fit in
        :data:`MAX_BLOCK_ELEMENTS` scores). ``num_relevant[q]`` = |{g : label(g) = label(q), (q, g) not
        excluded}| (counted from labels, ids and groups; during the pass only when a callable ``ignore``
        is given), and with ``first_relevant`` the 1-based rank of the best relevant item in the full
        ranking (1 + number of non-excluded items ordered before it, ties by gallery index) — exact,
        without materialising the ranking: read from the top-k when a relevant item is in it, else found
        by two more passes over those queries only.
        """
        query, gallery, exclusion, k = inputs.query, inputs.gallery, inputs.exclusion, request.k
        positive_int(request.chunk_size, "chunk_size")
        dev = request.device if request.device is not None else query.device
        dtype = torch.promote_types(query.dtype, gallery.dtype)
        n_gallery = len(gallery)
        k_found = min(k, n_gallery)
        tile = min(max(GALLERY_TILE, k_found), max(n_gallery, 1))
        chunk = request.chunk_size or max(1, min(max(len(query), 1), MAX_BLOCK_ELEMENTS // tile))
        block = _BlockScorer(query, gallery, request.distance, exclusion, dev, dtype)
        labels = None
        if inputs.query_labels is not None and inputs.gallery_labels is not None:
            labels = (inputs.query_labels.to(dev), inputs.gallery_labels.to(dev))
        count_in_pass = labels is not None and exclusion.fn is not None
        distances, indices, counted = _top_k(
            block, k, k_found, chunk, tile, labels if count_in_pass else None
        )
        if labels is None:
            return Neighbours(distances, indices, None, None)
        num_relevant = counted if counted is not None else count_relevant(*labels, exclusion).to(dev)
        first_rank = None
        if request.first_relevant:
            first_rank = _first_relevant_rank(indices, *labels, num_relevant, block, chunk, tile)
        return Neighbours(distances, indices, num_relevant, first_rank)


def _top_k(
    block: _BlockScorer,
    k: int,
    k_found: int,
    chunk: int,
    tile: int,
    labels: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(distances [nq, k], indices [nq, k], R counted in the pass when ``labels`` are given, else None)."""
    n_query, n_gallery, dev = len(block.query), len(block.gallery), block.device
    # Filled in place (a list of blocks and a torch.cat would hold the top-k twice at the end).
    distances = torch.full((n_query, k), block.distance.worst, dtype=block.dtype, device=dev)
    indices = torch.full((n_query, k), -1, dtype=torch.long, device=dev)
    counts = None if labels is None else torch.zeros(n_query, dtype=torch.long, device=dev)
    with torch.no_grad():
        for start in range(0, n_query, chunk):
            end = min(start + chunk, n_query)
            rows = torch.arange(start, end, device=dev)
            q = block.queries(rows)
            top_values = top_indices = None
            for g_start in range(0, n_gallery, tile):
                g_end = min(g_start + tile, n_gallery)
                score, excluded = block(rows, q, g_start, g_end, want_mask=counts is not None)
                if labels is not None and counts is not None:
                    relevant = labels[0][start:end, None] == labels[1][None, g_start:g_end]
                    if excluded is not None:
                        relevant &= ~excluded
                    counts[start:end] += relevant.sum(dim=1)
                    del relevant
                del excluded
                if k_found > 0:
                    values, columns = topk_stable(score, min(k_found, g_end - g_start))
                    top_values, top_indices = _merge_topk(
                        top_values, top_indices, values, columns + g_start, k_found
                    )
                del score
            if top_values is not None and top_indices is not None:
                top_indices = top_indices.masked_fill_(top_values == float("-inf"), -1)
                top_values, top_indices = block.finish(q, top_values, top_indices)
                distances[start:end, :k_found] = top_values
                indices[start:end, :k_found] = top_indices
                del top_values, top_indices
    return distances, indices, counts


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
