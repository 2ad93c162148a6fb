"""PML-style reducers of dmlkit.losses.reducers (``threshold``, ``per_anchor``, ``class_weighted``,
``do_nothing``) against pytorch-metric-learning (PML): alone on random per-element losses of every
reduction type (values and gradients), through losses whose per-element structure is PML's (contrastive
pairs, triplet-margin triplets, generalized-lifted and multi-similarity per-anchor losses, ProxyNCA
per-sample losses), on edge cases (all-zero losses, no element, thresholds excluding everything), and
from a configuration (``--loss-args``)."""

from __future__ import annotations

import argparse
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from pair_checks import TOL, compare, grads_close, make_batch

from dmlkit import losses
from dmlkit.errors import ConfigError, UnknownNameError
from dmlkit.losses import reducers
from dmlkit.losses.base import PairLoss, check_trainable
from dmlkit.losses.reducers import Elements

pml_reducers = pytest.importorskip("pytorch_metric_learning.reducers")
pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
lmu = pytest.importorskip("pytorch_metric_learning.utils.loss_and_miner_utils")

BATCH, CLASSES = 12, 4
WEIGHTS = [0.5, 2.0, 1.0, 3.0]

#: id → (our reduction spec, PML reducer factory)
REDUCERS: dict[str, tuple[Any, Any]] = {
    "threshold-low": (
        {"name": "threshold", "args": {"low": 0.5}},
        lambda: pml_reducers.ThresholdReducer(low=0.5),
    ),
    "threshold-high": (
        {"name": "threshold", "args": {"high": 1.2}},
        lambda: pml_reducers.ThresholdReducer(high=1.2),
    ),
    "threshold-both": (
        {"name": "threshold", "args": {"low": 0.3, "high": 1.5}},
        lambda: pml_reducers.ThresholdReducer(low=0.3, high=1.5),
    ),
    "class_weighted": (
        {"name": "class_weighted", "args": {"weights": WEIGHTS}},
        lambda: pml_reducers.ClassWeightedReducer(torch.tensor(WEIGHTS)),
    ),
    "per_anchor": ("per_anchor", lambda: pml_reducers.PerAnchorReducer()),
    "per_anchor-avg_non_zero": (
        {"name": "per_anchor", "args": {"reduction": "avg_non_zero"}},
        lambda: pml_reducers.PerAnchorReducer(pml_reducers.AvgNonZeroReducer()),
    ),
    "per_anchor-class_weighted": (
        {
            "name": "per_anchor",
            "args": {"reduction": {"name": "class_weighted", "args": {"weights": WEIGHTS}}},
        },
        lambda: pml_reducers.PerAnchorReducer(pml_reducers.ClassWeightedReducer(torch.tensor(WEIGHTS))),
    ),
    "per_anchor-threshold": (
        {"name": "per_anchor", "args": {"reduction": {"name": "threshold", "args": {"low": 0.2}}}},
        lambda: pml_reducers.PerAnchorReducer(pml_reducers.ThresholdReducer(low=0.2)),
    ),
    "mean": ("mean", lambda: pml_reducers.MeanReducer()),
    "avg_non_zero": ("avg_non_zero", lambda: pml_reducers.AvgNonZeroReducer()),
    "sum": ("sum", lambda: pml_reducers.SumReducer()),
}
PML_TYPE = {"element": "element", "pair": "pos_pair", "triplet": "triplet"}
#: (reducer id, reduction type): every pair but per_anchor on triplets, where PML's PerAnchorReducer raises
#: (test_per_anchor_averages_triplets_per_anchor_where_pml_raises)
CASES = [
    (name, kind)
    for name in sorted(REDUCERS)
    for kind in ("element", "pair", "triplet")
    if not (name.startswith("per_anchor") and kind == "triplet")
]


def random_case(
    kind: str, seed: int, n: int = 30, zeros: float = 0.3, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor]:
    """Random non-negative losses (a share exactly 0), their indices (pairs distinct, as the losses of one
    pair are), and batch labels in ``0 … CLASSES − 1``."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (BATCH,), generator=g)
    losses = torch.rand(n, generator=g, dtype=dtype) * 2
    losses[torch.rand(n, generator=g) < zeros] = 0.0
    if kind == "pair":
        flat = torch.randperm(BATCH * BATCH, generator=g)[:n]
        indices: tuple[torch.Tensor, ...] = (flat // BATCH, flat % BATCH)
    else:
        indices = tuple(
            torch.randint(0, BATCH, (n,), generator=g) for _ in range({"element": 1, "triplet": 3}[kind])
        )
    return losses, indices, labels


def pml_reduce(
    reducer: Any, losses: torch.Tensor, indices: tuple, kind: str, labels: torch.Tensor
) -> torch.Tensor:
    embeddings = torch.zeros(len(labels), 2, dtype=losses.dtype)  # PML reads its size, dtype and device
    pml_indices = indices[0] if kind == "element" else indices
    loss_dict = {"loss": {"losses": losses, "indices": pml_indices, "reduction_type": PML_TYPE[kind]}}
    return reducer(loss_dict, embeddings, labels)


def check_against_pml(
    spec: Any, factory: Any, losses: torch.Tensor, indices: tuple, kind: str, labels
) -> None:
    ours_in, pml_in = losses.clone().requires_grad_(True), losses.clone().requires_grad_(True)
    value = reducers.from_spec(spec)(ours_in, Elements(indices, labels, BATCH))
    expected = pml_reduce(factory(), pml_in, indices, kind, labels)
    tol = TOL[losses.dtype]
    torch.testing.assert_close(value, expected.to(value.dtype).reshape(()), **tol)
    value.backward()
    if expected.requires_grad:
        expected.backward()
    grads_close(ours_in.grad, pml_in.grad, ours_in)


# ---------------------------------------------------------------------------------------------- alone


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize(("name", "kind"), CASES)
def test_reducer_matches_pml_on_random_losses(name: str, kind: str, dtype: torch.dtype) -> None:
    spec, factory = REDUCERS[name]
    for seed in range(3):
        losses, indices, labels = random_case(kind, seed, dtype=dtype)
        check_against_pml(spec, factory, losses, indices, kind, labels)


@pytest.mark.parametrize(("name", "kind"), CASES)
def test_masked_reduction_is_the_reduction_of_the_selected_elements(name: str, kind: str) -> None:
    spec, factory = REDUCERS[name]
    losses, indices, labels = random_case(kind, seed=11)
    mask = torch.rand(len(losses), generator=torch.Generator().manual_seed(5)) < 0.6
    ours_in, pml_in = losses.clone().requires_grad_(True), losses.clone().requires_grad_(True)
    value = reducers.from_spec(spec).masked(ours_in, mask, Elements(indices, labels, BATCH))
    expected = pml_reduce(factory(), pml_in[mask], tuple(i[mask] for i in indices), kind, labels)
    torch.testing.assert_close(value, expected.reshape(()), **TOL[torch.float64])
    value.backward()
    if expected.requires_grad:
        expected.backward()
    grads_close(ours_in.grad, pml_in.grad, ours_in)


def test_duplicate_pairs_count_once_per_anchor_as_in_pml() -> None:
    """A pair listed twice (a pair mined twice: the same loss) counts once in its anchor's mean; both
    copies receive the gradient, as PML's matrix write does."""
    losses, indices, labels = random_case("pair", seed=3, n=10, zeros=0.0)
    twice = torch.cat([losses, losses[:4]]), tuple(torch.cat([i, i[:4]]) for i in indices)
    check_against_pml("per_anchor", REDUCERS["per_anchor"][1], *twice, "pair", labels)


def test_per_anchor_averages_triplets_per_anchor_where_pml_raises() -> None:
    losses, indices, labels = random_case("triplet", seed=2, n=25)
    with pytest.raises(NotImplementedError):
        pml_reduce(pml_reducers.PerAnchorReducer(), losses, indices, "triplet", labels)
    x = losses.clone().requires_grad_(True)
    value = reducers.build("per_anchor")(x, Elements(indices, labels, BATCH))
    anchors = indices[0].tolist()
    per_anchor = []
    for i in range(BATCH):  # loop formula: each anchor's listed triplets averaged, 0 without any
        mine = [x[k] for k in range(len(anchors)) if anchors[k] == i]
        per_anchor.append(sum(mine) / len(mine) if mine else torch.zeros((), dtype=x.dtype))
    torch.testing.assert_close(value, sum(per_anchor) / BATCH)


@pytest.mark.parametrize(("name", "kind"), CASES)
def test_all_zero_losses(name: str, kind: str) -> None:
    spec, factory = REDUCERS[name]
    _, indices, labels = random_case(kind, seed=4)
    check_against_pml(spec, factory, torch.zeros(len(indices[0]), dtype=torch.float64), indices, kind, labels)


@pytest.mark.parametrize("kind", ["element", "pair", "triplet"])
@pytest.mark.parametrize(("low", "high"), [(0.5, None), (None, 0.05), (0.45, 0.5)])
def test_thresholds_excluding_everything_give_zero(low: float | None, high: float | None, kind: str) -> None:
    _, indices, labels = random_case(kind, seed=4)
    losses = torch.rand(len(indices[0]), dtype=torch.float64) * 0.4 + 0.05  # all in (0.05, 0.45)
    check_against_pml(
        {"name": "threshold", "args": {"low": low, "high": high}},
        lambda: pml_reducers.ThresholdReducer(low=low, high=high),
        losses,
        indices,
        kind,
        labels,
    )
    x = losses.clone().requires_grad_(True)
    value = reducers.build("threshold", low=low, high=high)(x)
    value.backward()
    assert value.item() == 0.0 and x.grad is not None and not x.grad.any()


@pytest.mark.parametrize("kind", ["element", "pair"])
@pytest.mark.parametrize("name", sorted(REDUCERS))
def test_no_element_reduces_to_zero(name: str, kind: str) -> None:
    """An empty selection is 0 (PML agrees, but for class_weighted, whose mean of nothing is NaN)."""
    spec, factory = REDUCERS[name]
    labels = torch.randint(0, CLASSES, (BATCH,))
    empty = torch.zeros(0, dtype=torch.float64, requires_grad=True)
    indices = tuple(torch.zeros(0, dtype=torch.long) for _ in range(1 if kind == "element" else 2))
    value = reducers.from_spec(spec)(empty, Elements(indices, labels, BATCH))
    assert value.shape == () and value.item() == 0.0
    value.backward()
    expected = pml_reduce(factory(), empty.detach(), indices, kind, labels)
    # PML averages an empty tensor (NaN) in MeanReducer and ClassWeightedReducer, also as the inner
    # reducer of PerAnchorReducer on per-element losses (handed on as they are)
    if name.startswith("per_anchor"):  # on pairs: B anchors without pairs, each 0
        nan = kind == "element" and name in ("per_anchor", "per_anchor-class_weighted")
    else:
        nan = name in ("mean", "class_weighted")
    if nan:
        assert torch.isnan(expected)
    else:
        assert expected.item() == 0.0


def test_do_nothing_returns_the_losses() -> None:
    losses, indices, labels = random_case("pair", seed=1)
    reducer = reducers.build("do_nothing")
    assert reducer(losses, Elements(indices, labels, BATCH)) is losses
    mask = losses > 0.5
    torch.testing.assert_close(reducer.masked(losses, mask), losses[mask])
    assert not reducer.reduces and not reducer.fusable and reducers.DoNothingReducer.reduces is False
    loss_dict = {"loss": {"losses": losses, "indices": indices, "reduction_type": "pos_pair"}}
    assert pml_reducers.DoNothingReducer()(loss_dict, None, labels) is loss_dict  # PML: the dictionary


def test_capabilities_of_the_reducers() -> None:
    fusable = {n for n in reducers.available() if reducers.REGISTRY.get(n).fusable}
    assert fusable == {"mean", "avg_non_zero", "sum"}
    needs = {n for n in reducers.available() if reducers.REGISTRY.get(n).needs_elements}
    assert needs == {"per_anchor", "class_weighted"}
    with pytest.raises(ConfigError, match="reduction 'threshold' is not a sum divided by a count"):
        reducers.build("threshold", low=0.0).divisor(torch.tensor(3), torch.tensor(1))
    with pytest.raises(ConfigError, match="reduction 'class_weighted' needs to know the anchor"):
        reducers.build("class_weighted", weights=[1.0])(torch.ones(3))


# ---------------------------------------------------------------------------------------------- losses


def mined_pairs(emb: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    pairs = pml_miners.MultiSimilarityMiner(epsilon=0.1)(emb, labels)
    assert all(len(t) > 1 for t in pairs)
    return pairs


PAIR_CASES = ["threshold-low", "threshold-both", "class_weighted", "per_anchor", "per_anchor-class_weighted"]


@pytest.mark.parametrize("name", PAIR_CASES)
@pytest.mark.parametrize("tuples", ["mined", "all_pairs"])
def test_contrastive_with_listed_pairs_matches_pml(name: str, tuples: str) -> None:
    spec, factory = REDUCERS[name]
    emb, labels = make_batch(BATCH, 6, CLASSES, torch.float64, seed=1)
    indices_tuple = mined_pairs(emb, labels) if tuples == "mined" else lmu.get_all_pairs_indices(labels)
    ours = losses.build("contrastive", pos_margin=0.1, neg_margin=0.9, reduction=spec)
    theirs = pml_losses.ContrastiveLoss(pos_margin=0.1, neg_margin=0.9, reducer=factory())
    compare(ours, theirs, emb, labels, indices_tuple)


@pytest.mark.parametrize("name", PAIR_CASES)
def test_contrastive_without_miner_matches_pml(name: str) -> None:
    """Needs the per-pair path: a reduction that is no sum divided by a count leaves the fused one."""
    spec, factory = REDUCERS[name]
    emb, labels = make_batch(BATCH, 6, CLASSES, torch.float64, seed=2)
    ours = losses.build("contrastive", neg_margin=0.8, reduction=spec)
    compare(ours, pml_losses.ContrastiveLoss(neg_margin=0.8, reducer=factory()), emb, labels)


@pytest.mark.parametrize("name", ["threshold-low", "threshold-high", "class_weighted"])
@pytest.mark.parametrize("smooth_loss", [False, True])
@pytest.mark.parametrize("tuples", ["none", "mined"])
def test_triplet_margin_matches_pml(name: str, smooth_loss: bool, tuples: str) -> None:
    spec, factory = REDUCERS[name]
    emb, labels = make_batch(BATCH, 6, CLASSES, torch.float64, seed=3)
    indices_tuple = None if tuples == "none" else pml_miners.TripletMarginMiner(margin=0.3)(emb, labels)
    ours = losses.build("triplet", margin=0.3, smooth_loss=smooth_loss, reduction=spec)
    theirs = pml_losses.TripletMarginLoss(margin=0.3, smooth_loss=smooth_loss, reducer=factory())
    compare(ours, theirs, emb, labels, indices_tuple)


PER_ANCHOR_LOSSES = [
    ("generalized_lifted", "GeneralizedLiftedStructureLoss"),
    ("multisimilarity", "MultiSimilarityLoss"),
]


@pytest.mark.parametrize("name", ["threshold-both", "per_anchor", "per_anchor-threshold"])
@pytest.mark.parametrize(("loss", "pml"), PER_ANCHOR_LOSSES)
def test_per_anchor_losses_match_pml(name: str, loss: str, pml: str) -> None:
    spec, factory = REDUCERS[name]
    emb, labels = make_batch(BATCH, 6, CLASSES, torch.float64, seed=4)
    ours = losses.build(loss, reduction=spec)
    compare(ours, getattr(pml_losses, pml)(reducer=factory()), emb, labels)
    compare(ours, getattr(pml_losses, pml)(reducer=factory()), emb, labels, mined_pairs(emb, labels))


@pytest.mark.parametrize("name", ["class_weighted", "per_anchor-class_weighted"])
@pytest.mark.parametrize(("loss", "pml"), PER_ANCHOR_LOSSES)
def test_class_weighted_per_anchor_losses_weigh_each_anchor_by_its_class(
    name: str, loss: str, pml: str
) -> None:
    """``mean_i w[y_i]·L_i`` with PML's per-anchor losses ``L_i``. PML's own ClassWeightedReducer
    broadcasts these losses (shape B × 1) against the weights (B): ``mean(L)·mean(w[y])``."""
    spec, factory = REDUCERS[name]
    emb, labels = make_batch(BATCH, 6, CLASSES, torch.float64, seed=4)
    weights = torch.tensor(WEIGHTS, dtype=torch.float64)
    x_ours, x_pml = emb.clone().requires_grad_(True), emb.clone().requires_grad_(True)
    value = losses.build(loss, reduction=spec)(x_ours, labels)
    per_anchor = getattr(pml_losses, pml)(reducer=pml_reducers.DoNothingReducer())(x_pml, labels)
    per_anchor = per_anchor["loss"]["losses"].reshape(-1)
    expected = (per_anchor * weights[labels]).mean()
    torch.testing.assert_close(value, expected, **TOL[torch.float64])
    value.backward()
    expected.backward()
    grads_close(x_ours.grad, x_pml.grad, x_ours)
    pml_value = getattr(pml_losses, pml)(reducer=factory())(emb, labels)
    torch.testing.assert_close(pml_value, per_anchor.mean() * weights[labels].mean())


@pytest.mark.parametrize("name", ["threshold-low", "class_weighted", "per_anchor-class_weighted"])
def test_proxynca_per_sample_losses_match_pml(name: str) -> None:
    spec, factory = REDUCERS[name]
    emb, labels = make_batch(BATCH, 6, CLASSES, torch.float64, seed=5)
    torch.manual_seed(0)
    theirs = pml_losses.ProxyNCALoss(CLASSES, 6, softmax_scale=2.0, reducer=factory()).double()
    ours = losses.build("proxynca", num_classes=CLASSES, embedding_size=6, softmax_scale=2.0, reduction=spec)
    ours = ours.double()
    with torch.no_grad():
        ours.proxies.copy_(theirs.proxies)
    compare(ours, theirs, emb, labels, params=[(ours.proxies, theirs.proxies)])


def test_per_anchor_with_a_reference_set_larger_than_the_batch() -> None:
    """Pairs index a reference set of R > B items (PML's B × B matrix cannot hold them): each anchor's
    positive (negative) pairs averaged, then the B anchors averaged, from the contrastive formula."""
    emb, labels = make_batch(6, 5, 3, torch.float64, seed=10)
    ref, ref_labels = make_batch(20, 5, 3, torch.float64, seed=11)
    loss = losses.build("contrastive", pos_margin=0.2, neg_margin=0.9, reduction="per_anchor")
    value = loss(emb, labels, ref_emb=ref, ref_labels=ref_labels)
    d = torch.cdist(F.normalize(emb, dim=1), F.normalize(ref, dim=1))
    same = labels[:, None] == ref_labels[None, :]
    expected = torch.zeros((), dtype=torch.float64)
    for mask, terms in ((same, torch.relu(d - 0.2)), (~same, torch.relu(0.9 - d))):
        per_anchor = [terms[i][mask[i]].mean() if mask[i].any() else 0.0 for i in range(len(emb))]
        expected = expected + sum(per_anchor) / len(emb)
    torch.testing.assert_close(value, expected)


def test_do_nothing_returns_pmls_per_element_losses() -> None:
    emb, labels = make_batch(BATCH, 6, CLASSES, torch.float64, seed=6)
    pairs = mined_pairs(emb, labels)
    value = losses.build("contrastive", neg_margin=0.9, reduction="do_nothing")(emb, labels, pairs)
    theirs = pml_losses.ContrastiveLoss(neg_margin=0.9, reducer=pml_reducers.DoNothingReducer())(
        emb, labels, pairs
    )
    expected = torch.cat([theirs["pos_loss"]["losses"], theirs["neg_loss"]["losses"]])
    torch.testing.assert_close(value, expected)  # positive pairs first, then negative pairs
    value = losses.build("generalized_lifted", reduction="do_nothing")(emb, labels)
    theirs = pml_losses.GeneralizedLiftedStructureLoss(reducer=pml_reducers.DoNothingReducer())(emb, labels)
    torch.testing.assert_close(value, theirs["loss"]["losses"].reshape(-1))  # PML's shape: B × 1
    assert value.shape == (BATCH,)


def test_do_nothing_refuses_a_loss_that_adds_reduced_terms() -> None:
    class TwoTerms(PairLoss):
        def pair_losses(self, pos, neg):
            return pos, neg

        def compute_loss(self, batch):
            a1, p, a2, n = batch.to_pairs()
            mat = self.matrix(batch)
            return self.reduce(mat[a1, p]) + self.reduce(mat[a2, n])

    emb, labels = make_batch(BATCH, 6, CLASSES, torch.float64, seed=7)
    with pytest.raises(ConfigError, match="adds several reduced terms up, so reduction 'do_nothing'"):
        TwoTerms(distance="euclidean", reduction="do_nothing")(emb, labels)
    assert TwoTerms(distance="euclidean", reduction="sum")(emb, labels).ndim == 0


def test_a_loss_that_does_not_name_its_elements_refuses_reducers_that_need_them() -> None:
    class Unnamed(PairLoss):
        def compute_loss(self, batch):
            return self.reduce(self.matrix(batch).reshape(-1))

    emb, labels = make_batch(BATCH, 6, CLASSES, torch.float64, seed=8)
    for spec in ("per_anchor", {"name": "class_weighted", "args": {"weights": WEIGHTS}}):
        with pytest.raises(ConfigError, match="loss 'Unnamed' does not tell its reduction which anchor"):
            Unnamed(distance="euclidean", reduction=spec)(emb, labels)
    assert (
        Unnamed(distance="euclidean", reduction={"name": "threshold", "args": {"low": 0.1}})(emb, labels) > 0
    )


def test_class_weighted_refuses_labels_without_a_weight() -> None:
    emb, labels = make_batch(BATCH, 6, CLASSES, torch.float64, seed=9)
    loss = losses.build(
        "generalized_lifted", reduction={"name": "class_weighted", "args": {"weights": [1.0, 2.0]}}
    )
    with pytest.raises(ConfigError, match=r"2 class weights \(labels 0 … 1\), but an anchor has label [23]"):
        loss(emb, labels)


# ---------------------------------------------------------------------------------------------- configuration


def test_reduction_takes_a_name_a_mapping_or_a_reducer() -> None:
    loss = losses.build("contrastive", reduction={"name": "threshold", "args": {"low": 0.1, "high": 2.0}})
    assert isinstance(loss.reducer, reducers.ThresholdReducer) and loss.reduction == "threshold"
    assert (loss.reducer.low, loss.reducer.high) == (0.1, 2.0)
    assert "ThresholdReducer(low=0.1, high=2.0)" in repr(loss)
    assert losses.build("contrastive", reduction={"name": "sum"}).reduction == "sum"
    mine = reducers.PerAnchorReducer(reducers.build("avg_non_zero"))
    assert losses.build("triplet", reduction=mine).reducer is mine
    assert repr(mine) == "PerAnchorReducer(reduction=AvgNonZeroReducer())"


@pytest.mark.parametrize(
    ("spec", "error", "match"),
    [
        ("threshold", ConfigError, "reduction 'threshold': give low, high or both"),
        ({"name": "threshold", "args": {"low": 1.0, "high": 0.5}}, ConfigError, "low must be < high"),
        ({"name": "threshold", "args": {"lo": 1.0}}, UnknownNameError, "did you mean 'low'"),
        ({"name": "threshold", "args": {"low": "abc"}}, ConfigError, "low must be"),
        ({"nme": "threshold"}, ConfigError, r"reduction must be a name or \{name: ..., args"),
        ({"name": "threshold", "args": [1]}, ConfigError, r"reduction must be a name or \{name"),
        ({"name": "tresholds"}, UnknownNameError, "did you mean 'threshold'"),
        ({"name": "class_weighted", "args": {"weights": []}}, ConfigError, "non-empty list of finite"),
        ({"name": "per_anchor", "args": {"reduction": "avg_non_zer"}}, UnknownNameError, "'avg_non_zero'"),
    ],
)
def test_bad_reductions_are_named(spec: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        losses.build("contrastive", reduction=spec)


def test_reducers_are_reachable_from_loss_args_and_do_nothing_cannot_train() -> None:
    from dmlkit.config.flags import add_config_arguments, config_from_args
    from dmlkit.train.objective import build_objective

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)

    def objective(loss_args: str, loss: str = "contrastive") -> Any:
        args = parser.parse_args(["--loss", loss, "--loss-args", loss_args])
        return build_objective(config_from_args(args), CLASSES, 6)

    weighted = "{name: class_weighted, args: {weights: [1, 2, 3, 4]}}"
    built = objective(f"{{reduction: {{name: per_anchor, args: {{reduction: {weighted}}}}}}}")
    assert isinstance(built.loss.reducer, reducers.PerAnchorReducer)
    assert built.loss.reducer.inner.weights.tolist() == [1.0, 2.0, 3.0, 4.0]
    built = objective("{reduction: {name: threshold, args: {low: 0.1}}}", "triplet")
    assert built.loss.reducer.low == 0.1
    with pytest.raises(ConfigError, match="'do_nothing' is for Python use"):
        objective("{reduction: do_nothing}")
    with pytest.raises(ConfigError, match="loss 'triplet' with reduction 'do_nothing' returns per-element"):
        objective("{losses: [contrastive, {name: triplet, args: {reduction: do_nothing}}]}", "multiple")
    with pytest.raises(ConfigError, match="argument reduction must be a string or a mapping"):
        objective("{reduction: [threshold]}")


def test_check_trainable() -> None:
    check_trainable(losses.build("contrastive", reduction={"name": "threshold", "args": {"low": 0.0}}))
    with pytest.raises(ConfigError, match="'do_nothing' is for Python use"):
        check_trainable(losses.build("contrastive", reduction="do_nothing"))
