"""Miners against pytorch-metric-learning (PML): same tuples (as sets), registry, compatibility checks."""

from __future__ import annotations

import pytest
import torch

from dmlkit import losses, miners
from dmlkit.errors import ConfigError, UnknownNameError
from dmlkit.losses.base import BaseLoss

pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
pml_distances = pytest.importorskip("pytorch_metric_learning.distances")


def pml_distance(name: str, normalize: bool = True) -> object:
    if name == "euclidean":
        return pml_distances.LpDistance(normalize_embeddings=normalize)
    if name == "squared_euclidean":
        return pml_distances.LpDistance(normalize_embeddings=normalize, power=2)
    if name == "cosine":
        return pml_distances.CosineSimilarity()
    return pml_distances.DotProductSimilarity(normalize_embeddings=normalize)


CONFIGS = [
    ("multisimilarity", {}, lambda: pml_miners.MultiSimilarityMiner()),
    ("multisimilarity", {"epsilon": 0.3}, lambda: pml_miners.MultiSimilarityMiner(epsilon=0.3)),
    (
        "multisimilarity",
        {"epsilon": 0.2, "distance": "euclidean"},
        lambda: pml_miners.MultiSimilarityMiner(epsilon=0.2, distance=pml_distance("euclidean")),
    ),
    (
        "multisimilarity",
        {"distance": "dot", "normalize_embeddings": False, "epsilon": 1.0},
        lambda: pml_miners.MultiSimilarityMiner(epsilon=1.0, distance=pml_distance("dot", False)),
    ),
    ("batch_hard", {}, lambda: pml_miners.BatchHardMiner()),
    (
        "batch_hard",
        {"distance": "cosine"},
        lambda: pml_miners.BatchHardMiner(distance=pml_distance("cosine")),
    ),
    (
        "batch_hard",
        {"distance": "squared_euclidean", "normalize_embeddings": False},
        lambda: pml_miners.BatchHardMiner(distance=pml_distance("squared_euclidean", False)),
    ),
    (
        "batch_hard",
        {"allowed_pos_range": (0.2, 1.2), "allowed_neg_range": (0.5, 1.6)},
        lambda: pml_miners.BatchHardMiner(allowed_pos_range=(0.2, 1.2), allowed_neg_range=(0.5, 1.6)),
    ),
]
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'default'}" for n, kw, _ in CONFIGS]
SHAPES = [(8, 4, 3), (24, 8, 5), (48, 16, 12)]


def make_batch(
    b: int, d: int, classes: int, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g, dtype=dtype), torch.randint(0, classes, (b,), generator=g)


def as_sets(t: tuple) -> tuple[set, ...]:
    """Pairs → (positive pairs, negative pairs); triplets → (triplets,)."""
    t = [x.tolist() for x in t]
    if len(t) == 4:
        return set(zip(t[0], t[1], strict=True)), set(zip(t[2], t[3], strict=True))
    return (set(zip(*t, strict=True)),)


def assert_same_tuples(ours: tuple, theirs: tuple) -> None:
    assert len(ours) == len(theirs)
    assert all(x.dtype == torch.long and x.ndim == 1 for x in ours)
    assert as_sets(ours) == as_sets(theirs)
    assert [len(x) for x in ours] == [len(x) for x in theirs]  # no duplicates lost or added


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize(("name", "kwargs", "pml_factory"), CONFIGS, ids=IDS)
def test_same_tuples_as_pml(name, kwargs, pml_factory, shape, dtype) -> None:
    emb, labels = make_batch(*shape, dtype, seed=sum(shape))
    miner = miners.build(name, **kwargs)
    ours = miner(emb, labels)
    assert len(ours) == (4 if miner.output_kind == "pairs" else 3)
    assert_same_tuples(ours, pml_factory()(emb, labels))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize(("name", "kwargs", "pml_factory"), CONFIGS, ids=IDS)
def test_same_tuples_as_pml_with_ref(name, kwargs, pml_factory, dtype) -> None:
    emb, labels = make_batch(12, 8, 4, dtype, seed=1)
    ref, ref_labels = make_batch(30, 8, 4, dtype, seed=2)
    ours = miners.build(name, **kwargs)(emb, labels, ref, ref_labels)
    assert_same_tuples(ours, pml_factory()(emb, labels, ref, ref_labels))


EDGE_LABELS = {
    "all_same": torch.zeros(10, dtype=torch.long),
    "all_distinct": torch.arange(10),
    "singletons": torch.tensor([0, 0, 0, 1, 2, 3, 3, 4, 5, 6]),
}


@pytest.mark.parametrize("labels_name", sorted(EDGE_LABELS))
@pytest.mark.parametrize(("name", "kwargs", "pml_factory"), CONFIGS, ids=IDS)
def test_degenerate_labels_match_pml(name, kwargs, pml_factory, labels_name) -> None:
    labels = EDGE_LABELS[labels_name]
    emb = torch.randn(len(labels), 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours = miners.build(name, **kwargs)(emb, labels)
    assert_same_tuples(ours, pml_factory()(emb, labels))
    if labels_name != "singletons":
        assert all(len(x) == 0 for x in ours)


def test_mining_is_gradient_free_and_stats_match_formulas() -> None:
    emb, labels = make_batch(16, 8, 4, torch.float64, seed=9)
    emb.requires_grad_(True)
    miner = miners.build("multisimilarity")
    a1, p, a2, n = miner(emb, labels)
    assert not any(t.requires_grad for t in (a1, p, a2, n))
    x = torch.nn.functional.normalize(emb.detach(), dim=1)
    sim = x @ x.T
    stats = miner.last_stats
    assert stats["num_pos_pairs"] == len(a1) and stats["num_neg_pairs"] == len(a2)
    assert stats["mean_pos_distance"] == pytest.approx(float(sim[a1, p].mean()), rel=1e-12)
    assert stats["mean_neg_distance"] == pytest.approx(float(sim[a2, n].mean()), rel=1e-12)

    bh = miners.build("batch_hard")
    a, p, n = bh(emb, labels)
    dist = torch.cdist(x, x)
    assert bh.last_stats["num_triplets"] == len(a)
    assert bh.last_stats["mean_pos_distance"] == pytest.approx(float(dist[a, p].mean()), rel=1e-9)
    assert bh.last_stats["mean_neg_distance"] == pytest.approx(float(dist[a, n].mean()), rel=1e-9)


def test_empty_mining_reports_nan_means() -> None:
    miner = miners.build("batch_hard")
    miner(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))
    stats = miner.last_stats
    assert stats["num_triplets"] == 0.0 and stats["mean_pos_distance"] != stats["mean_pos_distance"]


@pytest.mark.parametrize("name", ["multisimilarity", "batch_hard"])
def test_bf16_autocast_mining_runs(name: str) -> None:
    emb, labels = make_batch(24, 16, 5, torch.float32, seed=3)
    miner = miners.build(name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = miner(emb.bfloat16(), labels)
    assert all(t.dtype == torch.long for t in ours) and len(ours[0]) > 0
    assert all(v == v for v in miner.last_stats.values())  # no NaN: something was mined


# ---------------------------------------------------------------------------------------------- registry


def test_registry_and_errors() -> None:
    assert {"multisimilarity", "batch_hard"} <= set(miners.available())
    with pytest.raises(UnknownNameError, match="did you mean 'batch_hard'"):
        miners.build("batchhard")
    with pytest.raises(UnknownNameError, match=r"'epsilo'.*did you mean 'epsilon'"):
        miners.build("multisimilarity", epsilo=0.2)
    with pytest.raises(ConfigError, match="allowed_pos_range"):
        miners.build("batch_hard", allowed_pos_range=(1.0, 0.0))


@pytest.mark.parametrize("name", miners.available())
def test_every_registered_miner_declares_its_output(name: str) -> None:
    cls = miners.REGISTRY.get(name)
    assert issubclass(cls, miners.BaseMiner) and cls.registry_name == name
    assert cls.output_kind in ("pairs", "triplets")
    assert miners.output_kind(name) == cls.output_kind


# ---------------------------------------------------------------------------------------------- compatibility


def test_pml_style_losses_take_both_kinds() -> None:
    for loss_name in ("multisimilarity", "contrastive", "triplet"):
        for miner_name in miners.available():
            miners.check_compatible(losses.REGISTRY.get(loss_name), miner_name)  # class + name
            miners.check_compatible(losses.build(loss_name), miners.build(miner_name))  # instances


def test_incompatible_miner_is_named_with_alternatives() -> None:
    class PairsOnly(BaseLoss):
        tuple_kinds = frozenset({"pairs"})
        registry_name = "pairs_only"

    class NoMiner(BaseLoss):
        pass

    with pytest.raises(
        ConfigError,
        match=r"loss 'pairs_only' cannot use miner 'batch_hard' \(it outputs triplets\); "
        r"miners that fit: [^(]*\bmultisimilarity\b.*triplets \(a, p, n\) are used as pairs \(a, p, a, n\)",
    ):
        miners.check_compatible(PairsOnly, "batch_hard")
    with pytest.raises(ConfigError, match=r"cannot use miner 'batch_hard'"):
        miners.check_compatible(PairsOnly(), miners.build("batch_hard"))
    with pytest.raises(
        ConfigError, match="loss NoMiner cannot use miner 'multisimilarity': it takes no miner"
    ):
        miners.check_compatible(NoMiner, "multisimilarity")
    with pytest.raises(UnknownNameError, match="did you mean 'batch_hard'"):
        miners.check_compatible(PairsOnly, "batch_hardd")


def test_mined_tuples_feed_losses_end_to_end() -> None:
    emb, labels = make_batch(24, 8, 4, torch.float32, seed=4)
    emb.requires_grad_(True)
    for miner_name in miners.available():
        for loss_name in ("multisimilarity", "contrastive", "triplet"):
            value = losses.build(loss_name)(emb, labels, miners.build(miner_name)(emb, labels))
            value.backward()
            assert torch.isfinite(value) and torch.isfinite(emb.grad).all()
            emb.grad = None
