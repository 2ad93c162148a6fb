"""Slow end-to-end check that ``synthetic`` is learnable: dataset + transforms + small_cnn + MS loss.

Run with ``pytest -m slow tests/data/test_synthetic_learnable.py``. Trains on 2 CPU threads for a fixed number
of steps (about a minute) with pytorch-metric-learning's MultiSimilarityLoss as an independent loss.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dmlkit import data
from dmlkit.models import build_model

pytest.importorskip("pytorch_metric_learning")


def _recall_at_1(model: torch.nn.Module, dataset: data.ImageDataset) -> float:
    model.eval()
    loader = DataLoader(dataset, batch_size=500)
    with torch.no_grad():
        embeddings = torch.cat([model(x) for x, _, _ in loader])
    similarity = embeddings @ embeddings.T
    similarity.fill_diagonal_(-2.0)
    labels = torch.from_numpy(dataset.labels)
    return (labels[similarity.argmax(1)] == labels).float().mean().item()


class _ClassBalancedBatches(torch.utils.data.Sampler[list[int]]):
    def __init__(self, labels: np.ndarray, classes: int, per_class: int, steps: int, seed: int) -> None:
        self.by_class = [np.flatnonzero(labels == c) for c in range(labels.max() + 1)]
        self.classes, self.per_class, self.steps, self.seed = classes, per_class, steps, seed

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        rng = np.random.default_rng(self.seed)
        for _ in range(self.steps):
            chosen = rng.choice(len(self.by_class), self.classes, replace=False)
            yield np.concatenate(
                [rng.choice(self.by_class[c], self.per_class, replace=False) for c in chosen]
            ).tolist()


@pytest.mark.slow
def test_small_cnn_learns_synthetic_glyphs() -> None:
    from pytorch_metric_learning.losses import MultiSimilarityLoss

    torch.manual_seed(0)
    splits = data.build("synthetic")
    splits.train.augment_seed = 0
    model = build_model("small_cnn", 64, in_channels=splits.channels)
    before = _recall_at_1(model, splits.test)
    model.train()
    loss_fn = MultiSimilarityLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    steps_per_epoch = len(splits.train) // 128
    for epoch in range(30):
        # a new epoch gives every item a new augmentation (with augment_seed, it is a function of the epoch)
        splits.train.set_epoch(epoch)
        batches = _ClassBalancedBatches(splits.train.labels, 32, 4, steps_per_epoch, seed=epoch)
        for images, labels, _ in DataLoader(splits.train, batch_sampler=batches):
            loss = loss_fn(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    after = _recall_at_1(model, splits.test)
    print(f"synthetic test R@1: random init {before:.3f} -> trained {after:.3f}")
    assert before < 0.5
    assert after >= 0.7
