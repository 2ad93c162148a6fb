"""Verification metrics of a search: the false non-match rate at a given false match rate (``fnmr@fmr=F``,
open-metric-learning's ``fnmr@fmr``), computed on the distances of every relevant ("positive") and every
irrelevant ("negative") (query, gallery) pair.

OML (``oml.functional.metrics.calc_fnmr_at_fmr``, open-metric-learning 4.0): with u the positive and v the
negative distances, the threshold is T = Q_v(F), the F-quantile of the negative distances (numpy's
``quantile``, linear interpolation), and FNMR@FMR(F) = (1/|u|) Σ_i 1[u_i ≥ T]: the share of positive pairs
that a threshold admitting a share F of the negative pairs as matches rejects.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from dmlkit.errors import ConfigError
from dmlkit.metrics.label_relevance import relevant_topk
from dmlkit.search.results import RetrievalResults


def _check_rates(rates: Sequence[float]) -> None:
    if len(rates) == 0:
        raise ConfigError("fnmr@fmr needs at least one false match rate")
    for rate in rates:
        if not isinstance(rate, int | float) or isinstance(rate, bool) or not 0 <= rate <= 1:
            raise ConfigError(f"a false match rate is a number in [0, 1], got {rate!r}")


def fnmr_at_fmr(
    positive: np.ndarray | torch.Tensor, negative: np.ndarray | torch.Tensor, fmr: float | Sequence[float]
) -> float | list[float]:
    """False non-match rate at false match rate ``fmr`` (a number, or several: a list comes back), from the
    ``positive`` and ``negative`` pair distances (smaller = more alike): T = ``numpy.quantile(negative,
    fmr)``, FNMR = share of ``positive`` ≥ T. NaN without positive or negative pairs. The formula of OML's
    ``calc_fnmr_at_fmr`` (e.g. positives [0, 0, 1, 1, 2, 2, 5, 5, 9, 9], negatives [3, 3, 4, 4, 6, 6, 7, 7,
    8, 8]: 0.4 at 0.1, 0.2 at 0.5)."""
    rates = [fmr] if isinstance(fmr, int | float) else list(fmr)
    _check_rates(rates)
    pos = np.asarray(positive.cpu() if isinstance(positive, torch.Tensor) else positive, np.float64).ravel()
    neg = np.asarray(negative.cpu() if isinstance(negative, torch.Tensor) else negative, np.float64).ravel()
    if len(pos) == 0 or len(neg) == 0:
        values = [math.nan] * len(rates)
    else:
        thresholds = np.quantile(neg, rates)
        values = [float(v) for v in (pos[None, :] >= thresholds[:, None]).mean(axis=1)]
    return values[0] if isinstance(fmr, int | float) else values


def pair_distances(results: RetrievalResults) -> tuple[np.ndarray, np.ndarray]:
    """(positive, negative) float64 distances of the retrieved (query, gallery) pairs of ``results``:
    relevant and irrelevant ones, empty slots left out, every query included. Similarities (``cosine``,
    ``dot``) are negated into distances, which changes no FNMR@FMR. Every pair is there only when the search
    kept every retrievable item (``fnmr@fmr=F`` asks for that depth)."""
    valid = results.topk_indices >= 0
    relevant = relevant_topk(results) & valid
    values = results.topk_distances.double()
    if results.distance.is_similarity:
        values = -values
    return values[relevant].numpy(), values[valid & ~relevant].numpy()


def fnmr_metric(results: RetrievalResults, fmr: float) -> float:
    """``fnmr@fmr=F`` of a search that kept every retrievable item (:func:`pair_distances`)."""
    positive, negative = pair_distances(results)
    value = fnmr_at_fmr(positive, negative, fmr)
    assert isinstance(value, float)
    return value
