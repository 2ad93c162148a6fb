"""Two augmented views of each image: the batches of self-supervised training (``dmlkit train --ssl``).

:class:`TwoViews` turns an :class:`~dmlkit.data.base.ImageDataset` into items ``(views, i, i)``: both views of
image ``i`` (its training transform drawn twice, with independent per-item seeds: :meth:`ImageDataset.image`)
and ``i`` itself as the label, so an image's only positive is its other view. :func:`collate_views` stacks a
batch of ``B`` such items as the ``2B`` images ``[A; B]`` (all first views, then all second views) with
labels and indices ``[i₁ … i_B, i₁ … i_B]``: an ordinary training batch, so the training step, the miners
and every pair loss run unchanged (``ntxent`` is SimCLR's loss), and the two-view losses
(:mod:`dmlkit.losses.self_supervised`) find the views by their labels.

The label is the image's index in the training part rather than its position in the batch (PML's
``SelfSupervisedLoss`` uses ``arange(B)``): the two agree on which pairs are positive, and the index stays
unique when several processes gather their batches into one (a position would repeat on every rank) and
across the batches of a cross-batch memory.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from dmlkit.data.base import ImageDataset

#: Views drawn of every image.
NUM_VIEWS = 2


class TwoViews(Dataset):
    """``dataset[i] == (views, i, i)``: ``views`` is ``2 × C × H × W``, two independent augmentations of
    image ``i`` of ``base`` (view 0 is the one supervised training would draw); the label is ``i``.

    ``base`` keeps its role: its ``transform``, ``augment_seed`` and ``epoch`` (``set_epoch`` on ``base``)
    decide the views, so they are a pure function of (seed, epoch, index, view), as reproducible on resume
    as supervised batches.
    """

    def __init__(self, base: ImageDataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        index = int(index)
        views = torch.stack([self.base.image(index, view) for view in range(NUM_VIEWS)])
        return views, index, index

    def __repr__(self) -> str:
        return f"TwoViews({self.base!r})"


def collate_views(
    items: Sequence[tuple[torch.Tensor, int, int]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(images, labels, indices)`` of a batch of :class:`TwoViews` items: ``2B`` images, the first views
    of the ``B`` items in order, then their second views; labels and indices ``[i₁ … i_B, i₁ … i_B]``."""
    views = torch.stack([item[0] for item in items])  # B × 2 × C × H × W
    indices = torch.tensor([item[2] for item in items], dtype=torch.int64)
    images = views.transpose(0, 1).reshape(-1, *views.shape[2:])
    twice = indices.repeat(NUM_VIEWS)
    return images, twice, twice.clone()


__all__ = ["NUM_VIEWS", "TwoViews", "collate_views"]
