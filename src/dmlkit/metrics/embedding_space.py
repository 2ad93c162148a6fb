"""Embedding-space diagnostics of Roth et al., "Revisiting Training Strategies and Generalization
Performance in Deep Metric Learning" (ICML 2020): spectral decay ρ and intra-/inter-class distances.

- ``rho_spectrum@K`` (:func:`rho_spectrum`): s = singular values of the n × d embedding matrix X (not
  centred, as in Roth et al.), sorted descending; s' = s[|K|−1:] (the |K|−1 largest dropped);
  p = s' / Σ s', u = uniform over the m = len(s') values.
  K ≥ 1: ρ = KL(u ‖ p) = Σ_i u_i log(u_i / p_i); K ≤ −1: KL(p ‖ u) = Σ_i p_i log(p_i / u_i).
  Smaller ρ = flatter spectrum (more directions used); 0 for a perfectly flat one.
- ``dists@intra`` (:func:`intra_class_distance`): mean over classes with ≥ 2 items of the mean distance
  over the ordered pairs (i ≠ j) of that class.
- ``dists@inter`` (:func:`inter_class_distance`): mean distance over the pairs of distinct classes of the
  class centroids μ_c (cosine: μ_c = normalise(mean of the normalised members), as Roth et al.;
  otherwise the plain mean).
- ``dists@intra_over_inter``: intra / max(inter, 1e-8).
- ``pcf@F`` (:func:`principal_components_fraction`): open-metric-learning's principal components fraction,
  the share of the d dimensions that PCA needs to explain a share F of the variance.

Distances: ``cosine`` → 1 − cos (Roth et al.'s choice), ``euclidean`` → ‖x − y‖, ``squared_euclidean``
→ ‖x − y‖². ``dot`` is not a distance and is rejected. Everything is accumulated in float64 and in
chunks: memory is O(d² + n_classes · d) plus one block of at most 2²⁴ pairwise distances.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from dmlkit import distances
from dmlkit.errors import ConfigError, DataError

#: Rows converted to float64 at a time when accumulating sums (bounds the temporary copies).
ROW_CHUNK = 65536
#: Largest pairwise block (entries) formed at once.
MAX_BLOCK_ELEMENTS = 2**24
DIST_MODES: tuple[str, ...] = ("intra", "inter", "intra_over_inter")
DIST_DISTANCES: tuple[str, ...] = ("cosine", "euclidean", "squared_euclidean")


def _embeddings(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.asarray(x)) if not isinstance(x, torch.Tensor) else x.detach()
    if t.ndim != 2 or not t.is_floating_point():
        raise DataError(f"embeddings must be a 2-D floating-point array, got {t.dtype} {tuple(t.shape)}")
    if len(t) == 0:
        raise DataError("embeddings are empty")
    return t.cpu()


def singular_values(embeddings: torch.Tensor | np.ndarray) -> torch.Tensor:
    """The min(n, d) singular values of the n × d matrix ``embeddings`` (float64, descending).

    Computed as the square roots of the eigenvalues of the d × d Gram matrix XᵀX, accumulated in float64
    over row chunks, so a million rows cost O(n·d²) time and O(d²) memory. (Absolute accuracy ≈ 1e-8 ·
    s_max, ample for ρ.)
    """
    x = _embeddings(embeddings)
    n, d = x.shape
    gram = torch.zeros(d, d, dtype=torch.float64)
    for start in range(0, n, ROW_CHUNK):
        block = x[start : start + ROW_CHUNK].double()
        gram += block.T @ block
    eigenvalues = torch.linalg.eigvalsh(gram).flip(0).clamp_min(0)
    return eigenvalues[: min(n, d)].sqrt()


def rho_spectrum(embeddings: torch.Tensor | np.ndarray, K: int = 1) -> float:
    """Spectral decay ρ of Roth et al. 2020 (``rho_spectrum@K``); see the module docstring.

    ``K = 0`` (Roth's "log the whole distribution") is not a number: use :func:`singular_values`.
    Returns ``inf`` when a kept singular value is 0 (K ≥ 1) and NaN when all are 0.
    """
    if not isinstance(K, int) or K == 0:
        raise ConfigError(
            f"rho_spectrum@K needs an integer K ≠ 0, got {K!r} (K = 0 is the whole spectrum: "
            "use dmlkit.metrics.singular_values)"
        )
    s = singular_values(embeddings)
    if abs(K) > len(s):
        raise ConfigError(
            f"rho_spectrum@{K} drops {abs(K) - 1} singular values but there are only {len(s)} "
            f"(min(n, d) of {tuple(np.shape(embeddings))})"
        )
    s = s[abs(K) - 1 :]
    total = float(s.sum())
    if total == 0:
        return math.nan
    p = s / total
    m = len(s)
    if K > 0:
        if bool((p == 0).any()):
            return math.inf
        return float((-math.log(m) - p.log()).mean())
    nonzero = p[p > 0]
    return float((nonzero * (nonzero * m).log()).sum())


def principal_components_fraction(embeddings: torch.Tensor | np.ndarray, variance: float) -> float:
    """``pcf@F``: open-metric-learning's principal components fraction (``oml.functional.metrics.calc_pcf``,
    open-metric-learning 4.0), the share of the d dimensions that PCA needs to explain a share ``variance``
    of the variance.

    λ_1 ≥ … ≥ λ_m are the m = min(n, d) eigenvalues of the covariance of the (centred) n × d embeddings and
    c_j = Σ_{i≤j} λ_i / Σ_i λ_i; n_F = the largest n with c_{n−1} ≤ F, i.e. 1 + #{j : c_j ≤ F} (OML's
    ``searchsorted(c, F, side="right") + 1``); the value is min(n_F, d) / d. OML does not cap n_F: for
    F = 1 and n ≥ d it gives (d + 1)/d; here the value never exceeds 1. NaN when the embeddings do not vary
    (fewer than two distinct rows). Computed in float64 from the d × d covariance, accumulated over row
    chunks in two passes (the mean, then the centred Gram matrix; O(n·d²) time, O(d²) memory), with c
    normalised by its last entry so that F = 1 counts every component exactly.
    """
    if isinstance(variance, bool) or not isinstance(variance, int | float) or not 0 <= variance <= 1:
        raise ConfigError(f"pcf@F needs a variance share F in [0, 1], got {variance!r}")
    x = _embeddings(embeddings)
    n, d = x.shape
    total = torch.zeros(d, dtype=torch.float64)
    for start in range(0, n, ROW_CHUNK):
        total += x[start : start + ROW_CHUNK].double().sum(0)
    mean = total / n
    covariance = torch.zeros(d, d, dtype=torch.float64)  # × (n − 1), which no share depends on
    for start in range(0, n, ROW_CHUNK):
        block = x[start : start + ROW_CHUNK].double() - mean
        covariance += block.T @ block
    eigenvalues = torch.linalg.eigvalsh(covariance).flip(0).clamp_min(0)[: min(n, d)]
    cumulative = eigenvalues.cumsum(0)
    if n < 2 or float(cumulative[-1]) <= 0:
        return math.nan
    share = cumulative / cumulative[-1]
    count = int(torch.searchsorted(share, torch.tensor([float(variance)], dtype=torch.float64), right=True))
    return min(count + 1, d) / d


def check_dist_distance(distance: str) -> None:
    """Raise ``ConfigError`` unless ``distance`` is one ``dists@*`` can use (not ``dot``, not ``snr``);
    an unknown name raises ``UnknownNameError`` with the closest valid one."""
    name = distances.resolve(distance).name
    if name not in DIST_DISTANCES:
        kind = "a similarity" if distances.REGISTRY.get(name).is_similarity else "not symmetric"  # type: ignore[attr-defined]
        raise ConfigError(f"dists@* need a distance, one of {', '.join(DIST_DISTANCES)}; '{name}' is {kind}")


def _class_codes(labels: torch.Tensor | np.ndarray, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    lab = torch.as_tensor(np.asarray(labels)) if not isinstance(labels, torch.Tensor) else labels
    if lab.ndim != 1 or len(lab) != n:
        raise DataError(f"labels must be 1-D with one entry per embedding ({n}), got {tuple(lab.shape)}")
    if lab.is_floating_point():
        raise DataError(f"labels must be integer codes, got dtype {lab.dtype}")
    classes, codes = torch.unique(lab.cpu(), return_inverse=True)
    return codes, torch.bincount(codes, minlength=len(classes))


def _class_sums(
    x: torch.Tensor, codes: torch.Tensor, num_classes: int, normalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ_{i∈c} x_i [C, d], Σ_{i∈c} ‖x_i‖² [C]) in float64; rows L2-normalised first if ``normalize``."""
    sums = torch.zeros(num_classes, x.shape[1], dtype=torch.float64)
    squares = torch.zeros(num_classes, dtype=torch.float64)
    for start in range(0, len(x), ROW_CHUNK):
        block = x[start : start + ROW_CHUNK].double()
        if normalize:
            block = F.normalize(block, dim=1)
        c = codes[start : start + ROW_CHUNK]
        sums.index_add_(0, c, block)
        squares.index_add_(0, c, block.pow(2).sum(1))
    return sums, squares


def _distance(a: torch.Tensor, b: torch.Tensor, distance: str) -> torch.Tensor:
    if distance == "cosine":
        return 1.0 - a @ b.T  # rows are already unit vectors
    return distances.build(distance).matrix(a, b)


def intra_class_distances(
    embeddings: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray, distance: str = "cosine"
) -> torch.Tensor:
    """Per class (in sorted label order): mean distance over its ordered pairs i ≠ j; NaN for classes
    with a single item.

    cosine and squared_euclidean use the exact identities Σ_{i≠j} x̂_i·x̂_j = ‖Σ x̂_i‖² − n_c and
    Σ_{i≠j} ‖x_i − x_j‖² = 2 n_c Σ ‖x_i‖² − 2 ‖Σ x_i‖² (O(n·d)); euclidean sums the pairs of each class
    in blocks (O(Σ_c n_c² · d)).
    """
    check_dist_distance(distance)
    x = _embeddings(embeddings)
    codes, counts = _class_codes(labels, len(x))
    num_classes = len(counts)
    pairs = (counts * (counts - 1)).double()
    if distance in ("cosine", "squared_euclidean"):
        sums, squares = _class_sums(x, codes, num_classes, normalize=distance == "cosine")
        sum_sq = sums.pow(2).sum(1)
        if distance == "cosine":
            total = pairs - (sum_sq - counts.double())  # Σ_{i≠j} (1 − cos)
        else:
            total = 2 * counts.double() * squares - 2 * sum_sq
    else:
        total = _euclidean_within_class_sums(x, codes, counts)
    return torch.where(counts > 1, total / pairs.clamp_min(1), torch.full_like(total, math.nan))


def _euclidean_within_class_sums(x: torch.Tensor, codes: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Σ_{i≠j in c} ‖x_i − x_j‖ per class: rows sorted by class, each row block against the contiguous
    span of the classes it touches, same-class pairs kept."""
    order = torch.argsort(codes, stable=True)
    xs, cs = x[order], codes[order]
    ends = counts.cumsum(0)
    starts = ends - counts
    n = len(xs)
    largest = int(counts.max())
    # rows · (rows + 2·largest) ≥ rows · span bounds the block size.
    rows = max(1, int(-largest + math.sqrt(largest**2 + MAX_BLOCK_ELEMENTS)))
    total = torch.zeros(len(counts), dtype=torch.float64)
    for a in range(0, n, rows):
        b = min(a + rows, n)
        lo, hi = int(starts[cs[a]]), int(ends[cs[b - 1]])
        block = distances.Euclidean().matrix(xs[a:b].double(), xs[lo:hi].double())
        # Same class, and not the item itself (whose distance is 0 only up to rounding).
        same = (cs[a:b, None] == cs[None, lo:hi]) & (
            torch.arange(a, b)[:, None] != torch.arange(lo, hi)[None, :]
        )
        block = block * same
        total.index_add_(0, cs[a:b], block.sum(1))
    return total


def intra_class_distance(
    embeddings: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray, distance: str = "cosine"
) -> float:
    """``dists@intra``: mean over classes with ≥ 2 items of their mean pairwise distance (NaN if none)."""
    per_class = intra_class_distances(embeddings, labels, distance)
    kept = per_class[~per_class.isnan()]
    return float(kept.mean()) if len(kept) else math.nan


def class_centroids(
    embeddings: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray, distance: str = "cosine"
) -> torch.Tensor:
    """float64 centroid per class (sorted label order); cosine: normalise(mean of normalised members)."""
    check_dist_distance(distance)
    x = _embeddings(embeddings)
    codes, counts = _class_codes(labels, len(x))
    sums, _ = _class_sums(x, codes, len(counts), normalize=distance == "cosine")
    centroids = sums / counts[:, None].double()
    return F.normalize(centroids, dim=1) if distance == "cosine" else centroids


def inter_class_distance(
    embeddings: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray, distance: str = "cosine"
) -> float:
    """``dists@inter``: mean distance between the centroids of distinct classes (NaN with < 2 classes)."""
    centroids = class_centroids(embeddings, labels, distance)
    c = len(centroids)
    if c < 2:
        return math.nan
    rows = max(1, MAX_BLOCK_ELEMENTS // c)
    total = 0.0
    for a in range(0, c, rows):
        block = _distance(centroids[a : a + rows], centroids, distance)
        # The diagonal (a class with itself) is 0 up to rounding; remove it exactly.
        block[torch.arange(len(block)), torch.arange(a, a + len(block))] = 0.0
        total += float(block.sum())
    return total / (c * (c - 1))


def intra_over_inter(
    embeddings: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray, distance: str = "cosine"
) -> float:
    """``dists@intra_over_inter``: intra / max(inter, 1e-8) (Roth et al. clip the denominator)."""
    intra = intra_class_distance(embeddings, labels, distance)
    inter = inter_class_distance(embeddings, labels, distance)
    if math.isnan(intra) or math.isnan(inter):
        return math.nan
    return intra / max(inter, 1e-8)


def distance_scores(
    embeddings: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    distance: str = "cosine",
    modes: tuple[str, ...] = DIST_MODES,
) -> dict[str, float]:
    """``{"dists@intra": ..., "dists@inter": ..., "dists@intra_over_inter": ...}`` (the requested modes),
    each quantity computed once."""
    for mode in modes:
        if mode not in DIST_MODES:
            raise ConfigError(f"unknown dists mode '{mode}'; valid: {', '.join(DIST_MODES)}")
    check_dist_distance(distance)
    intra = intra_class_distance(embeddings, labels, distance) if set(modes) - {"inter"} else math.nan
    inter = inter_class_distance(embeddings, labels, distance) if set(modes) - {"intra"} else math.nan
    out: dict[str, float] = {}
    for mode in modes:
        if mode == "intra":
            out["dists@intra"] = intra
        elif mode == "inter":
            out["dists@inter"] = inter
        else:
            both = not (math.isnan(intra) or math.isnan(inter))
            out["dists@intra_over_inter"] = intra / max(inter, 1e-8) if both else math.nan
    return out
