"""Evaluation of embeddings for retrieval: Recall@K, MAP@R, MAP@K, MRR, Roth et al.'s mAP variants,
NMI/AMI/F1, embedding-space diagnostics, OML's FNMR@FMR and PCF, and landmark-retrieval protocols — metrics
as functions of the :class:`~dmlkit.search.RetrievalResults` a search (:mod:`dmlkit.search`) returns.

``compute(results, metrics)`` fills a search's results with metric values; ``evaluate(query, query_labels,
gallery=None, gallery_labels=None, ...)`` is ``choose_k``, ``dmlkit.search.search``, ``compute``;
``available()`` lists the metric names; ``knn`` is the search's top-k as tensors; ``revisited_map`` /
``gldv2_map`` score landmark retrieval (revisited Oxford/Paris, Google Landmarks v2); ``retrieval_grid`` /
``pick_queries`` draw queries and their top results from the same results object. ``register_metric`` adds
a metric usable by name everywhere (``--metrics`` included); ``evaluate(..., label_comparison=fn)`` decides
relevance by a function of the labels, ``average="class"`` (or an ``@class`` name) averages per class, and
``c_``/``e_`` names rank by cosine/Euclidean in the same evaluation. ``calibrate_threshold`` picks the
verification threshold of a target false match rate (a :class:`Threshold`, saved as JSON); ``is_match``,
``apply_threshold`` and ``matches`` apply one. See ``docs/metrics.md`` for every formula and rule.
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
    principal_components_fraction,
    rho_spectrum,
    singular_values,
)
from dmlkit.metrics.label_relevance import EvaluationResults, LabelComparison, Relevance
from dmlkit.metrics.landmarks import LandmarkResults, gldv2_map, revisited_map
from dmlkit.metrics.retrieval import (
    DEFAULT_METRICS,
    RetrievalContext,
    available,
    check_options,
    higher_is_better,
    parse_metric,
    parse_name,
    register_metric,
    unregister_metric,
)
from dmlkit.metrics.scoring import choose_k, compute, evaluate, per_group
from dmlkit.metrics.verification import (
    Threshold,
    VerificationRates,
    apply_threshold,
    calibrate_threshold,
    fnmr_at_fmr,
    is_match,
    matches,
    pair_distances,
    threshold_rates,
)
from dmlkit.metrics.visualize import pick_queries, relevance, retrieval_grid
from dmlkit.search import RetrievalResults, knn

#: Search backend names (``dmlkit.search.available()``), for argument choices and configuration checks.
BACKENDS: tuple[str, ...] = tuple(_search.available())

__all__ = [
    "BACKENDS",
    "DEFAULT_METRICS",
    "EvaluationResults",
    "LabelComparison",
    "LandmarkResults",
    "Relevance",
    "RetrievalContext",
    "RetrievalResults",
    "Threshold",
    "VerificationRates",
    "ami",
    "apply_threshold",
    "available",
    "calibrate_threshold",
    "check_metric",
    "check_options",
    "choose_k",
    "class_centroids",
    "clustering_scores",
    "compute",
    "distance_scores",
    "evaluate",
    "f1",
    "fnmr_at_fmr",
    "gldv2_map",
    "higher_is_better",
    "inter_class_distance",
    "intra_class_distance",
    "intra_class_distances",
    "intra_over_inter",
    "is_match",
    "kmeans",
    "knn",
    "matches",
    "nmi",
    "pair_distances",
    "parse_metric",
    "parse_name",
    "per_group",
    "pick_queries",
    "principal_components_fraction",
    "register_metric",
    "relevance",
    "retrieval_grid",
    "revisited_map",
    "rho_spectrum",
    "singular_values",
    "threshold_rates",
    "unregister_metric",
]


def check_metric(name: str) -> None:
    """Raise ``UnknownNameError`` (with the closest valid name) if ``name`` is not a metric."""
    parse_metric(name)
