"""Optional faiss search backends for :func:`dmlkit.metrics.evaluate` and :func:`dmlkit.metrics.knn`.

``backend`` names (``BACKENDS``):

- ``"torch"``: the exact chunked search of :mod:`dmlkit.metrics.knn` (default; CPU or GPU).
- ``"faiss-flat"``: exact brute force, ``faiss.IndexFlatIP`` (cosine, dot) or ``faiss.IndexFlatL2``
  (euclidean, squared_euclidean). Same neighbours as ``"torch"`` on continuous data (ties may be ordered
  differently: faiss does not promise the gallery-index tie-break).
- ``"faiss-ivf"``: approximate, ``faiss.IndexIVFFlat``: k-means into ``nlist`` cells, ``nprobe`` cells
  searched per query.
- ``"faiss-hnsw"``: approximate, ``faiss.IndexHNSWFlat`` (graph search, ``M`` links per node).

faiss is an optional dependency (``pip install 'dmlkit[faiss]'``), imported only when a faiss backend is
asked for; without it a ``ConfigError`` says how to install it. faiss computes in float32 on the CPU.

Exclusions (the query itself, ``ignore`` groups) are applied after the search: each query asks faiss for
``k + E`` neighbours, where ``E`` is the largest number of gallery items any query may not retrieve, and
the excluded ones are dropped, so the result is the top k of the retrievable items exactly as with
``"torch"`` (for ``"faiss-flat"``). A callable ``ignore`` cannot be applied this way and is rejected.
R (the number of relevant items per query) is obtained by counting labels, ids and groups
(:func:`dmlkit.metrics.knn.count_relevant`), not from the search, so it is exact with every backend;
the rank of the first relevant item in the *full* ranking (``mrr``) is not available (use ``mrr@K``).
"""

from __future__ import annotations

import importlib
import math
from types import ModuleType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dmlkit.distances import check_distance, is_similarity
from dmlkit.errors import ConfigError, UnknownNameError, unknown_name_message
from dmlkit.metrics.knn import Exclusion, SearchOutput, count_excluded, count_relevant

BACKENDS: tuple[str, ...] = ("torch", "faiss-flat", "faiss-ivf", "faiss-hnsw")
FAISS_BACKENDS: tuple[str, ...] = ("faiss-flat", "faiss-ivf", "faiss-hnsw")

#: Options each faiss backend accepts (``backend_options``) and their defaults (None: chosen from the data).
#: ``batch_size``: queries per faiss call (bounds faiss's temporaries); ``seed``: IVF training sample and
#: k-means; ``train_size``: IVF training points (default min(n_gallery, 64 · nlist)).
OPTIONS: dict[str, dict[str, Any]] = {
    "faiss-flat": {"batch_size": 16384},
    "faiss-ivf": {"nlist": None, "nprobe": None, "train_size": None, "seed": 0, "batch_size": 16384},
    "faiss-hnsw": {"M": 32, "ef_construction": 80, "ef_search": None, "batch_size": 16384},
}


def check_backend(backend: str) -> None:
    """Raise ``UnknownNameError`` (with the closest name) if ``backend`` is not one of :data:`BACKENDS`."""
    if backend not in BACKENDS:
        raise UnknownNameError(unknown_name_message("search backend", str(backend), BACKENDS))


def import_faiss(backend: str = "faiss-flat") -> ModuleType:
    """The ``faiss`` module, or a ``ConfigError`` explaining how to install it."""
    try:
        return importlib.import_module("faiss")
    except ImportError as exc:
        raise ConfigError(
            f"backend '{backend}' needs the optional package faiss, which is not installed: "
            "pip install 'dmlkit[faiss]' (or faiss-cpu / faiss-gpu), or use backend='torch'"
        ) from exc


def resolve_options(backend: str, options: dict[str, Any] | None, n_gallery: int, k: int) -> dict[str, Any]:
    """``options`` completed with the backend's defaults; unknown keys raise with a suggestion."""
    check_backend(backend)
    if backend == "torch":
        if options:
            raise ConfigError(f"backend 'torch' takes no backend_options, got {sorted(options)}")
        return {}
    valid = OPTIONS[backend]
    out = dict(valid)
    for key, value in (options or {}).items():
        if key not in valid:
            raise UnknownNameError(unknown_name_message(f"option of backend '{backend}'", key, valid))
        out[key] = value
    for key in ("batch_size", "nlist", "nprobe", "train_size", "M", "ef_construction", "ef_search"):
        value = out.get(key)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ConfigError(f"backend option '{key}' must be a positive integer, got {value!r}")
    if backend == "faiss-ivf":
        if out["nlist"] is None:
            # faiss's guidance: nlist ~ 4·sqrt(n), and at least 39 training points per cell.
            out["nlist"] = max(1, min(round(4 * math.sqrt(n_gallery)), n_gallery // 39))
        out["nlist"] = min(out["nlist"], n_gallery)
        if out["nprobe"] is None:
            out["nprobe"] = max(1, math.ceil(out["nlist"] / 16))
        out["nprobe"] = min(out["nprobe"], out["nlist"])
        if out["train_size"] is None:
            out["train_size"] = min(n_gallery, 64 * out["nlist"])
    if backend == "faiss-hnsw":
        out["ef_search"] = max(out["ef_search"] or 128, k)
    return out


def _as_float32(x: torch.Tensor, distance: str) -> np.ndarray:
    x = x.detach().to("cpu", torch.float32)
    if distance == "cosine":
        x = F.normalize(x, dim=1)
    return np.ascontiguousarray(x.numpy())


def build_index(gallery: np.ndarray, distance: str, backend: str, options: dict[str, Any]) -> Any:
    """A filled faiss index over the float32 ``gallery`` (already L2-normalised for cosine)."""
    faiss = import_faiss(backend)
    d = gallery.shape[1]
    inner_product = is_similarity(distance)
    metric = faiss.METRIC_INNER_PRODUCT if inner_product else faiss.METRIC_L2
    if backend == "faiss-flat":
        index = faiss.IndexFlatIP(d) if inner_product else faiss.IndexFlatL2(d)
    elif backend == "faiss-ivf":
        quantizer = faiss.IndexFlatIP(d) if inner_product else faiss.IndexFlatL2(d)
        index = faiss.IndexIVFFlat(quantizer, d, options["nlist"], metric)
        index.cp.seed = int(options["seed"]) % (2**31)
        rng = np.random.default_rng(options["seed"])
        n_train = min(options["train_size"], len(gallery))
        if n_train < len(gallery):
            sample = gallery[np.sort(rng.choice(len(gallery), n_train, replace=False))]
        else:
            sample = gallery
        index.train(np.ascontiguousarray(sample))
        index.nprobe = options["nprobe"]
    elif backend == "faiss-hnsw":
        index = faiss.IndexHNSWFlat(d, options["M"], metric)
        index.hnsw.efConstruction = options["ef_construction"]
        index.hnsw.efSearch = options["ef_search"]
    else:  # pragma: no cover - check_backend rejects it earlier
        raise ConfigError(f"not a faiss backend: {backend}")
    index.add(gallery)
    return index


def search(
    query: torch.Tensor,
    gallery: torch.Tensor,
    k: int,
    distance: str,
    exclusion: Exclusion,
    *,
    backend: str,
    options: dict[str, Any] | None = None,
    query_labels: torch.Tensor | None = None,
    gallery_labels: torch.Tensor | None = None,
    first_relevant: bool = False,
    device: torch.device | str | None = None,
) -> SearchOutput:
    """faiss counterpart of :func:`dmlkit.metrics.knn.search` (same output, on the CPU).

    ``num_relevant`` is counted from labels/ids/groups; ``first_relevant`` (MRR over the full ranking) is
    not available and raises.
    """
    check_distance(distance)
    check_backend(backend)
    if backend not in FAISS_BACKENDS:
        raise ConfigError(f"faiss_backend.search needs a faiss backend, got '{backend}'")
    if device is not None and torch.device(device).type != "cpu":
        raise ConfigError(
            f"backend '{backend}' runs on the CPU; for a GPU search use backend='torch', device='{device}'"
        )
    if exclusion.fn is not None:
        raise ConfigError(
            f"backend '{backend}' cannot apply a callable ignore (it would need every pair); pass groups "
            "(query_groups, gallery_groups) or use backend='torch'"
        )
    if first_relevant:
        raise ConfigError(
            f"'mrr' ranks the whole gallery, which backend '{backend}' does not do; use 'mrr@K' "
            "(reciprocal rank within the top K) or backend='torch'"
        )
    n_query, n_gallery = len(query), len(gallery)
    excluded_per_query = count_excluded(n_query, exclusion)
    depth = min(n_gallery, k + (int(excluded_per_query.max()) if n_query else 0))
    opts = resolve_options(backend, options, n_gallery, depth)
    similarity = is_similarity(distance)
    empty = float("-inf") if similarity else float("inf")

    distances = torch.full((n_query, k), empty, dtype=torch.float32)
    indices = torch.full((n_query, k), -1, dtype=torch.int64)
    if depth > 0 and n_query > 0:
        index = build_index(_as_float32(gallery, distance), distance, backend, opts)
        for start in range(0, n_query, opts["batch_size"]):
            end = min(start + opts["batch_size"], n_query)
            q = _as_float32(query[start:end], distance)
            found_d, found_i = index.search(q, depth)
            d, i = _drop_excluded(
                torch.from_numpy(found_d), torch.from_numpy(found_i).long(), exclusion, start, k, similarity
            )
            if distance == "euclidean":
                d = d.clamp_min(0).sqrt()  # faiss's L2 index returns squared distances
            elif distance == "squared_euclidean":
                d = d.clamp_min(0)
            distances[start:end, : d.shape[1]] = d
            indices[start:end, : i.shape[1]] = i
    num_relevant = None
    if query_labels is not None and gallery_labels is not None:
        num_relevant = count_relevant(query_labels, gallery_labels, exclusion)
    return SearchOutput(distances, indices, num_relevant, None)


def _drop_excluded(
    d: torch.Tensor, i: torch.Tensor, exclusion: Exclusion, start: int, k: int, similarity: bool
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
    d = d.masked_fill(bad, float("-inf") if similarity else float("inf"))
    return d, i.masked_fill(bad, -1)
