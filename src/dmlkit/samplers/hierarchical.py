"""Hierarchical batches: a few super-classes per batch, P×K class-balanced inside each.

After pytorch-metric-learning's ``HierarchicalSampler`` (itself after Cakir et al.'s
``Deep-Metric-Learning-Baselines``, used for Stanford Online Products, whose 22,634 classes fall into 12
super-classes): every batch is made of ``super_classes_per_batch`` super-classes, and each contributes
``batch_size // super_classes_per_batch`` images, ``samples_per_class`` from each of several of its
classes. Negatives inside a batch thus include many pairs from the same super-class, which are harder
than pairs drawn from the whole dataset.

Differences from PML (which shuffles every class list and image draw independently for each batch):

* the classes a super-class contributes come from shuffled rounds over that super-class's classes, and the
  images from the per-class cycles of ``m_per_class`` (:func:`~dmlkit.samplers.class_balanced.cycle_images`);
* every batch is full: a super-class needs at least ``batch_size // super_classes_per_batch //
  samples_per_class`` classes (PML silently returns a shorter batch);
* a class keeps its ``K`` images on consecutive positions, and the sub-batches of the super-classes are
  consecutive (PML shuffles the positions inside a batch; the order is irrelevant to the losses);
* ``samples_per_class="all"`` is not supported.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from dmlkit.errors import ConfigError, DataError
from dmlkit.samplers.base import REGISTRY, BatchSampler, as_label_array, check_int, epoch_rng
from dmlkit.samplers.class_balanced import class_rounds, cycle_images, group_by_class, warn_small_classes

logger = logging.getLogger(__name__)

#: Above this many super-class tuples per epoch, construction refuses (the epoch would be huge).
MAX_SUPER_TUPLES = 1_000_000


def super_class_of_classes(
    classes: np.ndarray, labels: np.ndarray, super_labels: Mapping[int, int] | Any
) -> np.ndarray:
    """Super label of every class in ``classes`` from per-item ``super_labels`` or a class → super mapping.

    Per-item super labels must agree within each class; a mapping must cover every class. Violations raise
    :class:`DataError` naming the class.
    """
    if isinstance(super_labels, Mapping):
        result = np.empty(len(classes), dtype=np.int64)
        missing = []
        for i, cls in enumerate(classes.tolist()):
            if cls not in super_labels:
                missing.append(cls)
                continue
            value = super_labels[cls]
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise DataError(f"super_labels[{cls}] must be an integer super-class, got {value!r}")
            result[i] = int(value)
        if missing:
            shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
            raise DataError(f"super_labels mapping has no super-class for {len(missing)} class(es): {shown}")
        return result
    try:
        per_item = as_label_array(super_labels)
    except DataError as exc:
        raise DataError(f"super_labels: {exc}") from None
    if len(per_item) != len(labels):
        raise DataError(
            f"super_labels must give one super-class per item: got {len(per_item)} for {len(labels)} labels"
        )
    class_of_item = np.searchsorted(classes, labels)
    pairs = np.unique(np.stack([class_of_item, per_item], axis=1), axis=0)
    if len(pairs) != len(classes):
        duplicated = pairs[np.flatnonzero(pairs[1:, 0] == pairs[:-1, 0])[0] + 1, 0]
        supers = pairs[pairs[:, 0] == duplicated, 1].tolist()
        raise DataError(
            f"class {classes[duplicated]} has items in several super-classes {supers}; "
            "every class must belong to exactly one super-class"
        )
    return pairs[:, 1]


@REGISTRY.register("hierarchical")
class HierarchicalSampler(BatchSampler):
    """Batches of ``super_classes_per_batch`` super-classes × ``Q`` classes each × ``K`` images per class.

    ``K = samples_per_class``, ``Q = batch_size // super_classes_per_batch // K``. Rows of a batch: the
    ``Q·K`` images of the first super-class, then those of the second, ...; inside, each class takes ``K``
    consecutive positions. All ``P = batch_size // K`` classes of a batch are distinct.

    Epoch (as in pytorch-metric-learning): every combination of ``super_classes_per_batch`` super-classes
    ("super tuple") gets ``batches_per_super_tuple`` batches, in random order, so an epoch has
    ``comb(S, super_classes_per_batch) * batches_per_super_tuple`` global batches. ``batches_per_epoch``
    overrides that number: the shuffled list of (tuple, repetition) entries is then truncated or repeated
    with fresh shuffles. Within a super-class, classes come from shuffled rounds over its classes (each
    class once per round), so every class of super-class ``s`` is visited when its batches × ``Q`` reach
    its number of classes.

    Args:
        labels: class label of every dataset item (1-D integers; list, numpy array or tensor).
        batch_size: images per batch on each rank; a multiple of ``super_classes_per_batch *
            samples_per_class``.
        super_labels: the super-class of every item (1-D integers, same length as ``labels``, constant
            within each class) or a mapping ``{class label: super-class}`` covering every class.
        samples_per_class: ``K``, images per class in a batch.
        super_classes_per_batch: super-classes in every batch (PML default 2).
        batches_per_super_tuple: batches per combination of super-classes and epoch (PML default 4).
        batches_per_epoch: global batches per epoch; ``None`` for PML's definition above.
        seed: base seed; an epoch's batches depend only on ``(seed, epoch)``.
        rank: index of this process in ``[0, world_size)``.
        world_size: number of processes sharing each epoch.
        drop_last: drop the last ``batches mod world_size`` global batches instead of padding the ranks'
            shares. Batches themselves are always full.
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray | torch.Tensor,
        batch_size: int,
        super_labels: Mapping[int, int] | Sequence[int] | np.ndarray | torch.Tensor,
        samples_per_class: int = 4,
        super_classes_per_batch: int = 2,
        batches_per_super_tuple: int = 4,
        batches_per_epoch: int | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> None:
        super().__init__(labels, batch_size, seed=seed, rank=rank, world_size=world_size, drop_last=drop_last)
        k = check_int("samples_per_class", samples_per_class, 1)
        spb = check_int("super_classes_per_batch", super_classes_per_batch, 1)
        self.batches_per_super_tuple = check_int("batches_per_super_tuple", batches_per_super_tuple, 1)
        if self.batch_size % (spb * k):
            raise ConfigError(
                f"batch_size={self.batch_size} must be divisible by super_classes_per_batch × "
                f"samples_per_class = {spb} × {k} (each super-class fills batch_size // "
                "super_classes_per_batch positions with classes of samples_per_class images)"
            )
        self.samples_per_class = k
        self.super_classes_per_batch = spb
        self.classes_per_super_class = q = self.batch_size // spb // k
        self.classes_per_batch = spb * q

        self.classes, self.class_counts, self._items_by_class, self._class_start = group_by_class(self.labels)
        self.super_classes, super_of_class = np.unique(
            super_class_of_classes(self.classes, self.labels, super_labels), return_inverse=True
        )
        self.super_of_class = super_of_class.astype(np.int64)
        num_super = len(self.super_classes)
        if num_super < spb:
            raise ConfigError(
                f"super_classes_per_batch={spb} but the super_labels have only {num_super} super-class(es)"
            )
        self._classes_by_super = np.argsort(self.super_of_class, kind="stable")
        self.super_class_sizes = np.bincount(self.super_of_class, minlength=num_super)
        self._super_start = np.cumsum(self.super_class_sizes) - self.super_class_sizes
        too_small = np.flatnonzero(self.super_class_sizes < q)
        if len(too_small):
            first = int(too_small[0])
            raise ConfigError(
                f"{len(too_small)} super-class(es) have fewer than {q} classes (e.g. super-class "
                f"{self.super_classes[first]} has {self.super_class_sizes[first]}), but every batch takes "
                f"batch_size // super_classes_per_batch // samples_per_class = {q} classes from each of its "
                "super-classes; lower batch_size or raise samples_per_class / super_classes_per_batch"
            )
        num_tuples = math.comb(num_super, spb)
        if num_tuples > MAX_SUPER_TUPLES:
            raise ConfigError(
                f"{num_super} super-classes give comb({num_super}, {spb}) = {num_tuples} super-class "
                f"combinations per epoch (more than {MAX_SUPER_TUPLES}); lower super_classes_per_batch"
            )
        self._tuples = np.array(list(itertools.combinations(range(num_super), spb)), dtype=np.int64)
        if batches_per_epoch is None:
            self._num_batches = num_tuples * self.batches_per_super_tuple
        else:
            self._num_batches = check_int("batches_per_epoch", batches_per_epoch, 1)
        self.batches_per_epoch = self._num_batches
        self._check_shareable()
        warn_small_classes(self.class_counts, k)

    @property
    def num_global_batches(self) -> int:
        return self._num_batches

    def super_schedule(self, epoch: int, rng: np.random.Generator | None = None) -> np.ndarray:
        """``(B, super_classes_per_batch)`` super-class numbers (indices into :attr:`super_classes`)."""
        rng = epoch_rng(self.seed, check_int("epoch", epoch, 0)) if rng is None else rng
        entries = len(self._tuples) * self.batches_per_super_tuple
        cycles = math.ceil(self._num_batches / entries)
        order = rng.permuted(np.tile(np.arange(entries, dtype=np.int64), (cycles, 1)), axis=1).ravel()
        return self._tuples[order[: self._num_batches] // self.batches_per_super_tuple]

    def _build_epoch(self, epoch: int) -> np.ndarray:
        rng = epoch_rng(self.seed, epoch)
        supers = self.super_schedule(epoch, rng).ravel()  # super-class of every (batch, sub-batch)
        q = self.classes_per_super_class
        schedule = np.empty((len(supers), q), dtype=np.int64)
        # Group the sub-batches by super-class (in batch order) and give each super-class its own rounds.
        by_super = np.argsort(supers, kind="stable")
        visits = np.bincount(supers, minlength=len(self.super_classes))
        bounds = np.concatenate([[0], np.cumsum(visits)])
        for s in np.flatnonzero(visits).tolist():
            size, start = int(self.super_class_sizes[s]), int(self._super_start[s])
            local = class_rounds(size, q, int(visits[s]), rng)
            schedule[by_super[bounds[s] : bounds[s + 1]]] = self._classes_by_super[start + local]
        return cycle_images(
            schedule.ravel(),
            self.samples_per_class,
            self.class_counts,
            self._items_by_class,
            self._class_start,
            rng,
        )

    def __repr__(self) -> str:
        return (
            f"{super().__repr__()[:-1]}, samples_per_class={self.samples_per_class}, "
            f"super_classes_per_batch={self.super_classes_per_batch}, "
            f"num_super_classes={len(self.super_classes)}, batches_per_epoch={self._num_batches})"
        )
