"""P×K class-balanced batches: ``P`` distinct classes with ``K`` images each.

This is the sampling of Schroff et al., "FaceNet" (CVPR 2015) and Hermans et al., "In Defense of the
Triplet Loss" (2017), close to ``class_random`` in Roth et al., "Revisiting Training Strategies and
Generalization Performance in Deep Metric Learning" (ICML 2020) and to ``MPerClassSampler`` in
pytorch-metric-learning. Two things differ from ``MPerClassSampler``, whose batches draw classes and
images independently at random:

* Classes are taken from shuffled *rounds*: each round is a permutation of all classes cut into groups
  of ``P``, so every class appears once per ``ceil(C / P)`` batches and an epoch of ``B`` batches visits
  every class whenever ``P * B >= C``.
* Images of a class are taken from a per-class shuffled cycle: consecutive visits of a class in an epoch
  walk through a permutation of its images (without replacement) before any image repeats.

The sampler is registered as ``m_per_class``. Roth et al.'s own ``class_random`` draws every class and every
image independently at random, with replacement: that is :class:`ClassRandomSampler` (``class_random``).
:class:`ClassVisitSampler` (items grouped by class, shared settings and checks),
:class:`PKBatchSampler` (its plain P×K construction) and the helpers :func:`group_by_class`,
:func:`class_rounds`, :func:`visit_numbers`, :func:`cycle_images` and :func:`warn_small_classes` are shared
with the intra-class, hierarchical and embedding-driven samplers.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any

import numpy as np

from dmlkit.errors import ConfigError
from dmlkit.samplers.base import REGISTRY, BatchSampler, caller_stacklevel, check_int, epoch_rng


def group_by_class(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(classes, counts, items_by_class, class_start)``: item indices grouped by class, in index order.

    The items of the ``c``-th class (``classes[c]``) are
    ``items_by_class[class_start[c] : class_start[c] + counts[c]]``.
    """
    classes, class_of_item, counts = np.unique(labels, return_inverse=True, return_counts=True)
    counts = counts.astype(np.int64)
    items_by_class = np.argsort(class_of_item, kind="stable").astype(np.int64)
    return classes, counts, items_by_class, np.cumsum(counts) - counts


def warn_small_classes(counts: np.ndarray, k: int) -> None:
    """One ``UserWarning`` with the number of classes that have fewer than ``k`` images, if any."""
    small = int(np.count_nonzero(counts < k))
    if small:
        warnings.warn(
            f"{small} of {len(counts)} classes have fewer than samples_per_class={k} images; "
            "their images are repeated within a batch (sampled with replacement)",
            UserWarning,
            stacklevel=caller_stacklevel(),
        )


def class_rounds(num_classes: int, p: int, num_batches: int, rng: np.random.Generator) -> np.ndarray:
    """``(num_batches, p)`` class numbers: consecutive shuffled rounds over all classes, ``p`` distinct a row.

    A round is a permutation of the ``num_classes`` classes cut into ``ceil(num_classes / p)`` groups;
    when ``p`` does not divide ``num_classes`` the last group is completed with the round's first
    ``p - num_classes mod p`` classes, a uniformly random subset of the classes not in that group.
    """
    per_round = math.ceil(num_classes / p)
    rounds = math.ceil(num_batches / per_round)
    order = rng.permuted(np.tile(np.arange(num_classes, dtype=np.int64), (rounds, 1)), axis=1)
    tail = num_classes % p
    if tail:
        order = np.concatenate([order, order[:, : p - tail]], axis=1)
    return order.reshape(rounds * per_round, p)[:num_batches]


def visit_numbers(schedule: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """``(visit_no, visits)``: every slot's rank among the visits of its class, and visits per class.

    ``schedule`` is a 1-D array of class numbers in batch order; ``visit_no[i]`` counts the earlier slots of
    class ``schedule[i]`` (0 for its first visit), computed with one stable sort instead of a loop.
    """
    by_class = np.argsort(schedule, kind="stable")
    visits = np.bincount(schedule, minlength=num_classes)
    first_visit = np.cumsum(visits) - visits
    visit_no = np.empty_like(schedule)
    visit_no[by_class] = np.arange(len(schedule)) - first_visit[schedule[by_class]]
    return visit_no, visits


def cycle_images(
    schedule: np.ndarray,
    k: int,
    counts: np.ndarray,
    items_by_class: np.ndarray,
    class_start: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """Flat item indices: ``k`` images for every class visit in ``schedule`` (1-D class numbers, in order).

    Consecutive visits of class ``c`` take consecutive chunks of ``k`` from a shuffled *pass* over its
    ``n_c`` images, read cyclically as ``ceil(n_c / k)`` chunks (the last chunk wraps to the pass's first
    images, which are distinct from the chunk's others when ``n_c >= k``); after a pass a new shuffle
    starts. A class with ``n_c < k`` repeats its images as evenly as possible inside a visit.
    """
    num_classes = len(counts)
    visit_no, visits = visit_numbers(schedule, num_classes)

    # One "block" = one pass of one class; visits consume chunks in order, starting a new shuffle after
    # each pass.
    chunks_per_pass = -(-counts // k)
    passes = -(-visits // chunks_per_pass)
    block_class = np.repeat(np.arange(num_classes), passes)
    block_size = counts[block_class]
    block_start = np.cumsum(block_size) - block_size
    first_block = np.cumsum(passes) - passes
    total = int(block_size.sum())
    block_of_elem = np.repeat(np.arange(len(block_class), dtype=np.int64), block_size)
    pos_in_block = np.arange(total, dtype=np.int64) - block_start[block_of_elem]
    items = items_by_class[class_start[block_class][block_of_elem] + pos_in_block]
    # Shuffle within blocks: sort by (block, random key); the block number in the high bits keeps
    # blocks contiguous, the random low bits shuffle inside them.
    keys = (block_of_elem << 32) | rng.integers(0, 2**32, size=total, dtype=np.int64)
    shuffled = items[np.argsort(keys)]

    chunk_in_pass = visit_no % chunks_per_pass[schedule]
    block = first_block[schedule] + visit_no // chunks_per_pass[schedule]
    offsets = (chunk_in_pass[:, None] * k + np.arange(k)) % counts[schedule][:, None]
    return shuffled[block_start[block][:, None] + offsets].ravel()


class ClassVisitSampler(BatchSampler):
    """Base of the samplers whose batches are class visits of ``K = samples_per_class`` images each.

    It holds the items grouped by class (``classes``, ``class_counts``; see :func:`group_by_class`) and the
    epoch length, and performs the checks these samplers share. A subclass's ``configure`` calls, in this
    order: :meth:`_set_layout` (or checks ``K`` and its own batch layout itself), :meth:`_group_classes`,
    its own checks, then :meth:`_set_batches_per_epoch` (:class:`PKBatchSampler` does it for plain P×K).
    """

    samples_per_class: int
    classes_per_batch: int
    batches_per_epoch: int

    def _set_layout(self, samples_per_class: Any) -> int:
        """Check ``K`` and that it divides ``batch_size``; set ``samples_per_class``, ``classes_per_batch``.

        Returns ``P = batch_size // K``, the number of distinct classes of a batch.
        """
        k = check_int("samples_per_class", samples_per_class, 1)
        if self.batch_size % k:
            raise ConfigError(
                f"batch_size={self.batch_size} must be divisible by samples_per_class={k} "
                "(a batch holds batch_size // samples_per_class classes × samples_per_class images)"
            )
        self.samples_per_class = k
        self.classes_per_batch = self.batch_size // k
        return self.classes_per_batch

    def _group_classes(self, needed: int | None = None) -> int:
        """Group the item indices by class once (epochs only shuffle within the groups); return ``C``.

        With ``needed``, raise unless the labels have at least that many classes (a batch's ``P`` distinct
        classes).
        """
        self.classes, self.class_counts, self._items_by_class, self._class_start = group_by_class(self.labels)
        num_classes = len(self.classes)
        if needed is not None and num_classes < needed:
            raise ConfigError(
                f"batch_size={self.batch_size} with samples_per_class={self.samples_per_class} needs "
                f"{needed} distinct classes per batch, but the labels have only {num_classes} class(es); "
                "lower batch_size or raise samples_per_class"
            )
        return num_classes

    def _one_pass(self) -> int:
        """The default epoch length: ``max(1, len(labels) // batch_size)``, about one pass over the data."""
        return max(1, len(self.labels) // self.batch_size)

    def _set_batches_per_epoch(self, batches_per_epoch: int | None, default: int) -> None:
        """Fix the epoch at ``batches_per_epoch`` global batches (``default`` when ``None``), then run the
        construction checks that need it (:meth:`_check_shareable`) and warn about small classes."""
        if batches_per_epoch is None:
            self._num_batches = default
        else:
            self._num_batches = check_int("batches_per_epoch", batches_per_epoch, 1)
        self.batches_per_epoch = self._num_batches
        self._check_shareable()
        warn_small_classes(self.class_counts, self.samples_per_class)

    def _note_unvisited_classes(self) -> None:
        """Log (info, naming the sampler) when ``P × batches_per_epoch < C``: an epoch misses classes."""
        num_classes, p = len(self.classes), self.classes_per_batch
        if p * self._num_batches < num_classes:
            logging.getLogger(type(self).__module__).info(
                "%s: %d batches × %d classes per epoch cannot visit all %d classes; set "
                "batches_per_epoch >= %d to visit every class each epoch",
                self.who,
                self._num_batches,
                p,
                num_classes,
                math.ceil(num_classes / p),
            )

    @property
    def num_global_batches(self) -> int:
        return self._num_batches

    def _cycle_images(self, schedule: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """:func:`cycle_images` of the class visits ``schedule`` with this sampler's items and ``K``."""
        return cycle_images(
            schedule, self.samples_per_class, self.class_counts, self._items_by_class, self._class_start, rng
        )

    def _describe(self) -> dict[str, Any]:
        return {
            **super()._describe(),
            "samples_per_class": self.samples_per_class,
            "num_classes": len(self.classes),
            "batches_per_epoch": self._num_batches,
        }


class PKBatchSampler(ClassVisitSampler):
    """Base of the plain P×K samplers: ``P = batch_size // K`` distinct classes of ``K`` images a batch.

    Construction: the layout and class checks of :class:`ClassVisitSampler`, an epoch of about one pass
    (``max(1, len(labels) // batch_size)`` batches unless ``batches_per_epoch`` is given), a log line when
    an epoch cannot visit every class, then :meth:`_prepare` for what a subclass precomputes.

    Args (besides the shared options of :class:`~dmlkit.samplers.base.BatchSampler`):
        samples_per_class: ``K``, images per class in a batch; ``batch_size`` must be a multiple of it.
        batches_per_epoch: global batches per epoch (all ranks together); ``None`` for
            ``max(1, len(labels) // batch_size)``.

    ``drop_last`` only concerns the last ``batches_per_epoch mod world_size`` batches (dropped instead of
    padding the ranks' shares with the first batches of the epoch); batches themselves are always full.
    """

    def configure(self, samples_per_class: int = 4, batches_per_epoch: int | None = None) -> None:
        self._group_classes(needed=self._set_layout(samples_per_class))
        self._set_batches_per_epoch(batches_per_epoch, self._one_pass())
        self._note_unvisited_classes()
        self._prepare()

    def _prepare(self) -> None:
        """Precompute what building epochs needs, once the settings are checked (nothing by default)."""


@REGISTRY.register("m_per_class")
class MPerClassSampler(PKBatchSampler):
    """Batches of ``P = batch_size // samples_per_class`` distinct classes × ``K = samples_per_class`` images.

    Epoch: ``batches_per_epoch`` global batches, by default ``max(1, len(labels) // batch_size)`` so
    that an epoch draws about as many images as there are in the dataset (shared by all ranks). Within an
    epoch the classes come from consecutive shuffled rounds over all ``C`` classes (each round is
    ``ceil(C / P)`` batches; the last batch of a round is completed with random other classes of the
    round), so every class is visited at least once when ``P * batches_per_epoch >= C``. Each visit of a
    class takes the next ``K`` images of a per-class shuffled cycle over its images; a class with fewer than
    ``K`` images repeats its images as evenly as possible inside the batch (sampling with replacement).

    Arguments: those of :class:`PKBatchSampler`.
    """

    def _build_epoch(self, epoch: int) -> np.ndarray:
        rng = epoch_rng(self.seed, epoch)
        schedule = class_rounds(len(self.classes), self.classes_per_batch, self._num_batches, rng).ravel()
        return self._cycle_images(schedule, rng)


@REGISTRY.register("class_random")
class ClassRandomSampler(PKBatchSampler):
    """Roth et al.'s ``class_random`` sampler, faithfully: each batch draws ``P = batch_size //
    samples_per_class`` classes uniformly **with replacement** (a class may appear twice in a batch), and
    for each draw ``K = samples_per_class`` images of the class uniformly with replacement. An epoch has
    ``max(1, len(labels) // batch_size)`` batches (their ``len(image_list) // bs``) unless
    ``batches_per_epoch`` is given. Unlike :class:`MPerClassSampler` nothing guarantees distinct classes in
    a batch, visits to every class, or distinct images: use it to reproduce Roth et al.'s numbers.

    Arguments: those of :class:`PKBatchSampler` (the class count is not checked against ``P``: classes
    repeat).
    """

    def configure(self, samples_per_class: int = 4, batches_per_epoch: int | None = None) -> None:
        self._set_layout(samples_per_class)
        self._group_classes()
        self._set_batches_per_epoch(batches_per_epoch, self._one_pass())

    def _build_epoch(self, epoch: int) -> np.ndarray:
        rng = epoch_rng(self.seed, epoch)
        draws = self._num_batches * self.classes_per_batch
        classes = rng.integers(0, len(self.classes), size=draws)
        within = (rng.random((draws, self.samples_per_class)) * self.class_counts[classes, None]).astype(
            np.int64
        )
        return self._items_by_class[self._class_start[classes, None] + within].reshape(-1)
