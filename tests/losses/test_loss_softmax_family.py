"""circle, supcon, ntxent, nca, instance: value and gradient against PML, and an independent loop formula.

Reuses the PML harness of ``test_loss_reference.py`` (``compare`` checks value and gradients w.r.t. the
embeddings and the reference set).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
pml_reducers = pytest.importorskip("pytorch_metric_learning.reducers")

from test_loss_reference import MINERS, SHAPES, TOL, compare, make_batch, pml_distance  # noqa: E402

from dmlkit import losses  # noqa: E402
from dmlkit.errors import ConfigError  # noqa: E402

NAMES = ("circle", "supcon", "ntxent", "nca", "instance")

CONFIGS: list[tuple[str, dict, Callable[[], torch.nn.Module]]] = [
    ("circle", {}, lambda: pml_losses.CircleLoss()),
    ("circle", {"m": 0.25, "gamma": 256}, lambda: pml_losses.CircleLoss(m=0.25, gamma=256)),
    (
        "circle",
        {"m": 0.3, "gamma": 30, "reduction": "mean"},
        lambda: pml_losses.CircleLoss(m=0.3, gamma=30, reducer=pml_reducers.MeanReducer()),
    ),
    ("supcon", {}, lambda: pml_losses.SupConLoss()),
    (
        "supcon",
        {"temperature": 0.5, "distance": "euclidean"},
        lambda: pml_losses.SupConLoss(temperature=0.5, distance=pml_distance("euclidean")),
    ),
    (
        "supcon",
        {"temperature": 2.0, "distance": "dot", "normalize_embeddings": False, "reduction": "mean"},
        lambda: pml_losses.SupConLoss(
            temperature=2.0, distance=pml_distance("dot", False), reducer=pml_reducers.MeanReducer()
        ),
    ),
    ("ntxent", {}, lambda: pml_losses.NTXentLoss()),
    # τ large enough that no pair's probability nears float32's tiny (1e-38): PML adds `finfo.tiny` inside
    # its log, which skews its float32 gradient once a ratio is ~e^-85 (ours is an exact softplus).
    (
        "ntxent",
        {"temperature": 4.0, "distance": "squared_euclidean", "normalize_embeddings": False},
        lambda: pml_losses.NTXentLoss(temperature=4.0, distance=pml_distance("squared_euclidean", False)),
    ),
    (
        "ntxent",
        {"temperature": 0.2, "reduction": "avg_non_zero"},
        lambda: pml_losses.NTXentLoss(temperature=0.2, reducer=pml_reducers.AvgNonZeroReducer()),
    ),
    ("nca", {}, lambda: pml_losses.NCALoss()),
    (
        "nca",
        {"softmax_scale": 3.0, "distance": "cosine"},
        lambda: pml_losses.NCALoss(softmax_scale=3.0, distance=pml_distance("cosine")),
    ),
    (
        "nca",
        {"softmax_scale": 0.5, "distance": "euclidean", "normalize_embeddings": False},
        lambda: pml_losses.NCALoss(softmax_scale=0.5, distance=pml_distance("euclidean", False)),
    ),
]
CONFIG_IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'default'}" for name, kw, _ in CONFIGS]
DTYPES = [torch.float64, torch.float32]


# ------------------------------------------------------------------------------------------------- vs PML


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize(("name", "kwargs", "pml_factory"), CONFIGS, ids=CONFIG_IDS)
def test_no_miner_matches_pml(name, kwargs, pml_factory, shape, dtype) -> None:
    emb, labels = make_batch(*shape, dtype, seed=sum(shape) + 1)
    compare(name, kwargs, pml_factory, emb, labels)


MINED_CASES = [(m, torch.float64) for m in sorted(MINERS)] + [
    ("ms_pairs", torch.float32),
    ("semihard_triplets", torch.float32),
]


@pytest.mark.parametrize(("miner", "dtype"), MINED_CASES, ids=[f"{m}-{str(d)[-7:]}" for m, d in MINED_CASES])
@pytest.mark.parametrize(("name", "kwargs", "pml_factory"), CONFIGS, ids=CONFIG_IDS)
def test_mined_tuples_match_pml(name, kwargs, pml_factory, miner, dtype) -> None:
    """Mined tuples: matrix losses (circle, supcon) count a pair once, ntxent repeats repeated negatives in
    the denominator and repeated positives as terms, nca uses them as per-sample weights."""
    emb, labels = make_batch(24, 8, 5, dtype, seed=17)
    indices_tuple = MINERS[miner]()(emb, labels)
    assert all(len(t) > 1 for t in indices_tuple)  # avoid PML's "≤ 1 tuple ⇒ zero loss" shortcut
    compare(name, kwargs, pml_factory, emb, labels, indices_tuple)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("mined", [False, True], ids=["all", "mined"])
@pytest.mark.parametrize(("name", "kwargs", "pml_factory"), CONFIGS, ids=CONFIG_IDS)
def test_ref_emb_matches_pml(name, kwargs, pml_factory, mined, dtype) -> None:
    emb, labels = make_batch(12, 8, 4, dtype, seed=13)
    ref, ref_labels = make_batch(20, 8, 4, dtype, seed=14)
    indices_tuple = pml_miners.MultiSimilarityMiner()(emb, labels, ref, ref_labels) if mined else None
    compare(name, kwargs, pml_factory, emb, labels, indices_tuple, ref, ref_labels)


EDGE_LABELS = {
    "all_same": torch.zeros(10, dtype=torch.long),
    "all_distinct": torch.arange(10),
    "singletons": torch.tensor([0, 0, 0, 1, 2, 3, 3, 4, 5, 6]),
    "one_pair": torch.tensor([0, 0, 1, 2, 3, 4, 5, 6, 7, 8]),
}


@pytest.mark.parametrize("labels_name", sorted(EDGE_LABELS))
@pytest.mark.parametrize(("name", "kwargs", "pml_factory"), CONFIGS, ids=CONFIG_IDS)
def test_degenerate_labels_match_pml(name, kwargs, pml_factory, labels_name) -> None:
    labels = EDGE_LABELS[labels_name]
    emb = torch.randn(len(labels), 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    if name == "nca" and labels_name == "all_distinct":
        # PML takes the mean of an empty set of anchors: NaN. dmlkit: an empty reduction is 0.
        assert torch.isnan(pml_factory()(emb, labels))
        x = emb.clone().requires_grad_(True)
        value = losses.build(name, **kwargs)(x, labels)
        value.backward()
        assert value.item() == 0.0 and torch.count_nonzero(x.grad) == 0
        return
    ours = compare(name, kwargs, pml_factory, emb, labels)
    if labels_name in ("all_same", "all_distinct") and name != "nca":
        assert ours.item() == 0.0  # no positive or no negative pair


def test_ntxent_counts_a_repeated_negative_pair_repeatedly() -> None:
    """Loop formula: L_ap = −log(e^{z_ap} / (e^{z_ap} + Σ_{mined (a, n)} e^{z_an})), duplicates included."""
    emb, labels = make_batch(8, 4, 2, torch.float64, seed=3)
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    a1, p = torch.tensor([0, 0, 2]), torch.tensor([1, 1, 3])
    a2, n = torch.tensor([0, 0, 0, 2]), torch.tensor([4, 4, 5, 6])
    x = torch.nn.functional.normalize(emb, dim=1)
    terms = []
    for a, pp in zip(a1.tolist(), p.tolist(), strict=True):
        pos = math.exp(float(x[a] @ x[pp]) / 0.07)
        negs = sum(
            math.exp(float(x[a] @ x[nn]) / 0.07)
            for aa, nn in zip(a2.tolist(), n.tolist(), strict=True)
            if aa == a
        )
        terms.append(-math.log(pos / (pos + negs)))
    value = losses.build("ntxent")(emb, labels, (a1, p, a2, n))
    assert value.item() == pytest.approx(sum(terms) / len(terms), rel=1e-10)


# ---------------------------------------------------------------------------------------------- instance


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("gamma", [64.0, 8.0])
def test_instance_matches_pml_when_every_sample_is_its_own_class(shape, dtype, gamma) -> None:
    """With labels 0..B−1 (instance discrimination) PML's label-rank target is the sample itself."""
    emb, _ = make_batch(*shape, dtype, seed=sum(shape) + 2)
    labels = torch.arange(shape[0])
    compare("instance", {"gamma": gamma}, lambda: pml_losses.InstanceLoss(gamma=gamma), emb, labels)


def instance_loop(emb: torch.Tensor, labels: torch.Tensor, gamma: float = 64.0) -> torch.Tensor:
    """Each distinct label is a class, weighted by its first sample; softmax cross-entropy, batch mean."""
    x = torch.nn.functional.normalize(emb, dim=1)
    first: dict[int, int] = {}
    for j, y in enumerate(labels.tolist()):
        first.setdefault(y, j)
    total = emb.new_zeros(())
    for i, y in enumerate(labels.tolist()):
        logits = {c: gamma * (x[i] @ x[j]) for c, j in first.items()}
        total = total - logits[y] + torch.logsumexp(torch.stack(list(logits.values())), dim=0)
    return total / len(labels)


@pytest.mark.parametrize("seed", range(4))
def test_instance_matches_loop_formula_with_repeated_unsorted_labels(seed: int) -> None:
    """Deviation from PML (which targets column rank(y_i) of a B × B matrix, an unrelated sample)."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(14, 6, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 5, (14,), generator=g) * 7 + 3  # repeated, unsorted, not 0..C−1
    for gamma in (64.0, 4.0):
        x_ours, x_loop = emb.clone().requires_grad_(True), emb.clone().requires_grad_(True)
        ours = losses.build("instance", gamma=gamma)(x_ours, labels)
        expected = instance_loop(x_loop, labels, gamma)
        torch.testing.assert_close(ours, expected, **TOL[torch.float64])
        ours.backward()
        expected.backward()
        torch.testing.assert_close(x_ours.grad, x_loop.grad, rtol=1e-8, atol=1e-12)


def test_instance_single_label_is_zero_and_it_takes_no_miner_or_reference() -> None:
    emb, _ = make_batch(10, 6, 3, torch.float64, seed=0)
    x = emb.clone().requires_grad_(True)
    value = losses.build("instance")(x, torch.zeros(10, dtype=torch.long))
    value.backward()
    assert value.item() == 0.0 and torch.count_nonzero(x.grad) == 0
    loss = losses.build("instance")
    labels = torch.arange(10)
    with pytest.raises(ConfigError, match="does not accept ref_emb"):
        loss(emb, labels, ref_emb=emb.clone(), ref_labels=labels.clone())
    with pytest.raises(ConfigError, match="no miner output"):
        loss(emb, labels, (labels[:2], labels[1:3], labels[2:4]))


# ---------------------------------------------------------------------------------------------- contract


def test_class_attributes_and_no_parameters() -> None:
    both = frozenset({"pairs", "triplets"})
    expected = {"circle": both, "supcon": both, "ntxent": both, "nca": both, "instance": frozenset()}
    for name, kinds in expected.items():
        loss = losses.build(name)
        assert loss.tuple_kinds == kinds
        assert loss.accepts_ref is (name != "instance")
        assert loss.needs == frozenset()
        assert list(loss.parameters()) == []


def test_defaults_are_pmls() -> None:
    assert losses.build("circle").m == 0.4 and losses.build("circle").gamma == 80
    assert losses.build("supcon").temperature == 0.1
    assert losses.build("ntxent").temperature == 0.07
    assert losses.build("nca").softmax_scale == 1 and losses.build("nca").distance == "squared_euclidean"
    assert losses.build("instance").gamma == 64
    assert losses.build("circle").reduction == losses.build("supcon").reduction == "avg_non_zero"


def test_bad_options_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="circle: distance"):
        losses.build("circle", distance="euclidean")
    with pytest.raises(ConfigError, match="instance: distance"):
        losses.build("instance", distance="squared_euclidean")
    with pytest.raises(ConfigError, match="temperature"):
        losses.build("supcon", temperature=0)
    with pytest.raises(ConfigError, match="temperature"):
        losses.build("ntxent", temperature=-1.0)


def test_last_stats() -> None:
    emb, labels = make_batch(12, 6, 4, torch.float64, seed=9)
    same = labels[:, None] == labels[None, :]
    n_pos, n_neg = int(same.sum()) - 12, int((~same).sum())
    for name in ("circle", "supcon", "ntxent"):
        loss = losses.build(name)
        loss(emb, labels)
        assert loss.last_stats == {"num_pos_pairs": n_pos, "num_neg_pairs": n_neg}
    nca = losses.build("nca")
    nca(emb, labels)
    assert nca.last_stats == {"num_anchors": float((same.sum(1) > 1).sum())}


BF16_CASES = [(name, kwargs) for name, kwargs, _ in CONFIGS] + [
    ("instance", {}),
    ("instance", {"gamma": 8.0}),
]


@pytest.mark.parametrize(
    ("name", "kwargs"), BF16_CASES, ids=[*CONFIG_IDS, "instance-default", "instance-gamma=8"]
)
def test_bf16_autocast_is_finite_and_close_to_float32(name, kwargs) -> None:
    emb, labels = make_batch(24, 16, 5, torch.float32, seed=5)
    loss = losses.build(name, **kwargs)
    reference = loss(emb, labels)
    for inputs in (emb, emb.bfloat16()):
        x = inputs.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            value = loss(x, labels)
        value.backward()
        assert value.dtype == torch.float32
        assert torch.isfinite(value) and torch.isfinite(x.grad.float()).all()
        # bf16 inputs carry ~3 significant digits (a large γ or 1/τ amplifies them); float32 inputs must be
        # unaffected by autocast
        tol = {"rtol": 5e-2, "atol": 5e-3} if inputs.dtype == torch.bfloat16 else {"rtol": 1e-6, "atol": 1e-7}
        torch.testing.assert_close(value, reference, **tol)
