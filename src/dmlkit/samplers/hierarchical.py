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

:func:`super_labels_of` derives the per-item super labels from a dataset's class names (``"super/class"``) or
from a ``{class name: super-class name}`` mapping, as the trainer does for ``sampler: hierarchical``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from dmlkit.errors import ConfigError, DataError
from dmlkit.samplers.base import REGISTRY, BatchSampler, as_label_array, check_int, epoch_rng
from dmlkit.samplers.class_balanced import ClassVisitSampler, class_rounds

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


class NamedClasses(Protocol):
    """What :func:`super_labels_of` reads from a dataset (e.g. :class:`dmlkit.data.ImageDataset`)."""

    class_names: Sequence[str]
    labels: np.ndarray


@runtime_checkable
class Categorised(Protocol):
    """A dataset whose items may carry a category (a super-label): :class:`dmlkit.data.ImageDataset`."""

    @property
    def item_categories(self) -> np.ndarray | None: ...


def super_labels_of(dataset: NamedClasses, spec: Mapping[str, Any] | None) -> np.ndarray:
    """Per-item super-class codes of ``dataset`` for :class:`HierarchicalSampler` (its ``super_labels``).

    ``spec`` maps class names to super-class names; without it, the items' categories when the dataset has
    them (SOP's super-classes, an OML ``category`` column), else class names of the form ``"super/class"``
    (Omniglot's ``alphabet/character``, nested folders) give the part before the first ``/``. Super-class
    names are coded ``0 .. S-1`` in sorted order. Raises ``ConfigError`` naming the classes the mapping
    misses, or when neither a mapping nor ``/``-names are available.
    """
    names = list(dataset.class_names)
    if spec is not None:
        missing = [n for n in names if n not in spec]
        if missing:
            raise ConfigError(f"sampler_args.super_labels has no super-class for class(es) {missing[:5]}")
        supers = [str(spec[n]) for n in names]
    elif isinstance(dataset, Categorised) and dataset.item_categories is not None:
        return np.asarray(dataset.item_categories, dtype=np.int64)
    elif all("/" in n for n in names):
        supers = [n.split("/", 1)[0] for n in names]
    else:
        raise ConfigError(
            "the hierarchical sampler needs super-classes: give sampler_args {super_labels: {class name: "
            "super-class}} or use class names of the form 'super/class'"
        )
    _, super_codes = np.unique(np.asarray(supers), return_inverse=True)
    return super_codes.astype(np.int64)[np.asarray(dataset.labels)]


@REGISTRY.register("hierarchical")
class HierarchicalSampler(ClassVisitSampler):
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

    Args (besides the shared options of :class:`~dmlkit.samplers.base.BatchSampler`; ``batch_size`` must be
    a multiple of ``super_classes_per_batch * samples_per_class``):
        super_labels: the super-class of every item (1-D integers, same length as ``labels``, constant
            within each class) or a mapping ``{class label: super-class}`` covering every class.
        samples_per_class: ``K``, images per class in a batch.
        super_classes_per_batch: super-classes in every batch (PML default 2).
        batches_per_super_tuple: batches per combination of super-classes and epoch (PML default 4).
        batches_per_epoch: global batches per epoch; ``None`` for PML's definition above.

    ``drop_last`` drops the last ``batches mod world_size`` global batches instead of padding the ranks'
    shares. Batches themselves are always full.
    """

    def configure(
        self,
        super_labels: Mapping[int, int] | Sequence[int] | np.ndarray | torch.Tensor,
        samples_per_class: int = 4,
        super_classes_per_batch: int = 2,
        batches_per_super_tuple: int = 4,
        batches_per_epoch: int | None = None,
    ) -> None:
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
        self._group_classes()
        num_tuples = self._group_super_classes(super_labels)
        self._set_batches_per_epoch(batches_per_epoch, num_tuples * self.batches_per_super_tuple)

    def _group_super_classes(
        self, super_labels: Mapping[int, int] | Sequence[int] | np.ndarray | torch.Tensor
    ) -> int:
        """Group the classes by super-class, check each can fill its share of a batch and list the super
        tuples; return their number."""
        spb, q = self.super_classes_per_batch, self.classes_per_super_class
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
        return num_tuples

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
        return self._cycle_images(schedule.ravel(), rng)

    def _describe(self) -> dict[str, Any]:
        return {  # the super-class layout instead of the P×K samplers' number of classes
            **BatchSampler._describe(self),
            "samples_per_class": self.samples_per_class,
            "super_classes_per_batch": self.super_classes_per_batch,
            "num_super_classes": len(self.super_classes),
            "batches_per_epoch": self._num_batches,
        }
