"""``evaluate`` against pytorch-metric-learning's AccuracyCalculator and a numpy brute-force loop."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from pytorch_metric_learning.distances import CosineSimilarity, LpDistance
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import CustomKNN

from dmlkit.errors import ConfigError, DataError, UnknownNameError
from dmlkit.metrics import RetrievalResults, available, evaluate

PML_METRICS = ("precision_at_1", "r_precision", "mean_average_precision_at_r", "mean_reciprocal_rank")
OURS = {
    "precision_at_1": ("recall@1", "precision@1"),
    "r_precision": ("r_precision",),
    "mean_average_precision_at_r": ("map@r",),
    "mean_reciprocal_rank": ("mrr",),
}
RETRIEVAL = ("recall@1", "recall@2", "recall@4", "recall@16", "precision@1", "precision@5")
RETRIEVAL += ("r_precision", "map@r", "mrr")


def make_data(seed: int, n_query: int, n_gallery: int, n_classes: int, dim: int = 8):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n_query, dim, generator=gen)
    g = torch.randn(n_gallery, dim, generator=gen)
    ql = torch.randint(0, n_classes, (n_query,), generator=gen)
    gl = torch.randint(0, n_classes, (n_gallery,), generator=gen)
    return q, ql, g, gl


def pml(distance: str, k) -> AccuracyCalculator:
    pml_distance = CosineSimilarity() if distance == "cosine" else LpDistance(normalize_embeddings=False)
    return AccuracyCalculator(
        include=PML_METRICS, k=k, device=torch.device("cpu"), knn_func=CustomKNN(pml_distance)
    )


def brute_force(q, ql, g, gl, distance, metrics, excluded=None):
    """Independent reference: full numpy matrix, stable full ranking, one Python loop per query."""
    q, g = np.asarray(q, dtype=np.float64), np.asarray(g, dtype=np.float64)
    ql, gl = np.asarray(ql), np.asarray(gl)
    if distance == "cosine":
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        g = g / np.linalg.norm(g, axis=1, keepdims=True)
        key = -(q @ g.T)
    else:
        key = np.sqrt(((q[:, None, :] - g[None, :, :]) ** 2).sum(-1))
    values = {m: [] for m in metrics}
    classes = []
    skipped = 0
    for i in range(len(q)):
        keep = np.ones(len(g), bool) if excluded is None else ~excluded[i]
        order = np.argsort(key[i], kind="stable")
        order = order[keep[order]]
        rel = (gl[order] == ql[i]).astype(float)
        r = int(rel.sum())
        if r == 0:
            skipped += 1
            continue
        classes.append(ql[i])
        for m in metrics:
            if m.startswith("recall@"):
                v = float(rel[: int(m[7:])].sum() > 0)
            elif m.startswith("precision@"):
                kk = int(m[10:])
                v = rel[:kk].sum() / kk
            elif m == "r_precision":
                v = rel[:r].sum() / r
            elif m == "map@r":
                v = sum(rel[:j].sum() / j for j in range(1, r + 1) if rel[j - 1]) / r
            elif m == "mrr":
                v = 1.0 / (np.argmax(rel) + 1)
            values[m].append(v)
    means = {m: float(np.mean(v)) if v else math.nan for m, v in values.items()}
    per_class = {
        m: {
            c.item(): float(np.mean([x for x, cc in zip(v, classes, strict=True) if cc == c]))
            for c in set(classes)
        }
        for m, v in values.items()
    }
    return means, per_class, skipped


def assert_matches_brute_force(results: RetrievalResults, ref) -> None:
    means, per_class, skipped = ref
    assert results.num_queries_without_relevant == skipped
    for m, v in means.items():
        assert results[m] == pytest.approx(v, rel=1e-9, abs=1e-12), m
        assert results.per_class[m].keys() == per_class[m].keys()
        for c, pv in per_class[m].items():
            assert results.per_class[m][c] == pytest.approx(pv, rel=1e-9), (m, c)


# ---------------------------------------------------------------------------------------------------------
# pytorch-metric-learning
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
@pytest.mark.parametrize("pml_k", [None, "max_bin_count"])
def test_leave_one_out_matches_pml(distance, pml_k):
    q, ql, _, _ = make_data(0, 240, 1, 12)
    ours = evaluate(q, ql, metrics=[m for ms in OURS.values() for m in ms], distance=distance)
    theirs = pml(distance, pml_k).get_accuracy(q, ql)
    assert ours.num_queries_without_relevant == 0
    for name, value in theirs.items():
        if name == "mean_reciprocal_rank" and pml_k is not None:
            continue  # PML truncates MRR at k; ours ranks the whole gallery (checked with k=None)
        for our_name in OURS[name]:
            assert ours[our_name] == pytest.approx(value, rel=1e-6), (name, our_name)
    if pml_k == "max_bin_count":
        assert ours.k == int(torch.bincount(ql).max()) - 1


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_query_gallery_matches_pml(distance):
    # 14 query classes but 12 gallery classes: queries of classes 12 and 13 have no relevant item.
    q, _, g, gl = make_data(1, 150, 260, 12)
    ql = torch.randint(0, 14, (150,), generator=torch.Generator().manual_seed(9))
    ours = evaluate(q, ql, g, gl, metrics=[m for ms in OURS.values() for m in ms], distance=distance)
    theirs = pml(distance, None).get_accuracy(q, ql, g, gl)
    assert ours.num_queries_without_relevant == int((ql >= 12).sum()) > 0
    for name, value in theirs.items():
        for our_name in OURS[name]:
            assert ours[our_name] == pytest.approx(value, rel=1e-6), (name, our_name)


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_gallery_including_queries_matches_pml(distance):
    q, ql, g, gl = make_data(2, 100, 150, 10)
    reference, reference_labels = torch.cat([q, g]), torch.cat([ql, gl])
    ours = evaluate(
        q,
        ql,
        reference,
        reference_labels,
        metrics=[m for ms in OURS.values() for m in ms],
        distance=distance,
        query_ids=np.arange(100),
        gallery_ids=np.arange(250),
    )
    theirs = pml(distance, None).get_accuracy(q, ql, reference, reference_labels, ref_includes_query=True)
    for name, value in theirs.items():
        for our_name in OURS[name]:
            assert ours[our_name] == pytest.approx(value, rel=1e-6), (name, our_name)


# ---------------------------------------------------------------------------------------------------------
# Brute force
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_leave_one_out_matches_brute_force(distance):
    q, ql, _, _ = make_data(3, 90, 1, 15)
    ql[:3] = 100 + torch.arange(3)  # three singleton classes: no relevant item, excluded and counted
    results = evaluate(q, ql, metrics=RETRIEVAL, distance=distance)
    excluded = np.eye(90, dtype=bool)
    assert_matches_brute_force(results, brute_force(q, ql, q, ql, distance, RETRIEVAL, excluded))
    assert results.num_queries_without_relevant == 3 and results.num_queries == 90


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_query_gallery_matches_brute_force(distance):
    q, ql, g, gl = make_data(4, 70, 110, 9)
    results = evaluate(q.numpy(), ql.numpy(), g.numpy(), gl.numpy(), metrics=RETRIEVAL, distance=distance)
    assert_matches_brute_force(results, brute_force(q, ql, g, gl, distance, RETRIEVAL))


def test_ids_and_ignore_groups_match_brute_force():
    q, ql, g, gl = make_data(5, 60, 100, 6)
    rng = np.random.default_rng(5)
    q_ids, g_ids = rng.integers(0, 30, 60), rng.integers(0, 30, 100)
    q_groups, g_groups = rng.integers(0, 4, 60), rng.integers(0, 4, 100)
    excluded = (q_ids[:, None] == g_ids[None, :]) | (q_groups[:, None] == g_groups[None, :])
    results = evaluate(
        q,
        ql,
        g,
        gl,
        metrics=RETRIEVAL,
        query_ids=q_ids,
        gallery_ids=g_ids,
        ignore=(q_groups, g_groups),
        chunk_size=7,
    )
    assert_matches_brute_force(results, brute_force(q, ql, g, gl, "cosine", RETRIEVAL, excluded))
    assert int(results.num_relevant.max()) <= results.k


def test_leave_one_out_single_group_array_and_callable_ignore():
    q, ql, _, _ = make_data(6, 50, 1, 5)
    groups = np.arange(50) // 5
    excluded = groups[:, None] == groups[None, :]  # also excludes the query itself
    ref = brute_force(q, ql, q, ql, "cosine", RETRIEVAL, excluded)
    assert_matches_brute_force(evaluate(q, ql, metrics=RETRIEVAL, ignore=groups), ref)
    mask = torch.from_numpy(excluded)
    results = evaluate(q, ql, metrics=RETRIEVAL, ignore=lambda qi, gi: mask[qi][:, gi], chunk_size=3)
    assert_matches_brute_force(results, ref)


def test_chunked_equals_unchunked():
    q, ql, g, gl = make_data(7, 45, 80, 7)
    metrics = (*RETRIEVAL, "nmi", "ami")
    full = evaluate(q, ql, g, gl, metrics=metrics, chunk_size=1000)
    for chunk_size in (1, 2, 13):
        chunked = evaluate(q, ql, g, gl, metrics=metrics, chunk_size=chunk_size)
        assert torch.equal(chunked.topk_indices, full.topk_indices)
        torch.testing.assert_close(chunked.topk_distances, full.topk_distances)
        assert chunked.metrics == full.metrics and chunked.per_class == full.per_class


@pytest.mark.parametrize("chunk_size", [None, 1, 5])
def test_exact_ties_match_brute_force(chunk_size):
    # Small-integer embeddings make many distances exactly equal: every metric (MRR included) must rank
    # tied items by gallery index, like the stable brute-force ranking.
    gen = torch.Generator().manual_seed(16)
    q = torch.randint(-1, 2, (40, 3), generator=gen).float()
    g = torch.randint(-1, 2, (70, 3), generator=gen).float()
    ql, gl = torch.randint(0, 4, (40,), generator=gen), torch.randint(0, 4, (70,), generator=gen)
    results = evaluate(q, ql, g, gl, metrics=RETRIEVAL, distance="euclidean", chunk_size=chunk_size)
    assert_matches_brute_force(results, brute_force(q, ql, g, gl, "euclidean", RETRIEVAL))
    loo = evaluate(g, gl, metrics=RETRIEVAL, distance="euclidean", chunk_size=chunk_size)
    excluded = np.eye(70, dtype=bool)
    assert_matches_brute_force(loo, brute_force(g, gl, g, gl, "euclidean", RETRIEVAL, excluded))


# ---------------------------------------------------------------------------------------------------------
# Edge cases
# ---------------------------------------------------------------------------------------------------------


def test_single_class():
    q, _, _, _ = make_data(8, 20, 1, 1)
    results = evaluate(q, torch.zeros(20, dtype=torch.int64), metrics=(*RETRIEVAL, "nmi"))
    for m in RETRIEVAL:
        assert results[m] == 1.0
    assert results.k == 19 and results["nmi"] == pytest.approx(1.0)


def test_no_query_has_a_relevant_item():
    q, _, g, _ = make_data(9, 10, 12, 1)
    results = evaluate(q, torch.zeros(10, dtype=torch.long), g, torch.ones(12, dtype=torch.long))
    assert results.num_queries_without_relevant == 10
    assert math.isnan(results["recall@1"]) and math.isnan(results["map@r"])
    assert results.per_class["recall@1"] == {}
    assert json.loads(results.to_json())["metrics"]["recall@1"] is None


def test_one_query_leave_one_out():
    results = evaluate(torch.randn(1, 3), [7], metrics=("recall@2", "map@r", "mrr"))
    assert results.num_queries_without_relevant == 1
    assert results.topk_indices.tolist() == [[-1, -1]]


def test_duplicates_of_the_query_are_retrieved():
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(10))
    data = torch.cat([x, x[:1]])  # item 6 duplicates item 0 under another id
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 9])
    results = evaluate(data, labels, metrics=("recall@1",), distance="euclidean")
    assert results.topk_indices[0, 0] == 6 and results.topk_indices[6, 0] == 0
    assert results.topk_distances[0, 0] == 0.0
    # With the same id, the duplicate is the query itself and is never retrieved.
    same_id = evaluate(data, labels, metrics=("recall@1",), query_ids=[0, 1, 2, 3, 4, 5, 0])
    assert same_id.topk_indices[0, 0] not in (0, 6) and same_id.topk_indices[6, 0] not in (0, 6)


def test_large_int64_labels_are_exact():
    q, ql, g, gl = make_data(11, 40, 60, 5)
    base = 2**40
    big = evaluate(q, ql + base, g, gl + base, metrics=RETRIEVAL)
    small = evaluate(q, ql, g, gl, metrics=RETRIEVAL)
    assert big.metrics == small.metrics
    assert torch.equal(big.query_labels, ql + base) and big.query_labels.dtype == torch.int64
    assert set(big.per_class["map@r"]) == {int(c) + base for c in ql.unique()}
    # Adjacent huge labels must stay distinct (they would collapse if cast to float32).
    labels = torch.tensor([base, base + 1, base, base + 1], dtype=torch.int64)
    x = torch.tensor([[0.0, 1.0], [0.0, 1.1], [1.0, 0.0], [1.1, 0.0]])
    assert evaluate(x, labels, metrics=("recall@1",))["recall@1"] == 0.0


def test_string_labels():
    q, ql, g, gl = make_data(12, 40, 60, 5)
    names = np.array(["cat", "dog", "eel", "fox", "gnu"])
    strings = evaluate(q, list(names[ql]), g, names[gl], metrics=RETRIEVAL)
    codes = evaluate(q, ql, g, gl, metrics=RETRIEVAL)
    assert strings.metrics == codes.metrics
    assert strings.label_values == list(names)
    assert set(strings.per_class["recall@1"]) <= set(names)
    assert strings.query_label_values() == list(names[ql])
    assert strings.per_class["map@r"]["dog"] == codes.per_class["map@r"][1]
    with pytest.raises(DataError, match="both be integers or both be strings"):
        evaluate(q, list(names[ql]), g, gl)


def test_string_ids():
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(13))
    data = torch.cat([x, x[:1]])
    results = evaluate(data, [0, 0, 1, 1, 0], query_ids=["a", "b", "c", "d", "a"], metrics=("recall@1",))
    assert results.id_values == ["a", "b", "c", "d"]
    assert results.topk_indices[0, 0] != 4


def test_empty_and_mismatched_inputs():
    x = torch.randn(5, 3)
    labels = torch.arange(5)
    with pytest.raises(DataError, match="gallery is empty"):
        evaluate(x, labels, torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    with pytest.raises(DataError, match="query is empty"):
        evaluate(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    with pytest.raises(DataError, match="query_labels has 4 entries"):
        evaluate(x, labels[:4])
    with pytest.raises(DataError, match="integers or strings"):
        evaluate(x, labels.float())
    with pytest.raises(ConfigError, match="without gallery_labels"):
        evaluate(x, labels, x)
    with pytest.raises(ConfigError, match="without a gallery"):
        evaluate(x, labels, gallery_labels=labels)
    with pytest.raises(ConfigError, match="both query_ids and gallery_ids"):
        evaluate(x, labels, x, labels, query_ids=labels)
    with pytest.raises(DataError, match="dimensions differ"):
        evaluate(x, labels, torch.randn(5, 2), labels)


def test_metric_names():
    assert available() == [
        "ami",
        "dists@inter",
        "dists@intra",
        "dists@intra_over_inter",
        "f1",
        "fnmr@fmr=F",
        "map@K",
        "map@r",
        "map_1000",
        "map_c",
        "map_lim",
        "map_pml@K",
        "mrr",
        "mrr@K",
        "nmi",
        "pcf@F",
        "precision@K",
        "r_precision",
        "recall@K",
        "rho_spectrum@K",
    ]
    x, labels = torch.randn(6, 3), torch.tensor([0, 0, 1, 1, 2, 2])
    with pytest.raises(UnknownNameError, match="did you mean 'recall@5'"):
        evaluate(x, labels, metrics=("recal@5",))
    with pytest.raises(UnknownNameError, match="did you mean 'map@r'"):
        evaluate(x, labels, metrics=("map@R",))
    with pytest.raises(UnknownNameError, match="unknown metric 'f2'"):
        evaluate(x, labels, metrics=("f2",))
    with pytest.raises(ConfigError, match="positive integer"):
        evaluate(x, labels, metrics=("recall@0",))
    with pytest.raises(UnknownNameError, match="did you mean 'recall@1'"):
        evaluate(x, labels, metrics=("recall@1",))["recall@2"]


def test_choice_of_k():
    q, ql, g, gl = make_data(14, 30, 50, 3)
    assert evaluate(q, ql, g, gl, metrics=("recall@1", "recall@4")).k == 4
    largest = int(torch.bincount(gl).max())
    assert evaluate(q, ql, g, gl, metrics=("recall@1", "map@r")).k == largest
    assert evaluate(q, ql, g, gl, metrics=("recall@64", "map@r")).topk_indices.shape == (30, 64)
    assert evaluate(q, ql, metrics=("nmi",)).k == 0
    with pytest.raises(ConfigError, match="smaller than the largest K"):
        evaluate(q, ql, g, gl, metrics=("recall@8",), k=4)
    with pytest.raises(ConfigError, match="r_precision and map@r need k"):
        evaluate(q, ql, g, gl, metrics=("map@r",), k=2)
    assert evaluate(q, ql, g, gl, metrics=("recall@1",), k=10).topk_indices.shape == (30, 10)


def test_results_object():
    q, ql, g, gl = make_data(15, 30, 50, 3)
    results = evaluate(q, ql, g, gl, distance="euclidean")
    assert list(results.metrics) == ["recall@1", "recall@2", "recall@4", "recall@8", "map@r", "nmi"]
    assert results.topk_indices.dtype == torch.int64
    assert (results.topk_distances.diff(dim=1) >= 0).all()  # distances ascend
    assert results.distance == "euclidean" and results["recall@1"] == results.metrics["recall@1"]
    assert set(results.per_class) == {"recall@1", "recall@2", "recall@4", "recall@8", "map@r"}
    table = results.table(title="test")
    lines = table.splitlines()
    assert lines[0] == "test" and lines[1].split() == ["metric", "value"]
    assert len({len(line) for line in lines[1:]}) == 1  # aligned
    assert f"{results['map@r']:.4f}" in table
    data = json.loads(results.to_json(neighbors=True))
    assert data["metrics"]["recall@4"] == pytest.approx(results["recall@4"])
    assert data["topk_indices"] == results.topk_indices.tolist()
    assert results.to_dict()["num_queries"] == 30
    cosine = evaluate(q, ql, g, gl, metrics=("recall@4",))
    assert (cosine.topk_distances.diff(dim=1) <= 0).all()  # similarities descend


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_mrr_alone_needs_no_neighbours(distance):
    # MRR ranks the whole gallery from two extra passes, so k = 0 suffices (empty top-k).
    q, ql, g, gl = make_data(17, 60, 90, 8)
    results = evaluate(q, ql, g, gl, metrics=("mrr",), distance=distance)
    assert results.k == 0 and results.topk_indices.shape == (60, 0)
    assert_matches_brute_force(results, brute_force(q, ql, g, gl, distance, ("mrr",)))
