"""Constructor signatures: a loss declares its own hyperparameters, in the documented order, and takes the
options every loss shares (``distance``, ``normalize_embeddings``, ``reduction``; ``triplets_per_anchor``
for the triplet losses) keyword-only, with its own defaults."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from dmlkit import losses
from dmlkit.errors import UnknownNameError
from dmlkit.losses.base import BaseLoss, TripletLoss
from tests_support import documented_hyperparameters

DOCS = Path(__file__).resolve().parents[2] / "docs" / "losses.md"

#: name → (its own parameters, as ``inspect`` prints them without annotations; default distance; default
#: reduction). Distance None: the loss takes none of the shared options (``multiple``, ``self_supervised``,
#: ``vicreg``).
RECORDED: dict[str, tuple[str, str | None, str | None]] = {
    "angular": ("alpha=40.0", "euclidean", "mean"),
    "arcface": ("num_classes, embedding_size, margin=28.6, scale=64.0", "cosine", "mean"),
    "circle": ("m=0.4, gamma=80.0", "cosine", "avg_non_zero"),
    "contrastive": ("pos_margin=0.0, neg_margin=1.0", "euclidean", "avg_non_zero"),
    "cosface": ("num_classes, embedding_size, margin=0.35, scale=64.0", "cosine", "mean"),
    "dynamic_soft_margin": ("min_val=-2.0, num_bins=10, momentum=0.01", "euclidean", "mean"),
    "fastap": ("num_bins=10", "squared_euclidean", "mean"),
    "generalized_lifted": ("neg_margin=1.0, pos_margin=0.0", "euclidean", "mean"),
    "histogram": ("n_bins=None, delta=None", "cosine", "mean"),
    "instance": ("gamma=64.0", "cosine", "mean"),
    "intra_pair_variance": ("pos_eps=0.01, neg_eps=0.01", "cosine", "mean"),
    "large_margin_softmax": ("num_classes, embedding_size, margin=4, scale=1.0", "cosine", "mean"),
    "lifted": ("neg_margin=1.0, pos_margin=0.0", "euclidean", "mean"),
    "manifold": ("num_classes, embedding_size, lambdaC=1.0, alpha=0.8, margin=0.0005", "cosine", "mean"),
    "margin": (
        "margin=0.2, nu=0.0, beta=1.2, learn_beta=False, num_classes=None",
        "euclidean",
        "avg_non_zero",
    ),
    "multiple": ("losses=(), num_classes=None, embedding_size=None", None, None),
    "multisimilarity": ("alpha=2.0, beta=50.0, base=0.5", "cosine", "mean"),
    "nca": ("softmax_scale=1.0", "squared_euclidean", "mean"),
    "normsoftmax": ("num_classes, embedding_size, temperature=0.05", "dot", "mean"),
    "npair": ("", "dot", "mean"),
    "ntxent": ("temperature=0.07", "cosine", "mean"),
    "p2sgrad": ("num_classes, embedding_size", "cosine", "mean"),
    "pnp": ("b=2.0, alpha=1.0, anneal=0.01, variant='O'", "cosine", "mean"),
    "proxyanchor": ("num_classes, embedding_size, margin=0.1, alpha=32.0", "cosine", "mean"),
    "proxynca": ("num_classes, embedding_size, softmax_scale=1.0", "squared_euclidean", "mean"),
    "quadruplet": ("margin_alpha_1=0.2, margin_alpha_2=0.2, fourth_negatives='all'", "euclidean", "mean"),
    "ranked_list": ("margin=0.4, Tn=10.0, imbalance=0.5, alpha=None, Tp=0.0", "euclidean", "mean"),
    "self_supervised": ("loss='ntxent', symmetric=True", None, None),
    "snr_contrastive": ("pos_margin=0.0, neg_margin=1.0", "snr", "avg_non_zero"),
    "snr_triplet": ("margin=0.2, reg_lambda=0.005", "snr", "avg_non_zero"),
    "softtriple": (
        "num_classes, embedding_size, centers_per_class=10, la=20.0, gamma=0.1, margin=0.01",
        "cosine",
        "mean",
    ),
    "sphereface": ("num_classes, embedding_size, margin=4, scale=1.0", "cosine", "mean"),
    "subcenter_arcface": (
        "num_classes, embedding_size, margin=28.6, scale=64.0, sub_centers=3",
        "cosine",
        "mean",
    ),
    "supcon": ("temperature=0.1", "cosine", "avg_non_zero"),
    "threshold_consistent_margin": (
        "lambda_plus=1.0, lambda_minus=1.0, margin_plus=0.9, margin_minus=0.5",
        "cosine",
        "avg_non_zero",
    ),
    "triplet": ("margin=0.05, swap=False, smooth_loss=False", "euclidean", "avg_non_zero"),
    "tuplet_margin": ("margin=5.73, scale=64.0", "cosine", "mean"),
    "vicreg": ("invariance_lambda=25.0, variance_mu=25.0, covariance_v=1.0, eps=0.0001", None, None),
}
#: The losses whose family adds ``triplets_per_anchor="all"`` to the shared options.
TRIPLET_LOSSES = {"triplet", "margin", "snr_triplet"}
SHARED = (
    "triplets_per_anchor",
    "distance",
    "normalize_embeddings",
    "reduction",
    "embedding_regularizer",
    "embedding_reg_weight",
    "weight_regularizer",
    "weight_reg_weight",
)
REGULARIZER_OPTIONS = [
    "embedding_regularizer=None",
    "embedding_reg_weight=1.0",
    "weight_regularizer=None",
    "weight_reg_weight=1.0",
]


def plain(signature: inspect.Signature) -> str:
    """The signature without annotations and parentheses, e.g. ``"margin=0.2, *, distance='cosine'"``."""
    empty = inspect.Parameter.empty
    bare = [p.replace(annotation=empty) for p in signature.parameters.values()]
    return str(signature.replace(parameters=bare, return_annotation=inspect.Signature.empty))[1:-1]


def expected(name: str) -> str:
    own, distance, reduction = RECORDED[name]
    if distance is None:
        return own
    shared = ["triplets_per_anchor='all'"] if name in TRIPLET_LOSSES else []
    shared += [f"distance={distance!r}", "normalize_embeddings=True", f"reduction={reduction!r}"]
    shared += REGULARIZER_OPTIONS
    return ", ".join([*([own] if own else []), "*", *shared])


def documented_table() -> dict[str, list[tuple[str, str]]]:
    """``name → [(keyword, default as written), ...]`` from the table of docs/losses.md, in order."""
    table = DOCS.read_text().split("## Available losses", 1)[1].split("\n\n", 2)[1]
    return documented_hyperparameters(table.splitlines()[2:], SHARED)


def test_every_registered_loss_is_recorded() -> None:
    assert sorted(RECORDED) == losses.available()


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_signature_is_the_recorded_one(name: str) -> None:
    assert plain(inspect.signature(losses.REGISTRY.get(name))) == expected(name)


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_shared_options_are_keyword_only_with_the_family_annotation(name: str) -> None:
    family = {
        **inspect.signature(BaseLoss.shared_options).parameters,
        **inspect.signature(TripletLoss.shared_options).parameters,
    }
    for p in inspect.signature(losses.REGISTRY.get(name)).parameters.values():
        if p.name in SHARED:
            assert p.kind is p.KEYWORD_ONLY
            assert p.annotation == family[p.name].annotation
        else:
            assert p.kind is p.POSITIONAL_OR_KEYWORD


def test_class_losses_take_num_classes_and_embedding_size_first_and_positionally() -> None:
    for name in losses.available():
        cls = losses.REGISTRY.get(name)
        if name == "multiple" or not cls.needs:
            continue
        assert list(inspect.signature(cls).parameters)[:2] == ["num_classes", "embedding_size"]
        loss = cls(3, 4)
        assert (loss.num_classes, loss.embedding_size) == (3, 4)


def test_shared_options_are_not_positional() -> None:
    with pytest.raises(TypeError):
        losses.REGISTRY.get("contrastive")(0.0, 1.0, "cosine")
    loss = losses.REGISTRY.get("contrastive")(0.1, 0.9, distance="cosine", reduction="sum")
    assert (loss.pos_margin, loss.neg_margin, loss.distance, loss.reduction) == (0.1, 0.9, "cosine", "sum")


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_own_hyperparameters_come_in_the_documented_order_with_the_documented_defaults(name: str) -> None:
    documented = documented_table()[name]
    own = [
        p
        for p in inspect.signature(losses.REGISTRY.get(name)).parameters.values()
        if p.kind is p.POSITIONAL_OR_KEYWORD and p.default is not p.empty
    ]
    assert [p.name for p in own] == [key for key, _ in documented]
    for p, (_, written) in zip(own, documented, strict=True):
        try:
            value = ast.literal_eval(written)
        except (ValueError, SyntaxError):  # prose, e.g. the member list of ``multiple``
            continue
        assert value == p.default


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_misspelt_options_raise_with_the_closest_name(name: str) -> None:
    for option in inspect.signature(losses.REGISTRY.get(name)).parameters:
        misspelt = option + option[-1]
        with pytest.raises(
            UnknownNameError, match=rf"argument of loss '{name}' '{misspelt}'; did you mean '{option}'\?"
        ):
            losses.build(name, **{misspelt: None})
