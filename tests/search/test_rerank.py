"""Re-ranking and post-processing steps (dmlkit.search.rerank) against brute-force numpy references written
here from the papers' formulas: α-QE and DBA (Radenović et al.), k-reciprocal re-ranking (Zhong et al.,
CVPR 2017, over the full matrix) and PCA-whitening; their identities; the spec parser; and the memory
bound (no n × n tensor for a large n)."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from dmlkit import search
from dmlkit.errors import ConfigError, DataError
from dmlkit.metrics import compute, evaluate, revisited_map
from dmlkit.search import rerank


def data(n: int, d: int = 6, seed: int = 0, shift: float = 0.0) -> torch.Tensor:
    """Continuous float64 rows (no ties), optionally off the origin so cosines are mostly positive."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen, dtype=torch.float64) + shift


def prepared(x: np.ndarray, distance: str) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True) if distance == "cosine" else x


def ranking(q: np.ndarray, g: np.ndarray, distance: str, exclude_self: bool = False) -> np.ndarray:
    """Every query's gallery order by the distance (best first), its own row last when excluded."""
    if distance == "cosine":
        key = -(prepared(q, "cosine") @ prepared(g, "cosine").T)
    else:
        key = ((q[:, None, :] - g[None, :, :]) ** 2).sum(-1)
    if exclude_self:
        key = key + np.diag(np.full(len(q), np.inf))
    order = np.argsort(key, axis=1, kind="stable")
    return order[:, : len(g) - 1] if exclude_self else order


def expanded(
    x: np.ndarray, pool: np.ndarray, neighbours: np.ndarray, alpha: float, distance: str
) -> np.ndarray:
    """x̃_i = (x_i + Σ_t w_t y_t) / (1 + Σ_t w_t), w_t = max(cos(x_i, y_t), 0)^α (prepared rows)."""
    xp, yp = prepared(x, distance), prepared(pool, distance)
    out = np.empty_like(xp)
    for i, row in enumerate(neighbours):
        total, weight = xp[i].copy(), 1.0
        for j in row:
            if j < 0:
                continue
            cos = xp[i] @ yp[j] / (np.linalg.norm(xp[i]) * np.linalg.norm(yp[j]))
            w = max(cos, 0.0) ** alpha
            total += w * yp[j]
            weight += w
        out[i] = total / weight
    return prepared(out, distance)


# ---------------------------------------------------------------------------------------------------------
# Registry and spec strings


def test_registry_lists_the_four_steps():
    assert rerank.available() == ["aqe", "dba", "k_reciprocal", "pcaw"]
    assert isinstance(rerank.build("aqe", k=3), rerank.AlphaQE)
    assert rerank.build("k_reciprocal").kind == "ranking"
    assert rerank.build("dba").kind == rerank.build("pcaw").kind == "embeddings"


def test_parse_spec_reads_names_and_typed_options():
    assert rerank.parse_spec("aqe:alpha=3,k=2") == ("aqe", {"alpha": 3, "k": 2})
    assert rerank.parse_spec(" dba ") == ("dba", {})
    assert rerank.parse_spec("k_reciprocal:k1=20,k2=6,lambda_value=0.3") == (
        "k_reciprocal",
        {"k1": 20, "k2": 6, "lambda_value": 0.3},
    )
    assert rerank.parse_spec("pcaw:dim=64,power=0.5,normalize=false")[1] == {
        "dim": 64,
        "power": 0.5,
        "normalize": False,
    }


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("aqe:alpah=3", r"alpah.*alpha"),  # the bad key, and the closest valid one
        ("k_reciprocal:lambda=0.3", r"'lambda'.*lambda_value"),
        ("aqx:k=2", r"aqx.*aqe"),
        ("aqe:k=two", r"argument k must be an integer.*'two'"),
        ("aqe:k", r"aqe:k.*not a mapping"),
        ("aqe:k=-1", r"k must be an integer ≥ 0"),  # values too: the step is built
        ("pcaw:state=/nonexistent/w.pt", r"state file not found"),
        ("", r"empty"),
    ],
)
def test_parse_spec_errors_name_the_culprit(spec, match):
    with pytest.raises(ConfigError, match=match) as caught:
        rerank.parse_spec(spec)
    # argparse reports it as a bad --rerank argument (type=parse_spec)
    assert isinstance(caught.value, argparse.ArgumentTypeError)


def test_parse_spec_as_an_argparse_type():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rerank", action="append", type=rerank.parse_spec)
    args = parser.parse_args(["--rerank", "dba:k=5", "--rerank", "aqe:alpha=3,k=2"])
    assert args.rerank == [("dba", {"k": 5}), ("aqe", {"alpha": 3, "k": 2})]
    with pytest.raises(SystemExit):
        parser.parse_args(["--rerank", "aqe:kk=2"])


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("aqe", {"k": -1}, r"aqe.*k must be an integer ≥ 0"),
        ("dba", {"alpha": -2.0}, r"dba.*alpha"),
        ("k_reciprocal", {"lambda_value": 1.5}, r"lambda_value.*\[0.0, 1.0\]"),
        ("k_reciprocal", {"k1": 0}, r"k1"),
        ("pcaw", {"dim": 0}, r"dim"),
    ],
)
def test_bad_option_values(name, options, match):
    with pytest.raises(ConfigError, match=match):
        rerank.build(name, **options)


def test_spec_round_trips():
    for step in (
        rerank.build("aqe", k=4, alpha=1.5),
        rerank.build("k_reciprocal", k1=7),
        rerank.build("pcaw"),
    ):
        name, options = rerank.parse_spec(step.spec())
        assert rerank.build(name, **options).options == step.options


# ---------------------------------------------------------------------------------------------------------
# α-QE and DBA


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
@pytest.mark.parametrize(("k", "alpha"), [(2, 3.0), (3, 0.0), (1, 1.0)])
def test_aqe_equals_reference_query_gallery(distance, k, alpha):
    q, g = data(9, seed=1, shift=0.5), data(30, seed=2, shift=0.5)
    qn, gn = q.numpy(), g.numpy()
    new_q = expanded(qn, gn, ranking(qn, gn, distance)[:, :k], alpha, distance)
    expected = ranking(new_q, gn, distance)[:, :10]
    found = rerank.search(q, g, steps=[f"aqe:k={k},alpha={alpha}"], k=10, distance=distance)
    assert np.array_equal(found.topk_indices.numpy(), expected)
    np.testing.assert_allclose(found.query_embeddings.numpy(), new_q, rtol=1e-10, atol=1e-12)


def test_aqe_leave_one_out_never_expands_with_the_query_itself():
    x = data(40, seed=3, shift=0.3)
    xn = x.numpy()
    new_q = expanded(xn, xn, ranking(xn, xn, "cosine", exclude_self=True)[:, :3], 3.0, "cosine")
    key = -(new_q @ prepared(xn, "cosine").T) + np.diag(np.full(40, np.inf))
    expected = np.argsort(key, axis=1, kind="stable")[:, :8]
    found = rerank.search(x, steps="aqe:k=3,alpha=3", k=8)
    assert np.array_equal(found.topk_indices.numpy(), expected)
    assert not (found.topk_indices == torch.arange(40)[:, None]).any()  # still never itself


def test_alpha_zero_is_average_query_expansion():
    q, g = data(7, seed=4), data(25, seed=5)
    neighbours = search.search(q, g, k=4).topk_indices
    qn, gn = prepared(q.numpy(), "cosine"), prepared(g.numpy(), "cosine")
    mean = (qn + gn[neighbours.numpy()].sum(axis=1)) / 5  # negative cosines too: α = 0 weighs all equally
    got = rerank.expand(q, g, neighbours, alpha=0.0)
    np.testing.assert_allclose(got.numpy(), prepared(mean, "cosine"), rtol=1e-12)


def test_expand_empty_slots_weigh_nothing():
    q, g = data(4, seed=6), data(3, seed=7)
    found = search.search(q, g, k=5)  # 3 gallery items: slots 3 and 4 are empty (-1)
    assert (found.topk_indices[:, 3:] == -1).all()
    got = rerank.expand(q, g, found.topk_indices, alpha=2.0)
    ref = expanded(q.numpy(), g.numpy(), found.topk_indices.numpy(), 2.0, "cosine")
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-12)


@pytest.mark.parametrize("spec", ["aqe:k=0", "dba:k=0"])
def test_k_zero_is_the_identity(spec):
    q, g = data(10, seed=8), data(30, seed=9)
    plain = search.search(q, g, k=12, distance="euclidean")
    found = rerank.search(q, g, steps=spec, k=12, distance="euclidean")
    assert torch.equal(found.topk_indices, plain.topk_indices)
    assert torch.equal(found.topk_distances, plain.topk_distances)


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_dba_equals_reference_query_gallery(distance):
    q, g = data(8, seed=10, shift=0.5), data(35, seed=11, shift=0.5)
    qn, gn = q.numpy(), g.numpy()
    new_g = expanded(gn, gn, ranking(gn, gn, distance, exclude_self=True)[:, :3], 3.0, distance)
    expected = ranking(qn, new_g, distance)[:, :10]
    found = rerank.search(q, g, steps="dba:k=3,alpha=3", k=10, distance=distance)
    assert np.array_equal(found.topk_indices.numpy(), expected)


def test_dba_leave_one_out_augments_the_queries_with_the_gallery():
    x = data(40, seed=12, shift=0.4)
    xn = x.numpy()
    new = expanded(xn, xn, ranking(xn, xn, "cosine", exclude_self=True)[:, :2], 3.0, "cosine")
    expected = ranking(new, new, "cosine", exclude_self=True)[:, :6]
    found = rerank.search(x, steps="dba:k=2", k=6)
    assert np.array_equal(found.topk_indices.numpy(), expected)


def test_dba_then_aqe_uses_the_augmented_gallery():
    q, g = data(6, seed=13, shift=0.5), data(30, seed=14, shift=0.5)
    qn, gn = q.numpy(), g.numpy()
    new_g = expanded(gn, gn, ranking(gn, gn, "cosine", exclude_self=True)[:, :2], 3.0, "cosine")
    new_q = expanded(qn, new_g, ranking(qn, new_g, "cosine")[:, :2], 3.0, "cosine")
    found = rerank.search(q, g, steps=["dba:k=2", "aqe:k=2"], k=9)
    assert np.array_equal(found.topk_indices.numpy(), ranking(new_q, new_g, "cosine")[:, :9])


# ---------------------------------------------------------------------------------------------------------
# k-reciprocal re-ranking: the paper's formula over the full matrix


def reference_k_reciprocal(points: np.ndarray, k1: int, k2: int, lam: float) -> np.ndarray:
    """d* between every pair of points (Zhong et al. 2017, as their code computes it): d = squared
    distance / the row's max; R(i, k) = {j ∈ N(i, k+1) : i ∈ N(j, k+1)} (lists include the point);
    R*(i) = R(i, k1) ∪ R(c, round(k1/2)) for c ∈ R(i, k1) with |R(c, ·) ∩ R(i, k1)| > 2/3 |R(c, ·)|;
    V_i ∝ exp(−d(i, ·)) on R*(i), sum 1; V_i ← mean of V over N(i, k2); d_J = 1 − Σmin / Σmax."""
    n = len(points)
    sq = ((points[:, None, :] - points[None, :, :]) ** 2).sum(-1)
    d = sq / sq.max(axis=1, keepdims=True)
    rank = np.argsort(d, axis=1, kind="stable")

    def reciprocal(i: int, k: int) -> set[int]:
        return {int(j) for j in rank[i, : k + 1] if i in rank[j, : k + 1]}

    v = np.zeros((n, n))
    half = int(np.around(k1 / 2))
    for i in range(n):
        r = reciprocal(i, k1)
        star = set(r)
        for c in r:
            rc = reciprocal(c, half)
            if len(rc & r) > 2 / 3 * len(rc):
                star |= rc
        members = sorted(star)
        w = np.exp(-d[i, members])
        v[i, members] = w / w.sum()
    if k2 > 1:
        v = np.stack([v[rank[i, :k2]].mean(axis=0) for i in range(n)])
    jaccard = np.array(
        [
            [1 - np.minimum(v[i], v[j]).sum() / np.maximum(v[i], v[j]).sum() for j in range(n)]
            for i in range(n)
        ]
    )
    return (1 - lam) * jaccard + lam * d


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
@pytest.mark.parametrize(("k1", "k2", "lam"), [(4, 2, 0.3), (6, 1, 0.5), (5, 3, 0.0), (50, 6, 0.3)])
def test_k_reciprocal_with_every_candidate_equals_the_full_reference(distance, k1, k2, lam):
    q, g = data(7, seed=15), data(26, seed=16)
    points = prepared(np.concatenate([q.numpy(), g.numpy()]), distance)
    final = reference_k_reciprocal(points, k1, k2, lam)[:7, 7:]
    step = rerank.KReciprocal(k1=k1, k2=k2, lambda_value=lam, candidates=26)
    found = rerank.search(q, g, steps=[step], k=26, distance=distance)
    order = found.topk_indices.numpy()
    along = np.take_along_axis(final, order, 1)
    assert (np.sort(order, axis=1) == np.arange(26)).all()  # every gallery item, once
    assert (np.diff(along, axis=1) >= -1e-12).all()  # ascending d*
    if lam > 0:  # λ = 0 leaves ties (d_J = 1 without overlap), ordered by the original rank here
        assert np.array_equal(order, np.argsort(final, axis=1, kind="stable"))
    got = rerank.k_reciprocal_distances(
        q, g, found.topk_indices, k1=k1, k2=k2, lambda_value=lam, distance=distance
    )
    np.testing.assert_allclose(got.numpy(), along, atol=1e-9)


@pytest.mark.parametrize(("k1", "k2", "lam"), [(4, 2, 0.3), (7, 4, 0.2)])
def test_k_reciprocal_leave_one_out_equals_the_reference_on_one_set(k1, k2, lam):
    x = data(30, seed=17)
    final = reference_k_reciprocal(prepared(x.numpy(), "cosine"), k1, k2, lam)
    final[np.arange(30), np.arange(30)] = np.inf  # a query never retrieves itself
    found = rerank.search(x, steps=[rerank.KReciprocal(k1=k1, k2=k2, lambda_value=lam, candidates=29)], k=29)
    assert np.array_equal(found.topk_indices.numpy(), np.argsort(final, axis=1, kind="stable")[:, :29])


def test_k_reciprocal_restricted_to_the_top_candidates():
    """With K < n only the original top K are re-ordered (documented restriction): the reference's d*
    order within them."""
    q, g = data(6, seed=18), data(40, seed=19)
    points = prepared(np.concatenate([q.numpy(), g.numpy()]), "cosine")
    final = reference_k_reciprocal(points, 6, 3, 0.3)[:6, 6:]
    top = ranking(q.numpy(), g.numpy(), "cosine")[:, :8]
    expected = np.take_along_axis(
        top, np.argsort(np.take_along_axis(final, top, 1), axis=1, kind="stable"), 1
    )
    found = rerank.search(q, g, steps="k_reciprocal:k1=6,k2=3,candidates=8", k=5)
    assert found.k == 5
    assert np.array_equal(found.topk_indices.numpy(), expected[:, :5])


def test_k_reciprocal_lambda_one_keeps_the_original_order():
    q, g = data(10, seed=20), data(50, seed=21)
    plain = search.search(q, g, k=20, distance="euclidean", first_relevant=False)
    found = rerank.search(q, g, steps="k_reciprocal:lambda_value=1,candidates=20", k=20, distance="euclidean")
    assert torch.equal(found.topk_indices, plain.topk_indices)
    assert torch.equal(found.topk_distances, plain.topk_distances)


def test_k_reciprocal_keeps_original_distances_and_drops_the_first_relevant_rank():
    x, y = data(60, seed=22), torch.arange(60) % 6
    plain = search.search(x, k=59, query_labels=y)
    found = rerank.search(x, steps="k_reciprocal:k1=5,k2=2,candidates=59", k=59, query_labels=y)
    assert found.first_relevant_rank is None and torch.equal(found.num_relevant, plain.num_relevant)
    # the same items with their own original distances, in another order
    for row in range(60):
        by_index = dict(
            zip(plain.topk_indices[row].tolist(), plain.topk_distances[row].tolist(), strict=True)
        )
        assert [by_index[i] for i in found.topk_indices[row].tolist()] == found.topk_distances[row].tolist()
    with pytest.raises(ConfigError, match="mrr"):
        rerank.evaluate(x, y, steps="k_reciprocal", metrics=["mrr"])


def test_k_reciprocal_refuses_dot():
    with pytest.raises(ConfigError, match="dot"):
        rerank.search(data(5), steps="k_reciprocal", k=3, distance="dot")


# ---------------------------------------------------------------------------------------------------------
# PCA-whitening


def anisotropic(n: int, d: int = 5, seed: int = 23) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d, d, generator=gen, dtype=torch.float64)
    return torch.randn(n, d, generator=gen, dtype=torch.float64) @ mixing + 3.0


def test_pcaw_fit_equals_numpy_and_whitens_the_training_set():
    x = anisotropic(300)
    step = rerank.PCAWhitening(normalize=False).fit(x)
    xn = x.numpy()
    mean = xn.mean(axis=0)
    cov = (xn - mean).T @ (xn - mean) / len(xn)
    np.testing.assert_allclose(step.mean.numpy(), mean, rtol=1e-12)
    np.testing.assert_allclose(step.eigenvalues.numpy(), np.sort(np.linalg.eigvalsh(cov))[::-1], rtol=1e-10)
    white = step.apply(x).numpy()
    np.testing.assert_allclose(white.mean(axis=0), 0, atol=1e-10)
    np.testing.assert_allclose(white.T @ white / len(white), np.eye(5), atol=1e-10)


def test_pcaw_full_whitening_is_the_mahalanobis_distance():
    x, y = anisotropic(300), anisotropic(20, seed=24)
    step = rerank.PCAWhitening(normalize=False).fit(x)
    xn = x.numpy()
    inverse = np.linalg.inv(np.cov(xn.T, bias=True))
    white = step.apply(y).numpy()
    diff = y.numpy()[:, None] - y.numpy()[None]
    mahalanobis = np.einsum("ijd,de,ije->ij", diff, inverse, diff)
    np.testing.assert_allclose(((white[:, None] - white[None]) ** 2).sum(-1), mahalanobis, rtol=1e-8)


def test_pcaw_is_invariant_to_an_invertible_map_of_the_data():
    """Full whitening undoes any invertible linear map A: fitted on xA, applied to yA, the same
    distances as fitted on x, applied to y."""
    x, y = anisotropic(300), anisotropic(20, seed=25)
    a = torch.randn(5, 5, generator=torch.Generator().manual_seed(26), dtype=torch.float64)
    first = rerank.PCAWhitening(normalize=False).fit(x).apply(y)
    second = rerank.PCAWhitening(normalize=False).fit(x @ a).apply(y @ a)
    np.testing.assert_allclose(
        torch.cdist(first, first).numpy(), torch.cdist(second, second).numpy(), atol=1e-8
    )


def test_pcaw_power_zero_is_a_rotation_and_keeps_euclidean_rankings():
    """What holds at full dimension: power 0 (PCA alone) keeps every Euclidean distance, hence the
    Euclidean ranking; the cosine ranking is not kept (centring moves the origin), nor is either ranking
    under full whitening (it is the Mahalanobis distance)."""
    train, q, g = anisotropic(300), anisotropic(10, seed=27), anisotropic(40, seed=28)
    rotation = rerank.PCAWhitening(power=0.0, normalize=False).fit(train)
    np.testing.assert_allclose(
        torch.cdist(rotation.apply(q), rotation.apply(g)).numpy(), torch.cdist(q, g).numpy(), rtol=1e-10
    )
    plain = search.search(q, g, k=40, distance="euclidean").topk_indices
    step = rerank.PCAWhitening(power=0.0, normalize=False)
    rotated = rerank.search(q, g, steps=[step], k=40, distance="euclidean", fit_embeddings=train)
    assert torch.equal(rotated.topk_indices, plain)
    cosine = rerank.search(q, g, steps=[step], k=40).topk_indices
    whitened = rerank.search(
        q, g, steps="pcaw:normalize=false", k=40, distance="euclidean", fit_embeddings=train
    )
    assert not torch.equal(cosine, search.search(q, g, k=40).topk_indices)
    assert not torch.equal(whitened.topk_indices, plain)


def test_pcaw_dimension_reduction_keeps_the_leading_components():
    x = anisotropic(200, d=6)
    full = rerank.PCAWhitening(power=0.5).fit(x)
    reduced = rerank.PCAWhitening(dim=3, power=0.5).fit(x)
    np.testing.assert_allclose(reduced.apply(x).numpy(), full.apply(x)[:, :3].numpy(), rtol=1e-10)
    # normalize=True: rows are L2-normalised before centring; power 0.5 scales component i by λ_i^(−1/4)
    rows = torch.nn.functional.normalize(x, dim=1).numpy()
    centred = rows - rows.mean(axis=0)
    values, vectors = np.linalg.eigh(centred.T @ centred / len(rows))
    expected = centred @ vectors[:, ::-1][:, :3] / values[::-1][:3] ** 0.25
    np.testing.assert_allclose(np.abs(reduced.apply(x).numpy()), np.abs(expected), rtol=1e-8)


def test_pcaw_state_round_trip(tmp_path):
    x, y = anisotropic(100), anisotropic(7, seed=29)
    step = rerank.PCAWhitening(dim=4, power=0.5).fit(x)
    path = step.save(tmp_path / "w" / "pcaw.pt")
    loaded = rerank.build("pcaw", dim=4, power=0.5, state=str(path))
    assert loaded.fitted and loaded.count == 100
    assert torch.equal(loaded.apply(y), step.apply(y))
    assert set(step.state_dict()) == {"mean", "eigenvalues", "eigenvectors", "count", "normalize"}
    # dim and power apply at transform time: one fit serves every setting
    assert rerank.build("pcaw", dim=2, state=str(path)).apply(y).shape == (7, 2)


def test_pcaw_errors(tmp_path):
    with pytest.raises(ConfigError, match="not fitted"):
        rerank.PCAWhitening().apply(data(3))
    with pytest.raises(ConfigError, match=r"pcaw.*must be fitted"):
        rerank.search(data(5), steps="pcaw", k=2)
    with pytest.raises(DataError, match="not found"):
        rerank.build("pcaw", state=str(tmp_path / "missing.pt"))
    torch.save({"mean": torch.zeros(3), "count": 5, "normalize": True}, tmp_path / "bad.pt")
    with pytest.raises(DataError, match="lacks 'eigenvalues', 'eigenvectors'"):
        rerank.build("pcaw", state=str(tmp_path / "bad.pt"))
    with pytest.raises(ConfigError, match="rank"):
        rerank.PCAWhitening().fit(data(4, d=6)).apply(data(2, d=6))
    with pytest.raises(DataError, match="fitted on 6-d"):
        rerank.PCAWhitening(power=0).fit(data(4, d=6)).apply(data(2, d=5))


# ---------------------------------------------------------------------------------------------------------
# Pipelines


def test_embedding_steps_come_before_ranking_steps():
    with pytest.raises(ConfigError, match="before ranking steps"):
        rerank.build_steps(["k_reciprocal", "aqe"])
    with pytest.raises(ConfigError, match="does not change embeddings"):
        rerank.transform(data(5), steps="k_reciprocal")


def test_evaluate_with_steps():
    x, y = data(80, seed=30), torch.arange(80) % 8
    names = ["recall@1", "map@r"]
    assert rerank.evaluate(x, y, steps=None, metrics=names).metrics == evaluate(x, y, metrics=names).metrics
    steps = ["dba:k=2", "aqe:k=2", "k_reciprocal:k1=6,k2=2,candidates=30"]
    scored = rerank.evaluate(x, y, steps=steps, metrics=names)
    by_hand = compute(rerank.search(x, steps=steps, k=scored.k, query_labels=y), names)
    assert scored.metrics == by_hand.metrics and scored.k == 9  # the largest R, as evaluate chooses


def test_evaluate_with_steps_takes_label_comparison_and_class_average():
    """Relevance by a label comparison and the per-class average pass through re-ranking: with no steps
    the scores equal dmlkit.metrics.evaluate's; with steps they equal compute() on the re-ranked results
    with the same relevance (tags: a gallery item is relevant when it shares a tag with the query)."""
    x = data(60, seed=33)
    tags = np.stack([np.arange(60) % 5, np.arange(60) % 3], axis=1)

    def shares_a_tag(query_tags, gallery_tags):
        return (query_tags[..., :, None] == gallery_tags[..., None, :]).any(axis=(-1, -2))

    names = ["recall@1", "precision@4", "map@r"]
    plain = evaluate(x, tags, metrics=names, label_comparison=shares_a_tag, average="class")
    assert rerank.evaluate(
        x, tags, steps=None, metrics=names, label_comparison=shares_a_tag, average="class"
    ).metrics == pytest.approx(plain.metrics)
    scored = rerank.evaluate(
        x, tags, steps=["dba:k=2", "aqe:k=2"], metrics=names, label_comparison=shares_a_tag
    )
    labels_only = rerank.evaluate(x, np.arange(60) % 5, steps=["dba:k=2", "aqe:k=2"], metrics=names)
    assert scored.metrics != labels_only.metrics  # the comparison is used, not the first tag column
    with pytest.raises(ConfigError, match="ranks by another distance"):
        rerank.evaluate(x, tags[:, 0], steps=["aqe:k=2"], metrics=["c_recall@1"])


def test_revisited_map_reads_reranked_results():
    """Embedding steps give the same revisited scores through transform() + embeddings as through a
    full re-ranked ranking; a ranking step's results are a ranking revisited_map accepts."""
    q, g = data(4, seed=31, shift=0.3), data(30, seed=32, shift=0.3)
    gnd = [{"easy": [i, i + 4], "hard": [i + 8], "junk": [i + 12]} for i in range(4)]
    steps = ["dba:k=2", "aqe:k=2"]
    new_q, new_g = rerank.transform(q, g, steps=steps)
    by_embeddings = revisited_map(gnd, query=new_q, gallery=new_g)
    by_ranking = revisited_map(gnd, rerank.search(q, g, steps=steps, k=30))
    assert by_embeddings.metrics == pytest.approx(by_ranking.metrics)
    reranked = revisited_map(gnd, rerank.search(q, g, steps=[*steps, "k_reciprocal:k1=4,k2=2"], k=30))
    assert set(reranked.metrics) == set(by_ranking.metrics)


# ---------------------------------------------------------------------------------------------------------
# Memory: no n × n tensor


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any torch operation returns while active."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor):
                self.largest = max(self.largest, item.numel())
        return out


@pytest.mark.parametrize(
    "steps", [["aqe:k=3"], ["dba:k=3"], ["k_reciprocal:k1=8,k2=3,candidates=20"], ["pcaw:dim=6"]]
)
def test_steps_never_hold_an_n_by_n_matrix(monkeypatch, steps):
    n = 2500
    x = torch.randn(n, 8, generator=torch.Generator().manual_seed(33))
    y = torch.arange(n) % 50
    train = torch.randn(500, 8, generator=torch.Generator().manual_seed(34))
    whole = rerank.search(x, steps=steps, k=10, query_labels=y, fit_embeddings=train)
    # Smaller blocks than the default 2**22 (which is below n² only from n = 2049 on), so that the bound
    # below is tight: every block is ≤ 40 rows (chunk_size) or ≤ 2**16 entries.
    monkeypatch.setattr(rerank, "BLOCK_ELEMENTS", 2**16)
    with LargestTensor() as probe:
        blocked = rerank.search(x, steps=steps, k=10, query_labels=y, chunk_size=40, fit_embeddings=train)
    assert probe.largest < n * n / 40, probe.largest  # blocks of ≤ 40 rows × n, and O(n·k) lists
    assert torch.equal(blocked.topk_indices, whole.topk_indices)
