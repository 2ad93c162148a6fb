"""Index-tuple helpers (dmlkit.tuples) against PML's loss_and_miner_utils, and the validated call (Batch)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dmlkit import tuples
from dmlkit.errors import ConfigError, DataError

lmu = pytest.importorskip("pytorch_metric_learning.utils.loss_and_miner_utils")

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


def test_pair_counts_add_duplicates_and_masks_collapse_them() -> None:
    pairs = (torch.tensor([0, 0, 2]), torch.tensor([1, 1, 3]), torch.tensor([1, 1]), torch.tensor([2, 2]))
    pos, neg = tuples.pair_counts(pairs, (4, 5), torch.device("cpu"))
    assert pos.dtype == torch.long and pos[0, 1] == 2 and pos[2, 3] == 1 and pos.sum() == 3
    assert neg[1, 2] == 2 and neg.sum() == 2
    pos_mask, neg_mask = tuples.pair_masks(pairs, (4, 5), torch.device("cpu"))
    assert torch.equal(pos_mask, pos > 0) and torch.equal(neg_mask, neg > 0)


@pytest.mark.parametrize("with_ref", [False, True], ids=["self", "ref"])
def test_batch_helpers_leave_out_excluded_pairs(with_ref: bool) -> None:
    labels = LABELS["mixed"]
    ref = REF_LABELS if with_ref else None
    size = len(REF_LABELS) if with_ref else len(labels)
    exclude = torch.rand(len(labels), size, generator=torch.Generator().manual_seed(0)) < 0.3
    emb = torch.randn(len(labels), 3)
    ref_emb = torch.randn(size, 3) if with_ref else None
    batch = tuples.Batch(emb, labels, ref_emb, ref, exclude)
    assert batch.own_reference is not with_ref
    assert batch.reference is (ref_emb if with_ref else emb)
    assert torch.equal(batch.reference_labels, REF_LABELS if with_ref else labels)
    assert torch.equal(batch.same_labels(), labels[:, None] == batch.reference_labels[None, :])
    for ours, theirs in zip(batch.label_masks(), tuples.label_masks(labels, ref, exclude), strict=True):
        assert torch.equal(ours, theirs)
    assert_equal_tuples(batch.all_pairs(), tuples.all_pairs(labels, ref, exclude))
    assert_equal_tuples(batch.to_pairs(), tuples.all_pairs(labels, ref, exclude))
    assert_equal_tuples(batch.to_triplets(), tuples.all_triplets(labels, ref, exclude))
    rows, cols, is_pos = batch.same_label_entries()
    pos = torch.zeros(len(labels), size, dtype=torch.bool)
    pos[rows[is_pos], cols[is_pos]] = True
    assert torch.equal(pos, batch.label_masks()[0])
    assert torch.equal(labels[rows], batch.reference_labels[cols])


def test_checked_batch_validates_and_upcasts() -> None:
    emb, labels = torch.randn(4, 3).half(), torch.tensor([0, 1, 0, 1])
    batch = tuples.checked_batch(emb, labels, emb, labels, None, "miner", "demo")
    assert batch.ref_emb is None and batch.own_reference  # the batch itself, by identity
    assert batch.embeddings.dtype == torch.float32
    with pytest.raises(ConfigError, match="miner 'demo': ref_exclude needs ref_emb/ref_labels"):
        tuples.checked_batch(emb, labels, None, None, torch.zeros(4, 4, dtype=torch.bool), "miner", "demo")
    with pytest.raises(DataError, match="demo: ref_exclude has shape"):
        tuples.checked_batch(
            emb, labels, emb.clone(), labels.clone(), torch.zeros(4, 3, dtype=torch.bool), "loss", "demo"
        )
