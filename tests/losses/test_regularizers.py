"""Regularizers of dmlkit.losses.regularizers (``lp``, ``zero_mean``, ``center_invariant``,
``regular_face``, ``sparse_centers``) against pytorch-metric-learning (PML): alone on random matrices
(values and gradients, with their reducers), as embedding regularizers of pair, triplet and matrix losses
and as weight regularizers of proxy and classification losses (values, embedding and parameter gradients
against the PML loss built with the same regularizer), Roth et al.'s L2 penalty from its formula, and
the configuration (``--loss-args``) and its errors."""

from __future__ import annotations

import argparse
from typing import Any

import pytest
import torch
from pair_checks import TOL, compare, grads_close, make_batch
from proxy_checks import compare_twins, twins

from dmlkit import losses
from dmlkit.errors import ConfigError, DataError, UnknownNameError
from dmlkit.losses import regularizers

pml_regularizers = pytest.importorskip("pytorch_metric_learning.regularizers")
pml_reducers = pytest.importorskip("pytorch_metric_learning.reducers")
pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_miners = pytest.importorskip("pytorch_metric_learning.miners")

ROWS, DIM = 12, 5

#: id → (our spec, PML factory)
REGULARIZERS: dict[str, tuple[Any, Any]] = {
    "lp": ("lp", lambda: pml_regularizers.LpRegularizer()),
    "lp-p1": ({"name": "lp", "args": {"p": 1}}, lambda: pml_regularizers.LpRegularizer(p=1)),
    "lp-p3-power2": (
        {"name": "lp", "args": {"p": 3, "power": 2}},
        lambda: pml_regularizers.LpRegularizer(p=3, power=2),
    ),
    "lp-sum": (
        {"name": "lp", "args": {"reduction": "sum"}},
        lambda: pml_regularizers.LpRegularizer(reducer=pml_reducers.SumReducer()),
    ),
    "lp-threshold": (
        {"name": "lp", "args": {"reduction": {"name": "threshold", "args": {"high": 2.0}}}},
        lambda: pml_regularizers.LpRegularizer(reducer=pml_reducers.ThresholdReducer(high=2.0)),
    ),
    "lp-class_weighted": (  # PML tells the reducer that row i has label i
        {
            "name": "lp",
            "args": {"reduction": {"name": "class_weighted", "args": {"weights": list(range(ROWS))}}},
        },
        lambda: pml_regularizers.LpRegularizer(
            reducer=pml_reducers.ClassWeightedReducer(torch.arange(ROWS, dtype=torch.float64))
        ),
    ),
    "zero_mean": ("zero_mean", lambda: pml_regularizers.ZeroMeanRegularizer()),
    "zero_mean-avg_non_zero": (
        {"name": "zero_mean", "args": {"reduction": "avg_non_zero"}},
        lambda: pml_regularizers.ZeroMeanRegularizer(reducer=pml_reducers.AvgNonZeroReducer()),
    ),
    "center_invariant": ("center_invariant", lambda: pml_regularizers.CenterInvariantRegularizer()),
    "regular_face": ("regular_face", lambda: pml_regularizers.RegularFaceRegularizer()),
    "regular_face-sum": (
        {"name": "regular_face", "args": {"reduction": "sum"}},
        lambda: pml_regularizers.RegularFaceRegularizer(reducer=pml_reducers.SumReducer()),
    ),
    "sparse_centers": (
        {"name": "sparse_centers", "args": {"centers_per_class": 3}},
        lambda: pml_regularizers.SparseCentersRegularizer(num_classes=ROWS // 3, centers_per_class=3),
    ),
    "sparse_centers-num_classes": (
        {"name": "sparse_centers", "args": {"centers_per_class": 4, "num_classes": 3}},
        lambda: pml_regularizers.SparseCentersRegularizer(num_classes=3, centers_per_class=4),
    ),
    "sparse_centers-mean": (
        {"name": "sparse_centers", "args": {"centers_per_class": 2, "reduction": "mean"}},
        lambda: pml_regularizers.SparseCentersRegularizer(
            num_classes=ROWS // 2, centers_per_class=2, reducer=pml_reducers.MeanReducer()
        ),
    ),
}


def matrix(seed: int, dtype: torch.dtype, rows: int = ROWS) -> torch.Tensor:
    return torch.randn(rows, DIM, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", sorted(REGULARIZERS))
def test_regularizer_matches_pml(name: str, dtype: torch.dtype) -> None:
    spec, factory = REGULARIZERS[name]
    for seed in range(3):
        x = matrix(seed, dtype)
        # two identical class vectors: cos = 1 (regular_face's tie; sparse_centers' √ at ε, whose gradient
        # there is rounding noise times 1/√ε in float32)
        if seed == 2 and (dtype == torch.float64 or not name.startswith("sparse_centers")):
            x[1] = x[0]
        ours_in, pml_in = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        value = regularizers.from_spec(spec)(ours_in)
        expected = factory()(pml_in)
        torch.testing.assert_close(value, expected.to(value.dtype), **TOL[dtype])
        value.backward()
        expected.backward()
        grads_close(ours_in.grad, pml_in.grad, ours_in)


def test_regular_face_with_one_row_is_zero() -> None:
    x = torch.randn(1, DIM, requires_grad=True)
    value = regularizers.build("regular_face")(x)
    value.backward()
    assert value.item() == 0.0 and not x.grad.any()


# ---------------------------------------------------------------------------------------------- on embeddings

EMBEDDING_CASES: list[tuple[str, dict, Any, str]] = [
    # (loss, our kwargs, PML factory(regularizer, weight), tuples)
    (
        "contrastive",
        {},
        lambda r, w: pml_losses.ContrastiveLoss(embedding_regularizer=r, embedding_reg_weight=w),
        "none",
    ),
    (
        "contrastive",
        {},
        lambda r, w: pml_losses.ContrastiveLoss(embedding_regularizer=r, embedding_reg_weight=w),
        "mined",
    ),
    (
        "triplet",
        {"margin": 0.2},
        lambda r, w: pml_losses.TripletMarginLoss(
            margin=0.2, embedding_regularizer=r, embedding_reg_weight=w
        ),
        "mined",
    ),
    (
        "multisimilarity",
        {},
        lambda r, w: pml_losses.MultiSimilarityLoss(embedding_regularizer=r, embedding_reg_weight=w),
        "none",
    ),
]


@pytest.mark.parametrize(("reg", "weight"), [("lp", 0.005), ("zero_mean", 0.3), ("center_invariant", 1.0)])
@pytest.mark.parametrize(("loss", "kwargs", "pml", "tuples"), EMBEDDING_CASES)
def test_embedding_regularizer_matches_pml(loss, kwargs, pml, tuples, reg, weight) -> None:
    spec, factory = REGULARIZERS[reg]
    emb, labels = make_batch(16, DIM, 4, torch.float64, seed=1)
    indices_tuple = None if tuples == "none" else pml_miners.MultiSimilarityMiner(epsilon=0.1)(emb, labels)
    ours = losses.build(loss, embedding_regularizer=spec, embedding_reg_weight=weight, **kwargs)
    compare(ours, pml(factory(), weight), emb, labels, indices_tuple)


def test_embedding_regularizer_is_added_when_the_loss_is_zero() -> None:
    """All labels distinct: no positive pair, a zero contrastive loss, the penalty alone (PML too)."""
    emb, labels = torch.randn(8, DIM, dtype=torch.float64), torch.arange(8)
    ours = losses.build("contrastive", neg_margin=0.0, embedding_regularizer="lp", embedding_reg_weight=0.5)
    pml = pml_losses.ContrastiveLoss(
        neg_margin=0.0, embedding_regularizer=pml_regularizers.LpRegularizer(), embedding_reg_weight=0.5
    )
    value = compare(ours, pml, emb, labels)
    torch.testing.assert_close(value, 0.5 * emb.norm(dim=1).mean())


def test_roths_l2_penalty_is_lp_with_weight_0_005() -> None:
    """Roth et al.'s N-pair/angular criteria add ``0.005 · mean_i ‖x_i‖₂`` of the raw batch embeddings
    (``l2_weight``); the loss itself normalises them for its distance."""
    emb, labels = make_batch(16, DIM, 4, torch.float64, seed=2)
    emb = emb * 3
    x = emb.clone().requires_grad_(True)
    value = losses.build("npair", embedding_regularizer="lp", embedding_reg_weight=0.005)(x, labels)
    y = emb.clone().requires_grad_(True)
    expected = losses.build("npair")(y, labels) + 0.005 * torch.sqrt((y * y).sum(dim=1)).mean()
    torch.testing.assert_close(value, expected)
    value.backward()
    expected.backward()
    grads_close(x.grad, y.grad, x)


def test_half_precision_embeddings_are_regularized_in_float32() -> None:
    emb, labels = make_batch(16, DIM, 4, torch.float32, seed=3)
    loss = losses.build("contrastive", embedding_regularizer="center_invariant", embedding_reg_weight=2.0)
    half = emb.to(torch.bfloat16)
    value = loss(half, labels)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, loss(half.float(), labels))


# ---------------------------------------------------------------------------------------------- on weights

WEIGHT_CASES: list[tuple[str, str, dict, dict]] = [
    # (loss, regularizer, our loss kwargs, PML loss kwargs)
    ("proxyanchor", "regular_face", {}, {}),
    ("proxyanchor", "lp", {}, {}),
    ("proxynca", "center_invariant", {}, {}),
    ("normsoftmax", "regular_face", {}, {}),
    ("normsoftmax", "zero_mean", {}, {}),
    ("softtriple", "sparse_centers", {"centers_per_class": 3}, {"centers_per_class": 3}),
    ("subcenter_arcface", "sparse_centers", {"sub_centers": 3}, {"sub_centers": 3}),
    ("arcface", "regular_face", {}, {}),
    ("cosface", "center_invariant", {}, {}),
]


@pytest.mark.parametrize(("loss", "reg", "ours_kw", "pml_kw"), WEIGHT_CASES)
def test_weight_regularizer_matches_pml(loss: str, reg: str, ours_kw: dict, pml_kw: dict) -> None:
    classes, weight = 4, 0.3
    emb, labels = make_batch(16, DIM, classes, torch.float64, seed=4)
    if reg == "sparse_centers":
        ours_reg: Any = {"name": "sparse_centers", "args": {"centers_per_class": 3}}
        pml_reg = pml_regularizers.SparseCentersRegularizer(num_classes=classes, centers_per_class=3)
    else:
        ours_reg, pml_reg = REGULARIZERS[reg][0], REGULARIZERS[reg][1]()
    ours_kw = {**ours_kw, "weight_regularizer": ours_reg, "weight_reg_weight": weight}
    pml_kw = {**pml_kw, "weight_regularizer": pml_reg, "weight_reg_weight": weight}
    ours, theirs = twins(loss, classes, DIM, torch.float64, ours_kw, pml_kw, seed=5)
    compare_twins(loss, ours, theirs, emb, labels)
    unregularized = {k: v for k, v in ours_kw.items() if not k.startswith("weight_reg")}
    plain = losses.build(loss, num_classes=classes, embedding_size=DIM, **unregularized).double()
    plain.load_state_dict(ours.state_dict())
    with torch.no_grad():
        penalty = weight * regularizers.from_spec(ours_reg)(ours.class_vector_rows())
        torch.testing.assert_close(ours(emb, labels) - plain(emb, labels), penalty)
    assert ours.last_stats["weight_reg_loss"] == pytest.approx(float(penalty))


def test_both_regularizers_on_one_loss_match_pml() -> None:
    emb, labels = make_batch(16, DIM, 4, torch.float64, seed=6)
    ours_kw = {
        "embedding_regularizer": "zero_mean",
        "embedding_reg_weight": 0.1,
        "weight_regularizer": "regular_face",
        "weight_reg_weight": 2.0,
    }
    pml_kw = {
        "embedding_regularizer": pml_regularizers.ZeroMeanRegularizer(),
        "embedding_reg_weight": 0.1,
        "weight_regularizer": pml_regularizers.RegularFaceRegularizer(),
        "weight_reg_weight": 2.0,
    }
    ours, theirs = twins("proxyanchor", 4, DIM, torch.float64, ours_kw, pml_kw, seed=7)
    compare_twins("proxyanchor", ours, theirs, emb, labels)
    stats = ours.last_stats
    assert stats["embedding_reg_loss"] == pytest.approx(0.1 * float(emb.sum(dim=1).abs().mean()))
    assert "weight_reg_loss" in stats and "num_pos_proxies" in stats


def test_every_loss_with_class_vectors_declares_them() -> None:
    """The class vectors a weight regularizer sees are the loss's parameter, one row per vector."""
    for name in losses.available():
        cls = losses.REGISTRY.get(name)
        if not cls.needs or name == "multiple":
            assert cls.class_vectors is None, name
            continue
        loss = losses.build(name, num_classes=3, embedding_size=DIM)
        rows = loss.class_vector_rows()
        assert rows.shape[1] == DIM and rows.shape[0] % 3 == 0, name
        assert any(rows.data_ptr() == p.data_ptr() for p in loss.parameters()), name


# ---------------------------------------------------------------------------------------------- configuration


def test_regularizers_registry() -> None:
    assert regularizers.available() == [
        "center_invariant",
        "lp",
        "regular_face",
        "sparse_centers",
        "zero_mean",
    ]
    lp = regularizers.build("lp", p=1, power=2, reduction="sum")
    assert repr(lp) == "LpRegularizer(p=1, power=2, reduction=SumReducer())"
    assert regularizers.from_spec(lp) is lp
    assert "weight_regularizer=SparseCentersRegularizer(centers_per_class=3" in repr(
        losses.build(
            "softtriple",
            num_classes=3,
            embedding_size=DIM,
            weight_regularizer=REGULARIZERS["sparse_centers"][0],
        )
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"weight_regularizer": "regular_face"},
            ConfigError,
            "loss 'contrastive' has no class vectors .* proxyanchor",
        ),
        (
            {"embedding_regularizer": "lp", "reduction": "do_nothing"},
            ConfigError,
            "cannot be added to the per-element",
        ),
        ({"embedding_regularizer": "l2"}, UnknownNameError, "unknown regularizer 'l2'; did you mean 'lp'"),
        ({"embedding_regularizer": {"name": "lp", "args": {"pp": 2}}}, UnknownNameError, "did you mean 'p'"),
        ({"embedding_regularizer": {"name": "lp", "args": {"p": 0}}}, ConfigError, "p must be > 0"),
        (
            {"embedding_regularizer": {"lp": {"p": 2}}},
            ConfigError,
            r"embedding_regularizer must be a name or \{name",
        ),
        (
            {"embedding_regularizer": {"name": "lp", "args": {"reduction": "do_nothing"}}},
            ConfigError,
            "reduction must give a number",
        ),
        ({"embedding_regularizer": "sparse_centers"}, ConfigError, "centers_per_class"),
        (
            {"embedding_regularizer": {"name": "sparse_centers", "args": {"centers_per_class": 1}}},
            ConfigError,
            "centers_per_class must be an int > 1",
        ),
        ({"embedding_reg_weight": "heavy"}, ConfigError, "embedding_reg_weight must be"),
    ],
)
def test_bad_regularizer_options_are_named(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        losses.build("contrastive", **kwargs)


def test_sparse_centers_refuses_rows_that_are_not_whole_classes() -> None:
    reg = regularizers.build("sparse_centers", centers_per_class=3)
    with pytest.raises(DataError, match="10 rows are not num_classes=3 blocks of centers_per_class=3"):
        reg(torch.randn(10, DIM))
    with pytest.raises(DataError, match="12 rows are not num_classes=5 blocks"):
        regularizers.build("sparse_centers", centers_per_class=3, num_classes=5)(torch.randn(12, DIM))
    with pytest.raises(DataError, match="an N × d matrix"):
        reg(torch.randn(12))


def test_regularizers_are_reachable_from_loss_args() -> None:
    from dmlkit.config.flags import add_config_arguments, config_from_args
    from dmlkit.train.objective import build_objective

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)

    def objective(loss: str, loss_args: str) -> Any:
        args = parser.parse_args(["--loss", loss, "--loss-args", loss_args])
        return build_objective(config_from_args(args), 4, DIM)

    built = objective(
        "contrastive", "{embedding_regularizer: {name: lp, args: {p: 2}}, embedding_reg_weight: 0.005}"
    )
    assert isinstance(built.loss.embedding_regularizer, regularizers.LpRegularizer)
    assert built.loss.embedding_reg_weight == 0.005 and built.loss.weight_regularizer is None
    built = objective("proxyanchor", "{weight_regularizer: regular_face, weight_reg_weight: 0.1}")
    assert isinstance(built.loss.weight_regularizer, regularizers.RegularFaceRegularizer)
    emb, labels = make_batch(16, DIM, 4, torch.float32, seed=8)
    value, stats = built(emb, labels)
    assert value.ndim == 0 and stats["loss/weight_reg_loss"] > 0
    members = "{losses: [{name: contrastive, args: {embedding_regularizer: zero_mean}}, triplet]}"
    built = objective("multiple", members)
    assert isinstance(built.loss.losses[0].embedding_regularizer, regularizers.ZeroMeanRegularizer)
    with pytest.raises(ConfigError, match="has no class vectors"):
        objective("triplet", "{weight_regularizer: lp}")


def test_dmlkit_list_shows_the_regularizers() -> None:
    from dmlkit.cli.listing import registries

    assert registries()["regularizers"].available() == regularizers.available()
