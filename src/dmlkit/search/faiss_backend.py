"""Optional faiss backends (CPU, float32): ``faiss-flat`` (exact), ``faiss-ivf`` and ``faiss-hnsw``
(approximate).

- ``faiss-flat``: exact brute force, ``faiss.IndexFlatIP`` (inner-product distances: cosine, dot) or
  ``faiss.IndexFlatL2`` (euclidean, squared_euclidean). Same neighbours as ``torch`` on continuous data
  (ties may be ordered differently: faiss does not promise the gallery-index tie-break).
- ``faiss-ivf``: ``faiss.IndexIVFFlat``: k-means into ``nlist`` cells, ``nprobe`` cells searched per query.
- ``faiss-hnsw``: ``faiss.IndexHNSWFlat`` (graph search, ``M`` links per node).

faiss is an optional dependency (``pip install 'dmlkit[faiss]'``), imported when a faiss backend is built;
without it a ``ConfigError`` says how to install it.

Exclusions (the query itself, ``ignore`` groups) are applied after the search: each query asks faiss for
``k + E`` neighbours, where ``E`` is the largest number of gallery items any query may not retrieve, and
the excluded ones are dropped, so the result is the top k of the retrievable items exactly as with
``torch`` (for ``faiss-flat``). A callable ``ignore`` cannot be applied this way and is rejected. R is
counted from labels, ids and groups (:func:`~dmlkit.search.exclusion.count_relevant`), so it is exact with
every backend; the rank of the first relevant item in the *full* ranking (``mrr``) is not available.
"""

from __future__ import annotations

import importlib
import math
from abc import ABC, abstractmethod
from types import ModuleType
from typing import Any, ClassVar

import numpy as np
import torch

from dmlkit.distances import Distance
from dmlkit.errors import ConfigError
from dmlkit.search.base import (
    REGISTRY,
    Neighbours,
    SearchInputs,
    SearchRequest,
    check_full_ranking,
    positive_int,
)
from dmlkit.search.exclusion import Exclusion, count_excluded, count_relevant


def import_faiss(backend: str = "faiss-flat") -> ModuleType:
    """The ``faiss`` module, or a ``ConfigError`` explaining how to install it."""
    try:
        return importlib.import_module("faiss")
    except ImportError as exc:
        raise ConfigError(
            f"backend '{backend}' needs the optional package faiss, which is not installed: "
            "pip install 'dmlkit[faiss]' (or faiss-cpu / faiss-gpu), or use backend='torch'"
        ) from exc


def _as_float32(x: torch.Tensor, distance: Distance) -> np.ndarray:
    """Rows as the index stores them: float32 on the CPU, normalised if the distance normalises."""
    return np.ascontiguousarray(distance.prepare(x.detach().to("cpu", torch.float32)).numpy())


class _FaissSearch(ABC):
    """Build a faiss index over the gallery, search it in query batches, drop excluded neighbours."""

    name: ClassVar[str] = ""
    exact: ClassVar[bool] = False
    full_ranking: ClassVar[bool] = False

    def __init__(self, batch_size: int = 16384) -> None:
        """``batch_size``: queries per faiss call (bounds faiss's temporaries)."""
        positive_int(batch_size, "backend option 'batch_size'", none_ok=False)
        self.batch_size = batch_size
        self.faiss = import_faiss(self.name)

    @abstractmethod
    def make_index(self, gallery: np.ndarray, inner_product: bool, depth: int) -> Any:
        """An empty (trained, if it needs training) index for ``gallery`` that will be asked ``depth``
        neighbours per query."""

    def _flat(self, d: int, inner_product: bool) -> Any:
        return self.faiss.IndexFlatIP(d) if inner_product else self.faiss.IndexFlatL2(d)

    def _metric(self, inner_product: bool) -> Any:
        return self.faiss.METRIC_INNER_PRODUCT if inner_product else self.faiss.METRIC_L2

    def search(self, inputs: SearchInputs, request: SearchRequest) -> Neighbours:
        """Top-``k`` of every query (on the CPU); R counted from labels/ids/groups; ``chunk_size`` is not
        used (``batch_size`` is this backend's)."""
        query, gallery, exclusion, k = inputs.query, inputs.gallery, inputs.exclusion, request.k
        distance = request.distance
        self._check(exclusion, request.first_relevant, request.device)
        n_query, n_gallery = len(query), len(gallery)
        excluded_per_query = count_excluded(exclusion)
        depth = min(n_gallery, k + (int(excluded_per_query.max()) if n_query else 0))
        distances = torch.full((n_query, k), distance.worst, dtype=torch.float32)
        indices = torch.full((n_query, k), -1, dtype=torch.int64)
        if depth > 0 and n_query > 0:
            stored = _as_float32(gallery, distance)
            index = self.make_index(stored, distance.index_metric == "inner_product", depth)
            index.add(stored)
            for start in range(0, n_query, self.batch_size):
                end = min(start + self.batch_size, n_query)
                found_d, found_i = index.search(_as_float32(query[start:end], distance), depth)
                d, i = _drop_excluded(
                    torch.from_numpy(found_d), torch.from_numpy(found_i).long(), exclusion, start, k, distance
                )
                distances[start:end, : d.shape[1]] = distance.from_index(d)
                indices[start:end, : i.shape[1]] = i
        num_relevant = None
        if inputs.query_labels is not None and inputs.gallery_labels is not None:
            num_relevant = count_relevant(inputs.query_labels, inputs.gallery_labels, exclusion)
        return Neighbours(distances, indices, num_relevant, None)

    def _check(self, exclusion: Exclusion, first_relevant: bool, device: torch.device | None) -> None:
        if device is not None and torch.device(device).type != "cpu":
            raise ConfigError(
                f"backend '{self.name}' runs on the CPU; for a GPU search use backend='torch', "
                f"device='{device}'"
            )
        if exclusion.fn is not None:
            raise ConfigError(
                f"backend '{self.name}' cannot apply a callable ignore (it would need every pair); pass "
                "groups (query_groups, gallery_groups) or use backend='torch'"
            )
        if first_relevant:
            check_full_ranking(self.name)


def _drop_excluded(
    d: torch.Tensor, i: torch.Tensor, exclusion: Exclusion, start: int, k: int, distance: Distance
) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove excluded and missing (-1) neighbours, keep the order of the rest, cut at ``k``."""
    bad = i < 0
    safe = i.clamp_min(0)
    rows = torch.arange(start, start + len(i))
    if exclusion.query_ids is not None and exclusion.gallery_ids is not None:
        bad |= exclusion.query_ids.cpu()[rows, None] == exclusion.gallery_ids.cpu()[safe]
    if exclusion.query_groups is not None and exclusion.gallery_groups is not None:
        bad |= exclusion.query_groups.cpu()[rows, None] == exclusion.gallery_groups.cpu()[safe]
    # A stable sort on the flag moves the kept neighbours to the front in their original order.
    order = torch.sort(bad.to(torch.uint8), dim=1, stable=True).indices[:, :k]
    d, i, bad = d.gather(1, order), i.gather(1, order), bad.gather(1, order)
    return d.masked_fill(bad, distance.worst), i.masked_fill(bad, -1)


@REGISTRY.register("faiss-flat")
class FaissFlat(_FaissSearch):
    """Exact brute force (``IndexFlatIP`` / ``IndexFlatL2``)."""

    name = "faiss-flat"
    exact = True

    def make_index(self, gallery: np.ndarray, inner_product: bool, depth: int) -> Any:
        return self._flat(gallery.shape[1], inner_product)


@REGISTRY.register("faiss-ivf")
class FaissIVF(_FaissSearch):
    """Approximate inverted-file search (``IndexIVFFlat``)."""

    name = "faiss-ivf"

    def __init__(
        self,
        nlist: int | None = None,
        nprobe: int | None = None,
        train_size: int | None = None,
        seed: int = 0,
        batch_size: int = 16384,
    ) -> None:
        """``nlist`` cells (default ≈ 4·√n, ≥ 39 training points per cell, faiss's guidance), ``nprobe``
        cells searched per query (default ⌈nlist / 16⌉), ``train_size`` k-means training points (default
        min(n_gallery, 64·nlist)), drawn with ``seed`` (which also seeds the k-means)."""
        for key, value in (("nlist", nlist), ("nprobe", nprobe), ("train_size", train_size)):
            positive_int(value, f"backend option '{key}'")
        super().__init__(batch_size)
        self.nlist, self.nprobe, self.train_size, self.seed = nlist, nprobe, train_size, seed

    def make_index(self, gallery: np.ndarray, inner_product: bool, depth: int) -> Any:
        n, d = gallery.shape
        nlist = min(self.nlist or max(1, min(round(4 * math.sqrt(n)), n // 39)), n)
        nprobe = min(self.nprobe or max(1, math.ceil(nlist / 16)), nlist)
        index = self.faiss.IndexIVFFlat(self._flat(d, inner_product), d, nlist, self._metric(inner_product))
        index.cp.seed = int(self.seed) % (2**31)
        n_train = min(self.train_size or min(n, 64 * nlist), n)
        sample = gallery
        if n_train < n:
            rng = np.random.default_rng(self.seed)
            sample = gallery[np.sort(rng.choice(n, n_train, replace=False))]
        index.train(np.ascontiguousarray(sample))
        index.nprobe = nprobe
        return index


@REGISTRY.register("faiss-hnsw")
class FaissHNSW(_FaissSearch):
    """Approximate graph search (``IndexHNSWFlat``)."""

    name = "faiss-hnsw"

    def __init__(
        self, M: int = 32, ef_construction: int = 80, ef_search: int | None = None, batch_size: int = 16384
    ) -> None:
        """``M`` links per node, ``ef_construction`` (build) and ``ef_search`` (query; default 128, at
        least the number of neighbours asked) candidate-list sizes."""
        for key, value in (("M", M), ("ef_construction", ef_construction), ("ef_search", ef_search)):
            positive_int(value, f"backend option '{key}'")
        super().__init__(batch_size)
        self.M, self.ef_construction, self.ef_search = M, ef_construction, ef_search

    def make_index(self, gallery: np.ndarray, inner_product: bool, depth: int) -> Any:
        index = self.faiss.IndexHNSWFlat(gallery.shape[1], self.M, self._metric(inner_product))
        index.hnsw.efConstruction = self.ef_construction
        index.hnsw.efSearch = max(self.ef_search or 128, depth)
        return index
