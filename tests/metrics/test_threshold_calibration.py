"""Verification thresholds: ``calibrate_threshold`` against scikit-learn's ROC curve on every pair (ties
included), its rates against brute force and OML's ``fnmr@fmr``, chunked equal to unchunked, query/gallery
pairs with exclusions, the edge rates 0 and 1, bad input; matching (``is_match`` against PML's
``MatchFinder``, ``apply_threshold``, ``matches``) and the threshold file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning.distances import CosineSimilarity, LpDistance
from pytorch_metric_learning.utils.inference import MatchFinder
from sklearn.metrics import roc_curve

from dmlkit import distances
from dmlkit.errors import ConfigError, DataError
from dmlkit.metrics import verification
from dmlkit.metrics.verification import (
    Threshold,
    apply_threshold,
    calibrate_threshold,
    fnmr_at_fmr,
    is_match,
    matches,
    threshold_rates,
)
from dmlkit.search import search

DISTANCES = ("cosine", "euclidean", "squared_euclidean", "dot")


def tied_embeddings(rng: np.random.Generator, n: int, distance: str) -> torch.Tensor:
    """Rows whose pair values are exact in floating point, with many ties: small integers (n even: each
    row with its opposite, so the mean is 0 and the L2 form is not centred), or for cosine rows of ±1
    entries (or one non-zero entry) scaled by powers of two, so the normalised rows are exact."""
    if distance != "cosine":
        half = rng.integers(-2, 3, (n // 2, 4))
        return torch.tensor(rng.permutation(np.concatenate([half, -half])) * 1.0)
    x = rng.choice([-1.0, 1.0], (n, 4)) * 2.0 ** rng.integers(0, 3, (n, 1))
    axis = rng.random(n) < 0.3
    x[axis] = 0.0
    x[axis, rng.integers(0, 4, int(axis.sum()))] = 2.0 ** rng.integers(0, 3, int(axis.sum()))
    return torch.tensor(x)


def reference_values(q: np.ndarray, g: np.ndarray, distance: str) -> np.ndarray:
    """Dissimilarity matrix (smaller = closer) written out in numpy: the distance, or minus the similarity."""
    if distance == "cosine":
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        g = g / np.linalg.norm(g, axis=1, keepdims=True)
    if distance in ("cosine", "dot"):
        return -(q @ g.T)
    squared = ((q[:, None, :] - g[None, :, :]) ** 2).sum(-1)
    # torch's square root (a monotone map, so the order and the ties are numpy's): this torch's float64
    # sqrt is not always numpy's correctly rounded one (√2 differs in the last bit)
    return squared if distance == "squared_euclidean" else torch.from_numpy(squared).sqrt().numpy()


def roc_reference(values: np.ndarray, positive: np.ndarray, fmr: float) -> tuple[float, float, float]:
    """(threshold T on the dissimilarity, FPR, TPR) of sklearn's ROC curve at its last point with FPR ≤ fmr:
    predictions are score ≥ t with score = −d, so T = −t (−inf at sklearn's first point, nothing accepted)."""
    fpr, tpr, thresholds = roc_curve(positive, -values, drop_intermediate=False)
    index = int(np.flatnonzero(fpr <= fmr)[-1])
    return float(-thresholds[index]), float(fpr[index]), float(tpr[index])


def as_dissimilarity(threshold: Threshold) -> float:
    return -threshold.value if threshold.is_similarity else threshold.value


def assert_roc_threshold(found: Threshold, expected: float, values: np.ndarray, negative: np.ndarray) -> None:
    """The threshold is sklearn's; at sklearn's "accept nothing" point (−inf) it is the float just below
    the closest negative pair, which lies below every pair value."""
    if math.isfinite(expected):
        assert as_dissimilarity(found) == expected
    else:
        assert as_dissimilarity(found) == math.nextafter(values[negative].min(), -math.inf)
        assert as_dissimilarity(found) < values.min()


def all_pairs(x: torch.Tensor, y: np.ndarray, distance: str) -> tuple[np.ndarray, np.ndarray]:
    """Every unordered pair i < j: (values, is_positive), brute force."""
    values = reference_values(x.numpy(), x.numpy(), distance)
    upper = np.triu_indices(len(x), 1)
    return values[upper], (y[:, None] == y[None, :])[upper]


@pytest.mark.parametrize("distance", DISTANCES)
def test_equals_the_roc_curve_threshold_on_every_pair(distance: str) -> None:
    rng = np.random.default_rng(DISTANCES.index(distance))
    checked = 0
    for trial in range(40):
        n = 2 * int(rng.integers(3, 20))
        x = tied_embeddings(rng, n, distance)
        y = rng.integers(0, int(rng.integers(2, 6)), n)
        values, positive = all_pairs(x, y, distance)
        if positive.all() or not positive.any():
            continue
        fmr = float(rng.choice([0.0, 0.01, 0.1, 0.29, 0.5, 1.0, rng.random()]))
        chunk = None if trial % 3 == 0 else int(rng.integers(1, 9))
        found = calibrate_threshold(x, y, fmr=fmr, distance=distance, chunk_size=chunk)
        expected, fpr, tpr = roc_reference(values, positive, fmr)
        assert found.fmr == fpr <= fmr
        assert found.fnmr == pytest.approx(1.0 - tpr, abs=1e-12)
        assert (found.num_positive, found.num_negative) == (int(positive.sum()), int((~positive).sum()))
        assert_roc_threshold(found, expected, values, ~positive)
        checked += 1
    assert checked >= 30


def test_rates_are_brute_force_and_agree_with_oml_fnmr_at_fmr() -> None:
    """FMR/FNMR of the calibrated threshold counted by hand; where OML's interpolated quantile lands on the
    same negative, ``fnmr_at_fmr`` (OML's ``calc_fnmr_at_fmr``) gives the same FNMR."""
    rng = np.random.default_rng(7)
    compared = 0
    for _ in range(30):
        x = tied_embeddings(rng, 40, "squared_euclidean")
        y = rng.integers(0, 4, 40)
        values, positive = all_pairs(x, y, "squared_euclidean")
        pos, neg = values[positive], values[~positive]
        fmr = float(rng.uniform(0.0, 0.4))
        found = calibrate_threshold(x, y, fmr=fmr, distance="squared_euclidean")
        cut = found.value
        assert found.fmr == np.mean(neg <= cut) <= fmr
        assert found.fnmr == pytest.approx(np.mean(pos > cut), abs=1e-12)
        # No looser threshold meets the target: the next larger pair value accepts too many negatives.
        larger = values[values > cut]
        if len(larger):
            assert np.mean(neg <= larger.min()) > fmr
        # OML's threshold is quantile(neg, F'); at F' = a / (N − 1) it is the (a + 1)-th smallest negative
        # when that value is tied with its neighbour, which is our cut-off v₍ₐ₊₁₎.
        accepted = int(np.sum(neg <= cut))
        oml_rate = accepted / (len(neg) - 1)
        if accepted < len(neg) and np.quantile(neg, oml_rate) == np.sort(neg)[accepted]:
            assert found.fnmr == pytest.approx(fnmr_at_fmr(pos, neg, oml_rate), abs=1e-12)
            compared += 1
    assert compared >= 10


@pytest.mark.parametrize("distance", DISTANCES)
def test_chunked_equals_unchunked(distance: str) -> None:
    rng = np.random.default_rng(3)
    exact = tied_embeddings(rng, 60, distance)
    labels = rng.integers(0, 5, 60)
    for fmr in (0.0, 0.003, 0.1, 0.6, 1.0):
        whole = calibrate_threshold(exact, labels, fmr=fmr, distance=distance)
        for chunk in (1, 2, 7, 59, 60, 1000):
            assert calibrate_threshold(exact, labels, fmr=fmr, distance=distance, chunk_size=chunk) == whole
    # continuous data: a block of one row is a matrix-vector product whose last bit may differ
    x = torch.randn(120, 16, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 8, (120,), generator=torch.Generator().manual_seed(1))
    whole = calibrate_threshold(x, y, fmr=0.01, distance=distance)
    for chunk in (1, 5, 33):
        part = calibrate_threshold(x, y, fmr=0.01, distance=distance, chunk_size=chunk)
        assert part.value == pytest.approx(whole.value, rel=1e-5, abs=1e-6)
        assert (part.fmr, part.fnmr, part.num_negative) == (whole.fmr, whole.fnmr, whole.num_negative)


def test_no_block_is_larger_than_a_chunk_of_rows(monkeypatch) -> None:
    """Never an n × n matrix: every block of values is chunk_size rows at most (its columns: the rest of the
    rows, i < j)."""
    shapes: list[tuple[int, int]] = []
    original = verification._Dissimilarity.__call__

    def recording(self, query, first):
        values = original(self, query, first)
        shapes.append(tuple(values.shape))
        return values

    monkeypatch.setattr(verification._Dissimilarity, "__call__", recording)
    x, y = torch.randn(200, 8), torch.randint(0, 10, (200,))
    calibrate_threshold(x, y, fmr=0.01, chunk_size=16)
    # two passes of 13 blocks: rows [16 b, 16 b + 16) against the columns after the block's first row
    assert shapes == [(min(16, 200 - start), 199 - start) for start in range(0, 200, 16)] * 2


def test_query_gallery_pairs_with_ids_and_sequences() -> None:
    """Query/gallery: every (query, gallery) pair except an item with itself and pairs of one sequence
    (groups), equal to sklearn on those pairs; a callable ``ignore`` gives the same threshold."""
    rng = np.random.default_rng(11)
    g = tied_embeddings(rng, 36, "euclidean")
    q = torch.cat([g[:10], tied_embeddings(rng, 20, "euclidean")])
    gl = rng.integers(0, 4, 36)
    ql = np.concatenate([gl[:10], rng.integers(0, 4, 20)])  # the first 10 queries are also gallery items
    q_ids, g_ids = np.concatenate([np.arange(10), 100 + np.arange(20)]), np.arange(36)
    q_seq, g_seq = rng.integers(0, 6, 30), rng.integers(0, 6, 36)
    values = reference_values(q.numpy(), g.numpy(), "euclidean")
    counted = (q_ids[:, None] != g_ids[None, :]) & (q_seq[:, None] != g_seq[None, :])
    positive = (ql[:, None] == gl[None, :])[counted]
    for fmr in (0.0, 0.05, 0.2):
        expected, fpr, tpr = roc_reference(values[counted], positive, fmr)
        found = calibrate_threshold(
            q, ql, g, gl, fmr=fmr, distance="euclidean", query_ids=q_ids, gallery_ids=g_ids,
            ignore=(q_seq, g_seq), chunk_size=7,
        )  # fmt: skip
        assert found.fmr == fpr
        assert_roc_threshold(found, expected, values[counted], ~positive)
        assert found.fnmr == pytest.approx(1 - tpr, abs=1e-12)
        assert found.num_positive + found.num_negative == int(counted.sum()) < 30 * 36

        def ignore(qi: torch.Tensor, gi: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(q_seq)[qi][:, None] == torch.from_numpy(g_seq)[gi][None, :]

        by_callable = calibrate_threshold(
            q, ql, g, gl, fmr=fmr, distance="euclidean", query_ids=q_ids, gallery_ids=g_ids, ignore=ignore
        )
        assert by_callable == found


def test_leave_one_out_sequences_are_never_paired() -> None:
    rng = np.random.default_rng(5)
    x = tied_embeddings(rng, 40, "euclidean")
    y, seq = rng.integers(0, 4, 40), rng.integers(0, 8, 40)
    values, positive = all_pairs(x, y, "euclidean")
    upper = np.triu_indices(40, 1)
    counted = (seq[:, None] != seq[None, :])[upper]
    expected, fpr, _ = roc_reference(values[counted], positive[counted], 0.1)
    found = calibrate_threshold(x, y, fmr=0.1, distance="euclidean", ignore=seq, chunk_size=3)
    assert (found.value, found.fmr, found.num_positive + found.num_negative) == (expected, fpr, counted.sum())


def test_fmr_zero_and_one() -> None:
    # 1-D points: positives (same label) at distance 1, the closest negative pair at distance 2
    x = torch.tensor([[0.0], [1.0], [3.0], [4.0], [10.0]])
    y = [0, 0, 1, 1, 2]
    zero = calibrate_threshold(x, y, fmr=0.0, distance="euclidean")
    assert (zero.value, zero.fmr, zero.fnmr) == (1.0, 0.0, 0.0)  # the largest positive below 2
    one = calibrate_threshold(x, y, fmr=1.0, distance="euclidean")
    assert (one.value, one.fmr, one.fnmr) == (10.0, 1.0, 0.0)  # every pair matches
    # a negative closer than every positive: at fmr=0 nothing may match, the threshold is just below it
    # (in the values' precision: float32 here, so the value does not round back onto 0.5 in a float32 search)
    x = torch.tensor([[0.0], [0.5], [3.0], [5.0]])
    below = calibrate_threshold(x, [0, 1, 0, 1], fmr=0.0, distance="euclidean")
    assert below.value == float(np.nextafter(np.float32(0.5), np.float32(-1)))
    assert (below.fmr, below.fnmr) == (0.0, 1.0)
    assert not bool(below.accepts(torch.tensor([0.5])))
    assert bool(below.accepts(torch.tensor([0.4999])))


def test_no_positive_pair_or_a_single_class_is_an_error() -> None:
    x = torch.randn(6, 4)
    with pytest.raises(DataError, match=r"no two items .* share a label"):
        calibrate_threshold(x, [0, 1, 2, 3, 4, 5], fmr=0.1)
    with pytest.raises(DataError, match=r"all 6 items have the same label \('cat'\)"):
        calibrate_threshold(x, ["cat"] * 6, fmr=0.1)
    labels = torch.tensor([0, 0, 0, 1, 1, 1])

    def different(qi: torch.Tensor, gi: torch.Tensor) -> torch.Tensor:
        return labels[qi][:, None] != labels[gi][None, :]

    with pytest.raises(DataError, match="every different-label pair is excluded"):
        calibrate_threshold(x, labels, fmr=0.1, ignore=different)
    with pytest.raises(DataError, match="every pair is excluded"):
        calibrate_threshold(x, labels, fmr=0.1, ignore=[0, 0, 0, 0, 0, 0])


@pytest.mark.parametrize("fmr", [-0.1, 1.5, math.nan, True, "0.1"])
def test_bad_rates_and_distances_are_config_errors(fmr) -> None:
    x, y = torch.randn(6, 4), [0, 0, 1, 1, 2, 2]
    with pytest.raises(ConfigError, match="false match rate"):
        calibrate_threshold(x, y, fmr=fmr)


def test_bad_distances_are_config_errors() -> None:
    x, y = torch.randn(6, 4), [0, 0, 1, 1, 2, 2]
    with pytest.raises(ConfigError, match="snr"):
        calibrate_threshold(x, y, fmr=0.1, distance="snr")
    with pytest.raises(ConfigError, match="records its distance by name"):
        calibrate_threshold(x, y, fmr=0.1, distance=distances.Euclidean(normalize_embeddings=True))
    with pytest.raises(ConfigError, match="need labels"):
        calibrate_threshold(x, None, fmr=0.1)
    with pytest.raises(ConfigError, match="must be a distance name"):
        Threshold(0.5, distances.build("cosine"), 0.1, 0.1, 0.5, 3, 4)  # type: ignore[arg-type]


def test_threshold_rates_on_other_pairs() -> None:
    rng = np.random.default_rng(2)
    x, y = torch.randn(50, 8, dtype=torch.float64), rng.integers(0, 5, 50)
    threshold = calibrate_threshold(x, y, fmr=0.05, distance="cosine")
    same = threshold_rates(threshold, x, y, chunk_size=9)
    assert (same.fmr, same.fnmr) == (threshold.fmr, threshold.fnmr)
    other, other_y = torch.randn(40, 8, dtype=torch.float64), rng.integers(0, 5, 40)
    values, positive = all_pairs(other, other_y, "cosine")
    rates = threshold_rates(threshold, other, other_y)
    accepted = values <= -threshold.value
    assert rates.fmr == pytest.approx(np.mean(accepted[~positive]), abs=1e-12)
    assert rates.fnmr == pytest.approx(1 - np.mean(accepted[positive]), abs=1e-12)
    assert (rates.num_positive, rates.num_negative) == (positive.sum(), (~positive).sum())
    # a bare number needs its distance
    assert threshold_rates(threshold.value, other, other_y, distance="cosine") == rates
    with pytest.raises(ConfigError, match="needs its distance"):
        threshold_rates(0.5, other, other_y)


@pytest.mark.parametrize(
    ("name", "pml"), [("cosine", CosineSimilarity()), ("euclidean", LpDistance(normalize_embeddings=False))]
)
def test_is_match_is_pmls_match_finder(name: str, pml) -> None:
    """Thresholds between observed values (PML's ``LpDistance`` adds 1e-6 inside its pairwise distance, so
    values themselves differ in the last digits). PML's ``CosineSimilarity.pairwise_distance`` does not
    normalise (its ``InferenceModel`` normalises the embeddings first), so it gets unit rows."""
    generator = torch.Generator().manual_seed(4)
    a, b = torch.randn(300, 6, generator=generator), torch.randn(300, 6, generator=generator)
    pml_a, pml_b = (F.normalize(a), F.normalize(b)) if name == "cosine" else (a, b)
    ordered = distances.build(name).paired(a, b).sort().values
    for position in (3, 30, 150, 280):
        value = float((ordered[position] + ordered[position + 1]) / 2)
        expected = MatchFinder(pml, threshold=value).is_match(pml_a, pml_b)
        assert np.array_equal(is_match(a, b, value, name).numpy(), expected)
    calibrated = calibrate_threshold(torch.cat([a, b]), list(range(300)) * 2, fmr=0.1, distance=name)
    expected = MatchFinder(pml, threshold=calibrated.value).is_match(pml_a, pml_b)
    assert np.array_equal(is_match(a, b, calibrated).numpy(), expected)
    with pytest.raises(ConfigError, match="ranks by dot"):
        is_match(a, b, calibrated, "dot")


def test_is_match_ties_match() -> None:
    """A pair exactly at the threshold matches: similarity ≥ value (checked against PML on rows whose
    cosines are exact), distance ≤ value."""
    rng = np.random.default_rng(9)
    a, b = tied_embeddings(rng, 200, "cosine"), tied_embeddings(rng, 200, "cosine")
    for value in (0.0, 0.5, -0.5):
        expected = MatchFinder(CosineSimilarity(), threshold=value).is_match(F.normalize(a), F.normalize(b))
        found = is_match(a, b, value, "cosine")
        assert np.array_equal(found.numpy(), expected)
        assert bool((distances.build("cosine").paired(a, b) == value).any())
    a, b = torch.zeros(3, 2), torch.tensor([[3.0, 4.0], [3.0, 5.0], [0.0, 0.0]])  # distances 5, √34, 0
    assert is_match(a, b, 5.0, "euclidean").tolist() == [True, False, True]
    assert is_match(a, b, 25.0, "squared_euclidean").tolist() == [True, False, True]


def test_apply_threshold_and_matches() -> None:
    generator = torch.Generator().manual_seed(6)
    gallery, queries = torch.randn(80, 8, generator=generator), torch.randn(12, 8, generator=generator)
    queries[0] = -gallery.mean(0) * 100  # far from everything under euclidean: no match
    threshold = calibrate_threshold(gallery, torch.arange(80) // 4, fmr=0.05, distance="euclidean")
    found = search(queries, gallery, k=10, distance="euclidean")
    kept = apply_threshold(found, threshold)
    full = torch.cdist(queries.double(), gallery.double())
    for q in range(12):
        within = int((full[q] <= threshold.value).sum())
        # the kept neighbours are the search's own prefix within the threshold; the rest are empty slots
        count = min(within, 10)
        assert torch.equal(kept.topk_indices[q, :count], found.topk_indices[q, :count])
        assert bool((kept.topk_indices[q, count:] == -1).all())
        assert bool((kept.topk_distances[q, count:] == math.inf).all())
    assert bool((kept.topk_indices[0] == -1).all())
    assert torch.equal(matches(queries, gallery, threshold=threshold, k=10).topk_indices, kept.topk_indices)
    with pytest.raises(ConfigError, match="euclidean value, but the search ranks by cosine"):
        apply_threshold(search(queries, gallery, k=3), threshold)
    cosine = apply_threshold(search(queries, gallery, k=3), 0.5)  # a number: in the search's distance
    assert bool((cosine.topk_distances[cosine.topk_indices >= 0] >= 0.5).all())


def test_threshold_file_round_trip_and_errors(tmp_path: Path) -> None:
    x, y = torch.randn(30, 4), torch.arange(30) % 5
    threshold = calibrate_threshold(x, y, fmr=0.1, source="synthetic / val", fingerprint="ab" * 32)
    path = threshold.to_json(tmp_path / "sub" / "threshold.json")
    written = json.loads(path.read_text())
    assert written["format"] == "dmlkit-threshold" and written["rule"].startswith("cosine >= ")
    assert Threshold.from_json(path) == threshold
    assert threshold.tmr == 1 - threshold.fnmr
    with pytest.raises(DataError, match=r"nope\.json not found"):
        Threshold.from_json(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match=r"bad\.json is not valid JSON"):
        Threshold.from_json(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"ids": []}')
    with pytest.raises(DataError, match=r"other\.json is not a dmlkit threshold"):
        Threshold.from_json(tmp_path / "other.json")
    for key, value, message in (
        ("value", None, "lacks the key"),
        ("value", "NaN", "finite number"),
        ("distance", "cosin", "cosine"),
        ("fmr", 2.0, "fmr must be a rate"),
    ):
        broken = dict(written)
        if value is None:
            del broken[key]
        else:
            broken[key] = value
        (tmp_path / "broken.json").write_text(json.dumps(broken))
        with pytest.raises(DataError, match=message) as info:
            Threshold.from_json(tmp_path / "broken.json")
        assert "broken.json" in str(info.value)
