"""The two SNR losses, named apart: ``snr_contrastive`` (PML's ``SignalToNoiseRatioContrastiveLoss``) and
``snr_triplet`` (Roth et al.'s SNR triplet loss with its regulariser); the bare name ``snr`` is refused.

``snr_triplet`` is checked against :func:`roth_snr`, a transcription of ``Criterion.forward`` in
``criteria/snr.py`` of Roth et al.'s code (``Confusezius/Revisiting_Deep_Metric_Learning_PyTorch``), fed
triplets listed here with plain loops (no dmlkit tuple helper), values and gradients.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dmlkit import losses
from dmlkit.cli import main
from dmlkit.errors import ConfigError, UnknownNameError
from dmlkit.registry import Registry
from dmlkit.tuples import random_triplets
from tests_support import tiny_argv

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
pml_distances = pytest.importorskip("pytorch_metric_learning.distances")

TOL = {torch.float64: {"rtol": 1e-9, "atol": 1e-12}, torch.float32: {"rtol": 1e-5, "atol": 1e-6}}
Triplets = tuple[list[int], list[int], list[int]]


# ---------------------------------------------------------------------------------------------- references


def roth_snr(
    batch: torch.Tensor,
    triplets: Triplets,
    margin: float = 0.2,
    reg_lambda: float = 0.005,
    ref: torch.Tensor | None = None,
) -> torch.Tensor:
    """Roth et al.'s ``criteria/snr.py`` ``Criterion.forward`` as written there, the batchminer's
    triplets given. ``ref``: where positives and negatives are read (Roth: the batch itself)."""
    ref = batch if ref is None else ref
    anchors, positives, negatives = triplets
    pos_snr = torch.var(batch[anchors, :] - ref[positives, :], dim=1) / torch.var(batch[anchors, :], dim=1)
    neg_snr = torch.var(batch[anchors, :] - ref[negatives, :], dim=1) / torch.var(batch[anchors, :], dim=1)
    reg_loss = torch.mean(torch.abs(torch.sum(batch[anchors, :], dim=1)))
    snr_loss = torch.nn.functional.relu(pos_snr - neg_snr + margin)
    snr_loss = torch.sum(snr_loss) / torch.sum(snr_loss > 0)
    return snr_loss + reg_lambda * reg_loss


def loop_triplets(labels: torch.Tensor, ref_labels: torch.Tensor | None = None) -> Triplets:
    """Every ``(a, p, n)``: ``p`` of ``a``'s label (not ``a`` itself on the batch), ``n`` of another."""
    own = ref_labels is None
    ref = labels.tolist() if own else ref_labels.tolist()
    found = [
        (a, p, n)
        for a, la in enumerate(labels.tolist())
        for p, n in itertools.product(range(len(ref)), repeat=2)
        if ref[p] == la and not (own and p == a) and ref[n] != la
    ]
    return tuple(map(list, zip(*found, strict=True))) if found else ([], [], [])  # type: ignore[return-value]


def some_triplets(labels: torch.Tensor, count: int, seed: int) -> Triplets:
    """``count`` triplets drawn with replacement from every valid one (repeated anchors and triplets)."""
    every = list(zip(*loop_triplets(labels), strict=True))
    gen = torch.Generator().manual_seed(seed)
    picked = [every[i] for i in torch.randint(0, len(every), (count,), generator=gen).tolist()]
    return tuple(map(list, zip(*picked, strict=True)))  # type: ignore[return-value]


def as_tensors(triplets: Triplets) -> tuple[torch.Tensor, ...]:
    return tuple(torch.tensor(t, dtype=torch.long) for t in triplets)


def make_batch(
    seed: int, batch: int = 12, dim: int = 6, classes: int = 4, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(batch, dim, generator=gen, dtype=dtype)
    labels = torch.randint(0, classes, (batch,), generator=gen)
    labels[:4] = torch.tensor([0, 0, 1, 1])  # two classes with a positive pair at least
    return emb, labels


def value_and_grad(fn, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = emb.clone().requires_grad_()
    value = fn(x)
    (grad,) = torch.autograd.grad(value, x, allow_unused=True)
    return value.detach(), torch.zeros_like(emb) if grad is None else grad


def assert_matches(ours, theirs, emb: torch.Tensor) -> None:
    got, want = value_and_grad(ours, emb), value_and_grad(theirs, emb)
    assert torch.isfinite(want[0])  # a reference that gave NaN would compare nothing
    torch.testing.assert_close(got, want, **TOL[emb.dtype])


def seen(x: torch.Tensor, normalize: bool) -> torch.Tensor:
    """The rows Roth's loss receives: the model's L2-normalised output, or the raw one."""
    return F.normalize(x, p=2, dim=1) if normalize else x


# ------------------------------------------------------------------------------------------ snr_triplet


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_snr_triplet_without_a_miner_is_roth_on_every_triplet(seed, normalize, dtype) -> None:
    emb, labels = make_batch(seed, dtype=dtype)
    loss = losses.build("snr_triplet", normalize_embeddings=normalize)
    triplets = loop_triplets(labels)
    assert_matches(lambda x: loss(x, labels), lambda x: roth_snr(seen(x, normalize), triplets), emb)
    assert loss.last_stats["num_triplets"] == len(triplets[0])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("margin", "reg_lambda"), [(0.2, 0.005), (0.5, 0.3), (0.05, 0.0)])
def test_snr_triplet_on_mined_triplets_is_roth_on_them(seed, margin, reg_lambda) -> None:
    emb, labels = make_batch(seed, batch=16, dim=8, classes=5)
    triplets = some_triplets(labels, count=40, seed=seed)  # anchors repeat: the regulariser weighs them
    loss = losses.build("snr_triplet", margin=margin, reg_lambda=reg_lambda)
    assert_matches(
        lambda x: loss(x, labels, as_tensors(triplets)),
        lambda x: roth_snr(seen(x, True), triplets, margin, reg_lambda),
        emb,
    )


def test_mined_pairs_are_joined_on_their_anchor_into_triplets() -> None:
    emb, labels = make_batch(3)
    gen = torch.Generator().manual_seed(3)
    pos = [(a, p) for a, p in itertools.permutations(range(len(labels)), 2) if labels[a] == labels[p]]
    neg = [(a, n) for a, n in itertools.permutations(range(len(labels)), 2) if labels[a] != labels[n]]
    pos = [pos[i] for i in torch.randperm(len(pos), generator=gen)[:5].tolist()]
    neg = [neg[i] for i in torch.randperm(len(neg), generator=gen)[:30].tolist()]
    joined = [(a, p, n) for a, p in pos for a2, n in neg if a2 == a]
    assert joined
    triplets: Triplets = tuple(map(list, zip(*joined, strict=True)))  # type: ignore[assignment]
    pairs = tuple(torch.tensor(t) for t in (*zip(*pos, strict=True), *zip(*neg, strict=True)))
    loss = losses.build("snr_triplet")
    assert_matches(lambda x: loss(x, labels, pairs), lambda x: roth_snr(seen(x, True), triplets), emb)


def test_random_triplets_per_anchor_are_roth_on_the_drawn_ones() -> None:
    # The same seed draws the same triplets (each anchor with a positive and a negative twice).
    emb, labels = make_batch(4, batch=16, classes=3)
    loss = losses.build("snr_triplet", triplets_per_anchor=2, reg_lambda=0.5)
    torch.manual_seed(7)
    got = value_and_grad(lambda x: loss(x, labels), emb)
    torch.manual_seed(7)
    a, p, n = random_triplets(labels, None, 2)
    want = value_and_grad(
        lambda x: roth_snr(seen(x, True), (a.tolist(), p.tolist(), n.tolist()), 0.2, 0.5), emb
    )
    torch.testing.assert_close(got, want, **TOL[emb.dtype])


@pytest.mark.parametrize("seed", [0, 1])
def test_a_reference_set_gives_the_positives_and_negatives(seed) -> None:
    # Roth has no reference set; the same formula with positives and negatives read from it.
    emb, labels = make_batch(seed, batch=8)
    ref_emb, ref_labels = make_batch(seed + 10, batch=14)
    loss = losses.build("snr_triplet")
    triplets = loop_triplets(labels, ref_labels)
    assert_matches(
        lambda x: loss(x, labels, ref_emb=ref_emb, ref_labels=ref_labels),
        lambda x: roth_snr(seen(x, True), triplets, ref=seen(ref_emb, True)),
        emb,
    )


@pytest.mark.parametrize("margin", [0.0, 0.2])
def test_ties_copies_and_hinges_at_exactly_zero(margin) -> None:
    # Item 1 copies its anchor 0 (d = 0), item 2 (another class) copies item 1: with margin 0 the triplets
    # (0, 1, 2) and (1, 0, 2) sit exactly on the hinge's kink (inactive, zero gradient in both).
    emb, labels = make_batch(5, batch=10)
    emb[1] = emb[0]
    emb[2] = emb[1]
    labels[:3] = torch.tensor([0, 0, 1])
    loss = losses.build("snr_triplet", margin=margin, normalize_embeddings=False)
    triplets = loop_triplets(labels)
    assert_matches(lambda x: loss(x, labels), lambda x: roth_snr(x, triplets, margin), emb)
    a, p, n = some_triplets(labels, count=25, seed=5)
    mined: Triplets = ([0, 1, *a], [1, 0, *p], [2, 2, *n])
    assert_matches(lambda x: loss(x, labels, as_tensors(mined)), lambda x: roth_snr(x, mined, margin), emb)


def test_no_active_triplet_leaves_the_regulariser_where_roth_divides_zero_by_zero() -> None:
    emb, labels = make_batch(6)
    triplets = loop_triplets(labels)
    assert torch.isnan(roth_snr(seen(emb, True), triplets, margin=-100.0))  # Roth: 0 / 0
    loss = losses.build("snr_triplet", margin=-100.0)
    anchors = triplets[0]

    def regulariser_only(x: torch.Tensor) -> torch.Tensor:  # Roth's reg_loss line, weighted
        return 0.005 * torch.mean(torch.abs(torch.sum(seen(x, True)[anchors, :], dim=1)))

    assert_matches(lambda x: loss(x, labels), regulariser_only, emb)
    assert loss.last_stats["num_active_triplets"] == 0


@pytest.mark.parametrize("mined", [False, True])
@pytest.mark.filterwarnings(r"ignore:var\(\)")  # Roth's var of no rows
def test_no_triplet_at_all_is_a_connected_zero(mined) -> None:
    emb, labels = make_batch(7)
    labels = torch.arange(len(labels))  # every label once: no positive
    assert torch.isnan(roth_snr(emb, ([], [], [])))  # Roth: mean of nothing
    empty = tuple(torch.zeros(0, dtype=torch.long) for _ in range(3)) if mined else None
    value, grad = value_and_grad(lambda x: losses.build("snr_triplet")(x, labels, empty), emb)
    assert value.item() == 0.0 and torch.equal(grad, torch.zeros_like(emb))


def test_without_the_regulariser_it_is_the_triplet_loss_on_the_snr_distance() -> None:
    emb, labels = make_batch(8, batch=16)
    mined = as_tensors(some_triplets(labels, count=30, seed=8))
    ours = losses.build("snr_triplet", reg_lambda=0.0)
    triplet = losses.build("triplet", distance="snr", margin=0.2)
    for tuples in (None, mined):
        torch.testing.assert_close(
            value_and_grad(lambda x, t=tuples: ours(x, labels, t), emb),
            value_and_grad(lambda x, t=tuples: triplet(x, labels, t), emb),
        )


def test_the_reduction_applies_to_the_hinge() -> None:
    emb, labels = make_batch(9)
    a, p, n = loop_triplets(labels)

    def mean_hinge(x: torch.Tensor) -> torch.Tensor:  # Roth's terms, the hinge averaged over every triplet
        snr_loss = F.relu(
            torch.var(x[a] - x[p], dim=1) / torch.var(x[a], dim=1)
            - torch.var(x[a] - x[n], dim=1) / torch.var(x[a], dim=1)
            + 0.2
        )
        return snr_loss.mean() + 0.005 * torch.mean(torch.abs(torch.sum(x[a], dim=1)))

    loss = losses.build("snr_triplet", reduction="mean", normalize_embeddings=False)
    assert_matches(lambda x: loss(x, labels), mean_hinge, emb)
    per_triplet = losses.build("snr_triplet", reduction="do_nothing", reg_lambda=0.0)(emb, labels)
    assert per_triplet.shape == (len(a),)


def test_trainer_attributes_and_half_precision() -> None:
    loss = losses.build("snr_triplet")
    assert loss.tuple_kinds == frozenset({"pairs", "triplets"}) and loss.accepts_ref is True
    assert loss.needs == frozenset() and list(loss.parameters()) == []
    emb, labels = make_batch(12, batch=24, dim=16, dtype=torch.float32)
    reference = loss(emb, labels)
    x = emb.bfloat16().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(x, labels)
    value.backward()
    assert value.dtype == torch.float32 and torch.isfinite(x.grad.float()).all()
    torch.testing.assert_close(value, reference, rtol=5e-2, atol=5e-3)  # bf16 inputs: ~3 digits


def test_bad_options_are_named() -> None:
    with pytest.raises(ConfigError, match="snr_triplet: distance must be one of 'snr'"):
        losses.build("snr_triplet", distance="euclidean")
    with pytest.raises(ConfigError, match="snr_contrastive: distance must be one of 'snr'"):
        losses.build("snr_contrastive", distance="cosine")
    with pytest.raises(ConfigError, match="reg_lambda=0"):
        losses.build("snr_triplet", reduction="do_nothing")
    with pytest.raises(ConfigError, match="argument reg_lambda must be a number"):
        losses.build("snr_triplet", reg_lambda="high")
    with pytest.raises(UnknownNameError, match="did you mean 'reg_lambda'"):
        losses.build("snr_triplet", reg_lamda=0.1)


def test_the_regulariser_is_recorded_weighted() -> None:
    emb, labels = make_batch(10)
    loss = losses.build("snr_triplet", reg_lambda=0.25)
    loss(emb, labels)
    triplets = loop_triplets(labels)
    reg = torch.mean(torch.abs(torch.sum(seen(emb, True)[triplets[0]], dim=1)))
    assert loss.last_stats["reg_loss"] == pytest.approx(0.25 * float(reg), rel=1e-12)
    assert loss.registry_name == "snr_triplet" and "reg_lambda=0.25" in repr(loss)


# -------------------------------------------------------------------------------------- snr_contrastive


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    ("kwargs", "pml"),
    [
        ({}, lambda: pml_losses.SignalToNoiseRatioContrastiveLoss()),
        (
            {"pos_margin": 0.1, "neg_margin": 0.8, "normalize_embeddings": False},
            lambda: pml_losses.SignalToNoiseRatioContrastiveLoss(
                pos_margin=0.1, neg_margin=0.8, distance=pml_distances.SNRDistance(normalize_embeddings=False)
            ),
        ),
    ],
)
@pytest.mark.parametrize("mined", [False, True])
def test_snr_contrastive_is_pml(seed, kwargs, pml, mined) -> None:
    emb, labels = make_batch(seed, batch=16, dim=8)
    tuples = pml_miners.BatchEasyHardMiner()(emb, labels) if mined else None
    assert_matches(
        lambda x: losses.build("snr_contrastive", **kwargs)(x, labels, tuples),
        lambda x: pml()(x, labels, tuples),
        emb,
    )


# ------------------------------------------------------------------------------------------ the bare name


def test_the_bare_name_snr_names_both_losses() -> None:
    assert {"snr_contrastive", "snr_triplet"} <= set(losses.available())
    assert "snr" not in losses.available() and "snr" not in losses.REGISTRY
    expected = "loss 'snr' is ambiguous: PML's SNR contrastive loss is 'snr_contrastive', Roth et al.'s SNR"
    for attempt in (
        lambda: losses.build("snr"),
        lambda: losses.REGISTRY.check_kwargs("snr", {}, provided_by_caller=("num_classes",)),
        lambda: losses.capabilities("snr", {}),
        lambda: losses.build("multiple", losses=["contrastive", "snr"]),
    ):
        with pytest.raises(UnknownNameError, match=expected) as caught:
            attempt()
        assert "'snr_triplet'" in str(caught.value) and "did you mean" not in str(caught.value)
    # the distance keeps its name
    emb, labels = make_batch(11)
    assert torch.isfinite(losses.build("triplet", distance="snr")(emb, labels))


def test_the_cli_refuses_the_bare_name_before_training(tmp_path: Path, capsys) -> None:
    assert main(["train", *tiny_argv(tmp_path / "runs", name="snr", epochs=1), "--loss", "snr"]) == 2
    err = capsys.readouterr().err
    assert "'snr_contrastive'" in err and "'snr_triplet'" in err
    assert not (tmp_path / "runs" / "snr").exists()


def test_a_reserved_name_is_refused_with_its_reason() -> None:
    registry: Registry[int] = Registry("widget")
    registry.register("wide")(lambda: 1)
    registry.reserve("wid", "is ambiguous: say 'wide' or 'widow'")
    with pytest.raises(UnknownNameError, match=r"^widget 'wid' is ambiguous: say 'wide' or 'widow'$"):
        registry.get("wid")
    assert registry.available() == ["wide"] and "wid" not in registry
    with pytest.raises(ValueError, match="reserved"):
        registry.register("wid")(lambda: 2)
    with pytest.raises(ValueError, match="already registered or reserved"):
        registry.reserve("wide", "taken")
    with pytest.raises(UnknownNameError, match="did you mean 'wide'"):
        registry.get("wider")
