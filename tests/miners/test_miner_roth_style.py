"""Roth et al.'s batch miners: statistical tests with fixed seeds against loop implementations of their
rules (Roth et al.'s code loops over anchors in NumPy; the references below follow it)."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from scipy import stats

from dmlkit import miners, tuples
from dmlkit.errors import ConfigError, UnknownNameError
from dmlkit.tuples import label_masks

STOCHASTIC = [
    "random",
    "semihard",
    "softhard",
    "distance",
    "rho_distance",
    "npair",
    "random_distance",
    "intra_random",
    "parametric",
]


def sphere_batch(b: int, d: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=1)
    return emb, torch.randint(0, classes, (b,), generator=g)


def balanced_batch(b: int, d: int, per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    emb, _ = sphere_batch(b, d, 1, seed)
    return emb, torch.arange(b // per_class).repeat_interleave(per_class)


def masks(labels: torch.Tensor, ref_labels: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray]:
    pos, neg = label_masks(labels, ref_labels)
    return pos.numpy(), neg.numpy()


def pvalue(observed: list[float] | np.ndarray, expected: list[float] | np.ndarray) -> float:
    observed, expected = np.asarray(observed, float), np.asarray(expected, float)
    return float(stats.chisquare(observed, expected * observed.sum() / expected.sum()).pvalue)


def check_valid(out: tuple, labels: torch.Tensor, ref_labels: torch.Tensor | None, same_neg: bool = False):
    ref = labels if ref_labels is None else ref_labels
    assert all(t.dtype == torch.long and t.ndim == 1 for t in out)
    if len(out) == 3:
        a, p, n = out
        assert torch.all(labels[a] == ref[p])
        if not same_neg:
            assert torch.all(labels[a] != ref[n])
    else:
        a1, p, a2, n = out
        assert torch.all(labels[a1] == ref[p]) and torch.all(labels[a2] != ref[n])


# ---------------------------------------------------------------------------------------------- all miners


@pytest.mark.parametrize("with_ref", [False, True], ids=["self", "ref"])
@pytest.mark.parametrize("name", [*STOCHASTIC, "lifted"])
def test_valid_tuples_in_range(name: str, with_ref: bool) -> None:
    emb, labels = sphere_batch(20, 8, 4, seed=1)
    ref, ref_labels = sphere_batch(31, 8, 4, seed=2)
    miner = miners.build(name, **({"seed": 0} if name != "lifted" else {}))
    out = miner(emb, labels, ref, ref_labels) if with_ref else miner(emb, labels)
    r_labels = ref_labels if with_ref else None
    size = len(ref) if with_ref else len(emb)
    assert len(out) == (3 if miner.output_kind == "triplets" else 4) and len(out[0]) > 0
    anchors = out[0] if len(out) == 3 else torch.cat([out[0], out[2]])
    others = torch.cat(out[1:]) if len(out) == 3 else torch.cat([out[1], out[3]])
    assert anchors.max() < len(emb) and others.max() < size and others.min() >= 0
    if name in ("random_distance", "intra_random"):  # labels ignored / intra-class by design
        return
    check_valid(out, labels, r_labels, same_neg=name == "rho_distance")
    if not with_ref and name != "rho_distance":
        assert torch.all(out[0] != out[1])


@pytest.mark.parametrize("name", STOCHASTIC)
def test_seed_and_global_rng_reproduce(name: str) -> None:
    emb, labels = sphere_batch(24, 8, 5, seed=3)
    first = miners.build(name, seed=7)
    second = miners.build(name, seed=7)
    runs = [first(emb, labels) for _ in range(3)]
    assert all(
        torch.equal(x, y)
        for r1, r2 in zip(runs, [second(emb, labels) for _ in range(3)], strict=True)
        for x, y in zip(r1, r2, strict=True)
    )
    # the seeded stream survives a state_dict round trip (checkpoint / resume)
    state = first.state_dict()
    resumed = miners.build(name, seed=7)
    resumed.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(first(emb, labels), resumed(emb, labels), strict=True))
    with pytest.raises(ConfigError, match="seed"):
        miners.build(name, seed=8).load_state_dict(state)
    # without a seed: torch's global RNG
    unseeded = miners.build(name)
    torch.manual_seed(123)
    one = unseeded(emb, labels)
    torch.manual_seed(123)
    assert all(torch.equal(x, y) for x, y in zip(one, unseeded(emb, labels), strict=True))


@pytest.mark.parametrize("name", STOCHASTIC)
def test_degenerate_labels(name: str) -> None:
    emb, _ = sphere_batch(6, 4, 1, seed=0)
    for labels in (torch.zeros(6, dtype=torch.long), torch.arange(6)):
        out = miners.build(name, seed=0)(emb, labels)
        # intra_random needs neither positives nor negatives; rho_distance's replaced triplets need no
        # negative (as in Roth et al.'s code)
        if name == "intra_random" or (name == "rho_distance" and labels[1] == 0):
            assert len(out[0]) > 0
        else:
            assert all(len(t) == 0 for t in out[:2]) or all(len(t) == 0 for t in out[2:]), (name, out)


def test_configuration_errors() -> None:
    with pytest.raises(ConfigError, match="cp"):
        miners.build("rho_distance", cp=1.5)
    with pytest.raises(ConfigError, match="hard_fraction"):
        miners.build("semihard", hard_fraction=-0.1)
    for name in ("distance", "rho_distance", "random_distance"):
        with pytest.raises(ConfigError, match=f"miner '{name}' needs distance='euclidean'"):
            miners.build(name, distance="dot")
    with pytest.raises(UnknownNameError, match="did you mean 'hards'"):
        miners.build("parametric", mode="hard")
    with pytest.raises(
        ConfigError, match="histogram has 3 bins but n_support=100 makes 99; pass n_support=4"
    ):
        miners.build("parametric", histogram=[1, 2, 3])
    with pytest.raises(ConfigError, match="support_lim"):
        miners.build("parametric", support_lim=(1.0, 0.5))
    with pytest.raises(ConfigError, match=r"histogram\[1\]"):
        miners.build("parametric", n_support=3, histogram=[1.0, -1.0])


# ---------------------------------------------------------------------------------------- semihard / softhard


def test_semihard_returns_semihard_negatives_when_they_exist() -> None:
    emb, labels = sphere_batch(40, 6, 5, seed=4)
    dist = torch.cdist(emb, emb).numpy()
    pos, neg = masks(labels, None)
    miner = miners.build("semihard", margin=0.3, seed=1)
    fallback = semihard = 0
    p_counts = Counter()
    for _ in range(50):
        a, p, n = miner(emb, labels)
        assert set(a.tolist()) == set(np.flatnonzero(pos.any(1) & neg.any(1)).tolist())
        for i, j, k in zip(a.tolist(), p.tolist(), n.tolist(), strict=True):
            candidates = neg[i] & (dist[i] > dist[i, j]) & (dist[i] < dist[i, j] + 0.3)
            if candidates.any():
                assert candidates[k]
                semihard += 1
            else:
                assert neg[i, k]
                fallback += 1
            p_counts[(i, j)] += 1
    assert semihard > 10 * fallback > 0
    # positives are uniform among the anchor's positives
    anchor = int(np.argmax(pos.sum(1)))
    observed = [p_counts[(anchor, j)] for j in np.flatnonzero(pos[anchor])]
    assert pvalue(observed, np.ones(len(observed))) > 1e-3


@pytest.mark.parametrize("fraction", [0.0, 0.4, 1.0])
def test_semihard_hard_fraction(fraction: float) -> None:
    emb, labels = sphere_batch(48, 6, 4, seed=5)
    dist = torch.cdist(emb, emb).numpy()
    _, neg = masks(labels, None)
    miner = miners.build("semihard", hard_fraction=fraction, seed=2)
    hard = both = 0
    for _ in range(40):
        for i, j, k in zip(*(t.tolist() for t in miner(emb, labels)), strict=True):
            has_hard = (neg[i] & (dist[i] <= dist[i, j])).any()
            has_semi = (neg[i] & (dist[i] > dist[i, j]) & (dist[i] < dist[i, j] + 0.2)).any()
            if has_hard and has_semi:
                both += 1
                hard += dist[i, k] <= dist[i, j]
    assert both > 300
    # binomial: hard negative at rate hard_fraction where both kinds exist
    assert (
        stats.binomtest(int(hard), both, fraction).pvalue > 1e-3
        if 0 < fraction < 1
        else hard == fraction * both
    )


def test_softhard_rule() -> None:
    emb, labels = sphere_batch(36, 6, 5, seed=6)
    dist = torch.cdist(emb, emb).numpy()
    pos, neg = masks(labels, None)
    miner = miners.build("softhard", seed=3)
    for _ in range(20):
        for i, j, k in zip(*(t.tolist() for t in miner(emb, labels)), strict=True):
            hard_pos = pos[i] & (dist[i] > dist[i][neg[i]].min())
            hard_neg = neg[i] & (dist[i] < dist[i][pos[i]].max())
            assert (hard_pos if hard_pos.any() else pos[i])[j]
            assert (hard_neg if hard_neg.any() else neg[i])[k]


# -------------------------------------------------------------------------------------------- distance family


def inverse_density(d: float, dim: int, lower: float) -> float:
    d = max(d, lower)
    return math.exp((2.0 - dim) * math.log(d) - (dim - 3) / 2 * math.log(1 - d * d / 4))


def distance_target(dist: np.ndarray, neg: np.ndarray, dim: int, lower: float, upper: float) -> np.ndarray:
    """Roth's distance sampling with both cutoffs; without any negative under the upper cutoff, all
    negatives (their released code)."""
    target = np.zeros_like(dist)
    for a in range(dist.shape[0]):
        within = [n for n in np.flatnonzero(neg[a]) if max(dist[a, n], lower) <= upper]
        for n in within or np.flatnonzero(neg[a]):
            target[a, n] = inverse_density(dist[a, n], dim, lower)
        target[a] /= max(target[a].sum(), 1e-300)
    return target


def pooled_pvalue(counts: np.ndarray, target: np.ndarray) -> float:
    expected = counts.sum(1, keepdims=True) * target
    assert counts[expected == 0].sum() == 0, "drew a negative with target probability 0"
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return pvalue(obs, exp)


@pytest.mark.parametrize("with_ref", [False, True], ids=["self", "ref"])
def test_distance_follows_clipped_inverse_density_with_both_cutoffs(with_ref: bool) -> None:
    emb, labels = sphere_batch(24, 5, 4, seed=7)
    ref, ref_labels = sphere_batch(30, 5, 4, seed=8) if with_ref else (emb, None)
    dist = torch.cdist(emb, ref).numpy()
    pos, neg = masks(labels, ref_labels)
    lower, upper = 0.6, 1.3
    target = distance_target(dist, neg, 5, lower, upper)
    assert ((dist > upper) & neg).any(1).all()  # the upper cutoff matters for every anchor
    miner = miners.build("distance", lower_cutoff=lower, upper_cutoff=upper, seed=4)
    counts = np.zeros_like(dist)
    args = (emb, labels, ref, ref_labels) if with_ref else (emb, labels)
    for _ in range(250):
        a, _, n = miner(*args)
        assert a.tolist() == np.flatnonzero(pos.any(1) & neg.any(1)).tolist()  # one triplet per anchor
        np.add.at(counts, (a.numpy(), n.numpy()), 1)
    assert pooled_pvalue(counts, target) > 1e-3
    # and not the distribution without the upper cutoff
    assert pooled_pvalue(counts, distance_target(dist, neg, 5, lower, 10.0)) < 1e-6


def test_distance_falls_back_when_no_negative_is_under_the_upper_cutoff() -> None:
    emb, labels = balanced_batch(12, 5, 3, seed=9)
    a, _, n = miners.build("distance", upper_cutoff=0.01, seed=0)(emb, labels)
    assert len(a) == 12 and torch.all(labels[a] != labels[n])


@pytest.mark.parametrize("cp", [0.0, 0.3, 1.0])
def test_rho_distance_replaces_negatives_at_rate_cp(cp: float) -> None:
    emb, labels = balanced_batch(40, 6, 4, seed=10)
    miner = miners.build("rho_distance", cp=cp, seed=5)
    replaced = total = 0
    for _ in range(30):
        a, p, n = miner(emb, labels)
        flipped = labels[n] == labels[a]
        # replaced triplets are (a, a, p'): the anchor as its own positive, another positive as negative
        assert torch.all(p[flipped] == a[flipped]) and torch.all(n[flipped] != a[flipped])
        assert torch.all(p[~flipped] != a[~flipped]) and torch.all(labels[p] == labels[a])
        assert miner.last_stats["num_replaced"] == float(flipped.sum())
        replaced += int(flipped.sum())
        total += len(a)
    assert total == 30 * 40
    if 0 < cp < 1:
        assert stats.binomtest(replaced, total, cp).pvalue > 1e-3
    else:
        assert replaced == cp * total


def test_rho_distance_with_reference_set() -> None:
    emb, labels = balanced_batch(12, 6, 3, seed=11)
    ref, _ = balanced_batch(24, 6, 6, seed=12)
    ref_labels = torch.arange(4).repeat_interleave(6)
    miner = miners.build("rho_distance", cp=0.5, seed=6)
    replaced = 0
    for _ in range(30):
        a, p, n = miner(emb, labels, ref, ref_labels)
        flipped = ref_labels[n] == labels[a]
        assert torch.all(ref_labels[p] == labels[a]) and torch.all(p[flipped] != n[flipped])
        replaced += int(flipped.sum())
    assert stats.binomtest(replaced, 30 * 12, 0.5).pvalue > 1e-3


def test_random_distance_ignores_labels() -> None:
    emb, labels = balanced_batch(32, 6, 4, seed=13)
    miner = miners.build("random_distance", seed=7)
    same_pos = same_neg = total = 0
    for _ in range(30):
        a, p, n = miner(emb, labels)
        assert torch.all(a != p) and torch.all(a != n)
        same_pos += int((labels[p] == labels[a]).sum())
        same_neg += int((labels[n] == labels[a]).sum())
        total += len(a)
    # random relabelling: a "positive" shares the true label with probability 3/31
    assert stats.binomtest(same_pos, total, 3 / 31).pvalue > 1e-3
    assert same_neg > 0


# -------------------------------------------------------------------------------------- random / intra_random


def test_random_is_uniform_over_all_triplets_without_replacement() -> None:
    emb, labels = balanced_batch(6, 4, 2, seed=14)  # 6 anchors × 1 positive × 4 negatives = 24 triplets
    miner = miners.build("random", seed=8)
    counts = Counter()
    for _ in range(400):
        out = list(zip(*(t.tolist() for t in miner(emb, labels)), strict=True))
        assert len(out) == 6 and len(set(out)) == 6  # batch-size many, without replacement
        counts.update(out)
    a, p, n = tuples.all_triplets(labels)
    everything = list(zip(a.tolist(), p.tolist(), n.tolist(), strict=True))
    assert set(counts) == set(everything)
    assert pvalue([counts[t] for t in everything], np.ones(len(everything))) > 1e-3
    # fewer valid triplets than the batch size: all of them
    small = torch.tensor([0, 0, 1])
    out = miners.build("random", seed=0)(sphere_batch(3, 4, 1, 0)[0], small)
    assert sorted(zip(*(t.tolist() for t in out), strict=True)) == [(0, 1, 2), (1, 0, 2)]


def test_random_sparse_sampling_path() -> None:
    from dmlkit.miners.roth_style import _distinct_below

    g = torch.Generator().manual_seed(0)
    draws = _distinct_below(10**12, 500, g, torch.device("cpu"))
    assert len(draws) == 500 == len(set(draws.tolist())) and int(draws.max()) < 10**12


def test_intra_random_draws_within_a_uniform_class() -> None:
    emb, _ = sphere_batch(20, 4, 1, seed=15)
    labels = torch.tensor([0] * 8 + [1] * 6 + [2] * 4 + [3] * 2)
    miner = miners.build("intra_random", seed=9)
    classes, members = Counter(), Counter()
    for _ in range(100):
        a, p, n = miner(emb, labels)
        assert len(a) == 20 and torch.all(labels[a] == labels[p]) and torch.all(labels[a] == labels[n])
        classes.update(labels[a].tolist())
        members.update(p[labels[p] == 0].tolist())
    assert pvalue([classes[c] for c in range(4)], np.ones(4)) > 1e-3  # classes uniform, not by size
    assert pvalue([members[i] for i in range(8)], np.ones(8)) > 1e-3  # members uniform, with self


# --------------------------------------------------------------------------------------------- npair / lifted


@pytest.mark.parametrize("with_ref", [False, True], ids=["self", "ref"])
def test_npair_and_lifted_structure(with_ref: bool) -> None:
    emb, labels = sphere_batch(14, 4, 4, seed=16)
    labels[0] = 99  # an anchor without positive
    ref, ref_labels = sphere_batch(20, 4, 4, seed=17) if with_ref else (emb, None)
    args = (emb, labels, ref, ref_labels) if with_ref else (emb, labels)
    pos, neg = masks(labels, ref_labels)
    anchors = np.flatnonzero(pos.any(1))
    expected_neg = {(int(a), int(n)) for a in anchors for n in np.flatnonzero(neg[a])}
    a1, p, a2, n = miners.build("npair", seed=10)(*args)
    assert a1.tolist() == anchors.tolist() and all(
        pos[i, j] for i, j in zip(a1.tolist(), p.tolist(), strict=True)
    )
    assert set(zip(a2.tolist(), n.tolist(), strict=True)) == expected_neg and len(a2) == len(expected_neg)
    a1, p, a2, n = miners.build("lifted")(*args)
    assert set(zip(a1.tolist(), p.tolist(), strict=True)) == {tuple(x) for x in np.argwhere(pos).tolist()}
    assert set(zip(a2.tolist(), n.tolist(), strict=True)) == expected_neg and len(a2) == len(expected_neg)


# ---------------------------------------------------------------------------------------------- parametric


def test_parametric_follows_its_histogram() -> None:
    emb, labels = sphere_batch(30, 4, 5, seed=18)
    dist = torch.cdist(emb, emb).numpy()
    _, neg = masks(labels, None)
    histogram = [1.0, 0.0, 2.0, 5.0, 2.0]  # bins of width 0.3 over (0.3, 1.8)
    miner = miners.build("parametric", n_support=6, support_lim=(0.3, 1.8), histogram=histogram, seed=11)
    edges = np.linspace(0.3, 1.8, 6)
    bin_of = np.clip(np.searchsorted(edges[1:-1], dist, side="left"), 0, 4)  # (s_b, s_b+1]
    inside = neg & (dist >= 0.3) & (dist <= 1.8)
    observed, expected = np.zeros(5), np.zeros(5)
    draws_in_bin = Counter()
    for _ in range(100):
        a, _, n = miner(emb, labels)
        for i, k in zip(a.tolist(), n.tolist(), strict=True):
            assert inside[i, k] and histogram[bin_of[i, k]] > 0
            observed[bin_of[i, k]] += 1
            draws_in_bin[(i, k)] += 1
            filled = {int(b) for b in bin_of[i][inside[i]]}
            weights = np.array([histogram[b] if b in filled else 0.0 for b in range(5)])
            expected += weights / weights.sum()
    keep = expected > 0
    assert pvalue(observed[keep], expected[keep]) > 1e-3
    assert observed[1] == 0
    # inside a bin, uniform: the anchor/bin with the most candidates
    i, b = max(
        ((i, b) for i in range(30) for b in range(5)),
        key=lambda ib: (inside[ib[0]] & (bin_of[ib[0]] == ib[1])).sum(),
    )
    members = np.flatnonzero(inside[i] & (bin_of[i] == b))
    assert len(members) >= 3
    assert pvalue([draws_in_bin[(i, k)] for k in members], np.ones(len(members))) > 1e-3


def test_parametric_modes_prefer_their_bins() -> None:
    emb, labels = sphere_batch(40, 3, 8, seed=19)  # 3-d: many close negatives
    dist = torch.cdist(emb, emb).numpy()
    _, neg = masks(labels, None)
    runs = [miners.build("parametric", mode="hards", seed=s)(emb, labels) for s in range(5)]
    a, _, n = (torch.cat(x).numpy() for x in zip(*runs, strict=True))
    # "hards" keeps bins with centre <= 0.5; the last of them, (24·2/99, 25·2/99], ends at 0.50505
    has_close = (neg & (dist <= 0.505)).any(1)[a]
    assert has_close.sum() > 50
    assert np.all(dist[a, n][has_close] <= 2 * 25 / 99 + 1e-12)
    assert np.any(dist[a, n][~has_close] > 0.6)  # anchors without such negatives still get one
