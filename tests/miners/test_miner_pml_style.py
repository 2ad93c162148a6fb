"""PML-style miners against pytorch-metric-learning (PML).

Deterministic miners must return PML's set of tuples (compared as sets, with multiplicities via the
lengths) on seeded random inputs, with and without a reference set; the stochastic ones
(``distance_weighted``, ``uniform_histogram``) must draw from PML's distribution, checked with chi-square
tests against independent loop implementations.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from scipy import stats

from dmlkit import miners, tuples
from dmlkit.errors import ConfigError, UnknownNameError

pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
pml_distances = pytest.importorskip("pytorch_metric_learning.distances")


def cosine() -> object:
    return pml_distances.CosineSimilarity()


def dot_raw() -> object:
    return pml_distances.DotProductSimilarity(normalize_embeddings=False)


def sq_raw() -> object:
    return pml_distances.LpDistance(normalize_embeddings=False, power=2)


def _easy_hard_configs() -> list[tuple[str, dict, object]]:
    out = []
    for ps in ("hard", "semihard", "easy", "all"):
        for ns in ("hard", "semihard", "easy", "all"):
            if (ps == ns == "semihard") or {ps, ns} == {"semihard", "all"}:
                continue
            kw = {"pos_strategy": ps, "neg_strategy": ns}
            out.append(("batch_easy_hard", kw, lambda kw=kw: pml_miners.BatchEasyHardMiner(**kw)))
    ranges = {"allowed_pos_range": (0.0, 0.9), "allowed_neg_range": (-0.5, 0.6)}
    for ps, ns in (("easy", "semihard"), ("semihard", "hard"), ("hard", "easy")):
        kw = {"pos_strategy": ps, "neg_strategy": ns, **ranges}
        out.append(
            (
                "batch_easy_hard",
                {**kw, "distance": "cosine"},
                lambda kw=kw: pml_miners.BatchEasyHardMiner(distance=cosine(), **kw),
            )
        )
    kw = {"allowed_pos_range": (0.3, 1.3), "allowed_neg_range": (0.5, 1.5)}
    out.append(("batch_easy_hard", kw, lambda: pml_miners.BatchEasyHardMiner(**kw)))
    return out


CONFIGS: list[tuple[str, dict, object]] = [
    *[
        (
            "triplet_margin",
            {"type_of_triplets": t, **kw},
            lambda t=t, kw=kw, d=d: pml_miners.TripletMarginMiner(
                type_of_triplets=t, **kw, **({"distance": d()} if d else {})
            ),
        )
        for t in ("all", "hard", "semihard", "easy")
        for kw, d in (({}, None), ({"margin": 0.5}, None))
    ],
    (
        "triplet_margin",
        {"type_of_triplets": "semihard", "margin": 0.1, "distance": "cosine"},
        lambda: pml_miners.TripletMarginMiner(type_of_triplets="semihard", margin=0.1, distance=cosine()),
    ),
    (
        "triplet_margin",
        {"type_of_triplets": "hard", "distance": "dot", "normalize_embeddings": False, "margin": 1.0},
        lambda: pml_miners.TripletMarginMiner(type_of_triplets="hard", margin=1.0, distance=dot_raw()),
    ),
    (
        "triplet_margin",
        {"distance": "squared_euclidean", "normalize_embeddings": False, "margin": 2.0},
        lambda: pml_miners.TripletMarginMiner(margin=2.0, distance=sq_raw()),
    ),
    ("pair_margin", {}, lambda: pml_miners.PairMarginMiner()),
    (
        "pair_margin",
        {"pos_margin": 1.2, "neg_margin": 1.4},
        lambda: pml_miners.PairMarginMiner(pos_margin=1.2, neg_margin=1.4),
    ),
    (
        "pair_margin",
        {"pos_margin": 0.3, "neg_margin": 0.1, "distance": "cosine"},
        lambda: pml_miners.PairMarginMiner(pos_margin=0.3, neg_margin=0.1, distance=cosine()),
    ),
    ("hdc", {}, lambda: pml_miners.HDCMiner()),
    ("hdc", {"filter_percentage": 0.13}, lambda: pml_miners.HDCMiner(filter_percentage=0.13)),
    (
        "hdc",
        {"filter_percentage": 0.3, "distance": "cosine"},
        lambda: pml_miners.HDCMiner(filter_percentage=0.3, distance=cosine()),
    ),
    ("hdc", {"filter_percentage": 1.0}, lambda: pml_miners.HDCMiner(filter_percentage=1.0)),
    ("angular", {}, lambda: pml_miners.AngularMiner()),
    ("angular", {"angle": 45.0}, lambda: pml_miners.AngularMiner(angle=45)),
    ("angular", {"angle": 5.0}, lambda: pml_miners.AngularMiner(angle=5)),
    *_easy_hard_configs(),
    (
        "multisimilarity",
        {"epsilon": 0.05, "distance": "squared_euclidean"},
        lambda: pml_miners.MultiSimilarityMiner(epsilon=0.05, distance=pml_distances.LpDistance(power=2)),
    ),
    (
        "batch_hard",
        {"distance": "dot", "normalize_embeddings": False},
        lambda: pml_miners.BatchHardMiner(distance=dot_raw()),
    ),
]
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'default'}" for n, kw, _ in CONFIGS]


def make_batch(
    b: int, d: int, classes: int, seed: int, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g, dtype=dtype), torch.randint(0, classes, (b,), generator=g)


def as_sets(t: tuple) -> tuple[set, ...]:
    t = [x.tolist() for x in t]
    if len(t) == 4:
        return set(zip(t[0], t[1], strict=True)), set(zip(t[2], t[3], strict=True))
    return (set(zip(*t, strict=True)),)


def assert_same_tuples(ours: tuple, theirs: tuple) -> None:
    assert len(ours) == len(theirs)
    assert all(x.dtype == torch.long and x.ndim == 1 for x in ours)
    assert as_sets(ours) == as_sets(theirs)
    assert [len(x) for x in ours] == [len(x) for x in theirs]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize(("name", "kwargs", "pml_factory"), CONFIGS, ids=IDS)
def test_same_tuples_as_pml(name, kwargs, pml_factory, dtype) -> None:
    emb, labels = make_batch(30, 6, 5, seed=len(IDS[0]) + 7, dtype=dtype)
    miner = miners.build(name, **kwargs)
    ours = miner(emb, labels)
    assert len(ours) == (4 if miner.output_kind == "pairs" else 3)
    theirs = pml_factory()(emb, labels)
    assert_same_tuples(ours, theirs)
    if name in ("triplet_margin", "angular", "hdc", "pair_margin"):
        assert sum(len(x) for x in ours) > 0  # the configuration is not vacuous


@pytest.mark.parametrize(("name", "kwargs", "pml_factory"), CONFIGS, ids=IDS)
def test_same_tuples_as_pml_with_ref(name, kwargs, pml_factory) -> None:
    emb, labels = make_batch(10, 6, 4, seed=3)
    ref, ref_labels = make_batch(25, 6, 4, seed=4)
    ours = miners.build(name, **kwargs)(emb, labels, ref, ref_labels)
    assert_same_tuples(ours, pml_factory()(emb, labels, ref, ref_labels))


@pytest.mark.parametrize("labels", [[0] * 8, list(range(8)), [0, 0, 0, 1, 2, 3, 3, 4]], ids=str)
@pytest.mark.parametrize(("name", "kwargs", "pml_factory"), CONFIGS[::3], ids=IDS[::3])
def test_degenerate_labels_match_pml(name, kwargs, pml_factory, labels) -> None:
    emb = make_batch(len(labels), 5, 1, seed=0)[0]
    lab = torch.tensor(labels)
    assert_same_tuples(miners.build(name, **kwargs)(emb, lab), pml_factory()(emb, lab))


def test_triplet_margin_chunks_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    """Working over chunks of positive pairs (the path of large reference sets) changes nothing."""
    from dmlkit.miners import pml_style

    emb, labels = make_batch(20, 6, 3, seed=5)
    ref, ref_labels = make_batch(40, 6, 3, seed=6)
    miner = miners.build("triplet_margin", type_of_triplets="semihard")
    whole = miner(emb, labels, ref, ref_labels)
    monkeypatch.setattr(pml_style, "_CHUNK_ELEMENTS", 7 * 40)
    chunked = miner(emb, labels, ref, ref_labels)
    assert all(torch.equal(x, y) for x, y in zip(whole, chunked, strict=True))
    assert_same_tuples(
        chunked, pml_miners.TripletMarginMiner(type_of_triplets="semihard")(emb, labels, ref, ref_labels)
    )


def test_invalid_configurations_are_named() -> None:
    with pytest.raises(UnknownNameError, match="did you mean 'semihard'"):
        miners.build("triplet_margin", type_of_triplets="semihrd")
    with pytest.raises(ConfigError, match="cannot both be 'semihard'"):
        miners.build("batch_easy_hard", pos_strategy="semihard", neg_strategy="semihard")
    with pytest.raises(ConfigError, match="cannot be combined with 'all'"):
        miners.build("batch_easy_hard", pos_strategy="all", neg_strategy="semihard")
    with pytest.raises(UnknownNameError, match="pos_strategy"):
        miners.build("batch_easy_hard", pos_strategy="hardest")
    with pytest.raises(ConfigError, match="allowed_neg_range"):
        miners.build("batch_easy_hard", allowed_neg_range=(2.0, 1.0))
    with pytest.raises(ConfigError, match="filter_percentage"):
        miners.build("hdc", filter_percentage=1.5)
    for name in ("angular", "distance_weighted"):
        with pytest.raises(ConfigError, match="distance='euclidean'"):
            miners.build(name, distance="cosine")
        with pytest.raises(ConfigError, match="normalize_embeddings=True"):
            miners.build(name, normalize_embeddings=False)
    with pytest.raises(ConfigError, match="num_bins"):
        miners.build("uniform_histogram", num_bins=0)
    with pytest.raises(ConfigError, match="seed"):
        miners.build("distance_weighted", seed=1.5)


# ------------------------------------------------------------------------------------------ distance_weighted


def sphere_batch(b: int, d: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    emb, labels = make_batch(b, d, classes, seed)
    return torch.nn.functional.normalize(emb, dim=1), labels


def distance_weighted_target(
    emb: np.ndarray, labels: np.ndarray, ref: np.ndarray, ref_labels: np.ndarray, cutoff: float, upper: float
) -> np.ndarray:
    """Loop reference: P[a, n] ∝ q(max(d, cutoff))^-1 over a's negatives with max(d, cutoff) < upper."""
    dim = emb.shape[1]
    target = np.zeros((len(emb), len(ref)))
    for a in range(len(emb)):
        for n in range(len(ref)):
            if labels[a] == ref_labels[n]:
                continue
            d = max(float(np.linalg.norm(emb[a] - ref[n])), cutoff)
            if d >= upper:
                continue
            target[a, n] = math.exp((2.0 - dim) * math.log(d) - (dim - 3) / 2 * math.log(1 - d * d / 4))
        if target[a].sum() > 0:
            target[a] /= target[a].sum()
    return target


def chi_square_pvalue(counts: np.ndarray, expected: np.ndarray) -> float:
    """Pearson chi-square over cells, cells with expected count < 5 pooled into one."""
    counts, expected = counts.ravel(), expected.ravel()
    assert counts[expected == 0].sum() == 0, "drew something with target probability 0"
    small = (expected > 0) & (expected < 5)
    big = expected >= 5
    obs = np.append(counts[big], counts[small].sum())
    exp = np.append(expected[big], expected[small].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return float(stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue)


def accumulate(miner, calls: int, *args) -> tuple[np.ndarray, list[tuple]]:
    ref_size = len(args[2]) if len(args) > 2 else len(args[0])
    counts = np.zeros((len(args[0]), ref_size))
    outs = []
    for _ in range(calls):
        a, p, n = miner(*args)
        np.add.at(counts, (a.numpy(), n.numpy()), 1)
        outs.append((a, p, n))
    return counts, outs


@pytest.mark.parametrize("with_ref", [False, True], ids=["self", "ref"])
def test_distance_weighted_follows_inverse_density(with_ref: bool) -> None:
    emb, labels = sphere_batch(24, 6, 6, seed=11)
    ref, ref_labels = sphere_batch(30, 6, 6, seed=12) if with_ref else (emb, labels)
    args = (emb, labels, ref, ref_labels) if with_ref else (emb, labels)
    cutoff, upper = 0.6, 1.6
    target = distance_weighted_target(
        emb.numpy(), labels.numpy(), ref.numpy(), ref_labels.numpy(), cutoff, upper
    )
    miner = miners.build("distance_weighted", cutoff=cutoff, nonzero_loss_cutoff=upper, seed=0)
    counts, outs = accumulate(miner, 150, *args)
    # anchors and how many triplets each: PML's get_random_triplet_indices
    same = (labels[:, None] == ref_labels[None, :]).numpy()
    if not with_ref:
        np.fill_diagonal(same, False)
    per_anchor = same.sum(1) + (0 if with_ref else 1)
    eligible = same.any(1) & (target.sum(1) > 0)
    a, p, n = outs[0]
    assert Counter(a.tolist()) == {i: int(per_anchor[i]) for i in np.flatnonzero(eligible)}
    for a, p, n in outs[:20]:
        assert torch.all(labels[a] == ref_labels[p]) and torch.all(labels[a] != ref_labels[n])
        if not with_ref:
            assert torch.all(a != p)
    draws = counts.sum(1, keepdims=True)
    assert chi_square_pvalue(counts, draws * target) > 1e-3

    # PML's own miner passes the same test (the reference encodes PML's semantics)
    torch.manual_seed(0)
    pml = pml_miners.DistanceWeightedMiner(cutoff=cutoff, nonzero_loss_cutoff=upper)
    pml_counts, _ = accumulate(pml, 150, *args)
    assert chi_square_pvalue(pml_counts, pml_counts.sum(1, keepdims=True) * target) > 1e-3


def test_distance_weighted_keeps_rows_pml_would_underflow() -> None:
    """128-d weights span > 80 orders of magnitude across anchors; each anchor is normalised alone."""
    emb, labels = sphere_batch(16, 128, 4, seed=2)
    emb[1] = torch.nn.functional.normalize(emb[0] + 0.3 * emb[1], dim=0)  # one very close negative pair
    labels[0], labels[1] = 0, 1
    a, _, _ = miners.build("distance_weighted", seed=0)(emb, labels)
    assert set(a.tolist()) == {i for i in range(16) if (labels == labels[i]).sum() > 1}


# ------------------------------------------------------------------------------------------ uniform_histogram


def histogram_bins(values: torch.Tensor, num_bins: int) -> torch.Tensor:
    """PML's binning, as its loop: bin i holds edges[i] <= v < edges[i+1], the last bin closed."""
    edges = torch.linspace(values.min(), values.max(), steps=num_bins + 1, dtype=values.dtype)
    out = torch.full(values.shape, -1)
    for i in range(num_bins):
        upper = values <= edges[i + 1] if i == num_bins - 1 else values < edges[i + 1]
        out[(edges[i] <= values) & upper] = i
    assert (out >= 0).all()
    return out


@pytest.mark.parametrize("with_ref", [False, True], ids=["self", "ref"])
def test_uniform_histogram_follows_pml(with_ref: bool) -> None:
    emb, labels = make_batch(20, 5, 4, seed=21)
    ref, ref_labels = make_batch(26, 5, 4, seed=22)
    args = (emb, labels, ref, ref_labels) if with_ref else (emb, labels)
    kw = {"num_bins": 7, "pos_per_bin": 3, "neg_per_bin": 5}
    miner = miners.build("uniform_histogram", seed=1, **kw)
    mat = miner.distance.matrix(emb, ref if with_ref else None)
    pos, neg = tuples.label_masks(labels, ref_labels if with_ref else None)
    theirs = pml_miners.UniformHistogramMiner(**kw)(*args)
    ours = miner(*args)
    assert [len(x) for x in ours] == [len(x) for x in theirs]
    for (a, o), mask, per_bin in (((ours[0], ours[1]), pos, 3), ((ours[2], ours[3]), neg, 5)):
        assert mask[a, o].all()
        values = mat[mask]
        bins = histogram_bins(values, 7)
        filled = set(bins.tolist())
        got = Counter(histogram_bins(torch.cat([values, mat[a, o]]), 7)[len(values) :].tolist())
        assert got == dict.fromkeys(filled, per_bin)  # exactly per_bin draws from each non-empty bin
    # within a bin, draws are uniform: pool many calls for the negative pairs of the most populated bin
    values = mat[neg]
    bins = histogram_bins(values, 7)
    big = int(torch.bincount(bins).argmax())
    members = [tuple(x) for x in torch.nonzero(neg, as_tuple=False)[bins == big].tolist()]
    counts = Counter()
    for _ in range(200):
        _, _, a2, n = miner(*args)
        counts.update(zip(a2.tolist(), n.tolist(), strict=True))
    observed = np.array([counts[m] for m in members], dtype=float)
    assert observed.sum() == 200 * 5
    assert stats.chisquare(observed).pvalue > 1e-3
