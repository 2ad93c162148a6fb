"""A miner that mines by its loss's margin (Roth's ``semihard``) takes the loss's triplet margin unless the
config gives it its own: ``triplet`` + ``semihard`` is one margin, as in Roth et al.'s code, where the miner
reads ``--loss_<loss>_margin``."""

from __future__ import annotations

import pytest

from dmlkit.config.loading import make_config
from dmlkit.train.objective import build_objective

DATA = {
    "dataset": {"name": "synthetic", "args": {"num_classes": 12, "samples_per_class": 8, "image_size": 16}},
    "batch_size": 16, "samples_per_class": 4, "val_fraction": 0.25, "num_workers": 0,
}  # fmt: skip


def _built(loss: dict, miner: dict):
    config = make_config(
        {"data": DATA, "model": {"backbone": "small_cnn", "embedding_size": 8},
         "objective": {"loss": loss, "miner": miner}},
        source="test",
    )  # fmt: skip
    return build_objective(config, num_classes=9, embedding_size=8)


@pytest.mark.parametrize(
    ("loss", "miner", "expected"),
    [
        ({"name": "triplet"}, {"name": "semihard"}, 0.05),  # the loss's default, not the miner's 0.2
        ({"name": "triplet", "args": {"margin": 0.1}}, {"name": "semihard"}, 0.1),
        ({"name": "margin", "args": {"margin": 0.3}}, {"name": "semihard"}, 0.3),
        ({"name": "triplet", "args": {"margin": 0.1}}, {"name": "semihard", "args": {"margin": 0.25}}, 0.25),
        ({"name": "contrastive"}, {"name": "semihard"}, 0.2),  # no triplet margin: the miner's own default
    ],
)
def test_semihard_takes_its_losss_triplet_margin_unless_given_one(loss, miner, expected) -> None:
    objective = _built(loss, miner)
    assert objective.miner.margin == pytest.approx(expected)


def test_miners_that_do_not_mine_by_the_loss_margin_keep_theirs() -> None:
    objective = _built({"name": "triplet", "args": {"margin": 0.1}}, {"name": "triplet_margin"})
    assert objective.miner.margin == pytest.approx(0.2)  # PML's TripletMarginMiner default: its own
