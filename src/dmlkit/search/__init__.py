"""k-nearest-neighbour search of embeddings: one entry point, registered backends, one results object.

    results = search(query, gallery, k=10, distance="euclidean", query_labels=ql, gallery_labels=gl)
    results.topk_indices, results.topk_distances, results.num_relevant   # no metric values yet
    scored = dmlkit.metrics.compute(results, ["recall@1", "map@r"])     # search → RetrievalResults → compute

- :func:`search` (no ``gallery``: leave-one-out) validates and encodes its inputs once
  (:func:`prepare`), builds the backend and returns a :class:`RetrievalResults` (neighbours, distances,
  labels/ids, R; metrics empty).
- Backends (:data:`REGISTRY`, ``build(name, **options)``, ``available()``; :class:`SearchBackend`): ``torch``
  (exact, blocked, O(n·k) memory, CPU or GPU, the only one that ranks the whole gallery for ``mrr``),
  ``faiss-flat`` (exact), ``faiss-ivf`` and ``faiss-hnsw`` (approximate); faiss is optional.
- :class:`Exclusion`: pairs never retrieved (the query itself by id, ``ignore`` groups or a callable).
"""

from dmlkit.search import faiss_backend, torch_backend  # noqa: F401  (registers the backends)
from dmlkit.search.api import check_searchable, knn, prepare, run, search
from dmlkit.search.base import (
    REGISTRY,
    Neighbours,
    SearchBackend,
    SearchInputs,
    SearchRequest,
    available,
    build,
    check_full_ranking,
)
from dmlkit.search.encoding import as_embeddings, encode_pair
from dmlkit.search.exclusion import Exclusion, build_exclusion, count_excluded, count_matches, count_relevant
from dmlkit.search.results import Label, RetrievalResults

__all__ = [
    "REGISTRY",
    "Exclusion",
    "Label",
    "Neighbours",
    "RetrievalResults",
    "SearchBackend",
    "SearchInputs",
    "SearchRequest",
    "as_embeddings",
    "available",
    "build",
    "build_exclusion",
    "check_full_ranking",
    "check_searchable",
    "count_excluded",
    "count_matches",
    "count_relevant",
    "encode_pair",
    "knn",
    "prepare",
    "run",
    "search",
]
