"""``self_supervised`` and ``vicreg`` against PML's ``SelfSupervisedLoss`` and ``VICRegLoss``: values and
gradients on random views (several seeds and sizes, n = 2 and d = 1 included), both call forms (PML's
``loss(A, ref_emb=B)`` and the trainer's stacked views paired by labels), and the errors."""

from __future__ import annotations

import re

import pytest
import torch

from dmlkit import losses
from dmlkit.config import make_config
from dmlkit.errors import ConfigError, DataError, UnknownNameError
from dmlkit.losses.base import check_trainable
from dmlkit.losses.self_supervised import two_views

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")

F64 = {"rtol": 1e-9, "atol": 1e-10}

#: dmlkit name → PML class, the losses PML's SelfSupervisedLoss supports (SNR aside: its dmlkit name is
#: another helper's), at the defaults both libraries share.
WRAPPED = {
    "angular": "AngularLoss",
    "circle": "CircleLoss",
    "contrastive": "ContrastiveLoss",
    "generalized_lifted": "GeneralizedLiftedStructureLoss",
    "intra_pair_variance": "IntraPairVarianceLoss",
    "lifted": "LiftedStructureLoss",
    "multisimilarity": "MultiSimilarityLoss",
    "nca": "NCALoss",
    "ntxent": "NTXentLoss",
    "supcon": "SupConLoss",
    "triplet": "TripletMarginLoss",
    "tuplet_margin": "TupletMarginLoss",
}
SIZES = [(2, 3), (5, 8), (16, 4)]
#: PML's AngularLoss leaves the negatives unnormalised, dmlkit's normalises them (a documented deviation,
#: tests/losses/test_loss_pair.py): PML gets unit vectors, normalised inside the graph as there.
UNIT_INPUTS = {"angular"}


def views(seed: int, n: int, d: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two correlated views (B is A plus noise, as augmentations of one image are), float64."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, dtype=torch.float64, generator=gen) * scale
    b = a + 0.5 * scale * torch.randn(n, d, dtype=torch.float64, generator=gen)
    return a, b


def value_and_grads(loss: torch.nn.Module, a: torch.Tensor, b: torch.Tensor, call, pre=None) -> tuple:
    """The loss and its gradients w.r.t. both views (``pre`` maps the views first, inside the graph)."""
    a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
    value = call(loss, a, b) if pre is None else call(loss, pre(a), pre(b))
    value.backward()
    return value.detach(), a.grad, b.grad


def ours_call(loss, a, b):
    return loss(a, ref_emb=b)


def pml_call(loss, a, b):
    return loss(a, b)


def assert_twins(ours, theirs) -> None:
    for x, y in zip(ours, theirs, strict=True):
        # PML's zero loss is a constant when nothing is active: its gradient is None rather than 0
        torch.testing.assert_close(x, torch.zeros_like(x) if y is None else y, **F64)


# ------------------------------------------------------------------------------------------ self_supervised


@pytest.mark.parametrize("name", sorted(WRAPPED))
@pytest.mark.parametrize("symmetric", [True, False])
def test_self_supervised_equals_pml_values_and_gradients(name: str, symmetric: bool) -> None:
    pre = (lambda x: torch.nn.functional.normalize(x, dim=1)) if name in UNIT_INPUTS else None
    for seed, (n, d) in enumerate(SIZES):
        a, b = views(seed, n, d)
        ours = losses.build("self_supervised", loss=name, symmetric=symmetric)
        theirs = pml_losses.SelfSupervisedLoss(getattr(pml_losses, WRAPPED[name])(), symmetric=symmetric)
        expected = value_and_grads(theirs, a, b, pml_call, pre)
        assert_twins(value_and_grads(ours, a, b, ours_call), expected)


@pytest.mark.parametrize("name", ["ntxent", "contrastive", "triplet", "multisimilarity"])
def test_stacked_views_paired_by_labels_equal_pml(name: str) -> None:
    """The trainer's call: both views in one tensor, rows in any order, each label twice (first row: view
    A). Equal to PML's wrapper on (A, B), gradients routed back to the right rows."""
    for seed, (n, d) in enumerate(SIZES):
        a, b = views(seed, n, d)
        ids = torch.randperm(1000, generator=torch.Generator().manual_seed(seed))[:n]  # dataset indices
        rows = torch.randperm(2 * n, generator=torch.Generator().manual_seed(seed + 1))
        # give view A of image i the earlier of its two rows, view B the later one
        pairs = rows.reshape(n, 2).sort(dim=1).values
        first, second = pairs[:, 0], pairs[:, 1]
        stacked = torch.empty(2 * n, d, dtype=torch.float64)
        stacked[first], stacked[second] = a, b
        labels = torch.empty(2 * n, dtype=torch.long)
        labels[first], labels[second] = ids, ids
        stacked.requires_grad_()
        ours = losses.build("self_supervised", loss=name)
        value = ours(stacked, labels)
        value.backward()
        theirs = value_and_grads(
            pml_losses.SelfSupervisedLoss(getattr(pml_losses, WRAPPED[name])()), a, b, pml_call
        )
        torch.testing.assert_close(value.detach(), theirs[0], **F64)
        torch.testing.assert_close(stacked.grad[first], theirs[1], **F64)
        torch.testing.assert_close(stacked.grad[second], theirs[2], **F64)


def test_wrapped_loss_arguments_and_modules() -> None:
    from pytorch_metric_learning.distances import CosineSimilarity

    a, b = views(3, 6, 5)
    margins = {"pos_margin": 0.9, "neg_margin": 0.3}
    for symmetric in (True, False):
        spec = {"name": "contrastive", "args": {**margins, "distance": "cosine"}}
        ours = losses.build("self_supervised", loss=spec, symmetric=symmetric)
        wrapped = pml_losses.ContrastiveLoss(distance=CosineSimilarity(), **margins)
        theirs = pml_losses.SelfSupervisedLoss(wrapped, symmetric=symmetric)
        assert_twins(value_and_grads(ours, a, b, ours_call), value_and_grads(theirs, a, b, pml_call))
    # a built dmlkit loss, and a foreign (PML) loss module, wrapped from Python
    built = losses.REGISTRY.get("self_supervised")(loss=losses.build("ntxent", temperature=0.2))
    foreign = losses.REGISTRY.get("self_supervised")(loss=pml_losses.NTXentLoss(temperature=0.2))
    reference = pml_losses.SelfSupervisedLoss(pml_losses.NTXentLoss(temperature=0.2))
    expected = value_and_grads(reference, a, b, pml_call)
    assert_twins(value_and_grads(built, a, b, ours_call), expected)
    assert_twins(value_and_grads(foreign, a, b, ours_call), expected)
    assert foreign.last_stats == {}
    built(a, ref_emb=b)
    assert built.last_stats == built.loss.last_stats and "num_pos_pairs" in built.last_stats


def test_contrastive_margins_against_the_formula() -> None:
    """``self_supervised(contrastive)`` with cosine margins, symmetric: the contrastive formula on the 2n
    views with labels (y, y), each pair set reduced by its mean over non-zero losses, written out here."""
    a, b = views(4, 5, 6)
    loss = losses.build(
        "self_supervised",
        loss={"name": "contrastive", "args": {"pos_margin": 0.9, "neg_margin": 0.3, "distance": "cosine"}},
    )
    x = torch.nn.functional.normalize(torch.cat([a, b]), dim=1)
    sim = x @ x.T
    y = torch.arange(5).repeat(2)
    same = y[:, None] == y[None, :]
    off = ~torch.eye(10, dtype=torch.bool)
    pos = torch.relu(0.9 - sim[same & off])
    neg = torch.relu(sim[~same] - 0.3)
    expected = pos[pos > 0].mean() + neg[neg > 0].mean()
    torch.testing.assert_close(loss(a, ref_emb=b), expected, **F64)


def test_the_wrapped_loss_must_compare_views_by_index() -> None:
    for name in ("arcface", "proxyanchor", "normsoftmax"):
        with pytest.raises(ConfigError, match=rf"self_supervised cannot wrap loss '{name}': it needs"):
            losses.build("self_supervised", loss=name)
    for name in ("vicreg", "self_supervised", "instance"):
        with pytest.raises(ConfigError, match=rf"cannot wrap loss '{name}': it takes no reference set"):
            losses.build("self_supervised", loss=name)
    with pytest.raises(ConfigError, match="put self_supervised members inside 'multiple'"):
        losses.build("self_supervised", loss={"name": "multiple", "args": {"losses": ["contrastive"]}})
    with pytest.raises(ConfigError, match="cannot wrap loss 'arcface': it needs"):
        losses.REGISTRY.get("self_supervised")(loss=losses.build("arcface", num_classes=3, embedding_size=4))
    with pytest.raises(UnknownNameError, match="did you mean 'ntxent'"):
        losses.build("self_supervised", loss="ntxnet")
    with pytest.raises(UnknownNameError, match="did you mean 'args'"):
        losses.build("self_supervised", loss={"name": "ntxent", "arg": {}})
    with pytest.raises(UnknownNameError, match="did you mean 'temperature'"):
        losses.build("self_supervised", loss={"name": "ntxent", "args": {"temperatur": 0.1}})
    with pytest.raises(ConfigError, match="needs a 'name'"):
        losses.build("self_supervised", loss={"args": {}})
    with pytest.raises(ConfigError, match="argument loss must be a string or a mapping or a Module"):
        losses.build("self_supervised", loss=3)
    # checked without building anything, as the configuration does before any data is loaded
    with pytest.raises(ConfigError, match="cannot wrap loss 'arcface'"):
        losses.capabilities("self_supervised", {"loss": "arcface"})
    assert losses.capabilities("self_supervised", {}) == (frozenset(), False)
    with pytest.raises(ConfigError, match="cannot wrap loss 'proxynca'"):
        make_config({"ssl": True, "loss": "self_supervised", "loss_args": {"loss": "proxynca"}})


def test_a_wrapped_loss_that_returns_per_element_losses_cannot_train() -> None:
    loss = losses.build("self_supervised", loss={"name": "contrastive", "args": {"reduction": "do_nothing"}})
    with pytest.raises(ConfigError, match="reduction 'do_nothing' returns per-element losses"):
        check_trainable(loss)


# ---------------------------------------------------------------------------------------------- VICReg


@pytest.mark.parametrize(("n", "d"), [(2, 1), (2, 5), (3, 1), (7, 2), (17, 16), (64, 8)])
def test_vicreg_equals_pml_values_and_gradients(n: int, d: int) -> None:
    options = [{}, {"invariance_lambda": 5.0, "variance_mu": 10.0, "covariance_v": 2.0, "eps": 1e-3}]
    for seed in range(3):
        for scale in (0.3, 2.0):  # below 1 the variance hinge is active, above it mostly not
            a, b = views(seed, n, d, scale)
            for kwargs in options:
                ours = value_and_grads(losses.build("vicreg", **kwargs), a, b, ours_call)
                theirs = value_and_grads(pml_losses.VICRegLoss(**kwargs), a, b, ours_call)
                assert_twins(ours, theirs)


def test_vicreg_edge_cases_equal_pml() -> None:
    a, _ = views(0, 6, 4)
    cases = {
        "identical views": (a, a.clone()),
        "a constant dimension": (torch.cat([a[:, :3], torch.ones(6, 1)], 1), a),
        "constant views": (torch.ones(6, 4, dtype=torch.float64), torch.zeros(6, 4, dtype=torch.float64)),
    }
    for what, (x, y) in cases.items():
        ours = value_and_grads(losses.build("vicreg"), x, y, ours_call)
        theirs = value_and_grads(pml_losses.VICRegLoss(), x, y, ours_call)
        assert all(torch.isfinite(t).all() for t in ours), what
        assert_twins(ours, theirs)
    loss = losses.build("vicreg")
    loss(a, ref_emb=a.clone())
    assert loss.last_stats["invariance_loss"] == 0.0


def test_vicreg_terms_against_the_paper_formula() -> None:
    """Each recorded term from Bardes et al. (2022), Eq. 1–4, written with loops over dimensions."""
    a, b = views(5, 9, 3, 0.5)
    loss = losses.build("vicreg")
    total = loss(a, ref_emb=b)
    n, d = a.shape
    inv = sum(float(((a[i] - b[i]) ** 2).sum()) for i in range(n)) / (n * d)
    var = []
    cov = 0.0
    for z in (a, b):
        var.append(sum(max(0.0, 1 - float((z[:, j].var() + 1e-4).sqrt())) for j in range(d)) / d / 2)
        c = torch.cov(z.T)
        cov += sum(float(c[j, k]) ** 2 for j in range(d) for k in range(d) if j != k) / d
    stats = loss.last_stats
    assert stats["invariance_loss"] == pytest.approx(25 * inv)
    assert stats["variance_loss1"] == pytest.approx(25 * var[0])
    assert stats["variance_loss2"] == pytest.approx(25 * var[1])
    assert stats["covariance_loss"] == pytest.approx(cov)
    assert float(total) == pytest.approx(25 * inv + 25 * sum(var) + cov)


def test_vicreg_on_stacked_views_and_in_half_precision() -> None:
    a, b = views(2, 8, 6)
    stacked = torch.cat([a, b])
    ids = torch.arange(100, 108)
    value = losses.build("vicreg")(stacked, torch.cat([ids, ids]))
    torch.testing.assert_close(value, pml_losses.VICRegLoss()(a, ref_emb=b), **F64)
    half = losses.build("vicreg")(a.bfloat16(), ref_emb=b.bfloat16())
    assert half.dtype == torch.float32 and torch.isfinite(half)
    expected = pml_losses.VICRegLoss()(a.bfloat16().float(), ref_emb=b.bfloat16().float())
    torch.testing.assert_close(half, expected)


def test_vicreg_options_and_sizes_are_checked() -> None:
    with pytest.raises(ConfigError, match="eps must be > 0"):
        losses.build("vicreg", eps=0.0)
    with pytest.raises(ConfigError, match="variance_mu must be ≥ 0"):
        losses.build("vicreg", variance_mu=-1.0)
    with pytest.raises(UnknownNameError, match="did you mean 'covariance_v'"):
        losses.build("vicreg", covariance=1.0)
    a, b = views(0, 1, 4)
    with pytest.raises(DataError, match="needs at least 2 pairs of views"):
        losses.build("vicreg")(a, ref_emb=b)


# ---------------------------------------------------------------------------------------------- the calls


@pytest.mark.parametrize("name", ["self_supervised", "vicreg"])
def test_two_view_losses_declare_and_refuse_what_they_do_not_take(name: str) -> None:
    loss = losses.build(name)
    assert isinstance(loss, losses.Loss)
    assert loss.tuple_kinds == frozenset() and loss.accepts_ref is False and loss.needs == frozenset()
    a, b = views(0, 4, 3)
    labels = torch.arange(4)
    with pytest.raises(ConfigError, match="takes no miner output"):
        loss(torch.cat([a, b]), labels.repeat(2), indices_tuple=(labels, labels, labels))
    with pytest.raises(ConfigError, match="takes no ref_labels"):
        loss(a, ref_emb=b, ref_labels=labels)
    with pytest.raises(ConfigError, match="not both"):
        loss(a, labels, ref_emb=b)
    with pytest.raises(ConfigError, match="pass the second view as ref_emb"):
        loss(a)
    with pytest.raises(DataError, match=re.escape("must have the embeddings' shape (4, 3), got (3, 3)")):
        loss(a, ref_emb=b[:3])
    with pytest.raises(DataError, match="label 0 occurs 3 time"):
        loss(torch.cat([a, b, a[:1]]), torch.cat([labels, labels, labels[:1]]))
    with pytest.raises(DataError, match="label 3 occurs 1 time"):
        loss(torch.cat([a, b[:3]]), torch.cat([labels, labels[:3]]))
    with pytest.raises(DataError, match="labels must be an integer"):
        loss(torch.cat([a, b]), labels.repeat(2).double())


def test_two_views_pairs_first_and_second_occurrences() -> None:
    emb = torch.arange(12, dtype=torch.float64).reshape(6, 2)
    labels = torch.tensor([7, 3, 3, 9, 7, 9])
    first, second = two_views(emb, labels, None, "test")
    torch.testing.assert_close(first, emb[[1, 0, 3]])  # labels 3, 7, 9: their first rows
    torch.testing.assert_close(second, emb[[2, 4, 5]])
