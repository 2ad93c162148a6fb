"""Statistics every miner reports (``last_stats``) against brute-force computations, and checks that
run over every registered miner (half precision, reference sets, feeding the losses)."""

from __future__ import annotations

import math

import pytest
import torch

from dmlkit import losses, miners
from dmlkit.miners import base
from dmlkit.tuples import pairs_to_triplets

KEYS = {"mean_pos_distance", "mean_neg_distance", "frac_hard", "frac_semihard", "frac_easy"}


def sphere_batch(b: int, d: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=1)
    return emb, torch.randint(0, classes, (b,), generator=g)


def brute_force(miner, mat: torch.Tensor, out: tuple, margin: float) -> dict[str, float]:
    """Means over the mined pairs, fractions over the mined (or implied, for pairs) triplets."""
    if len(out) == 4:
        means = (mat[out[0], out[1]].mean(), mat[out[2], out[3]].mean())
        a, p, n = pairs_to_triplets(out)
    else:
        a, p, n = out
        means = (mat[a, p].mean(), mat[a, n].mean())
    gap = mat[a, p] - mat[a, n] if miner.is_similarity else mat[a, n] - mat[a, p]
    return {
        "mean_pos_distance": float(means[0]),
        "mean_neg_distance": float(means[1]),
        "frac_hard": float((gap <= 0).double().mean()),
        "frac_semihard": float(((gap > 0) & (gap <= margin)).double().mean()),
        "frac_easy": float((gap > margin).double().mean()),
    }


CASES = [
    ("triplet_margin", {"margin": 0.5}),
    ("triplet_margin", {"distance": "cosine", "type_of_triplets": "semihard"}),
    ("semihard", {"margin": 0.3, "seed": 0}),
    ("distance_weighted", {"seed": 0}),
    ("multisimilarity", {}),
    ("multisimilarity", {"distance": "euclidean", "epsilon": 0.3}),
    ("hdc", {"distance": "cosine"}),
    ("uniform_histogram", {"num_bins": 5, "seed": 0}),  # duplicate pairs count with multiplicity
    ("npair", {"seed": 0}),
    ("lifted", {}),
]


@pytest.mark.parametrize("with_ref", [False, True], ids=["self", "ref"])
@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=[f"{n}-{k}" for n, k in CASES])
def test_stats_match_brute_force(name: str, kwargs: dict, with_ref: bool) -> None:
    emb, labels = sphere_batch(24, 6, 4, seed=1)
    ref, ref_labels = sphere_batch(40, 6, 4, seed=2)
    args = (emb, labels, ref, ref_labels) if with_ref else (emb, labels)
    miner = miners.build(name, **kwargs)
    out = miner(*args)
    stats = miner.last_stats
    count_keys = {"num_triplets"} if len(out) == 3 else {"num_pos_pairs", "num_neg_pairs"}
    assert set(stats) == KEYS | count_keys
    assert stats.get("num_triplets", len(out[0])) == len(out[0])
    mat = miner.distance.matrix(emb, ref if with_ref else None)
    expected = brute_force(miner, mat, out, float(getattr(miner, "margin", 0.2)))
    for key, value in expected.items():
        assert stats[key] == pytest.approx(value, abs=1e-9), key
    assert stats["frac_hard"] + stats["frac_semihard"] + stats["frac_easy"] == pytest.approx(1.0)
    assert miner.last_stats == stats  # computed once, then cached


def test_pair_fractions_with_many_positives_per_anchor() -> None:
    """More than 32 positives per anchor takes the binary-search path."""
    emb, labels = sphere_batch(6, 5, 2, seed=3)
    ref, _ = sphere_batch(120, 5, 1, seed=4)
    ref_labels = torch.arange(120) % 2
    miner = miners.build("lifted")
    out = miner(emb, labels, ref, ref_labels)
    expected = brute_force(miner, miner.distance.matrix(emb, ref), out, 0.2)
    assert miner.last_stats["frac_hard"] == pytest.approx(expected["frac_hard"], abs=1e-12)
    assert miner.last_stats["frac_easy"] == pytest.approx(expected["frac_easy"], abs=1e-12)


def test_stats_subsample_large_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    emb, labels = sphere_batch(40, 6, 4, seed=5)
    miner = miners.build("triplet_margin", type_of_triplets="all", margin=0.4)
    out = miner(emb, labels)
    exact = miner.last_stats
    monkeypatch.setattr(base, "STATS_SAMPLE", 500)
    assert len(out[0]) > 5000
    miner(emb, labels)
    approx = miner.last_stats
    assert approx["num_triplets"] == exact["num_triplets"]
    for key in KEYS:
        assert approx[key] == pytest.approx(exact[key], abs=0.05), key


def test_empty_output_gives_nan_statistics() -> None:
    emb, _ = sphere_batch(6, 4, 1, seed=0)
    for name in ("multisimilarity", "triplet_margin", "semihard"):
        miner = miners.build(name)
        miner(emb, torch.zeros(6, dtype=torch.long))
        stats = miner.last_stats
        assert all(math.isnan(stats[key]) for key in KEYS)


# ---------------------------------------------------------------------------------------------- every miner


@pytest.mark.parametrize("name", miners.available())
def test_every_miner_in_half_precision_and_with_a_reference_set(name: str) -> None:
    g = torch.Generator().manual_seed(6)
    emb = torch.randn(24, 16, generator=g)
    labels = torch.arange(6).repeat_interleave(4)
    ref, ref_labels = torch.randn(50, 16, generator=g), torch.randint(0, 6, (50,), generator=g)
    miner = miners.build(name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = miner(emb.bfloat16(), labels)
    assert all(t.dtype == torch.long for t in out) and len(out[0]) > 0
    out = miner(emb, labels, ref, ref_labels)
    anchors, others = (out[:1], out[1:]) if len(out) == 3 else (out[::2], out[1::2])
    assert len(out[0]) > 0 and max(int(t.max()) for t in anchors) < 24
    assert max(int(t.max()) for t in others) < 50 and min(int(t.min()) for t in others) >= 0
    assert set(miner.last_stats) >= KEYS


@pytest.mark.parametrize("name", miners.available())
def test_every_miner_feeds_losses_with_a_reference_set(name: str) -> None:
    g = torch.Generator().manual_seed(7)
    emb = torch.randn(16, 8, generator=g, requires_grad=True)
    labels = torch.arange(4).repeat_interleave(4)
    ref, ref_labels = torch.randn(30, 8, generator=g), torch.randint(0, 4, (30,), generator=g)
    for loss_name in ("triplet", "contrastive", "multisimilarity"):
        loss = losses.build(loss_name)
        miners.check_compatible(loss, name)
        value = loss(emb, labels, miners.build(name)(emb, labels, ref, ref_labels), ref, ref_labels)
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(emb.grad).all()
        emb.grad = None
