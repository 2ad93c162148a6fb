"""Losses against pytorch-metric-learning (PML): value and gradient, on seeded random inputs."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from dmlkit import losses

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
pml_distances = pytest.importorskip("pytorch_metric_learning.distances")

TOL = {torch.float64: {"rtol": 1e-8, "atol": 1e-12}, torch.float32: {"rtol": 1e-5, "atol": 1e-7}}


def pml_distance(name: str, normalize: bool = True) -> object:
    if name == "euclidean":
        return pml_distances.LpDistance(normalize_embeddings=normalize)
    if name == "squared_euclidean":
        return pml_distances.LpDistance(normalize_embeddings=normalize, power=2)
    if name == "cosine":
        return pml_distances.CosineSimilarity()
    return pml_distances.DotProductSimilarity(normalize_embeddings=normalize)


# (our name, our kwargs, PML factory): defaults first, then non-default hyperparameters and distances.
CONFIGS: list[tuple[str, dict, Callable[[], torch.nn.Module]]] = [
    ("multisimilarity", {}, lambda: pml_losses.MultiSimilarityLoss()),
    (
        "multisimilarity",
        {"alpha": 1.5, "beta": 20.0, "base": 0.3},
        lambda: pml_losses.MultiSimilarityLoss(alpha=1.5, beta=20.0, base=0.3),
    ),
    (
        "multisimilarity",
        {"distance": "euclidean", "base": 1.0, "beta": 10.0},
        lambda: pml_losses.MultiSimilarityLoss(base=1.0, beta=10.0, distance=pml_distance("euclidean")),
    ),
    ("contrastive", {}, lambda: pml_losses.ContrastiveLoss()),
    (
        "contrastive",
        {"pos_margin": 0.9, "neg_margin": 0.1, "distance": "cosine"},
        lambda: pml_losses.ContrastiveLoss(pos_margin=0.9, neg_margin=0.1, distance=pml_distance("cosine")),
    ),
    (
        "contrastive",
        {
            "pos_margin": 1.0,
            "neg_margin": 6.0,
            "distance": "squared_euclidean",
            "normalize_embeddings": False,
        },
        lambda: pml_losses.ContrastiveLoss(
            pos_margin=1.0, neg_margin=6.0, distance=pml_distance("squared_euclidean", False)
        ),
    ),
    ("triplet", {}, lambda: pml_losses.TripletMarginLoss()),
    (
        "triplet",
        {"margin": 0.3, "swap": True},
        lambda: pml_losses.TripletMarginLoss(margin=0.3, swap=True),
    ),
    (
        "triplet",
        {"margin": 0.1, "distance": "cosine"},
        lambda: pml_losses.TripletMarginLoss(margin=0.1, distance=pml_distance("cosine")),
    ),
    (
        "triplet",
        {"smooth_loss": True, "distance": "dot", "normalize_embeddings": False, "reduction": "mean"},
        lambda: pml_losses.TripletMarginLoss(
            smooth_loss=True,
            distance=pml_distance("dot", False),
            reducer=__import__("pytorch_metric_learning.reducers", fromlist=["x"]).MeanReducer(),
        ),
    ),
]
CONFIG_IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'default'}" for name, kw, _ in CONFIGS]

SHAPES = [(8, 4, 3), (24, 8, 5), (40, 16, 12)]  # (batch, dim, classes): the last has single-sample classes


def make_batch(
    batch: int, dim: int, classes: int, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(batch, dim, generator=g, dtype=dtype)
    labels = torch.randint(0, classes, (batch,), generator=g)
    # at least two classes with two samples each, so every mining mode has something to find
    labels[:4] = torch.tensor([0, 0, 1, 1])
    return emb, labels


def compare(
    name: str,
    kwargs: dict,
    pml_factory: Callable[[], torch.nn.Module],
    emb: torch.Tensor,
    labels: torch.Tensor,
    indices_tuple: tuple | None = None,
    ref: torch.Tensor | None = None,
    ref_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Assert value and gradients (embeddings and ref) equal PML's; return our loss."""
    tol = TOL[emb.dtype]
    ours_in = [emb.clone().requires_grad_(True), None if ref is None else ref.clone().requires_grad_(True)]
    pml_in = [emb.clone().requires_grad_(True), None if ref is None else ref.clone().requires_grad_(True)]
    ours = losses.build(name, **kwargs)(ours_in[0], labels, indices_tuple, ours_in[1], ref_labels)
    theirs = pml_factory()(pml_in[0], labels, indices_tuple, pml_in[1], ref_labels)
    assert ours.ndim == 0 and torch.isfinite(ours)
    torch.testing.assert_close(ours, theirs.to(ours.dtype), **tol)
    ours.backward()
    theirs.backward()
    for a, b in zip(ours_in, pml_in, strict=True):
        if a is None:
            continue
        ga = a.grad if a.grad is not None else torch.zeros_like(a)
        gb = b.grad if b.grad is not None else torch.zeros_like(b)
        assert torch.isfinite(ga).all()
        # Gradient entries are sums of many pair terms that partly cancel, so the absolute tolerance is
        # taken relative to the gradient's scale (PML's euclidean is torch.cdist, ours the Gram form).
        scale = float(gb.abs().max()) if gb.numel() else 0.0
        torch.testing.assert_close(ga, gb, rtol=tol["rtol"], atol=max(tol["atol"], tol["rtol"] * scale))
    return ours


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize(("name", "kwargs", "pml_factory"), CONFIGS, ids=CONFIG_IDS)
def test_no_miner_matches_pml(name, kwargs, pml_factory, shape, dtype) -> None:
    emb, labels = make_batch(*shape, dtype, seed=sum(shape))
    compare(name, kwargs, pml_factory, emb, labels)


MINERS = {
    "ms_pairs": lambda: pml_miners.MultiSimilarityMiner(epsilon=0.1),
    "semihard_triplets": lambda: pml_miners.TripletMarginMiner(margin=0.2, type_of_triplets="semihard"),
    "batch_hard_triplets": lambda: pml_miners.BatchHardMiner(),
    "easy_hard_pairs": lambda: pml_miners.BatchEasyHardMiner(pos_strategy="all", neg_strategy="hard"),
}


MINED_CASES = [(m, torch.float64) for m in sorted(MINERS)] + [
    ("ms_pairs", torch.float32),
    ("batch_hard_triplets", torch.float32),
]


@pytest.mark.parametrize(("miner", "dtype"), MINED_CASES, ids=[f"{m}-{str(d)[-7:]}" for m, d in MINED_CASES])
@pytest.mark.parametrize(("name", "kwargs", "pml_factory"), CONFIGS, ids=CONFIG_IDS)
def test_mined_tuples_match_pml(name, kwargs, pml_factory, miner, dtype) -> None:
    emb, labels = make_batch(24, 8, 5, dtype, seed=7)
    indices_tuple = MINERS[miner]()(emb, labels)
    assert all(len(t) > 1 for t in indices_tuple)  # avoid PML's "≤ 1 tuple ⇒ zero loss" shortcut
    compare(name, kwargs, pml_factory, emb, labels, indices_tuple)


# PML's swap reads mat[p, n] with reference indices as rows, wrong once ref_emb is given: swap with a
# reference set is checked against a loop implementation in test_loss_base.py instead.
REF_CONFIGS = [c for c in CONFIGS if not c[1].get("swap")]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("mined", [False, True], ids=["all", "mined"])
@pytest.mark.parametrize(
    ("name", "kwargs", "pml_factory"), REF_CONFIGS, ids=[CONFIG_IDS[CONFIGS.index(c)] for c in REF_CONFIGS]
)
def test_ref_emb_matches_pml(name, kwargs, pml_factory, mined, dtype) -> None:
    emb, labels = make_batch(12, 8, 4, dtype, seed=3)
    ref, ref_labels = make_batch(20, 8, 4, dtype, seed=4)
    indices_tuple = pml_miners.MultiSimilarityMiner()(emb, labels, ref, ref_labels) if mined else None
    compare(name, kwargs, pml_factory, emb, labels, indices_tuple, ref, ref_labels)


EDGE_LABELS = {
    "all_same": torch.zeros(10, dtype=torch.long),
    "all_distinct": torch.arange(10),
    "singletons": torch.tensor([0, 0, 0, 1, 2, 3, 3, 4, 5, 6]),
    "one_pair": torch.tensor([0, 0, 1, 2, 3, 4, 5, 6, 7, 8]),
}


@pytest.mark.parametrize("labels_name", sorted(EDGE_LABELS))
@pytest.mark.parametrize(("name", "kwargs", "pml_factory"), CONFIGS, ids=CONFIG_IDS)
def test_degenerate_labels_match_pml(name, kwargs, pml_factory, labels_name) -> None:
    labels = EDGE_LABELS[labels_name]
    emb = torch.randn(len(labels), 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours = compare(name, kwargs, pml_factory, emb, labels)
    if name == "triplet" and labels_name in ("all_same", "all_distinct"):
        assert ours.item() == 0.0  # no triplet exists


def test_triplets_per_anchor_matches_pml_on_the_same_triplets() -> None:
    from dmlkit.tuples import random_triplets

    emb, labels = make_batch(24, 8, 5, torch.float64, seed=11)
    torch.manual_seed(123)
    triplets = random_triplets(labels, None, 3)
    torch.manual_seed(123)  # the loss draws the same triplets from the same global RNG state
    ours = losses.build("triplet", triplets_per_anchor=3)(emb, labels)
    theirs = pml_losses.TripletMarginLoss()(emb, labels, triplets)
    torch.testing.assert_close(ours, theirs, **TOL[torch.float64])


@pytest.mark.parametrize(("name", "kwargs", "pml_factory"), CONFIGS, ids=CONFIG_IDS)
def test_bf16_autocast_is_finite_and_close_to_float32(name, kwargs, pml_factory) -> None:
    emb, labels = make_batch(24, 16, 5, torch.float32, seed=5)
    loss = losses.build(name, **kwargs)
    reference = loss(emb, labels)
    for inputs in (emb, emb.bfloat16()):
        x = inputs.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            value = loss(x, labels)
        value.backward()
        assert value.dtype == torch.float32
        assert torch.isfinite(value) and torch.isfinite(x.grad.float()).all()
        # bf16 inputs carry ~3 significant digits; float32 inputs must be unaffected by autocast
        tol = {"rtol": 5e-2, "atol": 5e-3} if inputs.dtype == torch.bfloat16 else {"rtol": 1e-6, "atol": 1e-7}
        torch.testing.assert_close(value, reference, **tol)
