"""Index-tuple helpers and the distance matrix against PML's loss_and_miner_utils and distances."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dmlkit.errors import ConfigError
from dmlkit.miners import tuples

lmu = pytest.importorskip("pytorch_metric_learning.utils.loss_and_miner_utils")
pml_distances = pytest.importorskip("pytorch_metric_learning.distances")

LABELS = {
    "mixed": torch.tensor([0, 1, 0, 2, 1, 1, 3, 0]),
    "all_same": torch.zeros(5, dtype=torch.long),
    "all_distinct": torch.arange(5),
}
REF_LABELS = torch.tensor([1, 0, 0, 4, 2, 2])


def assert_equal_tuples(ours: tuple, theirs: tuple) -> None:
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert a.dtype == torch.long
        assert torch.equal(a, b.long())


@pytest.mark.parametrize("with_ref", [False, True], ids=["self", "ref"])
@pytest.mark.parametrize("name", sorted(LABELS))
def test_all_pairs_and_triplets_match_pml(name: str, with_ref: bool) -> None:
    labels = LABELS[name]
    ref = REF_LABELS if with_ref else None
    # PML decides "the reference is the batch" by identity of the labels tensor
    pml_ref = REF_LABELS if with_ref else labels
    assert_equal_tuples(tuples.all_pairs(labels, ref), lmu.get_all_pairs_indices(labels, pml_ref))
    assert_equal_tuples(tuples.all_triplets(labels, ref), lmu.get_all_triplets_indices(labels, pml_ref))
    assert_equal_tuples(tuples.to_pairs(None, labels, ref), lmu.convert_to_pairs(None, labels, pml_ref))
    assert_equal_tuples(
        tuples.to_triplets(None, labels, ref), lmu.convert_to_triplets(None, labels, pml_ref, "all")
    )


def test_conversions_match_pml() -> None:
    labels = LABELS["mixed"]
    pairs = lmu.get_all_pairs_indices(labels)
    triplets = lmu.get_all_triplets_indices(labels)
    assert_equal_tuples(tuples.to_pairs(triplets, labels), lmu.convert_to_pairs(triplets, labels))
    assert_equal_tuples(tuples.to_triplets(pairs, labels), lmu.convert_to_triplets(pairs, labels))
    assert_equal_tuples(tuples.to_pairs(pairs, labels), pairs)
    assert_equal_tuples(tuples.to_triplets(triplets, labels), triplets)
    # a subset of pairs whose anchors only partly overlap
    sub = (pairs[0][::3], pairs[1][::3], pairs[2][::2], pairs[3][::2])
    assert_equal_tuples(tuples.pairs_to_triplets(sub), lmu.convert_to_triplets(sub, labels))


def test_masks() -> None:
    labels = LABELS["mixed"]
    pos, neg = tuples.label_masks(labels)
    for i in range(len(labels)):
        for j in range(len(labels)):
            assert pos[i, j] == (i != j and labels[i] == labels[j])
            assert neg[i, j] == (labels[i] != labels[j])
    a1, p, a2, n = tuples.all_pairs(labels)
    pos2, neg2 = tuples.pair_masks((a1, p, a2, n), tuple(pos.shape), pos.device)
    assert torch.equal(pos, pos2) and torch.equal(neg, neg2)
    pos_r, neg_r = tuples.label_masks(labels, REF_LABELS)
    assert pos_r.shape == (8, 6) and torch.equal(pos_r, labels[:, None] == REF_LABELS[None, :])
    assert torch.equal(neg_r, ~pos_r)


@settings(max_examples=25, deadline=None)
@given(
    labels=st.lists(st.integers(0, 4), min_size=1, max_size=16),
    ref=st.one_of(st.none(), st.lists(st.integers(0, 4), min_size=1, max_size=16)),
    per_anchor=st.integers(1, 4),
)
def test_random_triplets_are_valid_and_per_anchor(
    labels: list[int], ref: list[int] | None, per_anchor: int
) -> None:
    lab = torch.tensor(labels)
    ref_lab = None if ref is None else torch.tensor(ref)
    a, p, n = tuples.random_triplets(lab, ref_lab, per_anchor)
    r = lab if ref_lab is None else ref_lab
    assert a.dtype == p.dtype == n.dtype == torch.long
    assert torch.all(lab[a] == r[p]) and torch.all(lab[a] != r[n])
    if ref_lab is None:
        assert torch.all(a != p)
    expected_anchors = [
        i
        for i in range(len(labels))
        if any(r[j] == lab[i] and (ref_lab is not None or j != i) for j in range(len(r)))
        and any(r[j] != lab[i] for j in range(len(r)))
    ]
    assert a.tolist() == [i for i in expected_anchors for _ in range(per_anchor)]


def test_tuple_kind_and_validation() -> None:
    t = (torch.tensor([0]), torch.tensor([1]), torch.tensor([2]))
    assert tuples.tuple_kind(t) == "triplets" and tuples.tuple_kind((*t, t[0])) == "pairs"
    with pytest.raises(ConfigError):
        tuples.tuple_kind(t[:2])
    # pairs may have different numbers of positive and negative pairs
    assert tuples.check_indices_tuple((t[0], t[1], torch.tensor([0, 1]), torch.tensor([2, 3]))) == "pairs"


PML_DISTANCES = {
    ("euclidean", True): lambda: pml_distances.LpDistance(),
    ("euclidean", False): lambda: pml_distances.LpDistance(normalize_embeddings=False),
    ("squared_euclidean", True): lambda: pml_distances.LpDistance(power=2),
    ("cosine", True): lambda: pml_distances.CosineSimilarity(),
    ("dot", True): lambda: pml_distances.DotProductSimilarity(),
    ("dot", False): lambda: pml_distances.DotProductSimilarity(normalize_embeddings=False),
}


@pytest.mark.parametrize(("distance", "normalize"), sorted(PML_DISTANCES))
def test_distance_matrix_matches_pml(distance: str, normalize: bool) -> None:
    g = torch.Generator().manual_seed(0)
    x, y = (
        torch.randn(7, 5, generator=g, dtype=torch.float64),
        torch.randn(9, 5, generator=g, dtype=torch.float64),
    )
    pml = PML_DISTANCES[(distance, normalize)]()
    torch.testing.assert_close(tuples.distance_matrix(x, y, distance, normalize), pml(x, y))
    ours_self = tuples.distance_matrix(x, None, distance, normalize)
    off_diag = ~torch.eye(7, dtype=torch.bool)
    torch.testing.assert_close(ours_self[off_diag], pml(x)[off_diag])
    # row-wise variant agrees with the matrix
    torch.testing.assert_close(
        tuples.paired_distance(x, y[:7], distance, normalize),
        tuples.distance_matrix(x, y[:7], distance, normalize).diagonal(),
    )


def test_distance_matrix_upcasts_half_precision() -> None:
    x = torch.randn(4, 3).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mat = tuples.distance_matrix(x, None, "cosine")
    assert mat.dtype == torch.float32
    torch.testing.assert_close(mat, tuples.distance_matrix(x.float(), None, "cosine"))
