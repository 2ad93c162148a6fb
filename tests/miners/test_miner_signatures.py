"""Constructor signatures: a miner declares its own hyperparameters, in the documented order, and takes
the options every miner shares (``distance``, ``normalize_embeddings``; ``seed`` for the stochastic ones)
keyword-only, with its own default distance."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from dmlkit import miners
from dmlkit.errors import UnknownNameError
from dmlkit.miners.base import BaseMiner
from dmlkit.miners.pml_style import StochasticMiner
from tests_support import documented_hyperparameters

DOCS = Path(__file__).resolve().parents[2] / "docs" / "miners.md"

#: name → (its own parameters, as ``inspect`` prints them without annotations; default distance).
RECORDED: dict[str, tuple[str, str]] = {
    "angular": ("angle=20.0", "euclidean"),
    "batch_easy_hard": (
        "pos_strategy='easy', neg_strategy='semihard', allowed_pos_range=None, allowed_neg_range=None",
        "euclidean",
    ),
    "batch_hard": ("allowed_pos_range=None, allowed_neg_range=None", "euclidean"),
    "distance": ("lower_cutoff=0.5, upper_cutoff=1.4", "euclidean"),
    "distance_weighted": ("cutoff=0.5, nonzero_loss_cutoff=1.4", "euclidean"),
    "hdc": ("filter_percentage=0.5", "euclidean"),
    "intra_random": ("", "euclidean"),
    "lifted": ("", "euclidean"),
    "multisimilarity": ("epsilon=0.1", "cosine"),
    "npair": ("", "euclidean"),
    "pair_margin": ("pos_margin=0.2, neg_margin=0.8", "euclidean"),
    "parametric": ("mode='uniform', n_support=100, support_lim=(0.0, 2.0), histogram=None", "euclidean"),
    "random": ("", "euclidean"),
    "random_distance": ("lower_cutoff=0.5, upper_cutoff=1.4", "euclidean"),
    "rho_distance": ("lower_cutoff=0.5, upper_cutoff=1.4, cp=0.2", "euclidean"),
    "semihard": ("margin=0.2, hard_fraction=0.0", "euclidean"),
    "softhard": ("", "euclidean"),
    "triplet_margin": ("margin=0.2, type_of_triplets='all'", "euclidean"),
    "uniform_histogram": ("num_bins=100, pos_per_bin=10, neg_per_bin=10", "euclidean"),
}
SHARED = ("seed", "distance", "normalize_embeddings")


def plain(signature: inspect.Signature) -> str:
    """The signature without annotations and parentheses, e.g. ``"margin=0.2, *, distance='cosine'"``."""
    empty = inspect.Parameter.empty
    bare = [p.replace(annotation=empty) for p in signature.parameters.values()]
    return str(signature.replace(parameters=bare, return_annotation=inspect.Signature.empty))[1:-1]


def expected(name: str) -> str:
    own, distance = RECORDED[name]
    stochastic = issubclass(miners.REGISTRY.get(name), StochasticMiner)
    shared = ["seed=None"] if stochastic else []
    shared += [f"distance={distance!r}", "normalize_embeddings=True"]
    return ", ".join([*([own] if own else []), "*", *shared])


def documented_table() -> dict[str, list[tuple[str, str]]]:
    """``name → [(keyword, default as written), ...]`` from the table of docs/miners.md, in order."""
    section = DOCS.read_text().split("## Available miners", 1)[1]
    rows = [line for line in section.split("\n\n")[2].splitlines() if line.startswith("| `")]
    return documented_hyperparameters(rows, SHARED)


def test_every_registered_miner_is_recorded() -> None:
    assert sorted(RECORDED) == miners.available()


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_signature_is_the_recorded_one(name: str) -> None:
    assert plain(inspect.signature(miners.REGISTRY.get(name))) == expected(name)


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_shared_options_are_keyword_only_with_the_family_annotation(name: str) -> None:
    family = {
        **inspect.signature(BaseMiner.shared_options).parameters,
        **inspect.signature(StochasticMiner.shared_options).parameters,
    }
    for p in inspect.signature(miners.REGISTRY.get(name)).parameters.values():
        if p.name in SHARED:
            assert p.kind is p.KEYWORD_ONLY
            assert p.annotation == family[p.name].annotation
        else:
            assert p.kind is p.POSITIONAL_OR_KEYWORD


def test_shared_options_are_not_positional() -> None:
    with pytest.raises(TypeError):
        miners.REGISTRY.get("pair_margin")(0.2, 0.8, "cosine")
    miner = miners.REGISTRY.get("semihard")(0.3, seed=3, distance="cosine")
    assert (miner.margin, miner.seed, miner.distance) == (0.3, 3, "cosine")


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_own_hyperparameters_come_in_the_documented_order_with_the_documented_defaults(name: str) -> None:
    documented = documented_table()[name]
    own = [
        p
        for p in inspect.signature(miners.REGISTRY.get(name)).parameters.values()
        if p.kind is p.POSITIONAL_OR_KEYWORD
    ]
    assert [p.name for p in own] == [key for key, _ in documented]
    for p, (_, written) in zip(own, documented, strict=True):
        assert ast.literal_eval(written) == p.default


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_misspelt_options_raise_with_the_closest_name(name: str) -> None:
    for option in inspect.signature(miners.REGISTRY.get(name)).parameters:
        misspelt = option + option[-1]
        with pytest.raises(
            UnknownNameError, match=rf"argument of miner '{name}' '{misspelt}'; did you mean '{option}'\?"
        ):
            miners.build(name, **{misspelt: None})
