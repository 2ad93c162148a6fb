"""Evaluation you can extend: registered metrics (Python, entry points, ``dmlkit eval --metrics``),
``label_comparison`` and ``avg_of_avgs`` against pytorch-metric-learning's AccuracyCalculator, OML's
``fnmr@fmr`` and ``pcf`` against numpy written from OML's formulas, and ``c_``/``e_`` distance variants."""

from __future__ import annotations

import importlib.metadata
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pytorch_metric_learning.distances import CosineSimilarity, LpDistance
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import CustomKNN

import dmlkit.search
from dmlkit.cli import main
from dmlkit.errors import ConfigError, DataError, UnknownNameError
from dmlkit.metrics import (
    EvaluationResults,
    available,
    check_options,
    compute,
    evaluate,
    fnmr_at_fmr,
    higher_is_better,
    per_group,
    principal_components_fraction,
    register_metric,
    relevance,
    unregister_metric,
)
from dmlkit.metrics.retrieval import METRICS
from dmlkit.search import search
from tests_support import checkpoint_test_embeddings, tiny_argv

# ---------------------------------------------------------------------------------------------------------
# An independent reference: full numpy matrices, stable full rankings, one Python loop per query
# ---------------------------------------------------------------------------------------------------------


def keys(q, g, distance: str) -> np.ndarray:
    """n_query × n_gallery, smaller = closer: 1 − cos for cosine (ranks like −cos), ‖q − g‖ otherwise."""
    q, g = np.asarray(q, np.float64), np.asarray(g, np.float64)
    if distance == "cosine":
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        g = g / np.linalg.norm(g, axis=1, keepdims=True)
        return -(q @ g.T)
    return np.sqrt(((q[:, None, :] - g[None, :, :]) ** 2).sum(-1))


def ndcg_value(rel: np.ndarray, r: int, k: int) -> float:
    dcg = sum(rel[i] / math.log2(i + 2) for i in range(min(k, len(rel))))
    ideal = sum(1 / math.log2(i + 2) for i in range(min(k, r)))
    return dcg / ideal


def per_query_value(name: str, rel: np.ndarray, n_class: int) -> float:
    r = int(rel.sum())
    if name.startswith("recall@"):
        return float(rel[: int(name[7:])].sum() > 0)
    if name == "r_precision":
        return rel[:r].sum() / r
    if name == "map@r":
        return sum(rel[:j].sum() / j for j in range(1, r + 1) if rel[j - 1]) / r
    if name.startswith("map_pml@"):
        k = int(name[8:])
        return sum(rel[:j].sum() / j for j in range(1, min(k, len(rel)) + 1) if rel[j - 1]) / r
    if name == "map_c":
        return sum(rel[:j].sum() / j for j in range(1, min(n_class, len(rel)) + 1) if rel[j - 1]) / n_class
    if name.startswith("mrr@"):
        first = int(np.argmax(rel)) + 1
        return 1 / first if first <= int(name[4:]) else 0.0
    if name.startswith("ndcg@"):
        return ndcg_value(rel, r, int(name[5:]))
    raise AssertionError(name)


def brute_force(q, g, relevant, distance, names, excluded=None, classes=None):
    """(query mean, class mean, per class) of each per-query metric; ``relevant``/``excluded`` are
    n_query × n_gallery booleans, ``classes`` one hashable class per query."""
    key = keys(q, g, distance)
    excluded = np.zeros(key.shape, bool) if excluded is None else excluded
    found: dict[str, list[float]] = {name: [] for name in names}
    kept_classes = []
    for i in range(len(key)):
        order = np.argsort(key[i], kind="stable")
        order = order[~excluded[i][order]]
        rel = relevant[i][order].astype(float)
        if rel.sum() == 0:
            continue
        kept_classes.append(classes[i] if classes is not None else None)
        for name in names:
            found[name].append(per_query_value(name, rel, int(relevant[i].sum())))
    means = {name: float(np.mean(v)) for name, v in found.items()}
    by_class = {}
    for name, v in found.items():
        groups: dict = {}
        for value, c in zip(v, kept_classes, strict=True):
            groups.setdefault(c, []).append(value)
        by_class[name] = {c: float(np.mean(x)) for c, x in groups.items()}
    class_means = {name: float(np.mean(list(c.values()))) for name, c in by_class.items()}
    return means, class_means, by_class


def fnmr_reference(q, g, relevant, distance, fmr, excluded=None) -> float:
    """OML's calc_fnmr_at_fmr on every non-excluded pair: T = quantile(negatives, fmr), mean(pos ≥ T)."""
    key = keys(q, g, distance)
    keep = np.ones(key.shape, bool) if excluded is None else ~excluded
    pos, neg = key[keep & relevant], key[keep & ~relevant]
    return float((pos >= np.quantile(neg, fmr)).mean())


def pcf_reference(x, variance: float) -> float:
    """OML's calc_pcf: PCA explained-variance ratios (SVD of the centred data), n = searchsorted(cumsum,
    variance, side="right") + 1, value n / d."""
    x = np.asarray(x, np.float64)
    s = np.linalg.svd(x - x.mean(0), compute_uv=False)
    explained = s**2 / (len(x) - 1)
    cumulative = np.cumsum(explained / explained.sum())
    return (np.searchsorted(cumulative, variance, side="right") + 1) / x.shape[1]


def make_data(seed: int, n: int, dim: int = 6):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=gen), gen


def pml(distance: str, k, include, **options) -> AccuracyCalculator:
    knn = CustomKNN(CosineSimilarity() if distance == "cosine" else LpDistance(normalize_embeddings=False))
    return AccuracyCalculator(include=include, k=k, device=torch.device("cpu"), knn_func=knn, **options)


# ---------------------------------------------------------------------------------------------------------
# Registered metrics
# ---------------------------------------------------------------------------------------------------------


def ndcg(ctx, K):
    """NDCG@K with binary relevance: Σ_{i≤K} rel(i)/log2(i+1) over its best value, min(K, R) hits first."""
    rel = ctx.relevant[:, :K].double()
    discounts = 1.0 / torch.log2(torch.arange(2, K + 2, dtype=torch.float64, device=rel.device))
    ideal = discounts.cumsum(0)[ctx.num_relevant.clamp(1, K) - 1]
    return (rel * discounts[: rel.shape[1]]).sum(1) / ideal


def top1_all(results) -> float:
    """Share of *all* queries (R = 0 included) whose first result is relevant."""
    return float(relevance(results)[:, 0].double().mean())


@pytest.fixture
def registered():
    """Registers ``ndcg@K`` (per query) and ``top1_all`` (whole results); removes them afterwards."""
    register_metric("ndcg@K", ndcg)
    register_metric("top1_all", top1_all, kind="results", depth=1)
    yield
    unregister_metric("ndcg@K")
    unregister_metric("top1_all")


def test_registered_metrics_through_evaluate(registered):
    q, gen = make_data(0, 70)
    g = torch.randn(90, 6, generator=gen)
    ql, gl = torch.randint(0, 9, (70,), generator=gen), torch.randint(0, 8, (90,), generator=gen)
    names = ["ndcg@3", "ndcg@10", "c_ndcg@3", "ndcg@3@class", "top1_all", "c_top1_all", "recall@1"]
    ours = evaluate(q, ql, g, gl, metrics=names, distance="euclidean")
    assert list(ours.metrics) == names and "ndcg@K" in available()
    relevant = ql.numpy()[:, None] == gl.numpy()[None, :]
    for distance, prefix in (("euclidean", ""), ("cosine", "c_")):
        means, class_means, by_class = brute_force(
            q, g, relevant, distance, ["ndcg@3", "ndcg@10"], classes=ql.tolist()
        )
        assert ours[f"{prefix}ndcg@3"] == pytest.approx(means["ndcg@3"], rel=1e-12)
        assert ours[f"{prefix}ndcg@3"] != pytest.approx(means["ndcg@10"])
        key = keys(q, g, distance)
        top1 = relevant[np.arange(70), key.argmin(1)]
        assert ours[f"{prefix}top1_all"] == pytest.approx(top1.mean())  # R = 0 queries count here
        if not prefix:
            assert ours["ndcg@10"] == pytest.approx(means["ndcg@10"], rel=1e-12)
            assert ours["ndcg@3@class"] == pytest.approx(class_means["ndcg@3"], rel=1e-12)
            assert ours.per_class["ndcg@3"] == pytest.approx(by_class["ndcg@3"], rel=1e-12)
    assert "top1_all" not in ours.per_class  # a whole-results value has no per-class values
    assert ours.k == 10 and higher_is_better("ndcg@5")


def test_registration_as_decorator_direction_depth_and_errors():
    @register_metric("worst_rank_share", kind="results", higher_is_better=False, depth="all")
    def share(results):
        return float((relevance(results).sum(1) > 0).double().mean())

    try:
        x, _ = make_data(1, 30)
        labels = torch.arange(30) % 5
        found = evaluate(x, labels, metrics=["worst_rank_share"])
        assert found.k == 29 and found["worst_rank_share"] == 1.0  # every retrievable item was kept
        assert not higher_is_better("worst_rank_share") and not higher_is_better("c_worst_rank_share")
        with pytest.raises(ConfigError, match="already registered"):
            register_metric("worst_rank_share", share, kind="results")
    finally:
        unregister_metric("worst_rank_share")
    with pytest.raises(UnknownNameError, match="unknown metric 'worst_rank_share'"):
        check_options(["worst_rank_share"])
    bad = [
        ("Upper", {}, "lower-case"),
        ("c_mine", {}, "name modifiers"),
        ("mine@class", {}, "name modifiers"),
        ("recall@3", {}, "built-in"),
        ("recall@K", {}, "built-in"),
        ("map@r", {}, "built-in"),
        ("mine", {"kind": "clustering"}, "kind must be one of"),
        ("mine", {"depth": "K"}, "depth must be"),
        ("mine@K", {"depth": -1}, "depth must be"),
        ("a,b", {}, "lower-case"),
    ]
    for name, options, message in bad:
        with pytest.raises(ConfigError, match=message):
            register_metric(name, ndcg, **options)
    with pytest.raises(ConfigError, match="built in"):
        unregister_metric("recall@K")


def test_registered_metric_output_is_checked():
    register_metric("broken@K", lambda ctx, K: torch.zeros(3))
    register_metric("words", lambda results: "high", kind="results", depth=1)
    try:
        x = torch.randn(20, 4)
        labels = torch.arange(20) % 4
        with pytest.raises(ConfigError, match=r"'broken@K \(K=2\)' must return one value per query"):
            evaluate(x, labels, metrics=["broken@2"])
        with pytest.raises(ConfigError, match="'words' must return a number"):
            evaluate(x, labels, metrics=["words"])
    finally:
        unregister_metric("broken@K")
        unregister_metric("words")


def test_metrics_of_an_installed_package_load_through_entry_points(tmp_path, monkeypatch):
    module = tmp_path / "dmlkit_plugin_metrics.py"
    module.write_text(
        "import torch\n"
        "from dmlkit.metrics import register_metric\n\n"
        "@register_metric('hits@K')\n"
        "def hits(ctx, K):\n"
        "    return ctx.hits(K).double()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    entry = importlib.metadata.EntryPoint("mine", "dmlkit_plugin_metrics", "dmlkit.metrics")

    def entry_points(**selection):
        return [entry] if selection.get("group") == "dmlkit.metrics" else []

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    monkeypatch.setattr(METRICS, "_plugins_loaded", False)
    try:
        x = torch.randn(40, 5)
        labels = torch.arange(40) % 5
        found = evaluate(x, labels, metrics=["hits@4", "precision@4"])  # the plugin loads on first use
        assert found["hits@4"] == pytest.approx(4 * found["precision@4"])
        assert "hits@K" in available()
    finally:
        if "hits@K" in METRICS.specs:
            unregister_metric("hits@K")
        sys.modules.pop("dmlkit_plugin_metrics", None)
    broken = importlib.metadata.EntryPoint("broken", "no_such_module_xyz", "dmlkit.metrics")
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **selection: [broken])
    monkeypatch.setattr(METRICS, "_plugins_loaded", False)
    with pytest.raises(ConfigError, match="metric plugin 'broken' \\(no_such_module_xyz"):
        check_options(["not_a_metric"])


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("extensions")
    assert main(["train", *tiny_argv(out / "runs", name="ext", epochs=1)]) == 0
    return out / "runs" / "ext"


def test_eval_command_reads_registered_and_new_metrics(trained_run: Path, registered, capsys):
    """``dmlkit eval --metrics`` with a registered per-query and whole-results metric, an @class mean,
    c_ names over a Euclidean search, fnmr@fmr and pcf, against the reference on the same embeddings."""
    names = "ndcg@3,top1_all,recall@1,c_recall@1,map@r@class,c_map@r,fnmr@fmr=0.1,pcf@0.5,c_pcf@0.5"
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(trained_run), "--metrics", names, "--distance", "euclidean",
                 "--json", "--no-progress"]) == 0  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert list(report["metrics"]) == names.split(",")
    found = report["metrics"]
    x, y, _ = checkpoint_test_embeddings(trained_run / "best.pt")
    relevant = y.numpy()[:, None] == y.numpy()[None, :]
    excluded = np.eye(len(y), dtype=bool)
    eu, eu_class, _ = brute_force(
        x, x, relevant, "euclidean", ["ndcg@3", "recall@1", "map@r"], excluded, y.tolist()
    )
    co, _, _ = brute_force(x, x, relevant, "cosine", ["recall@1", "map@r"], excluded, y.tolist())
    assert found["ndcg@3"] == pytest.approx(eu["ndcg@3"], rel=1e-9)
    assert found["recall@1"] == pytest.approx(eu["recall@1"], rel=1e-9)
    assert found["map@r@class"] == pytest.approx(eu_class["map@r"], rel=1e-9)
    assert found["c_recall@1"] == pytest.approx(co["recall@1"], rel=1e-9)
    assert found["c_map@r"] == pytest.approx(co["map@r"], rel=1e-9)
    key = keys(x, x, "euclidean") + np.diag(np.full(len(y), np.inf))
    assert found["top1_all"] == pytest.approx(relevant[np.arange(len(y)), key.argmin(1)].mean())
    pairs = (relevant & ~excluded).sum()
    assert found["fnmr@fmr=0.1"] == pytest.approx(
        fnmr_reference(x, x, relevant, "euclidean", 0.1, excluded), abs=1.01 / pairs
    )
    assert found["pcf@0.5"] == pytest.approx(pcf_reference(x.numpy(), 0.5))
    unit = torch.nn.functional.normalize(x, dim=1)
    assert found["c_pcf@0.5"] == pytest.approx(pcf_reference(unit.numpy(), 0.5))


# ---------------------------------------------------------------------------------------------------------
# label_comparison and avg_of_avgs against PML
# ---------------------------------------------------------------------------------------------------------


def multi_label(a, b):
    """Relevant when the two rows of tags share one."""
    return (a * b).sum(-1) > 0


def coarse(a, b):
    """Hierarchical: relevant when the super-classes (label // 4) agree."""
    return torch.div(a, 4, rounding_mode="floor") == torch.div(b, 4, rounding_mode="floor")


def labelled(seed: int, n: int, kind: str):
    x, gen = make_data(seed, n)
    if kind == "multi_label":
        tags = torch.randint(0, 2, (n, 4), generator=gen)
        tags[tags.sum(1) == 0, 0] = 1  # every item has a tag, so relevance is reflexive as PML assumes
        return x, tags, multi_label
    return x, torch.randint(0, 16, (n,), generator=gen), coarse


PML_AT_R = ("precision_at_1", "r_precision", "mean_average_precision_at_r")
OURS_AT_R = {
    "precision_at_1": "recall@1",
    "r_precision": "r_precision",
    "mean_average_precision_at_r": "map@r",
}
PML_AT_K = {"mean_average_precision": "map_pml@5", "mean_reciprocal_rank": "mrr@5"}


@pytest.mark.parametrize("kind", ["multi_label", "hierarchical"])
@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
@pytest.mark.parametrize("mode", ["leave_one_out", "query_gallery"])
def test_label_comparison_matches_pml(kind, distance, mode):
    x, labels, fn = labelled(3, 150, kind)
    if mode == "leave_one_out":
        args, pml_args = (x, labels), (x, labels)
    else:
        args = (x[:60], labels[:60], x[60:], labels[60:])
        pml_args = args
    names = [*OURS_AT_R.values(), *PML_AT_K.values()]
    for average, options in (("query", {}), ("class", {"avg_of_avgs": True})):
        ours = evaluate(*args, metrics=names, distance=distance, label_comparison=fn, average=average)
        theirs = pml(distance, "max_bin_count", PML_AT_R, label_comparison_fn=fn, **options).get_accuracy(
            *pml_args
        )
        theirs |= pml(distance, 5, tuple(PML_AT_K), label_comparison_fn=fn, **options).get_accuracy(*pml_args)
        for their_name, value in theirs.items():
            our_name = OURS_AT_R.get(their_name) or PML_AT_K[their_name]
            assert ours[our_name] == pytest.approx(value, rel=1e-6), (average, our_name)
        if average == "class":
            suffixed = evaluate(
                *args, metrics=[f"{n}@class" for n in names], distance=distance, label_comparison=fn
            )
            for name in names:
                assert suffixed[f"{name}@class"] == ours[name]
                assert ours[name] == pytest.approx(np.mean(list(ours.per_class[name].values())), rel=1e-12)


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_avg_of_avgs_matches_pml_with_lone_queries(distance):
    x, gen = make_data(4, 200)
    labels = torch.randint(0, 12, (200,), generator=gen)
    query, query_labels = x[:80], labels[:80] + 2  # classes 12 and 13 have no gallery item
    gallery, gallery_labels = x[80:], labels[80:]
    names = ["recall@1@class", "r_precision@class", "map@r@class"]
    ours = evaluate(query, query_labels, gallery, gallery_labels, metrics=names, distance=distance)
    theirs = pml(distance, None, PML_AT_R, avg_of_avgs=True).get_accuracy(
        query, query_labels, gallery, gallery_labels
    )
    assert ours.num_queries_without_relevant == int((query_labels >= 12).sum()) > 0
    for their_name, value in theirs.items():
        assert ours[f"{OURS_AT_R[their_name]}@class"] == pytest.approx(value, rel=1e-6), their_name
    plain = evaluate(x, labels, metrics=["recall@1", "map@r"], distance=distance, average="class")
    theirs = pml(distance, None, PML_AT_R, avg_of_avgs=True).get_accuracy(x, labels)
    assert plain["recall@1"] == pytest.approx(theirs["precision_at_1"], rel=1e-6)
    assert plain["map@r"] == pytest.approx(theirs["mean_average_precision_at_r"], rel=1e-6)


def test_label_comparison_with_string_labels_exclusions_and_roth_denominators():
    """Hierarchical string labels compared by a numpy function, ignore groups, ``map_c`` (whose N counts
    the items the comparison finds relevant before exclusions): against the brute-force reference."""
    x, gen = make_data(5, 90)
    fine = torch.randint(0, 12, (90,), generator=gen).tolist()
    labels = [f"family{f // 3}/species{f}" for f in fine]
    groups = torch.randint(0, 15, (90,), generator=gen)

    def same_family(a, b):
        return np.char.partition(a, "/")[..., 0] == np.char.partition(b, "/")[..., 0]

    names = ["recall@1", "recall@4", "r_precision", "map@r", "map_c", "mrr@3"]
    ours = evaluate(
        x, labels, metrics=names, distance="euclidean", ignore=groups, label_comparison=same_family
    )
    family = np.array([f // 3 for f in fine])
    relevant = family[:, None] == family[None, :]
    excluded = np.eye(90, dtype=bool) | (groups.numpy()[:, None] == groups.numpy()[None, :])
    means, _, by_class = brute_force(x, x, relevant, "euclidean", names, excluded, labels)
    for name in names:
        assert ours[name] == pytest.approx(means[name], rel=1e-12), name
        assert ours.per_class[name] == pytest.approx(by_class[name], rel=1e-12), name
    assert (ours.num_relevant.numpy() == (relevant & ~excluded).sum(1)).all()
    assert (relevance(ours).numpy() == relevant[np.arange(90)[:, None], ours.topk_indices.numpy()]).all()


def test_label_comparison_equality_gives_the_default_values():
    x, gen = make_data(6, 80)
    labels = torch.randint(0, 7, (80,), generator=gen)
    names = ["recall@1", "map@r", "map_1000", "map_c", "precision@3", "nmi"]
    default = evaluate(x, labels, metrics=names)
    compared = evaluate(x, labels, metrics=names, label_comparison=lambda a, b: a == b)
    assert compared.metrics == pytest.approx(default.metrics, rel=1e-12)
    assert compared.per_class == default.per_class
    assert isinstance(compared, EvaluationResults) and compared.relevance is not None


def test_label_comparison_rows_per_group_and_errors():
    x, labels, fn = labelled(7, 60, "multi_label")
    ours = evaluate(x, labels, metrics=["recall@1", "map@r"], label_comparison=fn)
    assert all(key.startswith("(") for key in ours.per_class["map@r"])  # classes are the distinct rows
    groups = torch.arange(60) % 3
    by_group = per_group(ours, groups, ["recall@1", "map@r"])
    relevant = (labels @ labels.T > 0).numpy()
    for code in range(3):
        rows = (groups == code).numpy()
        means, _, _ = brute_force(
            x[rows], x, relevant[rows], "cosine", ["recall@1", "map@r"], np.eye(60, dtype=bool)[rows]
        )
        assert by_group["map@r"][code] == pytest.approx(means["map@r"], rel=1e-12)
        assert by_group["recall@1"][code] == pytest.approx(means["recall@1"], rel=1e-12)
    with pytest.raises(ConfigError, match="use mrr@K"):
        evaluate(x, labels, metrics=["mrr"], label_comparison=fn)
    with pytest.raises(ConfigError, match="must return booleans"):
        evaluate(x, labels, metrics=["recall@1"], label_comparison=lambda a, b: (a * b).sum(-1))
    with pytest.raises(ConfigError, match="one boolean per"):
        evaluate(x, labels, metrics=["recall@1"], label_comparison=lambda a, b: a == b)
    with pytest.raises(DataError, match="query_labels must be integers, booleans or strings"):
        evaluate(x, labels.float(), metrics=["recall@1"], label_comparison=fn)
    with pytest.raises(DataError, match="gallery labels have shape"):
        evaluate(x[:20], labels[:20], x[20:], labels[20:, :2], metrics=["recall@1"], label_comparison=fn)


def test_class_average_options_are_checked():
    x = torch.randn(20, 4)
    labels = torch.arange(20) % 4
    for name in ("nmi@class", "fnmr@fmr=0.1@class", "pcf@0.5@class"):
        with pytest.raises(ConfigError, match="only per-query retrieval metrics"):
            evaluate(x, labels, metrics=[name])
    with pytest.raises(ConfigError, match="average must be one of"):
        evaluate(x, labels, metrics=["recall@1"], average="classes")


# ---------------------------------------------------------------------------------------------------------
# OML: fnmr@fmr and pcf
# ---------------------------------------------------------------------------------------------------------


def test_fnmr_at_fmr_oml_docstring_example():
    positive = np.array([0, 0, 1, 1, 2, 2, 5, 5, 9, 9])
    negative = np.array([3, 3, 4, 4, 6, 6, 7, 7, 8, 8])
    assert fnmr_at_fmr(positive, negative, (0.1, 0.5)) == pytest.approx([0.4, 0.2])
    assert fnmr_at_fmr(torch.tensor(positive), torch.tensor(negative), 0.1) == pytest.approx(0.4)
    assert math.isnan(fnmr_at_fmr([], negative, 0.1))
    with pytest.raises(ConfigError, match=r"in \[0, 1\]"):
        fnmr_at_fmr(positive, negative, 1.5)


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
@pytest.mark.parametrize("mode", ["leave_one_out", "query_gallery"])
def test_fnmr_matches_the_oml_formula(distance, mode):
    x, gen = make_data(8, 120)
    labels = torch.randint(0, 6, (120,), generator=gen)
    groups = torch.randint(0, 20, (120,), generator=gen)
    names = ["fnmr@fmr=0.01", "fnmr@fmr=0.1", "fnmr@fmr=0.5", "fnmr@fmr=1"]
    if mode == "leave_one_out":
        ours = evaluate(x, labels, metrics=names, distance=distance, ignore=groups)
        q, g, ql, gl = x, x, labels, labels
        excluded = np.eye(120, dtype=bool) | (groups.numpy()[:, None] == groups.numpy()[None, :])
        assert ours.k == 119
    else:
        q, ql, g, gl = x[:40], labels[:40], x[40:], labels[40:]
        ours = evaluate(q, ql, g, gl, metrics=names, distance=distance)
        excluded = None
        assert ours.k == 80
    relevant = ql.numpy()[:, None] == gl.numpy()[None, :]
    pairs = int((relevant & (True if excluded is None else ~excluded)).sum())
    for name in names:
        expected = fnmr_reference(q, g, relevant, distance, float(name.split("=")[1]), excluded)
        assert ours[name] == pytest.approx(expected, abs=1.01 / pairs), name
    assert ours["fnmr@fmr=0.01"] >= ours["fnmr@fmr=0.1"] >= ours["fnmr@fmr=0.5"] >= ours["fnmr@fmr=1"]
    assert not higher_is_better("fnmr@fmr=0.1") and "fnmr@fmr=0.1" not in ours.per_class


def test_pcf_matches_the_oml_formula():
    # The example of OML's docstring: 4 one-hot rows of length 10.
    eye = torch.eye(4, 10)
    assert principal_components_fraction(eye, 0.5) == pytest.approx(0.2)
    assert principal_components_fraction(eye, 1.0) == pytest.approx(0.5)
    gen = torch.Generator().manual_seed(9)
    low_rank = torch.randn(300, 3, generator=gen) @ torch.randn(3, 12, generator=gen)
    spread = torch.randn(300, 12, generator=gen) * torch.linspace(0.1, 3.0, 12)
    for x in (
        low_rank + 0.01 * torch.randn(300, 12, generator=gen),
        spread,
        torch.randn(8, 12, generator=gen),
    ):
        for variance in (0.0, 0.1, 0.5, 0.9, 0.99):
            assert principal_components_fraction(x, variance) == pytest.approx(pcf_reference(x, variance))
    results = evaluate(spread, torch.arange(300) % 5, metrics=["pcf@0.5", "c_pcf@0.5"], distance="euclidean")
    assert results["pcf@0.5"] == pytest.approx(pcf_reference(spread, 0.5))
    unit = torch.nn.functional.normalize(spread, dim=1)
    assert results["c_pcf@0.5"] == pytest.approx(pcf_reference(unit, 0.5))
    # Deviation: OML counts one more component than there are for F = 1 with n ≥ d ((d + 1)/d); ours is 1.
    assert pcf_reference(spread, 1.0) == pytest.approx(13 / 12)
    assert principal_components_fraction(spread, 1.0) == 1.0
    assert math.isnan(principal_components_fraction(torch.ones(5, 3), 0.5))
    with pytest.raises(ConfigError, match=r"F must be a number in \[0, 1\]"):
        evaluate(spread, torch.arange(300) % 5, metrics=["pcf@1.5"])


# ---------------------------------------------------------------------------------------------------------
# c_ / e_ variants
# ---------------------------------------------------------------------------------------------------------


def counting_searches(monkeypatch) -> list[str]:
    calls: list[str] = []
    original = dmlkit.search.run

    def run(inputs, k, distance, *args, **kwargs):
        calls.append(str(distance))
        return original(inputs, k, distance, *args, **kwargs)

    monkeypatch.setattr(dmlkit.search, "run", run)
    return calls


def test_variants_search_once_per_distance_and_equal_single_distance_runs(monkeypatch):
    x, gen = make_data(10, 90)
    labels = torch.randint(0, 8, (90,), generator=gen)
    cosine = evaluate(x, labels, metrics=["recall@1", "map@r", "nmi", "dists@intra", "fnmr@fmr=0.1"])
    euclidean = evaluate(x, labels, metrics=["recall@1", "map@r", "mrr"], distance="euclidean")
    calls = counting_searches(monkeypatch)
    names = [
        "recall@1",
        "c_recall@1",
        "c_map@r",
        "e_map@r",
        "mrr",
        "c_nmi",
        "c_dists@intra",
        "c_fnmr@fmr=0.1",
    ]
    both = evaluate(x, labels, metrics=names, distance="euclidean")
    assert sorted(calls) == ["cosine", "euclidean"]  # one search per distance, shared by its metrics
    assert both["recall@1"] == euclidean["recall@1"] and both["e_map@r"] == euclidean["map@r"]
    assert both["mrr"] == euclidean["mrr"]
    for name in ("recall@1", "map@r", "nmi", "dists@intra", "fnmr@fmr=0.1"):
        assert both[f"c_{name}"] == pytest.approx(cosine[name], rel=1e-12), name
    assert both.per_class["c_map@r"] == cosine.per_class["map@r"]
    assert both.distance == "euclidean" and set(both.variants) == {"cosine"}

    calls.clear()
    only = evaluate(x, labels, metrics=["c_recall@1", "c_map@r", "e_recall@1"], distance="cosine")
    assert calls == ["cosine", "euclidean"] and only["c_recall@1"] == cosine["recall@1"]
    calls.clear()
    alone = evaluate(x, labels, metrics=["c_recall@1", "nmi"], distance="euclidean")
    assert calls == ["cosine"] and alone.k == 0 and alone.distance == "euclidean"
    assert alone["c_recall@1"] == cosine["recall@1"]


def test_variants_in_compute_per_group_and_options():
    x, gen = make_data(11, 60)
    labels = torch.randint(0, 5, (60,), generator=gen)
    both = evaluate(x, labels, metrics=["recall@1", "c_recall@1"], distance="euclidean")
    groups = torch.arange(60) % 2
    by_group = per_group(both, groups, ["c_recall@1", "recall@1"])
    for code in (0, 1):
        part = compute(both.select_queries(groups == code), ["c_recall@1"])
        assert by_group["c_recall@1"][code] == part["c_recall@1"]
    plain = search(x, k=5, distance="euclidean", query_labels=labels)
    with pytest.raises(ConfigError, match="ranks by the cosine distance"):
        compute(plain, ["c_recall@1"])
    cosine_search = search(x, k=5, query_labels=labels)
    assert compute(cosine_search, ["c_recall@1"])["c_recall@1"] == both["c_recall@1"]
    with pytest.raises(ConfigError, match="dists@\\* need a distance"):
        check_options(["dists@intra"], "dot")
    assert check_options(["c_dists@intra", "e_dists@inter"], "dot") == ["c_dists@intra", "e_dists@inter"]
    with pytest.raises(UnknownNameError, match="did you mean 'c_recall@1'"):
        check_options(["c_recal@1"])
    with pytest.raises(UnknownNameError, match="did you mean 'map@r@class'"):
        check_options(["map@R@class"])
    assert not higher_is_better("c_dists@intra") and higher_is_better("pcf@0.5")
