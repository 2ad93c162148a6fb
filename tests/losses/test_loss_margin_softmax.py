"""Margin-softmax classification losses (dmlkit.losses.margin_softmax) against pytorch-metric-learning
(PML): value and gradients w.r.t. the embeddings and the class weights, with identical initial weights."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from proxy_checks import (
    EDGE_CLASSES,
    EDGE_LABELS,
    SHAPES,
    compare_twins,
    make_batch,
    one_step_reduces_loss,
    twins,
)

from dmlkit import losses, miners
from dmlkit.errors import ConfigError, DataError

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_miners = pytest.importorskip("pytorch_metric_learning.miners")

# PML's LargeMarginSoftmaxLoss builds its binomial table with scipy on a tensor (NumPy 2 deprecation)
pytestmark = pytest.mark.filterwarnings("ignore:__array_wrap__:DeprecationWarning")

NAMES = ["arcface", "subcenter_arcface", "cosface", "sphereface", "large_margin_softmax", "p2sgrad"]

# (name, our kwargs, PML kwargs): defaults first, then other hyperparameters
CONFIGS: list[tuple[str, dict, dict]] = [
    ("arcface", {}, {}),
    ("arcface", {"margin": 10.0, "scale": 30.0}, {"margin": 10.0, "scale": 30.0}),
    ("subcenter_arcface", {}, {}),
    ("subcenter_arcface", {"sub_centers": 2, "margin": 20.0}, {"sub_centers": 2, "margin": 20.0}),
    ("cosface", {}, {}),
    ("cosface", {"margin": 0.2, "scale": 10.0}, {"margin": 0.2, "scale": 10.0}),
    ("sphereface", {}, {}),
    ("sphereface", {"margin": 3, "scale": 2.0}, {"margin": 3, "scale": 2.0}),
    ("large_margin_softmax", {}, {}),
    ("large_margin_softmax", {"margin": 2, "scale": 0.5}, {"margin": 2, "scale": 0.5}),
    ("large_margin_softmax", {"margin": 1}, {"margin": 1}),
    ("p2sgrad", {}, {}),
]
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'default'}" for n, kw, _ in CONFIGS]
DEFAULTS = [c for c in CONFIGS if not c[1]]
DEFAULT_IDS = [c[0] for c in DEFAULTS]
MINED = [c for c in CONFIGS if c[0] != "p2sgrad"]  # PML's P2SGradLoss rejects an indices_tuple


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize(("name", "ours_kw", "pml_kw"), CONFIGS, ids=IDS)
def test_no_miner_matches_pml(name, ours_kw, pml_kw, shape, dtype) -> None:
    batch, dim, classes = shape
    emb, labels = make_batch(batch, dim, classes, dtype, seed=sum(shape))
    ours, theirs = twins(name, classes, dim, dtype, ours_kw, pml_kw, seed=batch)
    compare_twins(name, ours, theirs, emb, labels)


MINERS = {
    "ms_pairs": lambda: pml_miners.MultiSimilarityMiner(epsilon=0.1),
    "batch_hard_triplets": lambda: pml_miners.BatchHardMiner(),
}
MINED_CASES = [(m, torch.float64) for m in MINERS] + [("batch_hard_triplets", torch.float32)]


@pytest.mark.parametrize(("miner", "dtype"), MINED_CASES, ids=[f"{m}-{str(d)[-7:]}" for m, d in MINED_CASES])
@pytest.mark.parametrize(("name", "ours_kw", "pml_kw"), MINED, ids=[IDS[CONFIGS.index(c)] for c in MINED])
def test_mined_tuples_weigh_samples_as_pml(name, ours_kw, pml_kw, miner, dtype) -> None:
    emb, labels = make_batch(24, 8, 5, dtype, seed=7)
    indices_tuple = MINERS[miner]()(emb, labels)
    assert all(len(t) > 1 for t in indices_tuple)
    ours, theirs = twins(name, 5, 8, dtype, ours_kw, pml_kw, seed=3)
    compare_twins(name, ours, theirs, emb, labels, indices_tuple)


@pytest.mark.parametrize("labels_name", sorted(EDGE_LABELS))
@pytest.mark.parametrize(("name", "ours_kw", "pml_kw"), DEFAULTS, ids=DEFAULT_IDS)
def test_degenerate_labels_match_pml(name, ours_kw, pml_kw, labels_name) -> None:
    labels = EDGE_LABELS[labels_name]
    emb = torch.randn(len(labels), 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours, theirs = twins(name, EDGE_CLASSES, 6, torch.float64, ours_kw, pml_kw)
    compare_twins(name, ours, theirs, emb, labels)


@pytest.mark.parametrize("name", ["arcface", "subcenter_arcface"])
def test_arcface_beyond_pi_minus_margin_matches_pml(name) -> None:
    """Target angles above ``π − m`` take PML's fallback ``cos θ − m sin m``: embeddings opposite to
    their class weights (plus noise) put every target there."""
    dim, classes = 6, 4
    ours, theirs = twins(name, classes, dim, torch.float64, {"margin": 40.0}, {"margin": 40.0})
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    k = getattr(ours, "sub_centers", 1)
    g = torch.Generator().manual_seed(0)
    # sub-centres of a class close together, so an embedding can be opposite to all of them
    weights = torch.randn(dim, classes, generator=g, dtype=torch.float64).repeat_interleave(k, dim=1)
    weights += 0.01 * torch.randn(dim, classes * k, generator=g, dtype=torch.float64)
    with torch.no_grad():
        ours.W.copy_(weights)
        theirs.W.copy_(weights)
    emb = -theirs.W.detach()[:, labels * k].t() + 0.05 * torch.randn(8, dim, generator=g, dtype=torch.float64)
    cos = F.normalize(emb, dim=1) @ F.normalize(theirs.W.detach(), dim=0)
    target = cos.view(8, classes, k).amax(2)[torch.arange(8), labels]
    assert (torch.acos(target) > math.pi - math.radians(40.0)).all()
    compare_twins(name, ours, theirs, emb, labels)


def test_arcface_gradient_is_finite_at_cosine_one() -> None:
    """An embedding exactly on its class weight: ``acos`` has an infinite slope there (PML's gradient is
    not finite); dmlkit clamps ``sin θ`` at the dtype's eps."""
    loss = losses.build("arcface", num_classes=3, embedding_size=4)
    emb = loss.W.detach()[:, [0, 1]].t().clone().requires_grad_(True)
    value = loss(emb, torch.tensor([0, 1]))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(emb.grad).all() and torch.isfinite(loss.W.grad).all()


@pytest.mark.parametrize("name", ["arcface", "cosface", "subcenter_arcface"])
def test_fused_cross_entropy_gradcheck(name) -> None:
    loss = losses.build(name, num_classes=4, embedding_size=5, scale=3.0).double()
    emb, labels = make_batch(6, 5, 4, torch.float64, seed=1)
    emb.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x, w: _with_weight(loss, w)(x, labels), (emb, loss.W.detach().clone().requires_grad_(True))
    )


def _with_weight(loss: torch.nn.Module, weight: torch.Tensor):
    def call(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        original = loss.W
        try:
            del loss.W
            loss.W = weight  # a plain tensor, so gradcheck can perturb it
            return loss(x, labels)
        finally:
            del loss.W
            loss.W = original

    return call


def test_avg_angle_statistic() -> None:
    loss = losses.build("cosface", num_classes=4, embedding_size=5)
    emb, labels = make_batch(10, 5, 4, torch.float32, seed=2)
    loss(emb, labels)
    cos = F.normalize(emb, dim=1) @ F.normalize(loss.W.detach(), dim=0)
    expected = math.degrees(float(torch.acos(cos[torch.arange(10), labels]).mean()))
    assert loss.last_stats["avg_angle"] == pytest.approx(expected, rel=1e-5)


def test_subcenter_get_outliers_matches_pml() -> None:
    dim, classes = 6, 4
    ours, theirs = twins(
        "subcenter_arcface", classes, dim, torch.float32, {"sub_centers": 3}, {"sub_centers": 3}
    )
    emb, labels = make_batch(40, dim, 3, torch.float32, seed=5)  # class 3 has no sample
    for threshold in (30.0, 60.0, 75.0):
        outliers, dominant = ours.get_outliers(emb, labels, threshold=threshold)
        expected, expected_dominant = theirs.get_outliers(emb, labels, threshold=threshold)
        assert outliers.tolist() == expected.tolist()
        present = sorted(set(labels.tolist()))  # PML leaves absent classes' columns uninitialised
        torch.testing.assert_close(dominant[:, present], expected_dominant[:, present])
    assert 0 < len(outliers) < len(emb)
    only = ours.get_outliers(emb, labels, return_dominant_centers=False)
    assert isinstance(only, torch.Tensor) and only.tolist() == outliers.tolist()
    torch.testing.assert_close(dominant[:, 3], ours.W.detach()[:, 9])  # absent class: its first sub-centre


def test_p2sgrad_keeps_unit_class_weights() -> None:
    loss = losses.build("p2sgrad", num_classes=4, embedding_size=5)
    torch.testing.assert_close(loss.weight.norm(dim=0), torch.ones(4))
    with torch.no_grad():
        loss.weight.mul_(3.0)
    emb, labels = make_batch(8, 5, 4, torch.float32, seed=0)
    loss(emb, labels)
    torch.testing.assert_close(loss.weight.norm(dim=0), torch.ones(4))


# ---------------------------------------------------------------------------------------------- contract


@pytest.mark.parametrize("name", NAMES)
def test_class_attributes_and_parameters(name) -> None:
    cls = losses.REGISTRY.get(name)
    assert cls.needs == {"num_classes", "embedding_size"}
    assert cls.accepts_ref is False
    assert cls.tuple_kinds == (frozenset() if name == "p2sgrad" else frozenset({"pairs", "triplets"}))
    loss = losses.build(name, num_classes=4, embedding_size=6)
    params = list(loss.parameters())
    assert len(params) == 1 and isinstance(params[0], torch.nn.Parameter) and params[0].requires_grad
    columns = 4 * (3 if name == "subcenter_arcface" else 1)
    assert params[0].shape == (6, columns)


@pytest.mark.parametrize("name", NAMES)
def test_one_optimizer_step_reduces_the_loss(name) -> None:
    emb, labels = make_batch(16, 6, 4, torch.float32, seed=4)
    torch.manual_seed(0)
    loss = losses.build(name, num_classes=4, embedding_size=6)
    one_step_reduces_loss(
        loss, emb, labels, lr=0.01 if name in ("sphereface", "large_margin_softmax") else 0.05
    )


@pytest.mark.parametrize("name", NAMES)
def test_ref_emb_is_rejected_but_the_batch_itself_is_fine(name) -> None:
    emb, labels = make_batch(8, 6, 4, torch.float32, seed=0)
    loss = losses.build(name, num_classes=4, embedding_size=6)
    with pytest.raises(ConfigError, match="does not accept ref_emb"):
        loss(emb, labels, ref_emb=emb.clone(), ref_labels=labels.clone())
    torch.testing.assert_close(loss(emb, labels, ref_emb=emb, ref_labels=labels), loss(emb, labels))


@pytest.mark.parametrize("name", NAMES)
def test_labels_outside_the_classes_are_named(name) -> None:
    emb, labels = make_batch(8, 6, 4, torch.float32, seed=0)
    loss = losses.build(name, num_classes=4, embedding_size=6)
    with pytest.raises(DataError, match=r"label 4 is not a class index 0\.\.3 \(num_classes=4\)"):
        loss(emb, torch.where(labels == 1, 4, labels))
    with pytest.raises(DataError, match=r"label -2 is not a class index"):
        loss(emb, torch.where(labels == 1, -2, labels))
    with pytest.raises(DataError, match="int64"):
        loss(emb, labels.float())


def test_p2sgrad_takes_no_miner_output() -> None:
    emb, labels = make_batch(8, 6, 4, torch.float32, seed=0)
    loss = losses.build("p2sgrad", num_classes=4, embedding_size=6)
    with pytest.raises(ConfigError, match="takes no miner output"):
        loss(emb, labels, miners.build("batch_hard")(emb, labels))
    miners.check_compatible(losses.build("arcface", num_classes=4, embedding_size=6), "batch_hard")


def test_bad_options() -> None:
    with pytest.raises(ConfigError, match="distance must be one of 'cosine'"):
        losses.build("arcface", num_classes=3, embedding_size=4, distance="euclidean")
    # a float margin is refused by the registry's type check, a non-positive one by the loss itself
    with pytest.raises(ConfigError, match="argument margin must be an integer"):
        losses.build("large_margin_softmax", num_classes=3, embedding_size=4, margin=2.5)
    with pytest.raises(ConfigError, match="margin must be a positive integer"):
        losses.build("large_margin_softmax", num_classes=3, embedding_size=4, margin=0)
    with pytest.raises(ConfigError, match="sub_centers"):
        losses.build("subcenter_arcface", num_classes=3, embedding_size=4, sub_centers=0)


@pytest.mark.parametrize("name", NAMES)
def test_bf16_autocast_is_finite_and_close_to_float32(name) -> None:
    emb, labels = make_batch(24, 16, 5, torch.float32, seed=5)
    torch.manual_seed(0)
    loss = losses.build(name, num_classes=5, embedding_size=16)
    reference = loss(emb, labels)
    for inputs in (emb, emb.bfloat16()):
        x = inputs.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            value = loss(x, labels)
        value.backward()
        assert value.dtype == torch.float32
        assert torch.isfinite(value) and torch.isfinite(x.grad.float()).all()
        # bf16 inputs carry ~3 significant digits, amplified by scale=64 in the logits
        tol = {"rtol": 5e-2, "atol": 5e-2} if inputs.dtype == torch.bfloat16 else {"rtol": 1e-6, "atol": 1e-6}
        torch.testing.assert_close(value, reference, **tol)
