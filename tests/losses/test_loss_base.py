"""Loss registry, base-class contract, reductions, validation and the documented deviations from PML."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from dmlkit import losses
from dmlkit.errors import ConfigError, DataError, UnknownNameError
from dmlkit.losses.base import BaseLoss, masked_logsumexp, reduce
from dmlkit.tuples import TUPLE_KINDS

F64 = {"rtol": 1e-8, "atol": 1e-12}


def batch(b: int = 12, d: int = 6, classes: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g, dtype=torch.float64), torch.randint(0, classes, (b,), generator=g)


# ---------------------------------------------------------------------------------------------- registry


def test_available_and_build() -> None:
    assert {"multisimilarity", "contrastive", "triplet"} <= set(losses.available())
    assert losses.available() == losses.REGISTRY.available()
    loss = losses.build("multisimilarity", alpha=3)
    assert isinstance(loss, losses.MultiSimilarityLoss) and loss.alpha == 3.0


def test_unknown_loss_name_suggests_closest() -> None:
    with pytest.raises(UnknownNameError, match=r"'multisimilarty'.*did you mean 'multisimilarity'"):
        losses.build("multisimilarty")


@pytest.mark.parametrize(
    ("name", "kwarg", "suggestion"),
    [
        ("triplet", "margn", "margin"),
        ("contrastive", "neg_margn", "neg_margin"),
        ("multisimilarity", "bta", "beta"),
    ],
)
def test_misspelt_kwarg_names_it_and_suggests(name: str, kwarg: str, suggestion: str) -> None:
    with pytest.raises(UnknownNameError, match=rf"'{kwarg}'.*did you mean '{suggestion}'"):
        losses.build(name, **{kwarg: 0.1})


def test_bad_option_values_are_config_errors() -> None:
    with pytest.raises(UnknownNameError, match="did you mean 'cosine'"):
        losses.build("contrastive", distance="cosin")
    with pytest.raises(UnknownNameError, match="did you mean 'avg_non_zero'"):
        losses.build("triplet", reduction="avg_nonzero")
    with pytest.raises(ConfigError, match="triplets_per_anchor"):
        losses.build("triplet", triplets_per_anchor=0)
    with pytest.raises(ConfigError, match="alpha"):
        losses.build("multisimilarity", alpha=0)


@pytest.mark.parametrize("name", losses.available())
def test_every_registered_loss_honours_the_base_contract(name: str) -> None:
    cls = losses.REGISTRY.get(name)
    assert issubclass(cls, BaseLoss) and cls.registry_name == name
    assert cls.tuple_kinds <= TUPLE_KINDS
    assert cls.needs <= {"num_classes", "embedding_size"}
    assert isinstance(cls.accepts_ref, bool)
    params = inspect.signature(cls).parameters.values()
    # explicit keywords only: the registry can only catch misspelt options without **kwargs
    assert not any(p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) for p in params)
    assert {p.name for p in params if p.default is inspect.Parameter.empty} <= cls.needs


def test_trainer_facing_attributes_of_first_losses() -> None:
    for name in ("multisimilarity", "contrastive", "triplet"):
        loss = losses.build(name)
        assert loss.tuple_kinds == frozenset({"pairs", "triplets"})
        assert loss.accepts_ref is True
        assert loss.needs == frozenset()
        assert list(loss.parameters()) == []


# ---------------------------------------------------------------------------------------------- reductions


def test_reductions_against_formulas() -> None:
    x = torch.tensor([0.0, 2.0, 0.0, 1.0, 3.0], dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(reduce(x, "mean"), torch.tensor(6.0 / 5, dtype=torch.float64))
    torch.testing.assert_close(reduce(x, "sum"), torch.tensor(6.0, dtype=torch.float64))
    value = reduce(x, "avg_non_zero")
    torch.testing.assert_close(value, torch.tensor(2.0, dtype=torch.float64))
    value.backward()
    torch.testing.assert_close(x.grad, torch.tensor([0, 1 / 3, 0, 1 / 3, 1 / 3], dtype=torch.float64))
    for how in ("mean", "sum", "avg_non_zero"):
        empty = reduce(torch.zeros(0), how)
        assert empty.item() == 0.0
        assert reduce(torch.zeros(4), how).item() == 0.0
    with pytest.raises(UnknownNameError, match="reduction 'avg'"):
        reduce(x, "avg")


def test_reducers_are_a_registry_with_masked_and_divisor_forms() -> None:
    assert losses.reducers.available() == [
        "avg_non_zero",
        "class_weighted",
        "do_nothing",
        "mean",
        "per_anchor",
        "sum",
        "threshold",
    ]
    with pytest.raises(UnknownNameError, match="unknown reduction 'mena'; did you mean 'mean'"):
        losses.reducers.build("mena")
    with pytest.raises(UnknownNameError, match="reduction 'means'; did you mean 'mean'"):
        losses.build("contrastive", reduction="means")
    x = torch.tensor([0.0, 2.0, -1.0, 1.0, 3.0], dtype=torch.float64)
    mask = torch.tensor([True, True, True, False, False])
    count, active = torch.tensor(3), torch.tensor(1)
    expected_divisor = {"mean": 3, "avg_non_zero": 1, "sum": 1}
    for name in ("mean", "avg_non_zero", "sum"):  # the fusable ones (others: test_reducers_pml.py)
        reducer = losses.reducers.build(name)
        assert reducer.fusable
        assert repr(losses.build("contrastive", reduction=name).reducer) == repr(reducer)
        torch.testing.assert_close(reducer.masked(x, mask), reduce(x[mask], name))
        torch.testing.assert_close(reducer(x), reduce(x, name))
        assert int(reducer.divisor(count, active)) == expected_divisor[name]


def test_protocols_describe_the_losses() -> None:
    loss = losses.build("contrastive")
    assert isinstance(loss, losses.Loss) and isinstance(
        losses.build("multiple", losses=["triplet"]), losses.Loss
    )
    assert not isinstance(torch.nn.MSELoss(), losses.Loss)  # a foreign loss: no tuple_kinds, accepts_ref, ...


SNR_READY = {"num_classes": 4, "embedding_size": 6}


@pytest.mark.parametrize("name", sorted(set(losses.available()) - {"multiple"}))
def test_snr_distance_works_or_is_refused_by_name(name: str) -> None:
    """``distance="snr"`` (asymmetric, unbounded) for every loss: a finite value and gradient, or a
    ConfigError naming the distance."""
    cls = losses.REGISTRY.get(name)
    params = inspect.signature(cls).parameters
    if "distance" not in params:
        pytest.skip("no distance")
    extra = {key: value for key, value in SNR_READY.items() if key in params}
    try:
        loss = losses.build(name, distance="snr", **extra)
    except ConfigError as exc:
        assert "distance" in str(exc) and "snr" in str(exc)
        return
    assert loss.distance == "snr" and not loss.is_similarity
    emb, labels = batch()
    emb.requires_grad_()
    value = loss(emb, labels)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(emb.grad).all()


def test_masked_logsumexp_matches_pml() -> None:
    lmu = pytest.importorskip("pytorch_metric_learning.utils.loss_and_miner_utils")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 7, generator=g, dtype=torch.float64) * 5
    mask = torch.rand(6, 7, generator=g) > 0.5
    mask[2] = False
    for add_one in (True, False):
        ours = masked_logsumexp(x, mask, add_one)
        torch.testing.assert_close(ours, lmu.logsumexp(x, mask, add_one=add_one).squeeze(1), **F64)
    assert ours[2].item() == 0.0


# ---------------------------------------------------------------------------------------------- validation


def test_input_validation_names_the_culprit() -> None:
    emb, labels = batch()
    loss = losses.build("contrastive")
    with pytest.raises(DataError, match="labels must be an integer"):
        loss(emb, labels.double())
    with pytest.raises(DataError, match=r"labels must have shape \(12,\)"):
        loss(emb, labels[:5])
    with pytest.raises(DataError, match="embeddings must be a 2-D"):
        loss(emb[0], labels)
    with pytest.raises(ConfigError, match="ref_emb and ref_labels must be given together"):
        loss(emb, labels, ref_emb=emb.clone())
    with pytest.raises(DataError, match="width 6"):
        loss(emb, labels, ref_emb=torch.randn(3, 5), ref_labels=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ConfigError, match="length 2"):
        loss(emb, labels, (labels, labels))
    with pytest.raises(DataError, match="mismatched lengths"):
        loss(emb, labels, (torch.tensor([0, 1]), torch.tensor([1]), torch.tensor([2, 3])))
    with pytest.raises(DataError, match="int64"):
        loss(emb, labels, (torch.tensor([0.0]), torch.tensor([1.0]), torch.tensor([2.0])))


def test_losses_without_tuple_kinds_or_ref_refuse_them() -> None:
    class ProxyLike(BaseLoss):
        accepts_ref = False

        def compute_loss(self, batch):
            return batch.embeddings.sum()

    emb, labels = batch()
    loss = ProxyLike()
    assert loss(emb, labels).item() == pytest.approx(emb.sum().item())
    with pytest.raises(
        ConfigError, match="cannot use an indices_tuple of triplets; it takes no miner output"
    ):
        loss(emb, labels, (labels[:1], labels[:1], labels[:1]))
    with pytest.raises(ConfigError, match="does not accept ref_emb"):
        loss(emb, labels, ref_emb=emb.clone(), ref_labels=labels.clone())
    loss(emb, labels, ref_emb=emb, ref_labels=labels)  # the batch itself, by identity: allowed


def test_ref_is_batch_by_identity_matches_no_ref() -> None:
    emb, labels = batch()
    for name in losses.available():
        cls = losses.REGISTRY.get(name)
        if not cls.accepts_ref:
            continue
        kwargs = {"losses": ["contrastive"]} if name == "multiple" else {}
        loss = losses.build(name, **kwargs)
        torch.testing.assert_close(loss(emb, labels, ref_emb=emb, ref_labels=labels), loss(emb, labels))


# -------------------------------------------------------------------------------------- independent formulas


def ms_loop(emb: torch.Tensor, labels: torch.Tensor, alpha=2.0, beta=50.0, base=0.5) -> float:
    """Multi-similarity loss written from Wang et al. (2019), Eq. 5, with plain loops."""
    x = torch.nn.functional.normalize(emb, dim=1)
    total = 0.0
    for i in range(len(x)):
        pos = [float(x[i] @ x[j]) for j in range(len(x)) if j != i and labels[j] == labels[i]]
        neg = [float(x[i] @ x[j]) for j in range(len(x)) if labels[j] != labels[i]]
        if pos:
            total += math.log(1 + sum(math.exp(-alpha * (s - base)) for s in pos)) / alpha
        if neg:
            total += math.log(1 + sum(math.exp(beta * (s - base)) for s in neg)) / beta
    return total / len(x)


def test_multisimilarity_matches_loop_formula() -> None:
    emb, labels = batch(10, 5, 3, seed=4)
    assert losses.build("multisimilarity")(emb, labels).item() == pytest.approx(
        ms_loop(emb, labels), rel=1e-10
    )


def test_single_pos_and_neg_pair_is_not_zeroed() -> None:
    """Deviation: PML returns 0 whenever every index tensor has ≤ 1 entry; we compute the loss."""
    emb = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    ref = torch.tensor([[0.6, 0.8], [0.8, 0.6]], dtype=torch.float64)
    labels, ref_labels = torch.tensor([0]), torch.tensor([0, 1])
    d_pos, d_neg = float(torch.dist(emb[0], ref[0])), float(torch.dist(emb[0], ref[1]))
    value = losses.build("contrastive")(emb, labels, ref_emb=ref, ref_labels=ref_labels)
    assert value.item() == pytest.approx(d_pos + max(0.0, 1.0 - d_neg), rel=1e-12)
    ms = losses.build("multisimilarity")(emb, labels, ref_emb=ref, ref_labels=ref_labels)
    expected = math.log(1 + math.exp(-2 * (0.6 - 0.5))) / 2 + math.log(1 + math.exp(50 * (0.8 - 0.5))) / 50
    assert ms.item() == pytest.approx(expected, rel=1e-12)


def test_triplet_swap_with_ref_uses_reference_pn_distance() -> None:
    """Deviation: with ref_emb, d(p, n) is measured between reference rows p and n (PML indexes mat[p, n])."""
    emb, labels = batch(6, 4, 2, seed=5)
    ref, ref_labels = batch(9, 4, 2, seed=6)
    x, r = torch.nn.functional.normalize(emb, dim=1), torch.nn.functional.normalize(ref, dim=1)
    losses_ = []
    for a in range(6):
        for p in range(9):
            for n in range(9):
                if ref_labels[p] == labels[a] and ref_labels[n] != labels[a]:
                    an = min(float(torch.dist(x[a], r[n])), float(torch.dist(r[p], r[n])))
                    losses_.append(max(0.0, float(torch.dist(x[a], r[p])) - an + 0.3))
    nonzero = [v for v in losses_ if v > 0]
    expected = sum(nonzero) / len(nonzero)
    value = losses.build("triplet", margin=0.3, swap=True)(emb, labels, ref_emb=ref, ref_labels=ref_labels)
    assert value.item() == pytest.approx(expected, rel=1e-10)


# ---------------------------------------------------------------------------------------------- statistics


def test_last_stats_count_pairs_and_triplets() -> None:
    emb, labels = batch(12, 6, 4, seed=2)
    same = labels[:, None] == labels[None, :]
    n_pos, n_neg = int(same.sum()) - 12, int((~same).sum())

    contrastive = losses.build("contrastive")
    contrastive(emb, labels)
    stats = contrastive.last_stats
    assert stats["num_pos_pairs"] == n_pos and stats["num_neg_pairs"] == n_neg
    x = torch.nn.functional.normalize(emb, dim=1)
    dist = torch.cdist(x, x)
    assert stats["num_active_neg_pairs"] == int(((dist < 1.0) & ~same).sum())
    assert stats["num_active_pos_pairs"] == n_pos
    assert all(isinstance(v, float) for v in stats.values())

    ms = losses.build("multisimilarity")
    ms(emb, labels)
    assert ms.last_stats == {"num_pos_pairs": n_pos, "num_neg_pairs": n_neg}

    triplet = losses.build("triplet")
    triplet(emb, labels)
    per_anchor = (same.sum(1) - 1) * (~same).sum(1)
    assert triplet.last_stats["num_triplets"] == int(per_anchor.sum())
    assert 0 < triplet.last_stats["num_active_triplets"] <= triplet.last_stats["num_triplets"]


def test_mined_duplicates_count_once_for_matrix_losses_and_repeatedly_for_pair_losses() -> None:
    emb, labels = batch(8, 4, 2, seed=3)
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    t = (torch.tensor([0, 0]), torch.tensor([1, 1]), torch.tensor([4, 5]))  # (0, 1) appears twice as a pair
    ms = losses.build("multisimilarity")
    ms(emb, labels, t)
    assert ms.last_stats == {"num_pos_pairs": 1.0, "num_neg_pairs": 2.0}
    contrastive = losses.build("contrastive")
    contrastive(emb, labels, t)
    assert contrastive.last_stats["num_pos_pairs"] == 2.0
