"""Pair- and tuple-based losses of dmlkit.losses.pair (beyond contrastive/triplet): value and gradient
against pytorch-metric-learning (PML) where PML has the loss, against loop implementations of the papers'
formulas otherwise (quadruplet) and for the documented deviations from PML."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from pair_checks import (
    EDGE_LABELS,
    SHAPES,
    TOL,
    angular_loop,
    compare,
    dsm_loop,
    grads_close,
    lifted_loop,
    loop_pairs,
    loop_triplets,
    make_batch,
    margin_loop,
    npair_loop,
    pml_distance,
    quadruplet_loop,
    tcm_loop,
)

from dmlkit import losses
from dmlkit.errors import ConfigError
from dmlkit.tuples import Batch, all_triplets, random_triplets

pml = pytest.importorskip("pytorch_metric_learning.losses")
pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
pml_reducers = pytest.importorskip("pytorch_metric_learning.reducers")
pml_distances = pytest.importorskip("pytorch_metric_learning.distances")

NAMES = [
    "margin",
    "lifted",
    "generalized_lifted",
    "npair",
    "angular",
    "snr_contrastive",
    "quadruplet",
    "tuplet_margin",
    "intra_pair_variance",
    "threshold_consistent_margin",
    "dynamic_soft_margin",
]


def normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, p=2, dim=1)


def pml_dsm(**kwargs) -> torch.nn.Module:
    """PML's DynamicSoftMarginLoss with the histogram update detached (our documented deviation: PML
    differentiates through the running histogram, and a second backward through it fails)."""
    loss = pml.DynamicSoftMarginLoss(**kwargs)
    update = type(loss).update_histogram
    loss.update_histogram = lambda data: update(loss, data.detach())
    return loss


# (our name, our kwargs, PML factory, PML handles ref_emb correctly, map applied to PML's inputs).
# Angular: PML leaves negatives unnormalised (our deviation); on normalised inputs both agree, and the
# map is inside the graph, so gradients are still w.r.t. the raw inputs.
Config = tuple[str, dict, Callable[[], torch.nn.Module], bool, Callable | None]
CONFIGS: list[Config] = [
    ("margin", {}, lambda: pml.MarginLoss(), True, None),
    (
        "margin",
        {"margin": 0.1, "beta": 0.9, "distance": "cosine"},
        lambda: pml.MarginLoss(margin=0.1, beta=0.9, distance=pml_distance("cosine")),
        True,
        None,
    ),
    (
        "margin",
        {"beta": 6.0, "reduction": "sum", "distance": "squared_euclidean", "normalize_embeddings": False},
        lambda: pml.MarginLoss(
            beta=6.0, reducer=pml_reducers.SumReducer(), distance=pml_distance("squared_euclidean", False)
        ),
        True,
        None,
    ),
    ("lifted", {}, lambda: pml.LiftedStructureLoss(), False, None),
    (
        "lifted",
        {"neg_margin": 0.4, "pos_margin": 0.9, "distance": "cosine"},
        lambda: pml.LiftedStructureLoss(neg_margin=0.4, pos_margin=0.9, distance=pml_distance("cosine")),
        False,
        None,
    ),
    ("generalized_lifted", {}, lambda: pml.GeneralizedLiftedStructureLoss(), True, None),
    (
        "generalized_lifted",
        {"neg_margin": 0.3, "pos_margin": 0.8, "distance": "cosine"},
        lambda: pml.GeneralizedLiftedStructureLoss(
            neg_margin=0.3, pos_margin=0.8, distance=pml_distance("cosine")
        ),
        True,
        None,
    ),
    ("npair", {}, lambda: pml.NPairsLoss(), False, None),
    (
        "npair",
        {"distance": "euclidean"},
        lambda: pml.NPairsLoss(distance=pml_distance("euclidean")),
        False,
        None,
    ),
    ("angular", {}, lambda: pml.AngularLoss(), True, normalize),
    ("angular", {"alpha": 30}, lambda: pml.AngularLoss(alpha=30), True, normalize),
    ("snr_contrastive", {}, lambda: pml.SignalToNoiseRatioContrastiveLoss(), True, None),
    (
        "snr_contrastive",
        {"pos_margin": 0.1, "neg_margin": 0.8, "normalize_embeddings": False},
        lambda: pml.SignalToNoiseRatioContrastiveLoss(
            pos_margin=0.1, neg_margin=0.8, distance=pml_distances.SNRDistance(normalize_embeddings=False)
        ),
        True,
        None,
    ),
    ("tuplet_margin", {}, lambda: pml.TupletMarginLoss(), True, None),
    (
        "tuplet_margin",
        {"margin": 10.0, "scale": 16.0},
        lambda: pml.TupletMarginLoss(margin=10.0, scale=16.0),
        True,
        None,
    ),
    ("intra_pair_variance", {}, lambda: pml.IntraPairVarianceLoss(), True, None),
    (
        "intra_pair_variance",
        {"pos_eps": 0.05, "neg_eps": 0.1, "distance": "euclidean"},
        lambda: pml.IntraPairVarianceLoss(pos_eps=0.05, neg_eps=0.1, distance=pml_distance("euclidean")),
        True,
        None,
    ),
    ("threshold_consistent_margin", {}, lambda: pml.ThresholdConsistentMarginLoss(), False, None),
    (
        "threshold_consistent_margin",
        {"lambda_plus": 0.5, "lambda_minus": 2.0, "margin_plus": 0.7, "margin_minus": 0.2},
        lambda: pml.ThresholdConsistentMarginLoss(
            lambda_plus=0.5, lambda_minus=2.0, margin_plus=0.7, margin_minus=0.2
        ),
        False,
        None,
    ),
    ("dynamic_soft_margin", {}, lambda: pml_dsm(), True, None),
    (
        "dynamic_soft_margin",
        {"min_val": -4.0, "num_bins": 20, "momentum": 0.1, "distance": "squared_euclidean"},
        lambda: pml_dsm(min_val=-4.0, num_bins=20, momentum=0.1, distance=pml_distance("squared_euclidean")),
        True,
        None,
    ),
]
CONFIG_IDS = [f"{c[0]}-{'-'.join(f'{k}={v}' for k, v in c[1].items()) or 'default'}" for c in CONFIGS]
REF_CONFIGS = [c for c in CONFIGS if c[3]]
REF_IDS = [CONFIG_IDS[CONFIGS.index(c)] for c in REF_CONFIGS]


def run(config: Config, emb, labels, indices_tuple=None, ref=None, ref_labels=None) -> torch.Tensor:
    name, kwargs, factory, _, pml_input = config
    return compare(
        losses.build(name, **kwargs), factory(), emb, labels, indices_tuple, ref, ref_labels, pml_input
    )


def test_names_registered_with_trainer_attributes() -> None:
    assert set(NAMES) <= set(losses.available())
    for name in NAMES:
        loss = losses.build(name)
        assert loss.tuple_kinds == frozenset({"pairs", "triplets"}) and loss.accepts_ref is True
        assert loss.needs == frozenset() and list(loss.parameters()) == []


# ---------------------------------------------------------------------------------------------- vs PML


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_no_miner_matches_pml(config, shape, dtype) -> None:
    emb, labels = make_batch(*shape, dtype, seed=sum(shape))
    run(config, emb, labels)


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
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_mined_tuples_match_pml(config, miner, dtype) -> None:
    emb, labels = make_batch(24, 8, 5, dtype, seed=7)
    indices_tuple = MINERS[miner]()(emb, labels)
    assert all(len(t) > 1 for t in indices_tuple)  # avoid PML's "≤ 1 tuple ⇒ zero loss" shortcut
    run(config, emb, labels, indices_tuple)


def test_duplicate_mined_pairs_count_like_pml() -> None:
    emb, labels = make_batch(16, 6, 4, torch.float64, seed=2)
    pairs = pml_miners.MultiSimilarityMiner(epsilon=0.1)(emb, labels)
    doubled = tuple(torch.cat([t, t[: len(t) // 2]]) for t in pairs)
    for config in CONFIGS:
        run(config, emb, labels, doubled)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("mined", [False, True], ids=["all", "mined"])
@pytest.mark.parametrize("config", REF_CONFIGS, ids=REF_IDS)
def test_ref_emb_matches_pml(config, mined, dtype) -> None:
    emb, labels = make_batch(12, 8, 4, dtype, seed=3)
    ref, ref_labels = make_batch(20, 8, 4, dtype, seed=4)
    indices_tuple = pml_miners.MultiSimilarityMiner()(emb, labels, ref, ref_labels) if mined else None
    run(config, emb, labels, indices_tuple, ref, ref_labels)


@pytest.mark.parametrize("labels_name", sorted(EDGE_LABELS))
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_degenerate_labels_match_pml(config, labels_name) -> None:
    labels = EDGE_LABELS[labels_name]
    emb = torch.randn(len(labels), 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    value = run(config, emb, labels)
    if labels_name in ("all_same", "all_distinct") and config[0] in ("margin", "dynamic_soft_margin"):
        assert value.item() == 0.0  # no triplet exists


def test_margin_random_triplets_match_pml_on_the_same_triplets() -> None:
    emb, labels = make_batch(24, 8, 5, torch.float64, seed=11)
    torch.manual_seed(123)
    triplets = random_triplets(labels, None, 3)
    torch.manual_seed(123)  # the loss draws the same triplets from the same global RNG state
    ours = losses.build("margin", triplets_per_anchor=3)(emb, labels)
    theirs = pml.MarginLoss()(emb, labels, triplets)
    torch.testing.assert_close(ours, theirs, **TOL[torch.float64])


# ---------------------------------------------------------------------------------------------- margin's β


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("source", ["all", "pairs", "triplets", "ref"])
@pytest.mark.parametrize("per_class", [False, True], ids=["global_beta", "class_beta"])
def test_margin_learnable_beta_matches_pml_with_parameter_gradients(per_class, source, dtype) -> None:
    classes = 5
    emb, labels = make_batch(24, 8, classes, dtype, seed=9)
    kwargs = {"learn_beta": True, "nu": 0.3, "num_classes": classes if per_class else None}
    theirs = pml.MarginLoss(**kwargs)
    ours = losses.build("margin", **kwargs)
    assert [p.shape for p in ours.parameters()] == [theirs.beta.shape]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # distinct values per class so the per-class indexing is exercised
        theirs.beta.copy_(0.8 + 0.8 * torch.rand(theirs.beta.shape, generator=g))
        ours.beta.copy_(theirs.beta)
    ref = ref_labels = indices_tuple = None
    if source == "pairs":
        indices_tuple = pml_miners.MultiSimilarityMiner(epsilon=0.1)(emb, labels)
    elif source == "triplets":
        indices_tuple = pml_miners.TripletMarginMiner(margin=0.2, type_of_triplets="semihard")(emb, labels)
    elif source == "ref":
        ref, ref_labels = make_batch(20, 8, classes, dtype, seed=4)
    compare(ours, theirs, emb, labels, indices_tuple, ref, ref_labels, params=[(ours.beta, theirs.beta)])


def test_margin_beta_learns_and_fixed_beta_is_a_buffer() -> None:
    emb, labels = make_batch(24, 8, 5, torch.float32, seed=6)
    for num_classes in (None, 5):
        loss = losses.build("margin", learn_beta=True, nu=0.1, num_classes=num_classes)
        params = list(loss.parameters())
        assert len(params) == 1 and params[0] is loss.beta and params[0].numel() == (num_classes or 1)
        opt = torch.optim.SGD(loss.parameters(), lr=0.05)
        before = loss(emb, labels)
        before.backward()
        opt.step()
        assert loss(emb, labels).item() < before.item()
    fixed = losses.build("margin", num_classes=5)
    assert list(fixed.parameters()) == [] and fixed.beta.shape == (5,)
    assert torch.equal(fixed.state_dict()["beta"], torch.full((5,), 1.2))


@pytest.mark.parametrize("reduction", ["avg_non_zero", "mean", "sum"])
@pytest.mark.parametrize("per_class", [False, True], ids=["global_beta", "class_beta"])
def test_margin_matches_loop_for_every_reduction(reduction, per_class) -> None:
    emb, labels = make_batch(10, 5, 3, torch.float64, seed=5)
    beta = torch.tensor([1.0, 1.3, 0.9] if per_class else [1.1], dtype=torch.float64)
    loss = losses.build(
        "margin", learn_beta=True, nu=0.2, num_classes=3 if per_class else None, reduction=reduction
    ).double()
    with torch.no_grad():
        loss.beta.copy_(beta)
    for source in ("all", "pairs"):
        x = emb.clone().requires_grad_(True)
        y = emb.clone().requires_grad_(True)
        b = beta.clone().requires_grad_(True)
        if source == "all":
            indices_tuple, triplets = None, loop_triplets(labels)
        else:  # mined pairs: every positive pair joined with every negative pair of its anchor
            pos, neg = loop_pairs(labels)
            pos, neg = pos[::2], neg[::3] + neg[::3]  # a subset, negatives duplicated
            indices_tuple = tuple(torch.tensor(v) for v in (*zip(*pos, strict=True), *zip(*neg, strict=True)))
            triplets = [(a, p, n) for a, p in pos for a2, n in neg if a2 == a]
        loss.beta.grad = None
        ours = loss(x, labels, indices_tuple)
        expected = margin_loop(y, labels, triplets, beta=b, nu=0.2, reduction=reduction, learn=True)
        torch.testing.assert_close(ours, expected, **TOL[torch.float64])
        ours.backward()
        expected.backward()
        grads_close(x.grad, y.grad, x)
        grads_close(loss.beta.grad, b.grad, b)


# ---------------------------------------------------------------------------------------------- deviations


def loop_grad_check(ours_fn, loop_fn, *tensors: torch.Tensor) -> None:
    """Value and gradients (w.r.t. every tensor) of our loss against a loop implementation."""
    ours_in = [t.clone().requires_grad_(True) for t in tensors]
    loop_in = [t.clone().requires_grad_(True) for t in tensors]
    value, expected = ours_fn(*ours_in), loop_fn(*loop_in)
    torch.testing.assert_close(value, torch.as_tensor(expected, dtype=value.dtype), **TOL[value.dtype])
    value.backward()
    if isinstance(expected, torch.Tensor) and expected.requires_grad:
        expected.backward()
    for a, b in zip(ours_in, loop_in, strict=True):
        grads_close(a.grad, b.grad, a)


def ref_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    emb, labels = make_batch(8, 5, 3, torch.float64, seed=13)
    ref, ref_labels = make_batch(11, 5, 4, torch.float64, seed=14)
    return emb, labels, ref, ref_labels


def test_lifted_matches_loop_with_and_without_ref() -> None:
    emb, labels, ref, ref_labels = ref_batch()
    loss = losses.build("lifted")
    loop_grad_check(lambda x: loss(x, labels), lambda x: lifted_loop(x, labels, loop_pairs(labels)), emb)
    # a reference item's own negative pairs are not in the query × reference matrix: anchor's only
    loop_grad_check(
        lambda x, r: loss(x, labels, ref_emb=r, ref_labels=ref_labels),
        lambda x, r: lifted_loop(x, labels, loop_pairs(labels, ref_labels), r, ref_labels),
        emb,
        ref,
    )


def test_npair_with_ref_matches_loop() -> None:
    emb, labels, ref, ref_labels = ref_batch()
    loss = losses.build("npair")
    loop_grad_check(lambda x: loss(x, labels), lambda x: npair_loop(x, labels), emb)
    loop_grad_check(
        lambda x, r: loss(x, labels, ref_emb=r, ref_labels=ref_labels),
        lambda x, r: npair_loop(x, labels, r, ref_labels),
        emb,
        ref,
    )


def test_angular_normalises_negatives_unlike_pml() -> None:
    emb, labels, ref, ref_labels = ref_batch()
    emb, ref = emb * torch.linspace(0.2, 3, 5, dtype=emb.dtype), ref * 2.5  # far from unit norm
    loss = losses.build("angular", alpha=35)
    loop_grad_check(
        lambda x: loss(x, labels), lambda x: angular_loop(x, labels, loop_pairs(labels)[0], alpha=35), emb
    )
    loop_grad_check(
        lambda x, r: loss(x, labels, ref_emb=r, ref_labels=ref_labels),
        lambda x, r: angular_loop(x, labels, loop_pairs(labels, ref_labels)[0], r, ref_labels, alpha=35),
        emb,
        ref,
    )
    # PML's value differs on these inputs (negatives unnormalised) but not on their normalised copies
    assert abs(loss(emb, labels).item() - pml.AngularLoss(alpha=35)(emb, labels).item()) > 1e-3


def test_tcm_with_ref_uses_reference_items() -> None:
    emb, labels, ref, ref_labels = ref_batch()
    kwargs = {"lambda_plus": 0.7, "lambda_minus": 1.5, "margin_plus": 0.6, "margin_minus": 0.1}
    loss = losses.build("threshold_consistent_margin", **kwargs)
    args = {"lp": 0.7, "lm": 1.5, "mp": 0.6, "mm": 0.1}
    loop_grad_check(
        lambda x, r: loss(x, labels, ref_emb=r, ref_labels=ref_labels),
        lambda x, r: tcm_loop(x, labels, loop_pairs(labels, ref_labels), r, ref_labels, **args),
        emb,
        ref,
    )


def test_tuplet_margin_identical_positives_have_finite_gradient() -> None:
    emb, labels = make_batch(12, 6, 4, torch.float64, seed=3)
    emb[1] = emb[0] * 2.0  # same direction: cosine exactly 1, where d cos(θ − m)/ds is infinite
    x = emb.clone().requires_grad_(True)
    value = losses.build("tuplet_margin")(x, labels)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(x.grad).all()


# ---------------------------------------------------------------------------------------------- DSM state


def test_dsm_histogram_runs_like_pml_over_calls() -> None:
    ours, theirs = losses.build("dynamic_soft_margin", momentum=0.2).double(), pml_dsm(momentum=0.2)
    g = torch.Generator().manual_seed(8)
    for _ in range(4):
        emb = torch.randn(20, 8, generator=g, dtype=torch.float64)
        labels = torch.randint(0, 4, (20,), generator=g)
        compare(ours, theirs, emb, labels)
        torch.testing.assert_close(ours.hist, theirs.hist_, rtol=1e-8, atol=1e-10)
    # unpatched PML: same values (its gradient also flows through the histogram)
    emb, labels = make_batch(20, 8, 4, torch.float64, seed=1)
    fresh = losses.build("dynamic_soft_margin")
    torch.testing.assert_close(
        fresh(emb.requires_grad_(True), labels),
        pml.DynamicSoftMarginLoss()(emb, labels),
        **TOL[torch.float64],
    )


def test_dsm_values_past_the_last_bin_count_in_it() -> None:
    # d(a,p) ≈ 2, d(a,n) ≈ 0: x ≈ 2 ≥ min_val + (num_bins − 1)·δ = 1.6, where PML indexes out of bounds
    emb = torch.tensor([[1.0, 0.0], [-1.0, 0.05], [1.0, 0.01], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 2, 2])
    with pytest.raises((IndexError, RuntimeError), match="out of bounds"):
        pml.DynamicSoftMarginLoss()(emb, labels)
    loss = losses.build("dynamic_soft_margin")
    hist = [0.0] * 10
    for _ in range(2):
        x = emb.clone().requires_grad_(True)
        expected, hist = dsm_loop(emb, labels, hist)
        value = loss(x, labels)
        torch.testing.assert_close(value, torch.as_tensor(expected, dtype=value.dtype), **TOL[torch.float64])
        torch.testing.assert_close(loss.hist, torch.tensor(hist, dtype=torch.float64), **TOL[torch.float64])


def test_dsm_histogram_advances_only_in_recorded_training_calls() -> None:
    emb, labels = make_batch(16, 6, 4, torch.float32, seed=2)
    loss = losses.build("dynamic_soft_margin")
    first = loss(emb, labels)  # no grad required: evaluated with the would-be histogram, not stored
    assert loss.hist.sum().item() == 0.0
    assert loss(emb, labels).item() == first.item()
    with torch.no_grad():
        loss(emb.clone().requires_grad_(True), labels)
    assert loss.hist.sum().item() == 0.0
    loss.eval()
    loss(emb.clone().requires_grad_(True), labels)
    assert loss.hist.sum().item() == 0.0
    loss.train()
    value = loss(emb.clone().requires_grad_(True), labels)
    assert value.item() == pytest.approx(first.item()) and loss.hist.sum().item() == pytest.approx(1.0)
    assert "hist" in loss.state_dict() and list(loss.parameters()) == []


# ---------------------------------------------------------------------------------------------- quadruplet


def test_quadruplet_defaults_are_roths() -> None:
    loss = losses.build("quadruplet")
    assert (loss.margin_alpha_1, loss.margin_alpha_2, loss.fourth_negatives) == (0.2, 0.2, "all")
    assert (loss.distance, loss.normalize_embeddings, loss.reduction) == ("euclidean", True, "mean")


QUAD_SOURCES = ["all", "triplets", "pairs", "ref"]


def quad_inputs(source: str, dtype: torch.dtype = torch.float64):
    emb, labels = make_batch(12, 5, 4, dtype, seed=21)
    ref = ref_labels = indices_tuple = None
    triplets = loop_triplets(labels)
    if source == "triplets":
        indices_tuple = pml_miners.TripletMarginMiner(margin=0.3, type_of_triplets="all")(emb, labels)
        triplets = list(zip(*(t.tolist() for t in indices_tuple), strict=True))
    elif source == "pairs":
        pos, neg = loop_pairs(labels)
        pos, neg = pos[::2], neg[::4]
        indices_tuple = tuple(torch.tensor(v) for v in (*zip(*pos, strict=True), *zip(*neg, strict=True)))
        triplets = [(a, p, n) for a, p in pos for a2, n in neg if a2 == a]
    elif source == "ref":
        ref, ref_labels = make_batch(14, 5, 5, dtype, seed=22)
        triplets = loop_triplets(labels, ref_labels)
    return emb, labels, indices_tuple, ref, ref_labels, triplets


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("source", QUAD_SOURCES)
@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_quadruplet_all_fourth_negatives_matches_loop(source, distance, dtype) -> None:
    emb, labels, indices_tuple, ref, ref_labels, triplets = quad_inputs(source, dtype)
    loss = losses.build("quadruplet", margin_alpha_1=0.3, margin_alpha_2=0.1, distance=distance)
    tensors = (emb,) if ref is None else (emb, ref)

    def ours(x, r=None):
        return loss(x, labels, indices_tuple, r, ref_labels)

    def loop(x, r=None):
        return quadruplet_loop(x, labels, triplets, r, ref_labels, 0.3, 0.1, distance)

    loop_grad_check(ours, loop, *tensors)


@pytest.mark.parametrize("source", QUAD_SOURCES)
def test_quadruplet_random_fourth_negative_matches_loop_on_the_same_draws(source) -> None:
    emb, labels, indices_tuple, ref, ref_labels, triplets = quad_inputs(source)
    loss = losses.build("quadruplet", fourth_negatives="random")
    torch.manual_seed(5)
    value = loss(emb, labels, indices_tuple, ref, ref_labels)
    # the same global RNG state gives the same draws; the loop checks each one is a valid fourth sample
    a, p, n = loss.triplets(Batch(emb, labels, ref, ref_labels, indices_tuple=indices_tuple))
    assert sorted(zip(a.tolist(), p.tolist(), n.tolist(), strict=True)) == sorted(triplets)
    torch.manual_seed(5)
    fourth, valid = loss.sample_fourth_negatives(a, n, labels, ref_labels)
    ours_order = list(zip(a.tolist(), p.tolist(), n.tolist(), strict=True))
    expected = quadruplet_loop(emb, labels, ours_order, ref, ref_labels, fourth=fourth)
    assert valid.all()
    torch.testing.assert_close(value, torch.as_tensor(expected, dtype=value.dtype), **TOL[torch.float64])


def test_quadruplet_fourth_negative_sampler_is_uniform_over_valid_items() -> None:
    labels = torch.tensor([0, 1, 2, 0, 3, 3, 1, 4, 2, 4, 5])
    ref_labels = torch.tensor([3, 0, 1, 1, 2, 5, 0, 4, 4, 4, 6, 1])
    a = torch.tensor([0, 1, 4, 10]).repeat_interleave(6000)
    n = torch.tensor([2, 1, 2, 3]).repeat_interleave(6000)  # reference negatives, labels 1, 0, 1, 1
    g = torch.Generator().manual_seed(0)
    fourth, valid = losses.REGISTRY.get("quadruplet").sample_fourth_negatives(a, n, labels, ref_labels, g)
    assert valid.all()
    for k, (anchor, neg) in enumerate([(0, 2), (1, 1), (4, 2), (10, 3)]):
        drawn = fourth[k * 6000 : (k + 1) * 6000]
        allowed = [
            j for j in range(12) if int(ref_labels[j]) not in (int(labels[anchor]), int(ref_labels[neg]))
        ]
        counts = torch.bincount(drawn, minlength=12)
        assert set(torch.nonzero(counts).flatten().tolist()) == set(allowed)
        expected = 6000 / len(allowed)
        assert (counts[allowed].double() - expected).abs().max() < 5 * expected**0.5  # ~5 sigma
    # two classes only: no valid fourth sample
    _, valid = losses.REGISTRY.get("quadruplet").sample_fourth_negatives(
        torch.tensor([0]), torch.tensor([1]), torch.tensor([0, 1]), None
    )
    assert not valid.any()


def test_quadruplet_with_two_classes_is_the_triplet_term() -> None:
    emb, _ = make_batch(8, 4, 2, torch.float64, seed=3)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1, 0])
    quad = losses.build("quadruplet", margin_alpha_1=0.3)(emb, labels)
    triplet = losses.build("triplet", margin=0.3, reduction="mean")(emb, labels)
    torch.testing.assert_close(quad, triplet, **TOL[torch.float64])


# ---------------------------------------------------------------------------------------------- all losses


@pytest.mark.parametrize("name", NAMES)
def test_bf16_autocast_is_finite_and_close_to_float32(name) -> None:
    emb, labels = make_batch(24, 16, 5, torch.float32, seed=5)
    reference = losses.build(name)(emb, labels)
    for inputs in (emb, emb.bfloat16()):
        x = inputs.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            value = losses.build(name)(x, labels)  # fresh: dynamic_soft_margin keeps a histogram
        value.backward()
        assert value.dtype == torch.float32
        assert torch.isfinite(value) and torch.isfinite(x.grad.float()).all()
        # bf16 inputs carry ~3 significant digits; float32 inputs must be unaffected by autocast
        tol = {"rtol": 5e-2, "atol": 5e-3} if inputs.dtype == torch.bfloat16 else {"rtol": 1e-6, "atol": 1e-7}
        torch.testing.assert_close(value, reference, **tol)


@pytest.mark.parametrize("name", NAMES)
def test_empty_mined_tuples_give_a_connected_zero(name) -> None:
    emb, labels = make_batch(12, 6, 4, torch.float32, seed=1)
    x = emb.clone().requires_grad_(True)
    empty = torch.empty(0, dtype=torch.long)
    value = losses.build(name)(x, labels, (empty, empty, empty))
    value.backward()
    assert value.item() == 0.0 and torch.isfinite(x.grad).all()


def test_last_stats() -> None:
    emb, labels = make_batch(12, 6, 4, torch.float64, seed=1)
    num_triplets = all_triplets(labels)[0].numel()
    loss = losses.build("margin")
    loss(emb, labels)
    assert loss.last_stats["num_triplets"] == num_triplets
    assert 0 < loss.last_stats["num_active_triplets"] <= num_triplets
    loss = losses.build("quadruplet")
    loss(emb, labels)
    assert loss.last_stats["num_triplets"] == num_triplets
    loss = losses.build("npair")
    loss(emb, labels)
    assert loss.last_stats["num_pairs"] == int((torch.bincount(labels) >= 2).sum())


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("angular", {"distance": "cosine"}, "distance"),
        ("angular", {"normalize_embeddings": False}, "normalize_embeddings"),
        ("angular", {"alpha": 90}, "alpha"),
        ("snr_contrastive", {"distance": "euclidean"}, "distance"),
        ("snr_triplet", {"distance": "euclidean"}, "distance"),
        ("tuplet_margin", {"distance": "dot"}, "distance"),
        ("threshold_consistent_margin", {"distance": "euclidean"}, "distance"),
        ("dynamic_soft_margin", {"distance": "cosine"}, "distance"),
        ("dynamic_soft_margin", {"normalize_embeddings": False}, "normalize_embeddings"),
        ("dynamic_soft_margin", {"num_bins": 1}, "num_bins"),
        ("dynamic_soft_margin", {"min_val": 1.0}, "min_val"),
        ("quadruplet", {"fourth_negatives": "hardest"}, "fourth_negatives"),
        ("margin", {"num_classes": 0}, "num_classes"),
        ("margin", {"triplets_per_anchor": 0}, "triplets_per_anchor"),
    ],
)
def test_bad_options_are_config_errors(name, kwargs, match) -> None:
    with pytest.raises(ConfigError, match=match):
        losses.build(name, **kwargs)
