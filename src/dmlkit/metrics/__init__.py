"""Evaluation of embeddings for retrieval: exact chunked k-NN, Recall@K, MAP@R, MRR, NMI/AMI.

``evaluate(query, query_labels, gallery=None, gallery_labels=None, ...)`` returns a
:class:`RetrievalResults`; ``available()`` lists the metric names; ``knn`` is the search it runs.
See ``docs/metrics.md`` for every formula and rule.
"""

from dmlkit.metrics.clustering import ami, clustering_scores, kmeans, nmi
from dmlkit.metrics.knn import knn
from dmlkit.metrics.results import RetrievalResults
from dmlkit.metrics.retrieval import DEFAULT_METRICS, available, evaluate, parse_metric

__all__ = [
    "DEFAULT_METRICS",
    "RetrievalResults",
    "ami",
    "available",
    "clustering_scores",
    "evaluate",
    "kmeans",
    "knn",
    "nmi",
    "parse_metric",
]


def check_metric(name: str) -> None:
    """Raise ``UnknownNameError`` (with the closest valid name) if ``name`` is not a metric."""
    parse_metric(name)
