"""``ref_exclude`` for miners: an excluded pair is never mined, and a deterministic miner mines as if
the excluded reference items were not there."""

from __future__ import annotations

import pytest
import torch

from dmlkit import miners
from dmlkit.errors import ConfigError

DIM = 8
DETERMINISTIC = [
    "batch_easy_hard",
    "batch_hard",
    "multisimilarity",
    "pair_margin",
    "triplet_margin",
    "angular",
    "hdc",
]


def data(seed: int, batch: int = 12, ref: int = 40, classes: int = 4):
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(batch, DIM, generator=gen)
    labels = torch.randint(0, classes, (batch,), generator=gen)
    ref_emb = torch.randn(ref, DIM, generator=gen)
    ref_labels = torch.randint(0, classes, (ref,), generator=gen)
    ref_labels[: 2 * classes] = torch.arange(classes).repeat(2)
    return emb, labels, ref_emb, ref_labels, gen


def as_sets(out: tuple[torch.Tensor, ...], column_of: torch.Tensor) -> list[set]:
    """The mined tuples as sets, reference indices mapped through ``column_of``."""
    if len(out) == 3:
        a, p, n = out
        return [set(zip(a.tolist(), column_of[p].tolist(), column_of[n].tolist(), strict=True))]
    a1, p, a2, n = out
    return [
        set(zip(a1.tolist(), column_of[p].tolist(), strict=True)),
        set(zip(a2.tolist(), column_of[n].tolist(), strict=True)),
    ]


@pytest.mark.parametrize("name", miners.available())
def test_no_excluded_pair_is_ever_mined(name: str) -> None:
    emb, labels, ref_emb, ref_labels, gen = data(0)
    exclude = torch.rand(len(emb), len(ref_emb), generator=gen) < 0.5
    out = miners.build(name)(emb, labels, ref_emb, ref_labels, ref_exclude=exclude)
    if len(out) == 3:
        a, p, n = out
        assert not exclude[a, p].any() and not exclude[a, n].any()
    else:
        a1, p, a2, n = out
        assert not exclude[a1, p].any() and not exclude[a2, n].any()


@pytest.mark.parametrize("name", DETERMINISTIC)
@pytest.mark.parametrize("seed", [1, 2])
def test_excluding_columns_equals_dropping_them(name: str, seed: int) -> None:
    emb, labels, ref_emb, ref_labels, gen = data(seed)
    dropped = torch.rand(len(ref_emb), generator=gen) < 0.3
    dropped[:8] = False
    miner = miners.build(name)
    exclude = dropped.expand(len(emb), -1).clone()
    got = miner(emb, labels, ref_emb, ref_labels, ref_exclude=exclude)
    kept = torch.nonzero(~dropped, as_tuple=True)[0]
    want = miner(emb, labels, ref_emb[kept], ref_labels[kept])
    assert as_sets(got, torch.arange(len(ref_emb))) == as_sets(want, kept)


def test_exclusion_needs_a_reference_set() -> None:
    emb, labels, _, _, _ = data(3)
    with pytest.raises(ConfigError, match="needs ref_emb"):
        miners.build("batch_hard")(emb, labels, ref_exclude=torch.zeros(12, 12, dtype=torch.bool))
