"""``ref_exclude``: pairs left out of a reference-set call, for every loss that takes a reference set.

Two independent constructions: excluding the same reference columns for every anchor must equal dropping
those columns, and (for the losses whose "no miner" means "all pairs") excluding arbitrary pairs must
equal passing every remaining pair explicitly.
"""

from __future__ import annotations

import pytest
import torch

from dmlkit import losses
from dmlkit.errors import ConfigError, DataError
from dmlkit.tuples import all_pairs

DIM = 8
REF_LOSSES = [n for n in losses.available() if losses.REGISTRY.get(n).accepts_ref]
# These read a miner's output as anchor weights (PML), so explicit pairs are not "all pairs" for them.
ANCHOR_WEIGHTED = {"fastap", "nca"}
# The quadruplet's fourth item enters through (negative, fourth) pairs of the reference set, which
# anchor-pair exclusions do not govern; dropping columns removes fourth items, excluding does not.
FOURTH_FROM_REFERENCE = {"quadruplet"}
PAIR_SEMANTICS = [
    n
    for n in REF_LOSSES
    if "pairs" in losses.REGISTRY.get(n).tuple_kinds and n not in ANCHOR_WEIGHTED | {"multiple"}
]


def build(name: str) -> torch.nn.Module:
    if name == "multiple":
        return losses.build("multiple", losses=[{"name": "contrastive"}, {"name": "multisimilarity"}])
    return losses.build(name)


def data(seed: int, batch: int = 10, ref: int = 36, classes: int = 4):
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(batch, DIM, dtype=torch.float64, generator=gen)
    labels = torch.randint(0, classes, (batch,), generator=gen)
    labels[:classes] = torch.arange(classes)
    ref_emb = torch.randn(ref, DIM, dtype=torch.float64, generator=gen)
    ref_labels = torch.randint(0, classes, (ref,), generator=gen)
    ref_labels[: 2 * classes] = torch.arange(classes).repeat(2)
    return emb, labels, ref_emb, ref_labels, gen


def value_and_grad(loss, emb, *args, **kwargs):
    x = emb.clone().requires_grad_()
    torch.manual_seed(0)  # losses that sample (quadruplet's fourth negatives) draw the same
    value = loss(x, *args, **kwargs)
    (grad,) = torch.autograd.grad(value, x, allow_unused=True)
    return value.detach(), torch.zeros_like(emb) if grad is None else grad


@pytest.mark.parametrize("name", sorted(set(REF_LOSSES) - FOURTH_FROM_REFERENCE))
@pytest.mark.parametrize("seed", [0, 1])
def test_excluding_columns_for_every_anchor_equals_dropping_them(name: str, seed: int) -> None:
    loss = build(name)
    emb, labels, ref_emb, ref_labels, gen = data(seed)
    dropped = torch.rand(len(ref_emb), generator=gen) < 0.3
    dropped[:8] = False  # every class keeps reference items
    exclude = dropped.expand(len(emb), -1).clone()
    got = value_and_grad(loss, emb, labels, None, ref_emb, ref_labels, ref_exclude=exclude)
    want = value_and_grad(loss, emb, labels, None, ref_emb[~dropped], ref_labels[~dropped])
    torch.testing.assert_close(got, want)


# angular takes every other-label item as a negative whatever a miner listed: its listed pairs can only
# leave out positives.
EXCLUSION_CASES = [(name, False) for name in PAIR_SEMANTICS] + [
    (name, True) for name in PAIR_SEMANTICS if name != "angular"
]


@pytest.mark.parametrize(("name", "negatives_too"), EXCLUSION_CASES)
def test_excluded_pairs_equal_listing_the_others(name: str, negatives_too: bool) -> None:
    loss = build(name)
    emb, labels, ref_emb, ref_labels, gen = data(2)
    same = labels[:, None] == ref_labels[None, :]
    exclude = same & (torch.rand(same.shape, generator=gen) < 0.3)
    if negatives_too:
        exclude |= torch.rand(same.shape, generator=gen) < 0.1
    got = value_and_grad(loss, emb, labels, None, ref_emb, ref_labels, ref_exclude=exclude)
    pairs = all_pairs(labels, ref_labels, exclude)
    want = value_and_grad(loss, emb, labels, pairs, ref_emb, ref_labels)
    torch.testing.assert_close(got, want)


def test_mined_tuples_using_an_excluded_pair_are_dropped() -> None:
    loss = losses.build("contrastive")
    emb, labels, ref_emb, ref_labels, gen = data(3)
    pairs = all_pairs(labels, ref_labels)
    exclude = torch.rand(len(emb), len(ref_emb), generator=gen) < 0.4
    got = value_and_grad(loss, emb, labels, pairs, ref_emb, ref_labels, ref_exclude=exclude)
    want = value_and_grad(loss, emb, labels, all_pairs(labels, ref_labels, exclude), ref_emb, ref_labels)
    torch.testing.assert_close(got, want)


def test_bad_exclusion_masks_are_named() -> None:
    loss = losses.build("contrastive")
    emb, labels, ref_emb, ref_labels, _ = data(4)
    with pytest.raises(DataError, match="ref_exclude has shape"):
        loss(emb, labels, None, ref_emb, ref_labels, ref_exclude=torch.zeros(3, 3, dtype=torch.bool))
    with pytest.raises(DataError, match="boolean"):
        loss(emb, labels, None, ref_emb, ref_labels, ref_exclude=torch.zeros(len(emb), len(ref_emb)))
    with pytest.raises(ConfigError, match="needs ref_emb"):
        loss(emb, labels, ref_exclude=torch.zeros(len(emb), len(emb), dtype=torch.bool))
