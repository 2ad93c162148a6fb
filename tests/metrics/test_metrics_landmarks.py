"""Revisited Oxford/Paris protocol against an independent implementation of revisitop's published mAP
computation, and the GLDv2 mAP@100 against a brute-force loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dmlkit.errors import ConfigError, DataError, UnknownNameError
from dmlkit.metrics import gldv2_map, revisited_map
from dmlkit.metrics.clustering import faiss_available

# ---------------------------------------------------------------------------------------------------------
# Reference: revisitop's evaluation as published (Radenović et al. 2018), written from its description
# ---------------------------------------------------------------------------------------------------------


def reference_ap(positions: list[int], n_positive: int, trapezoid: bool = True) -> float:
    """AP from the 0-based positions (junk removed) of the ranked positives, n_positive in total:
    trapezoids of the precision-recall curve, each of width 1/n_positive, between the precision just
    before the j-th positive (j/rank, or 1 at rank 0) and just after it ((j+1)/(rank+1))."""
    ap = 0.0
    for j, rank in enumerate(positions):
        after = (j + 1) / (rank + 1)
        if trapezoid:
            before = 1.0 if rank == 0 else j / rank
            ap += (before + after) / 2 / n_positive
        else:
            ap += after / n_positive
    return ap


def reference_compute_map(ranks: np.ndarray, gnd: list[dict], kappas=(1, 5, 10), trapezoid=True):
    """``ranks``: n_gallery × n_query (column per query, as revisitop). Returns mAP, per-query AP, mean
    mP@κ, per-query mP@κ; queries without positives are NaN and excluded."""
    n_query = ranks.shape[1]
    aps = np.full(n_query, np.nan)
    prs = np.full((n_query, len(kappas)), np.nan)
    for i in range(n_query):
        ok, junk = set(gnd[i]["ok"]), set(gnd[i]["junk"])
        if not ok:
            continue
        positions, removed = [], 0
        for place, item in enumerate(ranks[:, i]):
            if item in junk:
                removed += 1
            elif item in ok:
                positions.append(place - removed)
        aps[i] = reference_ap(positions, len(ok), trapezoid)
        one_based = np.array(positions) + 1
        for j, kappa in enumerate(kappas):
            cap = min(one_based.max(), kappa)
            prs[i, j] = (one_based <= cap).sum() / cap
    valid = ~np.isnan(aps)
    return aps[valid].mean(), aps, prs[valid].mean(0), prs


def protocol_gnd(gnd: list[dict], protocol: str) -> list[dict]:
    out = []
    for g in gnd:
        if protocol == "easy":
            out.append({"ok": list(g["easy"]), "junk": list(g["junk"]) + list(g["hard"])})
        elif protocol == "medium":
            out.append({"ok": list(g["easy"]) + list(g["hard"]), "junk": list(g["junk"])})
        else:
            out.append({"ok": list(g["hard"]), "junk": list(g["junk"]) + list(g["easy"])})
    return out


def synthetic(seed: int, n_query: int = 12, n_gallery: int = 80):
    """Random full rankings and disjoint easy/hard/junk lists (some queries without hard positives)."""
    rng = np.random.default_rng(seed)
    ranking = np.stack([rng.permutation(n_gallery) for _ in range(n_query)])
    gnd = []
    for i in range(n_query):
        chosen = rng.permutation(n_gallery)[: rng.integers(3, 25)]
        cut1, cut2 = sorted(rng.integers(0, len(chosen), 2))
        easy, hard, junk = chosen[:cut1], chosen[cut1:cut2], chosen[cut2:]
        if i % 4 == 0:
            hard = hard[:0]
        if i == 1:
            easy = easy[:0]
        gnd.append({"easy": easy.tolist(), "hard": hard.tolist(), "junk": junk.tolist()})
    return ranking, gnd


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ap", ["trapezoid", "step"])
def test_revisited_matches_reference(seed, ap):
    ranking, gnd = synthetic(seed)
    results = revisited_map(gnd, ranking, ap=ap)
    for protocol in ("easy", "medium", "hard"):
        mean, aps, mpr, prs = reference_compute_map(
            ranking.T, protocol_gnd(gnd, protocol), trapezoid=ap == "trapezoid"
        )
        assert results[f"{protocol}/map"] == pytest.approx(mean, rel=1e-12)
        np.testing.assert_allclose(results.per_query[f"{protocol}/map"].numpy(), aps, rtol=1e-12)
        for j, kappa in enumerate((1, 5, 10)):
            assert results[f"{protocol}/mp@{kappa}"] == pytest.approx(mpr[j], rel=1e-12)
            np.testing.assert_allclose(
                results.per_query[f"{protocol}/mp@{kappa}"].numpy(), prs[:, j], rtol=1e-12
            )
        assert results.num_queries_without_relevant[protocol] == int(np.isnan(aps).sum())
    assert results.num_queries_without_relevant["hard"] >= 3  # queries 0, 4, 8 have no hard positive
    assert results.num_queries_without_relevant["easy"] >= 1


def test_revisited_hand_computed():
    # Ranking 0..5; easy {1}, hard {3}, junk {0}. Easy: junk {0, 3} removed → 1 is at position 0: AP 1.
    # Medium: junk {0} removed → positives 1, 3 at positions 0, 2: AP = ½[(1 + 1) + (1/2 + 2/3)]/2.
    # Hard: junk {0, 1} removed → 3 at position 1: AP = ½(0 + 1/2) = 1/4.
    gnd = [{"easy": [1], "hard": [3], "junk": [0]}]
    r = revisited_map(gnd, [[0, 1, 2, 3, 4, 5]], kappas=(1, 2, 5))
    assert r["easy/map"] == 1.0
    assert r["medium/map"] == pytest.approx(0.5 * (2 + 0.5 + 2 / 3) / 2)
    assert r["hard/map"] == pytest.approx(0.25)
    # mP@κ caps κ at the last positive: medium positives at 1-based 1 and 3.
    assert (r["medium/mp@1"], r["medium/mp@2"], r["medium/mp@5"]) == (1.0, 0.5, pytest.approx(2 / 3))
    assert r["easy/mp@5"] == 1.0  # κ' = 1


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_revisited_from_embeddings_equals_explicit_ranking(distance):
    rng = np.random.default_rng(3)
    gallery = rng.standard_normal((70, 6))
    query = rng.standard_normal((9, 6))
    _, gnd = synthetic(3, n_query=9, n_gallery=70)
    if distance == "cosine":
        qn = query / np.linalg.norm(query, axis=1, keepdims=True)
        gn = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
        ranking = np.argsort(-(qn @ gn.T), axis=1, kind="stable")
    else:
        ranking = np.argsort(((query[:, None] - gallery[None]) ** 2).sum(-1), axis=1, kind="stable")
    explicit = revisited_map(gnd, ranking)
    embedded = revisited_map(
        gnd, query=torch.from_numpy(query), gallery=gallery, distance=distance, chunk_size=2
    )
    assert embedded.metrics == pytest.approx(explicit.metrics, rel=1e-12)


def test_revisited_truncated_ranking():
    ranking, gnd = synthetic(4)
    full = revisited_map(gnd, ranking)
    short = revisited_map(gnd, ranking[:, :40])
    for protocol in ("easy", "medium", "hard"):
        # AP over the truncated list: positives beyond it count in n⁺ and contribute nothing.
        for i, g in enumerate(protocol_gnd(gnd, protocol)):
            ok, junk = set(g["ok"]), set(g["junk"])
            if not ok:
                continue
            kept = [item for item in ranking[i, :40] if item not in junk]
            positions = [place for place, item in enumerate(kept) if item in ok]
            expected = reference_ap(positions, len(ok))
            assert float(short.per_query[f"{protocol}/map"][i]) == pytest.approx(expected, rel=1e-12, abs=0)
        # mP@κ is what the full ranking gives, as long as κ non-ignored items are listed.
        for kappa in (1, 5, 10):
            assert short[f"{protocol}/mp@{kappa}"] == pytest.approx(full[f"{protocol}/mp@{kappa}"], rel=1e-12)
    with pytest.raises(DataError, match="too short"):
        revisited_map([{"easy": [5, 9], "junk": [0]}], [[0, 5, 1]], kappas=(5,))


def test_revisited_input_errors():
    gnd = [{"easy": [1], "hard": [2], "junk": [0]}]
    with pytest.raises(DataError, match="both 'easy' and 'junk'"):
        revisited_map([{"easy": [1], "junk": [1]}], [[0, 1]])
    with pytest.raises(DataError, match="twice"):
        revisited_map(gnd, [[0, 1, 1]])
    with pytest.raises(DataError, match="1 rows but there are 2"):
        revisited_map(gnd * 2, [[0, 1, 2]])
    with pytest.raises(ConfigError, match="either a ranking"):
        revisited_map(gnd, [[0, 1, 2]], query=np.zeros((1, 2)), gallery=np.zeros((3, 2)))
    with pytest.raises(DataError, match="gallery has 2 items"):
        revisited_map(gnd, query=np.ones((1, 2)), gallery=np.ones((2, 2)))
    with pytest.raises(DataError, match="gallery is empty"):
        revisited_map(gnd, query=np.ones((1, 2)), gallery=np.ones((0, 2)))
    with pytest.raises(UnknownNameError, match="did you mean 'medium'"):
        revisited_map(gnd, [[0, 1, 2]], protocols=("mediun",))
    results = revisited_map([{"easy": [], "hard": [], "junk": [0]}], [[0, 1]])
    assert math.isnan(results["medium/map"]) and results.num_queries_without_relevant["medium"] == 1
    assert '"medium/map": null' in results.to_json()
    assert "queries without positive (hard)" in results.table()


# ---------------------------------------------------------------------------------------------------------
# GLDv2 mAP@100
# ---------------------------------------------------------------------------------------------------------


def brute_gldv2(ranking, relevant, k=100):
    values = []
    for row, rel_list in zip(ranking, relevant, strict=True):
        rel_set = set(rel_list)
        if not rel_set:
            continue
        hits, total = 0, 0.0
        for rank, item in enumerate(row[:k], start=1):
            if item in rel_set:
                hits += 1
                total += hits / rank
        values.append(total / min(len(rel_set), k))
    return float(np.mean(values))


def test_gldv2_matches_brute_force():
    rng = np.random.default_rng(5)
    ranking = np.stack([rng.permutation(500)[:150] for _ in range(30)])
    relevant = [rng.choice(500, rng.integers(0, 130), replace=False).tolist() for _ in range(30)]
    relevant[3] = []  # a non-landmark query: excluded and counted
    results = gldv2_map(relevant, ranking)
    assert results["map@100"] == pytest.approx(brute_gldv2(ranking, relevant), rel=1e-12)
    assert results.num_queries_without_relevant == {"map@100": 1}
    assert math.isnan(results.per_query["map@100"][3])
    assert gldv2_map(relevant, ranking, k=10)["map@10"] == pytest.approx(brute_gldv2(ranking, relevant, 10))


@pytest.mark.parametrize("backend", ["torch", "faiss-flat"])
def test_gldv2_from_embeddings(backend):
    if backend != "torch" and not faiss_available():
        pytest.skip("faiss is not installed")
    rng = np.random.default_rng(6)
    gallery = rng.standard_normal((400, 8)).astype(np.float32)
    query = rng.standard_normal((20, 8)).astype(np.float32)
    relevant = [rng.choice(400, rng.integers(1, 40), replace=False).tolist() for _ in range(20)]
    gn = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    qn = query / np.linalg.norm(query, axis=1, keepdims=True)
    ranking = np.argsort(-(qn.astype(np.float64) @ gn.T.astype(np.float64)), axis=1, kind="stable")
    results = gldv2_map(relevant, query=query, gallery=gallery, backend=backend)
    assert results["map@100"] == pytest.approx(brute_gldv2(ranking, relevant), rel=1e-6)
