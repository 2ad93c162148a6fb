"""Evaluation of embeddings for retrieval: Recall@K, MAP@R, MAP@K, MRR, Roth et al.'s mAP variants,
NMI/AMI/F1, embedding-space diagnostics, and landmark-retrieval protocols — metrics as functions of the
:class:`~dmlkit.search.RetrievalResults` a search (:mod:`dmlkit.search`) returns.

``compute(results, metrics)`` fills a search's results with metric values; ``evaluate(query, query_labels,
gallery=None, gallery_labels=None, ...)`` is ``choose_k``, ``dmlkit.search.search``, ``compute``;
``available()`` lists the metric names; ``knn`` is the search's top-k as tensors; ``revisited_map`` /
``gldv2_map`` score landmark retrieval (revisited Oxford/Paris, Google Landmarks v2); ``retrieval_grid`` /
``pick_queries`` draw queries and their top results from the same results object. See ``docs/metrics.md``
for every formula and rule.
"""

from dmlkit import search as _search
from dmlkit.metrics.clustering import ami, clustering_scores, f1, kmeans, nmi
from dmlkit.metrics.embedding_space import (
    class_centroids,
    distance_scores,
    inter_class_distance,
    intra_class_distance,
    intra_class_distances,
    intra_over_inter,
    rho_spectrum,
    singular_values,
)
from dmlkit.metrics.landmarks import LandmarkResults, gldv2_map, revisited_map
from dmlkit.metrics.retrieval import DEFAULT_METRICS, available, check_options, higher_is_better, parse_metric
from dmlkit.metrics.scoring import choose_k, compute, evaluate, per_group
from dmlkit.metrics.visualize import pick_queries, relevance, retrieval_grid
from dmlkit.search import RetrievalResults, knn

#: Search backend names (``dmlkit.search.available()``), for argument choices and configuration checks.
BACKENDS: tuple[str, ...] = tuple(_search.available())

__all__ = [
    "BACKENDS",
    "DEFAULT_METRICS",
    "LandmarkResults",
    "RetrievalResults",
    "ami",
    "available",
    "check_metric",
    "check_options",
    "choose_k",
    "class_centroids",
    "clustering_scores",
    "compute",
    "distance_scores",
    "evaluate",
    "f1",
    "gldv2_map",
    "higher_is_better",
    "inter_class_distance",
    "intra_class_distance",
    "intra_class_distances",
    "intra_over_inter",
    "kmeans",
    "knn",
    "nmi",
    "parse_metric",
    "per_group",
    "pick_queries",
    "relevance",
    "retrieval_grid",
    "revisited_map",
    "rho_spectrum",
    "singular_values",
]


def check_metric(name: str) -> None:
    """Raise ``UnknownNameError`` (with the closest valid name) if ``name`` is not a metric."""
    parse_metric(name)
