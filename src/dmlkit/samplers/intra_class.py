"""P×K class-balanced batches whose images are used uniformly *across* epochs (intra-class uniform sampling).

Berton, Musgrave and Masone, "All You Need to Know About Training Image Retrieval Models" (2025), find
that drawing the images of a class uniformly (every image equally often) rather than at random is one of
the training choices that helps across datasets. ``m_per_class`` already cycles through a class's images
without replacement, but restarts the cycles every epoch, so over many epochs the usage counts of a
class's images drift apart like a random walk. This sampler keeps one image stream per class that runs
on across epochs and is still a pure function of ``(seed, epoch)``:

* **Classes** come in shuffled rounds as in ``m_per_class`` (every class once per round, ``P`` distinct
  classes per batch), but the classes that complete a round's last batch ("fills") and the classes of an
  epoch's incomplete last round are taken from fixed rotations instead of at random. Hence the number of
  visits class ``c`` received before epoch ``e`` has a closed form (:meth:`visits_before`), and each
  visit has a global number ``v`` (counted from epoch 0) without replaying earlier epochs.
* **Images**: visit ``v`` of a class with ``n ≥ K`` images takes draws ``[vK, (v + 1)K)`` of the class's
  stream. The stream is cut into *super-blocks* of ``K`` passes (``n·K`` draws, exactly ``n`` visits);
  every pass is a random permutation of the class, so after any number of visits the usage counts of the
  class's images differ by at most one. The first images of a pass that share a visit with the end of the
  previous pass are chosen among images not in that end, so the ``K`` images of a visit are distinct.
  Super-blocks are independent, so only the ones an epoch touches are built.
* **Small classes** (``n < K``) repeat every image ``K // n`` times per visit and give the remaining
  ``K mod n`` draws to images taken in rotation over a fixed random order of the class, so again usage
  counts differ by at most one and a visit holds every image ``floor(K / n)`` or ``ceil(K / n)`` times.

Random choices come from a counter-based hash of ``(seed, purpose, round or class, ...)`` instead of a
sequential generator, so any round or super-block can be rebuilt in isolation.
"""

from __future__ import annotations

import math

import numpy as np

from dmlkit.samplers.base import REGISTRY, check_int
from dmlkit.samplers.class_balanced import PKBatchSampler, visit_numbers

_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)

# Purposes of hashed random numbers; distinct so that different decisions use unrelated keys.
_ROUND_ORDER, _ROUND_TAIL, _FILL_ORDER, _PARTIAL_ORDER, _PARTIAL_SHUFFLE = 1, 2, 3, 4, 5
_SMALL_ORDER, _PASS_HEAD, _PASS_ORDER = 6, 7, 8


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser (Steele et al., OOPSLA 2014): a bijection of uint64 with good avalanche."""
    x = x ^ (x >> np.uint64(30))
    x = x * _MUL1
    x = x ^ (x >> np.uint64(27))
    x = x * _MUL2
    return x ^ (x >> np.uint64(31))


def hash_keys(seed: int, purpose: int, *parts: np.ndarray | int) -> np.ndarray:
    """Pseudo-random uint64 keys, element-wise a pure function of ``(seed, purpose, *parts)`` (broadcast).

    ``h ← mix(h xor (part + φ))`` for each part, starting from ``mix(seed) xor mix(purpose)``. Unlike a
    sequential generator, any element can be recomputed on its own, which lets a round or a super-block of
    any epoch be rebuilt without replaying the epochs before it.
    """
    with np.errstate(over="ignore"):
        h = _mix64(np.array([seed % 2**64], dtype=np.uint64)) ^ _mix64(np.array([purpose], dtype=np.uint64))
        for part in parts:
            h = _mix64(h ^ (np.asarray(part, dtype=np.int64).astype(np.uint64) + _GOLDEN))
    return h


def _key31(seed: int, purpose: int, *parts: np.ndarray | int) -> np.ndarray:
    """Hashed keys in ``[0, 2**31)`` as int64, to be packed below a group number for one flat sort."""
    return (hash_keys(seed, purpose, *parts) >> np.uint64(33)).astype(np.int64)


def _rotation_count(total: np.ndarray | int, position: np.ndarray, n: int) -> np.ndarray:
    """How many of the slots ``0 .. total-1`` of a rotation over ``n`` positions fall on ``position``."""
    total = np.asarray(total, dtype=np.int64)
    return np.where(total > position, (total - position - 1) // n + 1, 0)


@REGISTRY.register("intra_class_uniform")
class IntraClassUniformSampler(PKBatchSampler):
    """P×K batches (like ``m_per_class``) whose images are used equally often over all epochs.

    Each batch holds ``P = batch_size // samples_per_class`` distinct classes with ``K =
    samples_per_class`` images each; class ``c`` occupies ``K`` consecutive positions. After the first
    ``e`` epochs (of the global batch sequence), the usage counts of the images of any class differ by at
    most one; the images of one visit are distinct when the class has at least ``K`` images, otherwise
    each is repeated ``floor(K / n)`` or ``ceil(K / n)`` times (sampling with replacement, warned once).

    Epoch: ``batches_per_epoch`` global batches, by default ``max(1, len(labels) // batch_size)``. With
    ``per_round = ceil(C / P)`` batches per round, an epoch is ``B // per_round`` full rounds (every class
    once, plus ``per_round * P - C`` fill visits taken in rotation) followed by ``B mod per_round``
    batches whose ``P * (B mod per_round) < C`` classes are the next ones of a second rotation. So every
    class is visited at least once per epoch whenever ``P * B >= C``.

    Arguments: those of :class:`~dmlkit.samplers.class_balanced.PKBatchSampler`.
    """

    def _prepare(self) -> None:
        num_classes, p = len(self.classes), self.classes_per_batch
        self._per_round = math.ceil(num_classes / p)
        self._fills = self._per_round * p - num_classes  # fill visits per full round
        self._full_rounds, self._partial_batches = divmod(self._num_batches, self._per_round)
        # Fixed random orders of the classes for the two rotations, and of each class's images for the
        # extra draws of small classes.
        self._fill_order = np.argsort(
            hash_keys(self.seed, _FILL_ORDER, np.arange(num_classes)), kind="stable"
        )
        self._fill_pos = np.argsort(self._fill_order, kind="stable")
        self._partial_order = np.argsort(
            hash_keys(self.seed, _PARTIAL_ORDER, np.arange(num_classes)), kind="stable"
        )
        self._partial_pos = np.argsort(self._partial_order, kind="stable")
        class_of_item = np.repeat(np.arange(num_classes, dtype=np.int64), self.class_counts)
        small_keys = _key31(self.seed, _SMALL_ORDER, self._items_by_class)
        self._items_rotation = self._items_by_class[
            np.argsort((class_of_item << 32) | small_keys, kind="stable")
        ]

    # -- classes -------------------------------------------------------------------------------------------

    def class_schedule(self, epoch: int) -> np.ndarray:
        """``(B, P)`` class numbers (indices into :attr:`classes`) of the global batches of ``epoch``."""
        epoch = check_int("epoch", epoch, 0)
        num_classes, p = len(self.classes), self.classes_per_batch
        rounds, fills = self._full_rounds, self._fills
        parts = []
        if rounds:
            g = (epoch * rounds + np.arange(rounds, dtype=np.int64))[:, None]  # global round numbers
            cls = np.arange(num_classes, dtype=np.int64)[None, :]
            order_key = _key31(self.seed, _ROUND_ORDER, g, cls)
            if fills:
                # Round g is completed with the fill classes at rotation slots [g*f, (g+1)*f). They go into
                # the last batch together with `tail` other classes, chosen at random among the non-fill
                # classes and moved to the end of the round's permutation, so that batch has no duplicate.
                start = (g * fills) % num_classes
                is_fill = (self._fill_pos[None, :] - start) % num_classes < fills
                tail = num_classes % p
                tail_key = np.where(is_fill, -1, _key31(self.seed, _ROUND_TAIL, g, cls))
                tail_cols = np.argsort(tail_key, axis=1, kind="stable")[:, num_classes - tail :]
                is_tail = np.zeros(is_fill.shape, dtype=np.int64)
                np.put_along_axis(is_tail, tail_cols, 1, axis=1)
                order = np.argsort((is_tail << 32) | order_key, axis=1, kind="stable")
                fill_classes = self._fill_order[(start + np.arange(fills)) % num_classes]
                order = np.concatenate([order, fill_classes], axis=1)
            else:
                order = np.argsort(order_key, axis=1, kind="stable")
            parts.append(order.reshape(rounds * self._per_round, p))
        if self._partial_batches:
            # The incomplete last round takes the next P * partial (< C, hence distinct) classes of a
            # second rotation, in random order.
            slots = self._partial_batches * p
            start = epoch * slots
            cls = self._partial_order[(start + np.arange(slots)) % num_classes]
            shuffle = np.argsort(_key31(self.seed, _PARTIAL_SHUFFLE, epoch, np.arange(slots)), kind="stable")
            parts.append(cls[shuffle].reshape(self._partial_batches, p))
        return np.concatenate(parts).astype(np.int64)

    def visits_before(self, epoch: int) -> np.ndarray:
        """Visits of every class (indexed like :attr:`classes`) in the global batches of epochs ``< epoch``.

        ``e·R + fills_c(e·R·f) + partial_c(e·P·(B mod per_round))``: ``R`` full rounds per epoch visit
        every class once, plus the fill and partial-round rotations, counted in closed form.
        """
        epoch = check_int("epoch", epoch, 0)
        num_classes = len(self.classes)
        rounds = epoch * self._full_rounds
        fill_visits = _rotation_count(rounds * self._fills, self._fill_pos, num_classes)
        partial_slots = epoch * self._partial_batches * self.classes_per_batch
        partial_visits = _rotation_count(partial_slots, self._partial_pos, num_classes)
        return rounds + fill_visits + partial_visits

    # -- images --------------------------------------------------------------------------------------------

    def _build_epoch(self, epoch: int) -> np.ndarray:
        schedule = self.class_schedule(epoch).ravel()
        k = self.samples_per_class
        num_classes = len(self.classes)
        # Global visit number of every slot: visits before this epoch + rank among this epoch's visits.
        visit = visit_numbers(schedule, num_classes)[0] + self.visits_before(epoch)[schedule]

        n = self.class_counts[schedule]
        out = np.empty((len(schedule), k), dtype=np.int64)
        draws = np.arange(k, dtype=np.int64)[None, :]
        small = n < k
        if small.any():
            ns, vs = n[small][:, None], visit[small][:, None]
            repeated = (k // ns) * ns
            local = np.where(draws < repeated, draws % ns, (vs * (k % ns) + draws - repeated) % ns)
            out[small] = self._items_rotation[self._class_start[schedule[small]][:, None] + local]
        large = ~small
        if large.any():
            cls, v, nl = schedule[large], visit[large], n[large]
            block, window = v // nl, v % nl
            span = int(block.max()) + 1
            pairs, pair_of_slot = np.unique(cls * span + block, return_inverse=True)
            stream, stream_start = self._super_blocks(pairs // span, pairs % span)
            out[large] = stream[stream_start[pair_of_slot][:, None] + window[:, None] * k + draws]
        return out.ravel()

    def _super_blocks(self, cls: np.ndarray, block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Draw streams of super-block ``block[i]`` of class ``cls[i]`` (all with ``n >= K``), concatenated.

        Returns ``(stream, start)``: super-block ``i`` is ``stream[start[i] : start[i] + K * n_i]``, ``K``
        passes of ``n_i`` draws. Built pass by pass for all super-blocks at once: pass ``t + 1`` puts ``K -
        a`` images that are not among the last ``a = (t + 1) n mod K`` images of pass ``t`` first (those
        share a visit), then the rest in random order.
        """
        k = self.samples_per_class
        n = self.class_counts[cls]
        total = int(n.sum())
        elem_pair = np.repeat(np.arange(len(cls), dtype=np.int64), n)
        pair_start = np.cumsum(n) - n
        local = np.arange(total, dtype=np.int64) - pair_start[elem_pair]
        items = self._items_by_class[self._class_start[cls][elem_pair] + local]
        elem_class, elem_block, elem_n = cls[elem_pair], block[elem_pair], n[elem_pair]
        high = elem_pair << 32  # keeps each super-block contiguous in the flat sorts below
        stream_start = np.cumsum(k * n) - k * n
        stream = np.empty(k * total, dtype=np.int64)
        avoid = np.zeros(total, dtype=np.int64)
        for t in range(k):
            shared = (t * elem_n) % k  # images of pass t - 1 in the visit that pass t starts in
            head = np.where(shared > 0, k - shared, 0)
            is_head = np.zeros(total, dtype=bool)
            if head.any():
                key = high | (avoid << 31) | _key31(self.seed, _PASS_HEAD, elem_class, elem_block, t, local)
                ranked = np.argsort(key, kind="stable")
                rank = np.empty(total, dtype=np.int64)
                rank[ranked] = np.arange(total) - pair_start[elem_pair[ranked]]
                is_head = rank < head  # n >= K leaves at least K - a images outside the avoided a
            key = (
                high
                | ((~is_head).astype(np.int64) << 31)
                | _key31(self.seed, _PASS_ORDER, elem_class, elem_block, t, local)
            )
            ranked = np.argsort(key, kind="stable")
            position = np.empty(total, dtype=np.int64)
            position[ranked] = np.arange(total) - pair_start[elem_pair[ranked]]
            stream[stream_start[elem_pair] + t * elem_n + position] = items
            end = ((t + 1) * elem_n) % k
            avoid = ((end > 0) & (position >= elem_n - end)).astype(np.int64)
        return stream, stream_start
