"""Verification metrics of a search: the false non-match rate at a given false match rate (``fnmr@fmr=F``,
open-metric-learning's ``fnmr@fmr``), computed on the distances of every relevant ("positive") and every
irrelevant ("negative") (query, gallery) pair.

OML (``oml.functional.metrics.calc_fnmr_at_fmr``, open-metric-learning 4.0): with u the positive and v the
negative distances, the threshold is T = Q_v(F), the F-quantile of the negative distances (numpy's
``quantile``, linear interpolation), and FNMR@FMR(F) = (1/|u|) Σ_i 1[u_i ≥ T]: the share of positive pairs
that a threshold admitting a share F of the negative pairs as matches rejects.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dmlkit import distances
from dmlkit.distances import Distance, DistanceLike
from dmlkit.errors import ConfigError, DataError
from dmlkit.files import read_json
from dmlkit.metrics.label_relevance import relevant_topk
from dmlkit.search.api import check_searchable, prepare, search
from dmlkit.search.base import SearchInputs, positive_int
from dmlkit.search.encoding import ArrayLike
from dmlkit.search.exclusion import IgnoreSpec
from dmlkit.search.results import RetrievalResults
from dmlkit.search.torch_backend import MAX_BLOCK_ELEMENTS


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


# ---------------------------------------------------------------------------------------------------------
# Threshold calibration: the distance threshold of a target false match rate, and matching with it

#: ``format`` key of a threshold file (:meth:`Threshold.to_json`).
THRESHOLD_FORMAT = "dmlkit-threshold"
THRESHOLD_VERSION = 1


def _check_fmr(fmr: object) -> float:
    if isinstance(fmr, bool) or not isinstance(fmr, int | float) or not 0 <= fmr <= 1:
        raise ConfigError(f"a target false match rate is a number in [0, 1], got {fmr!r}")
    return float(fmr)


def threshold_distance(distance: DistanceLike) -> Distance:
    """``distance`` as a searchable :class:`~dmlkit.distances.Distance` that a name identifies: a threshold
    file records the distance by name, so an object whose normalisation differs from its name's (e.g.
    ``Euclidean(normalize_embeddings=True)``) is refused rather than recorded under a misleading name."""
    resolved = check_searchable(distance)
    if resolved != distances.build(resolved.name):
        raise ConfigError(
            f"{resolved!r} is not what the name '{resolved.name}' builds, and a threshold records its "
            "distance by name: pass the name, and L2-normalise the embeddings first if that is what you want"
        )
    return resolved


def check_threshold_value(value: float, distance: DistanceLike, what: str = "threshold") -> float:
    """``value`` as a float threshold in ``distance``'s units, or a ``ConfigError`` naming ``what`` and the
    value: NaN and ±inf are refused, and so is a negative (squared) Euclidean distance, which no pair has."""
    resolved = threshold_distance(distance)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{what} must be a finite number, got {value!r}")
    if not resolved.is_similarity and value < 0:
        raise ConfigError(
            f"{what} {value!r} is a negative {resolved.name} distance: no pair is that close, so nothing "
            "would ever match"
        )
    return float(value)


@dataclass(frozen=True)
class Threshold:
    """A verification threshold: a pair matches when it is at least as close as ``value``, in
    ``distance``'s own units — ``distance ≤ value`` for a distance (``euclidean``, ``squared_euclidean``),
    ``similarity ≥ value`` for a similarity (``cosine``, ``dot``), PML's ``MatchFinder`` rule.

    :func:`calibrate_threshold` fills the rest from the pairs it was calibrated on: the ``target_fmr`` asked
    for, the ``fmr`` achieved (≤ the target) and the ``fnmr`` there, over ``num_positive`` same-label and
    ``num_negative`` different-label pairs; ``source`` says what they were (dataset, split, checkpoint) and
    ``fingerprint`` is the fingerprint of the checkpoint that embedded them (:func:`dmlkit.serving.index.
    fingerprint`), when known. Saved and read with :meth:`to_json` / :meth:`from_json`.
    """

    value: float
    distance: str
    target_fmr: float
    fmr: float
    fnmr: float
    num_positive: int
    num_negative: int
    source: str = ""
    fingerprint: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.distance, str):
            raise ConfigError(f"threshold distance must be a distance name, got {self.distance!r}")
        threshold_distance(self.distance)
        if (
            isinstance(self.value, bool)
            or not isinstance(self.value, int | float)
            or not math.isfinite(self.value)
        ):
            raise ConfigError(f"threshold value must be a finite number, got {self.value!r}")
        _check_fmr(self.target_fmr)
        for key in ("fmr", "fnmr"):
            rate = getattr(self, key)
            if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 <= rate <= 1:
                raise ConfigError(f"threshold {key} must be a rate in [0, 1], got {rate!r}")
        for key in ("num_positive", "num_negative"):
            count = getattr(self, key)
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise ConfigError(f"threshold {key} must be a non-negative integer, got {count!r}")

    @property
    def is_similarity(self) -> bool:
        """Whether ``value`` is a similarity (a pair matches at ``≥ value``) rather than a distance."""
        return distances.build(self.distance).is_similarity

    @property
    def tmr(self) -> float:
        """True match rate on the calibration pairs: 1 − ``fnmr``."""
        return 1.0 - self.fnmr

    @property
    def rule(self) -> str:
        """The match rule in words, e.g. ``cosine >= 0.731``."""
        return f"{self.distance} {'>=' if self.is_similarity else '<='} {self.value:.6g}"

    def accepts(self, values: torch.Tensor) -> torch.Tensor:
        """Which ``values`` (in ``distance``'s units) match: ``≥ value`` for a similarity, else
        ``≤ value``."""
        return values >= self.value if self.is_similarity else values <= self.value

    def check_distance(self, distance: DistanceLike, where: str = "the search") -> None:
        """``ConfigError`` naming both distances unless ``distance`` is the one this threshold is in."""
        name = distance.name if isinstance(distance, Distance) else str(distance)
        if name != self.distance:
            origin = f" from {self.source}" if self.source else ""
            raise ConfigError(
                f"the threshold{origin} is a {self.distance} value, but {where} ranks by {name}: calibrate "
                f"it again with that distance (dmlkit eval --distance {name} --calibrate-fmr F), or search "
                f"by {self.distance}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain values, as written to a threshold file (``format``/``version`` first, ``rule`` and ``tmr``
        for the reader; :meth:`from_dict` ignores those two)."""
        return {
            "format": THRESHOLD_FORMAT,
            "version": THRESHOLD_VERSION,
            "value": self.value,
            "distance": self.distance,
            "rule": self.rule,
            "target_fmr": self.target_fmr,
            "fmr": self.fmr,
            "fnmr": self.fnmr,
            "tmr": self.tmr,
            "num_positive": self.num_positive,
            "num_negative": self.num_negative,
            "source": self.source,
            "fingerprint": self.fingerprint,
        }

    def to_json(self, path: str | Path) -> Path:
        """Write the threshold to ``path`` (JSON; parent folders created) and return the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "threshold") -> Threshold:
        """A threshold from :meth:`to_dict`'s values; ``DataError`` naming ``where`` and the key otherwise."""
        if not isinstance(data, Mapping) or data.get("format") != THRESHOLD_FORMAT:
            raise DataError(f'{where} is not a dmlkit threshold (no "format": "{THRESHOLD_FORMAT}")')
        if data.get("version") != THRESHOLD_VERSION:
            raise DataError(
                f"{where}: threshold format version {data.get('version')!r}; this dmlkit reads "
                f"{THRESHOLD_VERSION}"
            )
        required = ("value", "distance", "target_fmr", "fmr", "fnmr", "num_positive", "num_negative")
        missing = [key for key in required if key not in data]
        if missing:
            raise DataError(f"{where} lacks the key(s) {', '.join(missing)}")
        source, fingerprint = data.get("source", ""), data.get("fingerprint")
        if not isinstance(source, str) or not (fingerprint is None or isinstance(fingerprint, str)):
            raise DataError(f"{where}: 'source' and 'fingerprint' must be strings (or null)")
        try:
            return cls(**{key: data[key] for key in required}, source=source, fingerprint=fingerprint)
        except ConfigError as exc:
            raise DataError(f"{where}: {exc}") from exc

    @classmethod
    def from_json(cls, path: str | Path) -> Threshold:
        """Read a threshold file written by :meth:`to_json`. ``DataError`` naming the file (and the key)
        when it is missing, not JSON, or not a valid threshold."""
        return cls.from_dict(read_json(path, "threshold file"), f"threshold file {path}")


@dataclass(frozen=True)
class VerificationRates:
    """How a threshold does on a set of pairs (:func:`threshold_rates`): the share of ``num_negative``
    different-label pairs it accepts (``fmr``) and of ``num_positive`` same-label pairs it rejects
    (``fnmr``); NaN when there are no such pairs."""

    fmr: float
    fnmr: float
    num_positive: int
    num_negative: int

    @property
    def tmr(self) -> float:
        """1 − ``fnmr``."""
        return 1.0 - self.fnmr


class _Dissimilarity:
    """Pair dissimilarities of query rows against the gallery (from a first column on): the distance, or
    the negated similarity, so that smaller is closer for every distance.

    Computed in the form a search ranks by, one matrix product per block, by the distance's own formulas
    (:meth:`~dmlkit.distances.Distance.prepare`, ``index_metric``, :meth:`~dmlkit.distances.Distance.
    from_index`): ⟨q, g⟩ of prepared rows, or ‖q‖² + ‖g‖² − 2⟨q, g⟩ clamped at 0 — both sides centred on
    the gallery mean when the data sit farther from the origin than they spread, as the ``torch`` search
    does, since the rounding error of that form grows with ‖g‖². Each entry is a dot product of the same
    two rows whatever the block, so integer-valued data give exact values (and exact ties).
    """

    def __init__(
        self, distance: Distance, gallery: torch.Tensor, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.distance = distance
        g = distance.prepare(gallery.to(device, dtype))
        self.center: torch.Tensor | None = None
        self.l2 = distance.index_metric == "l2"
        if self.l2 and len(g):
            mean = g.double().mean(dim=0)
            offset = float(mean.pow(2).sum())
            if offset > float(g.double().pow(2).sum(dim=1).mean()) - offset:
                self.center = mean.to(g.dtype)
                g = g - self.center
        self.gallery = g
        self.gallery_sq = g.pow(2).sum(dim=1) if self.l2 else None

    def __call__(self, query: torch.Tensor, first: int) -> torch.Tensor:
        q = self.distance.prepare(query.to(self.gallery.device, self.gallery.dtype))
        g = self.gallery[first:]
        if not self.l2:
            values = self.distance.from_index(q @ g.T)
            return values.neg_() if self.distance.is_similarity else values
        assert self.gallery_sq is not None
        if self.center is not None:
            q = q - self.center
        squared = torch.addmm(q.pow(2).sum(dim=1)[:, None] + self.gallery_sq[None, first:], q, g.T, alpha=-2)
        return self.distance.from_index(squared.clamp_min_(0))


def _pair_blocks(
    inputs: SearchInputs,
    distance: Distance,
    chunk_size: int | None,
    device: torch.device,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(values, positive, negative)`` for each chunk of query rows against the gallery: the pairs'
    dissimilarities (:class:`_Dissimilarity`: smaller = closer) and the masks of the same-label and
    different-label pairs that count.

    A pair counts unless the exclusion forbids it (ids, groups such as sequences, a callable). In
    leave-one-out mode (the gallery is the query set) only the unordered pairs i < j count, each once, so a
    chunk of rows ``[s, e)`` is compared with columns ``s + 1 …`` only. Memory: one ``chunk × n_gallery``
    block (default: as many rows as fit :data:`~dmlkit.search.torch_backend.MAX_BLOCK_ELEMENTS` entries).
    """
    assert inputs.query_labels is not None and inputs.gallery_labels is not None
    n_query, n_gallery = len(inputs.query), len(inputs.gallery)
    chunk = chunk_size or max(1, MAX_BLOCK_ELEMENTS // max(n_gallery, 1))
    exclusion = inputs.exclusion.to(device)
    q_lab, g_lab = inputs.query_labels.to(device), inputs.gallery_labels.to(device)
    dtype = torch.promote_types(inputs.query.dtype, inputs.gallery.dtype)
    dissimilarity = _Dissimilarity(distance, inputs.gallery, device, dtype)
    columns = torch.arange(n_gallery, device=device)
    with torch.no_grad():
        for start in range(0, n_query, chunk):
            end = min(start + chunk, n_query)
            first = start + 1 if inputs.leave_one_out else 0
            if first >= n_gallery:
                break
            rows = torch.arange(start, end, device=device)
            same = q_lab[start:end, None] == g_lab[None, first:]
            excluded = exclusion.mask(rows, first, n_gallery, device)
            counted = None if excluded is None else ~excluded
            if inputs.leave_one_out:
                upper = columns[None, first:] > rows[:, None]
                counted = upper if counted is None else counted & upper
            positive = same if counted is None else same & counted
            negative = ~same if counted is None else ~same & counted
            yield dissimilarity(inputs.query[start:end], first), positive, negative


def _labelled(
    embeddings: torch.Tensor | np.ndarray,
    labels: ArrayLike | None,
    gallery: torch.Tensor | np.ndarray | None,
    gallery_labels: ArrayLike | None,
    query_ids: ArrayLike | None,
    gallery_ids: ArrayLike | None,
    ignore: IgnoreSpec,
) -> SearchInputs:
    """The checked, encoded inputs of a set of pairs (:func:`dmlkit.search.prepare`); labels are required,
    since they say which pairs are genuine."""
    if labels is None:
        raise ConfigError("verification pairs need labels: a pair is positive when its two labels are equal")
    return prepare(embeddings, gallery, labels, gallery_labels, query_ids, gallery_ids, ignore)


def _allowed_false_matches(fmr: float, num_negative: int) -> int:
    """The most negative pairs a threshold may accept: the largest a with a / num_negative ≤ fmr, compared
    in floating point as sklearn's ``roc_curve`` computes its FPR (fps / fps[-1]), so the two agree
    exactly."""
    allowed = min(num_negative, math.floor(fmr * num_negative))
    while allowed < num_negative and (allowed + 1) / num_negative <= fmr:
        allowed += 1
    while allowed > 0 and allowed / num_negative > fmr:
        allowed -= 1
    return allowed


def _no_pairs_message(kind: str, labels: torch.Tensor, label_values: list[str] | None) -> str:
    classes = torch.unique(labels)
    if kind == "negative" and len(classes) == 1:
        code = int(classes[0])
        name = label_values[code] if label_values is not None else code
        return (
            f"all {len(labels)} items have the same label ({name!r}): there is no different-label pair, so "
            "no false match rate can be measured; calibrate on a set with at least two classes"
        )
    if kind == "positive":
        return (
            "no two items that may be compared share a label (every class has a single item, or its other "
            "items are excluded): there is no same-label pair to calibrate the threshold on"
        )
    return "every different-label pair is excluded: there is no negative pair to calibrate on"


def calibrate_threshold(
    embeddings: torch.Tensor | np.ndarray,
    labels: ArrayLike,
    gallery: torch.Tensor | np.ndarray | None = None,
    gallery_labels: ArrayLike | None = None,
    *,
    fmr: float,
    distance: DistanceLike = "cosine",
    query_ids: ArrayLike | None = None,
    gallery_ids: ArrayLike | None = None,
    ignore: IgnoreSpec = None,
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
    source: str = "",
    fingerprint: str | None = None,
) -> Threshold:
    """The threshold with the highest true match rate whose false match rate on the labelled pairs of
    ``embeddings`` is at most ``fmr`` (OML's thresholding, PML's ``MatchFinder``; a ROC operating point).

    **Pairs.** Without ``gallery``, every unordered pair i < j of the rows (leave-one-out), each once;
    with one, every (query, gallery) pair. Pairs the exclusion forbids are left out: equal ids (the item
    itself), equal ``ignore`` groups (e.g. frames of one sequence) or a callable, as in
    :func:`dmlkit.search.search`. Same label: positive (u, N₊ of them); else negative (v, N₋).

    **Rule.** With d the dissimilarity (the distance, or minus the similarity), a pair matches when
    d ≤ T (ties match, as in PML's ``MatchFinder``). Let a = the largest count with a / N₋ ≤ ``fmr`` and
    v₍ₐ₊₁₎ the (a + 1)-th smallest negative (+∞ when a = N₋): every T < v₍ₐ₊₁₎ accepts at most a
    negatives, so T is the largest observed pair value below v₍ₐ₊₁₎ — exactly the threshold that
    ``sklearn.metrics.roc_curve(is_positive, −d)`` gives at its last point with FPR ≤ ``fmr`` — and, when no
    pair lies below v₍ₐ₊₁₎ (``fmr=0`` with a negative closest of all), the float just below v₍₁₎: nothing
    matches. FMR = #{v ≤ T} / N₋ ≤ ``fmr``; FNMR = #{u > T} / N₊. The returned ``value`` is T in the
    distance's units (−T for a similarity: match at ``similarity ≥ value``).

    **Exact, in O(chunk · n + fmr · N₋) memory.** Never an n × n matrix: a first pass over chunks of
    ``chunk_size`` query rows counts the pairs and keeps the smallest ⌊fmr · N⌋ + 1 negative values (a
    running :func:`torch.topk` merge; N bounds N₋ from above), a second counts the positives below
    v₍ₐ₊₁₎. ``device``: where to compute (default the embeddings'). ``source`` and ``fingerprint``
    (a fingerprint) are recorded in the :class:`Threshold`.

    ``DataError`` when there is no positive or no negative pair (one class, singletons only); ``ConfigError``
    for a rate outside [0, 1] or a distance no index can search by.
    """
    rate = _check_fmr(fmr)
    metric = threshold_distance(distance)
    inputs = _labelled(embeddings, labels, gallery, gallery_labels, query_ids, gallery_ids, ignore)
    assert inputs.query_labels is not None
    positive_int(chunk_size, "chunk_size")
    dev = torch.device(device) if device is not None else inputs.query.device
    n_query, n_gallery = len(inputs.query), len(inputs.gallery)
    # An upper bound on N₋ (every pair) fixes how many negatives the first pass keeps before N₋ is known:
    # a / N₋ ≤ fmr keeps holding for a larger denominator, so a(N₋) ≤ a(N).
    bound_pairs = n_query * (n_query - 1) // 2 if inputs.leave_one_out else n_query * n_gallery
    keep = 0 if rate >= 1 else min(bound_pairs, _allowed_false_matches(rate, max(bound_pairs, 1)) + 1)
    kept = torch.empty(0, device=dev)
    num_positive = num_negative = 0
    negative_max = -math.inf
    dtype = torch.promote_types(inputs.query.dtype, inputs.gallery.dtype)
    for values, positive, negative in _pair_blocks(inputs, metric, chunk_size, dev):
        dtype = values.dtype
        num_positive += int(positive.sum())
        found = values[negative]
        if not len(found):
            continue
        num_negative += len(found)
        negative_max = max(negative_max, float(found.max()))
        if keep:
            if len(found) > keep:
                found = torch.topk(found, keep, largest=False, sorted=False).values
            kept = torch.cat([kept.to(found.dtype), found])
            if len(kept) > keep:
                kept = torch.topk(kept, keep, largest=False, sorted=False).values
    if num_positive == num_negative == 0:
        raise DataError(
            "every pair is excluded (ids, groups or the ignore callable): nothing to calibrate on"
        )
    for count, kind in ((num_positive, "positive"), (num_negative, "negative")):
        if count == 0:
            raise DataError(_no_pairs_message(kind, inputs.query_labels, inputs.label_values))
    allowed = _allowed_false_matches(rate, num_negative)
    if allowed >= num_negative:
        bound, accepted, best_negative = math.inf, num_negative, negative_max
    else:
        smallest = kept.sort().values
        bound = float(smallest[allowed])
        below = smallest[:allowed][smallest[:allowed] < bound]
        accepted = len(below)
        best_negative = float(below.max()) if accepted else -math.inf
    matched, best_positive = 0, -math.inf
    for values, positive, _ in _pair_blocks(inputs, metric, chunk_size, dev):
        found = values[positive]
        found = found[found < bound] if bound < math.inf else found
        if len(found):
            matched += len(found)
            best_positive = max(best_positive, float(found.max()))
    cut = max(best_positive, best_negative)
    if cut == -math.inf:
        # No pair lies below the first negative, so nothing may match: the value just below it, in the
        # precision of the values (a float64 step would round back onto a float32 distance and match it).
        below = torch.nextafter(torch.tensor(bound, dtype=dtype), torch.tensor(-math.inf, dtype=dtype))
        cut = float(below)
    return Threshold(
        value=-cut if metric.is_similarity else cut,
        distance=metric.name,
        target_fmr=rate,
        fmr=accepted / num_negative,
        fnmr=1.0 - matched / num_positive,
        num_positive=num_positive,
        num_negative=num_negative,
        source=source,
        fingerprint=fingerprint,
    )


def threshold_rates(
    threshold: Threshold | float,
    embeddings: torch.Tensor | np.ndarray,
    labels: ArrayLike,
    gallery: torch.Tensor | np.ndarray | None = None,
    gallery_labels: ArrayLike | None = None,
    *,
    distance: DistanceLike | None = None,
    query_ids: ArrayLike | None = None,
    gallery_ids: ArrayLike | None = None,
    ignore: IgnoreSpec = None,
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
) -> VerificationRates:
    """FMR and FNMR of ``threshold`` on the labelled pairs of other embeddings (e.g. the test split of a
    threshold calibrated on the validation split): the pairs of :func:`calibrate_threshold`, counted in
    one chunked pass. ``threshold``: a :class:`Threshold`, or a number in ``distance``'s units."""
    value, metric = _resolve(threshold, distance)
    inputs = _labelled(embeddings, labels, gallery, gallery_labels, query_ids, gallery_ids, ignore)
    positive_int(chunk_size, "chunk_size")
    dev = torch.device(device) if device is not None else inputs.query.device
    cut = -value if metric.is_similarity else value
    counts = [0, 0, 0, 0]  # positives, accepted positives, negatives, accepted negatives
    for values, positive, negative in _pair_blocks(inputs, metric, chunk_size, dev):
        accepted = values <= cut
        counts[0] += int(positive.sum())
        counts[1] += int((positive & accepted).sum())
        counts[2] += int(negative.sum())
        counts[3] += int((negative & accepted).sum())
    pos, pos_in, neg, neg_in = counts
    return VerificationRates(
        fmr=neg_in / neg if neg else math.nan,
        fnmr=1.0 - pos_in / pos if pos else math.nan,
        num_positive=pos,
        num_negative=neg,
    )


def _resolve(threshold: Threshold | float, distance: DistanceLike | None) -> tuple[float, Distance]:
    """``(value, distance)`` of a :class:`Threshold` (``distance``, if given, must be its own) or of a bare
    number (``distance`` required, the value checked by :func:`check_threshold_value`)."""
    if isinstance(threshold, Threshold):
        if distance is not None:
            threshold.check_distance(distance)
        return threshold.value, distances.build(threshold.distance)
    if distance is None:
        raise ConfigError("a threshold given as a number needs its distance (distance='cosine', ...)")
    return check_threshold_value(threshold, distance), threshold_distance(distance)


def is_match(
    a: torch.Tensor,
    b: torch.Tensor,
    threshold: Threshold | float,
    distance: DistanceLike | None = None,
) -> torch.Tensor:
    """Whether each row pair ``(a[i], b[i])`` matches under ``threshold`` (PML's ``MatchFinder.is_match``:
    distance ≤ value, similarity ≥ value): a bool tensor of shape ``(n,)``. ``threshold``: a
    :class:`Threshold`, or a number in ``distance``'s units."""
    value, metric = _resolve(threshold, distance)
    with torch.no_grad():
        values = metric.paired(torch.as_tensor(a), torch.as_tensor(b))
    return values >= value if metric.is_similarity else values <= value


def apply_threshold(
    results: RetrievalResults, threshold: Threshold | float, distance: DistanceLike | None = None
) -> RetrievalResults:
    """``results`` with every neighbour beyond ``threshold`` dropped: its slot emptied (index −1, distance
    ``distance.worst``), so each query keeps the prefix of its top-k that matches — possibly nothing. The
    threshold must be in the search's distance (``ConfigError`` naming both otherwise); metric values are
    cleared. A number ``threshold`` is taken in the search's distance unless ``distance`` says otherwise."""
    value, metric = _resolve(threshold, results.distance if distance is None else distance)
    if metric.name != results.distance.name:
        raise ConfigError(
            f"the threshold is a {metric.name} value, but the search ranked by {results.distance.name}"
        )
    d = results.topk_distances
    matched = (results.topk_indices >= 0) & (d >= value if metric.is_similarity else d <= value)
    return replace(
        results,
        topk_indices=results.topk_indices.masked_fill(~matched, -1),
        topk_distances=d.masked_fill(~matched, results.distance.worst),
        metrics={},
        per_class={},
        cluster_assignments=None,
    )


def matches(
    query: torch.Tensor | np.ndarray,
    gallery: torch.Tensor | np.ndarray | None = None,
    *,
    threshold: Threshold | float,
    k: int,
    distance: DistanceLike | None = None,
    **search_options: Any,
) -> RetrievalResults:
    """What a verification user asks: the top ``k`` gallery items of each query that match under
    ``threshold`` — :func:`dmlkit.search.search` (``search_options``: labels, ids, ``ignore``, backend,
    device...), then :func:`apply_threshold`. ``distance``: the threshold's by default (required for a
    number)."""
    value, metric = _resolve(threshold, distance)
    found = search(query, gallery, k=k, distance=metric, **search_options)
    return apply_threshold(found, threshold if isinstance(threshold, Threshold) else value)
