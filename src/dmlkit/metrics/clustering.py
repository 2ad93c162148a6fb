"""Clustering quality of embeddings: k-means, then NMI / AMI / F1 against the class labels.

Protocol (as in pytorch-metric-learning's ``AccuracyCalculator``): cluster the query embeddings with
k-means into as many clusters as there are query classes, then score the assignment against the labels
with scikit-learn's ``normalized_mutual_info_score`` (arithmetic normalisation) and
``adjusted_mutual_info_score``, and with the pair-counting F1 of Song et al. (CVPR 2016) used by Roth et
al. (ICML 2020) (:func:`f1`).
"""

from __future__ import annotations

import importlib.util
from typing import Literal

import numpy as np
import torch
from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score

from dmlkit.errors import ConfigError, DataError, UnknownNameError, unknown_name_message

KMeansBackend = Literal["auto", "faiss", "sklearn"]
KMEANS_BACKENDS: tuple[str, ...] = ("auto", "faiss", "sklearn")
#: Lloyd iterations of k-means (faiss's and PML's default is 20; scikit-learn stops at convergence).
KMEANS_ITERATIONS = 20


def faiss_available() -> bool:
    """True when the optional ``faiss`` package can be imported."""
    return importlib.util.find_spec("faiss") is not None


def _to_numpy_labels(values: torch.Tensor | np.ndarray, name: str) -> np.ndarray:
    array = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    if array.ndim != 1:
        raise DataError(f"{name} must be 1-D, got shape {array.shape}")
    if array.dtype.kind == "f":
        raise DataError(f"{name} must be integer codes, got dtype {array.dtype}")
    return array


def kmeans(
    embeddings: torch.Tensor | np.ndarray,
    num_clusters: int,
    *,
    seed: int = 0,
    backend: KMeansBackend = "auto",
    iterations: int = KMEANS_ITERATIONS,
) -> torch.Tensor:
    """Cluster the rows of ``embeddings`` with k-means; returns an int64 cluster id per row.

    ``backend="auto"`` uses ``faiss.Kmeans`` (exact, all points, ``seed``-ed) when faiss is installed and
    scikit-learn's ``KMeans(n_init=1, random_state=seed)`` otherwise. Both are deterministic for a seed.
    """
    if backend not in KMEANS_BACKENDS:
        raise UnknownNameError(unknown_name_message("k-means backend", backend, KMEANS_BACKENDS))
    x = embeddings.detach().cpu().numpy() if isinstance(embeddings, torch.Tensor) else np.asarray(embeddings)
    if x.ndim != 2 or len(x) == 0:
        raise DataError(f"k-means needs a non-empty n × d array, got shape {x.shape}")
    if not 1 <= num_clusters <= len(x):
        raise ConfigError(f"num_clusters must be in [1, {len(x)}] (number of points), got {num_clusters}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if backend == "faiss" or (backend == "auto" and faiss_available()):
        import faiss

        km = faiss.Kmeans(
            x.shape[1],
            num_clusters,
            niter=iterations,
            seed=int(seed) % (2**31),
            verbose=False,
            # Use every point (faiss subsamples above 256 per centroid) and skip its too-few-points warning.
            min_points_per_centroid=1,
            max_points_per_centroid=len(x),
        )
        km.train(x)
        _, assignment = km.index.search(x, 1)
        return torch.from_numpy(assignment[:, 0].astype(np.int64))
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=num_clusters, n_init=1, max_iter=max(iterations, 1), random_state=seed)
    return torch.from_numpy(km.fit_predict(x).astype(np.int64))


def nmi(labels: torch.Tensor | np.ndarray, assignments: torch.Tensor | np.ndarray) -> float:
    """Normalised mutual information I(Y; C) / mean(H(Y), H(C)) (scikit-learn, arithmetic mean)."""
    y = _to_numpy_labels(labels, "labels")
    c = _to_numpy_labels(assignments, "assignments")
    return float(normalized_mutual_info_score(y, c))


def ami(labels: torch.Tensor | np.ndarray, assignments: torch.Tensor | np.ndarray) -> float:
    """Adjusted mutual information (I − E[I]) / (mean(H(Y), H(C)) − E[I]) (scikit-learn)."""
    y = _to_numpy_labels(labels, "labels")
    c = _to_numpy_labels(assignments, "assignments")
    return float(adjusted_mutual_info_score(y, c))


def _pairs(counts: torch.Tensor) -> int:
    return int((counts * (counts - 1) // 2).sum())


def f1(labels: torch.Tensor | np.ndarray, assignments: torch.Tensor | np.ndarray) -> float:
    """Pair-counting clustering F1 (Song et al., "Deep Metric Learning via Lifted Structured Feature
    Embedding", CVPR 2016; the ``f1`` of Roth et al., ICML 2020).

    Over the unordered pairs of items: TP = pairs in the same class *and* the same cluster,
    P = TP / (pairs in the same cluster), R = TP / (pairs in the same class), F1 = 2PR / (P + R)
    = 2·TP / (same-cluster pairs + same-class pairs). When neither partition has a pair (every item alone
    in its class and its cluster) the two partitions are identical and F1 = 1; when only one has pairs,
    F1 = 0.
    """
    y = torch.from_numpy(_to_numpy_labels(labels, "labels").astype(np.int64))
    c = torch.from_numpy(_to_numpy_labels(assignments, "assignments").astype(np.int64))
    if len(y) != len(c):
        raise DataError(f"labels ({len(y)}) and assignments ({len(c)}) differ in length")
    if len(y) == 0:
        raise DataError("f1 needs at least one item")
    y_code = torch.unique(y, return_inverse=True)[1]
    c_code = torch.unique(c, return_inverse=True)[1]
    joint = torch.unique(y_code * (int(c_code.max()) + 1) + c_code, return_counts=True)[1]
    true_positive = _pairs(joint)
    same_class = _pairs(torch.bincount(y_code))
    same_cluster = _pairs(torch.bincount(c_code))
    if same_class + same_cluster == 0:
        return 1.0
    return 2.0 * true_positive / (same_class + same_cluster)


def clustering_scores(
    labels: torch.Tensor | np.ndarray,
    assignments: torch.Tensor | np.ndarray,
    metrics: tuple[str, ...] = ("nmi", "ami", "f1"),
) -> dict[str, float]:
    """``{"nmi": ..., "ami": ..., "f1": ...}`` (the requested subset) of a given cluster assignment."""
    functions = {"nmi": nmi, "ami": ami, "f1": f1}
    out: dict[str, float] = {}
    for name in metrics:
        if name not in functions:
            raise UnknownNameError(unknown_name_message("clustering metric", name, functions))
        out[name] = functions[name](labels, assignments)
    return out
