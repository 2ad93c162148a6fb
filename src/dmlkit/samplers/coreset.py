"""Embedding-driven batch selection after Roth et al., "Revisiting Training Strategies and Generalization
Performance in Deep Metric Learning" (ICML 2020), ``--data_sampler`` flags ``greedy_coreset``,
``d2_coreset`` and ``disthist_batchmatch``.

Every global batch is chosen from a larger *candidate pool*: ``min(C, pool_factor × P)`` distinct classes
with ``K`` images each, i.e. about ``pool_factor × batch_size`` images (Roth et al.'s "big batch",
``--data_batchmatch_bigbs``). The pools of an epoch are a pure function of ``(seed, epoch)``: they are
the batches of an ``m_per_class`` schedule with ``pool_factor`` times more classes (shuffled class rounds,
per-class image cycles). From its pool a batch keeps ``P`` class groups (``K`` images each, so batches keep
the P×K composition), chosen with the current embeddings:

* ``greedy_coreset``: greedy k-center (farthest-point) selection. Starting from a random group, repeatedly
  add the group of the pool image farthest from the images chosen so far. The batch covers the pool's
  embedding space: every pool image is close to some batch image.
* ``d2_coreset``: D² sampling (k-means++ seeding, Arthur & Vassilvitskii 2007): the next group is that of
  a pool image drawn with probability ∝ (squared distance to the chosen images)^``power``.
* ``disthist_batchmatch``: draw ``num_candidates`` random P-group batches from the pool and keep the one
  whose histogram of pairwise distances is closest (1-D Wasserstein distance) to the histogram of a
  random reference sample of the whole dataset's embeddings.

Embeddings come from the trainer, which calls :meth:`EmbeddingBatchSampler.update_embeddings` after every
step with the batch's dataset indices and (detached) embeddings. The sampler keeps them in an ``N × D``
float32 CPU buffer, allocated at the first call, and builds each batch only when the iterator is asked for
it, so every batch uses the newest embeddings. Groups with an image that has no embedding yet are put into
the batch first (in random order): they must be embedded before they can be compared, which plays the role
of Roth et al.'s initial pass embedding the whole training set. Before any embedding exists, batches are
random ``P``-group subsets of the pools.

Reproducibility: global batch ``g`` of epoch ``e`` is a pure function of ``(seed, e, g)`` and the buffer
contents when it is built. The buffer is part of :meth:`~EmbeddingBatchSampler.state_dict`, so resuming
from a checkpoint taken after a step continues with the same batches, given the same embeddings.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from dmlkit.distances import check_distance, pairwise
from dmlkit.errors import ConfigError, DataError
from dmlkit.samplers.base import REGISTRY, BatchSampler, check_int, epoch_rng
from dmlkit.samplers.class_balanced import class_rounds, cycle_images, group_by_class, warn_small_classes

#: Distances the selection can use: metrics (``cosine`` is turned into the distance ``1 − cos``).
SELECTION_DISTANCES = ("euclidean", "squared_euclidean", "cosine")


def _check_float(name: str, value: Any, minimum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value < minimum:
        raise ConfigError(f"{name} must be a finite number >= {minimum}, got {value}")
    return float(value)


def greedy_coreset_select(
    dist: torch.Tensor,
    group_of: torch.Tensor,
    available: torch.Tensor,
    centers: torch.Tensor,
    count: int,
    rng: np.random.Generator,
) -> list[int]:
    """Greedy k-center selection of ``count`` groups (Sener & Savarese, ICLR 2018; Roth et al. 2020).

    ``dist`` is the ``M × M`` distance matrix of the pool items, ``group_of`` the group of every item,
    ``available`` marks the selectable groups and ``centers`` the items already in the batch. Each step
    takes the group of ``argmax_i min_{j ∈ chosen} dist[i, j]`` over items of available groups and adds all
    of its items to the chosen set; without any chosen item the first group is drawn uniformly.
    """
    available = available.clone()
    nearest = dist[:, centers].min(dim=1).values if bool(centers.any()) else None
    chosen: list[int] = []
    for _ in range(count):
        if nearest is None:
            group = int(rng.choice(torch.nonzero(available).ravel().numpy()))
        else:
            score = torch.where(available[group_of], nearest, torch.full_like(nearest, -math.inf))
            group = int(group_of[int(torch.argmax(score))])
        chosen.append(group)
        available[group] = False
        added = dist[:, group_of == group].min(dim=1).values
        nearest = added if nearest is None else torch.minimum(nearest, added)
    return chosen


def d2_coreset_select(
    dist: torch.Tensor,
    group_of: torch.Tensor,
    available: torch.Tensor,
    centers: torch.Tensor,
    count: int,
    rng: np.random.Generator,
    power: float = 1.0,
) -> list[int]:
    """D² sampling of ``count`` groups (k-means++ seeding; Arthur & Vassilvitskii, SODA 2007).

    Arguments as in :func:`greedy_coreset_select`. Each step draws an item ``i`` of an available group with
    probability ``∝ (min_{j ∈ chosen} dist[i, j]²)^power`` and adds its group; so a group is drawn with
    probability proportional to the summed weights of its items. The first group (no chosen item yet), or
    any step where all weights vanish, is drawn uniformly among the available groups.
    """
    available = available.clone()
    nearest = dist[:, centers].min(dim=1).values if bool(centers.any()) else None
    chosen: list[int] = []
    for _ in range(count):
        group = -1
        if nearest is not None:
            # float64: (d²)^power of small distances underflows in float32 for large powers
            weight = nearest.double().square().pow(power) * available[group_of]
            total = float(weight.sum())
            if math.isfinite(total) and total > 0:
                cumulative = torch.cumsum(weight, 0)
                item = int(torch.searchsorted(cumulative, torch.tensor([rng.random() * total]), right=True))
                item = min(item, int(torch.nonzero(weight).max()))  # rounding at the top end
                group = int(group_of[item])
        if group < 0:
            group = int(rng.choice(torch.nonzero(available).ravel().numpy()))
        chosen.append(group)
        available[group] = False
        added = dist[:, group_of == group].min(dim=1).values
        nearest = added if nearest is None else torch.minimum(nearest, added)
    return chosen


def distance_histogram(values: torch.Tensor, weights: torch.Tensor, top: float, bins: int) -> torch.Tensor:
    """Normalised histograms (last dim ``bins``) of ``values`` (``... × n``) on ``[0, top]``, weighted.

    Values above ``top`` fall into the last bin. Rows without weight stay all-zero.
    """
    index = (values * (bins / top)).long().clamp(0, bins - 1)
    hist = torch.zeros(*values.shape[:-1], bins, dtype=torch.float64)
    hist.scatter_add_(-1, index, weights.double())
    return hist / hist.sum(-1, keepdim=True).clamp_min(1e-12)


def histogram_wasserstein(a: torch.Tensor, b: torch.Tensor, bin_width: float) -> torch.Tensor:
    """1-D Wasserstein-1 distance between histograms on the same bins: ``Σ |CDF_a − CDF_b| · width``."""
    return (torch.cumsum(a, -1) - torch.cumsum(b, -1)).abs().sum(-1) * bin_width


class EmbeddingBatchSampler(BatchSampler):
    """Base class of samplers that pick each batch from a candidate pool using the current embeddings.

    Trainer interface:

    * ``needs_embeddings`` (class attribute) is ``True``.
    * ``update_embeddings(indices, embeddings)`` after every training step: ``indices`` the batch's dataset
      indices (1-D integer tensor), ``embeddings`` the matching ``len(indices) × D`` floating tensor
      (detached; any device; stored as float32 on the CPU). Rows with non-finite values are ignored (the
      item keeps its previous embedding); duplicated indices keep one of their rows. In multi-process
      training, pass the indices and embeddings gathered from all ranks, so that every rank's buffer (and
      thus every rank's view of the global batch sequence) is the same.
    * ``state_dict()`` adds ``"embeddings"`` (the ``N × D`` float32 buffer, or ``None`` before the first
      update) and ``"seen"`` (``N`` bools: items with an embedding) to the cursor; ``load_state_dict``
      restores them when present (both or neither) and keeps the current buffer when absent.

    Subclasses implement :meth:`_select`.

    Args:
        labels: class label of every dataset item (1-D integers; list, numpy array or tensor).
        batch_size: images per batch on each rank; must be a multiple of ``samples_per_class``.
        samples_per_class: ``K``, images per class in a batch (and in the pool).
        pool_factor: the pool holds ``min(C, pool_factor × P)`` classes, ``K`` images each.
        batches_per_epoch: global batches per epoch; ``None`` for ``max(1, len(labels) // batch_size)``.
        distance: ``euclidean`` (default, as Roth et al.), ``squared_euclidean`` or ``cosine`` (as
            ``1 − cos``); the embeddings are compared with :func:`dmlkit.distances.pairwise`.
        seed: base seed.
        rank: index of this process in ``[0, world_size)``.
        world_size: number of processes sharing each epoch.
        drop_last: drop the last ``batches mod world_size`` global batches instead of padding the ranks'
            shares (padding builds the wrapped-around batches again, with the then current embeddings).
    """

    needs_embeddings: ClassVar[bool] = True
    state_keys: ClassVar[tuple[str, ...]] = (*BatchSampler.state_keys, "embeddings", "seen")

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray | torch.Tensor,
        batch_size: int,
        samples_per_class: int = 4,
        pool_factor: int = 4,
        batches_per_epoch: int | None = None,
        distance: str = "euclidean",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> None:
        super().__init__(labels, batch_size, seed=seed, rank=rank, world_size=world_size, drop_last=drop_last)
        k = check_int("samples_per_class", samples_per_class, 1)
        if self.batch_size % k:
            raise ConfigError(
                f"batch_size={self.batch_size} must be divisible by samples_per_class={k} "
                "(a batch holds batch_size // samples_per_class classes × samples_per_class images)"
            )
        self.samples_per_class = k
        self.classes_per_batch = p = self.batch_size // k
        self.pool_factor = check_int("pool_factor", pool_factor, 1)
        check_distance(distance)
        if distance not in SELECTION_DISTANCES:
            raise ConfigError(
                f"distance='{distance}' is not a metric; batch selection needs one of {SELECTION_DISTANCES}"
            )
        self.distance = distance
        self.classes, self.class_counts, self._items_by_class, self._class_start = group_by_class(self.labels)
        num_classes = len(self.classes)
        if num_classes < p:
            raise ConfigError(
                f"batch_size={self.batch_size} with samples_per_class={k} needs {p} distinct classes per "
                f"batch, but the labels have only {num_classes} class(es); lower batch_size or raise "
                "samples_per_class"
            )
        self.pool_classes = min(num_classes, self.pool_factor * p)
        if batches_per_epoch is None:
            self._num_batches = max(1, len(self.labels) // self.batch_size)
        else:
            self._num_batches = check_int("batches_per_epoch", batches_per_epoch, 1)
        self.batches_per_epoch = self._num_batches
        self._check_shareable()
        warn_small_classes(self.class_counts, k)

        self._pool_cache: tuple[int, np.ndarray] | None = None
        self._embeddings: torch.Tensor | None = None
        self._seen = torch.zeros(len(self.labels), dtype=torch.bool)

    @property
    def num_global_batches(self) -> int:
        return self._num_batches

    # -- embeddings ------------------------------------------------------------------------------------------

    @property
    def embeddings(self) -> torch.Tensor | None:
        """The ``N × D`` float32 buffer (rows of unseen items are zero), ``None`` before the first update."""
        return self._embeddings

    @property
    def seen(self) -> torch.Tensor:
        """``N`` bools: which items have an embedding in the buffer."""
        return self._seen

    def update_embeddings(self, indices: torch.Tensor, embeddings: torch.Tensor) -> None:
        """Store ``embeddings[i]`` as the embedding of item ``indices[i]`` (see the class docstring)."""
        indices = torch.as_tensor(indices)
        embeddings = torch.as_tensor(embeddings)
        if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
            raise DataError(f"indices must be an integer tensor, got dtype {indices.dtype}")
        if indices.dim() != 1:
            raise DataError(f"indices must be 1-D, got shape {tuple(indices.shape)}")
        if not embeddings.dtype.is_floating_point:
            raise DataError(f"embeddings must be a floating-point tensor, got dtype {embeddings.dtype}")
        if embeddings.dim() != 2 or embeddings.shape[0] != indices.shape[0]:
            raise DataError(
                f"embeddings must have shape (len(indices), D) = ({indices.shape[0]}, D), "
                f"got {tuple(embeddings.shape)}"
            )
        if indices.numel() == 0:
            return
        indices = indices.detach().to("cpu", torch.int64)
        low, high = int(indices.min()), int(indices.max())
        if low < 0 or high >= len(self.labels):
            raise DataError(f"indices must lie in [0, {len(self.labels)}), got values from {low} to {high}")
        embeddings = embeddings.detach().to("cpu", torch.float32)
        if self._embeddings is None:
            self._embeddings = torch.zeros(len(self.labels), embeddings.shape[1], dtype=torch.float32)
        elif embeddings.shape[1] != self._embeddings.shape[1]:
            raise DataError(
                f"embeddings have dimension {embeddings.shape[1]}, but the sampler's buffer was started "
                f"with dimension {self._embeddings.shape[1]}"
            )
        finite = torch.isfinite(embeddings).all(dim=1)
        if not bool(finite.all()):
            indices, embeddings = indices[finite], embeddings[finite]
        self._embeddings[indices] = embeddings
        self._seen[indices] = True

    # -- pools and selection ---------------------------------------------------------------------------------

    def pools(self, epoch: int) -> np.ndarray:
        """``(B, G, K)`` candidate pools of ``epoch``: ``G = pool_classes`` groups of ``K`` items; cached."""
        epoch = check_int("epoch", epoch, 0)
        if self._pool_cache is None or self._pool_cache[0] != epoch:
            rng = epoch_rng(self.seed, epoch)
            schedule = class_rounds(len(self.classes), self.pool_classes, self._num_batches, rng).ravel()
            flat = cycle_images(
                schedule,
                self.samples_per_class,
                self.class_counts,
                self._items_by_class,
                self._class_start,
                rng,
            )
            pools = flat.reshape(self._num_batches, self.pool_classes, self.samples_per_class)
            pools.setflags(write=False)
            self._pool_cache = (epoch, pools)
        return self._pool_cache[1]

    def pool_distances(self, items: np.ndarray) -> torch.Tensor:
        """``M × M`` float32 distances between the buffer rows of ``items`` (1-D dataset indices)."""
        assert self._embeddings is not None
        emb = self._embeddings[torch.from_numpy(np.array(items, dtype=np.int64))]  # copy: pools are read-only
        dist = pairwise(emb, emb, self.distance)
        if self.distance == "cosine":
            dist = (1.0 - dist).clamp_min(0.0)
        return dist

    def global_batch(self, epoch: int, index: int) -> np.ndarray:
        """Global batch ``index`` of ``epoch`` (``batch_size`` dataset indices), from the current buffer."""
        pool = self.pools(epoch)[check_int("batch index", index, 0)]
        p = self.classes_per_batch
        rng = np.random.default_rng(np.random.SeedSequence([self.seed % 2**64, epoch, index]))
        if self._embeddings is None:
            return pool[rng.choice(len(pool), p, replace=False)].ravel()
        seen = self._seen.numpy()[pool]  # (G, K)
        fresh = np.flatnonzero(~seen.all(axis=1))
        if len(fresh) >= p:
            return pool[rng.choice(fresh, p, replace=False)].ravel()
        fresh = rng.permutation(fresh)
        k = self.samples_per_class
        group_of = torch.arange(len(pool)).repeat_interleave(k)
        available = torch.ones(len(pool), dtype=torch.bool)
        available[torch.from_numpy(fresh)] = False
        # Items of the fresh groups that already have an embedding count as chosen for the selection.
        centers = (~available)[group_of] & torch.from_numpy(seen.ravel())
        chosen = self._select(pool, group_of, available, centers, p - len(fresh), rng)
        return pool[np.concatenate([fresh, np.asarray(chosen, dtype=np.int64)])].ravel()

    def _select(
        self,
        pool: np.ndarray,
        group_of: torch.Tensor,
        available: torch.Tensor,
        centers: torch.Tensor,
        count: int,
        rng: np.random.Generator,
    ) -> list[int]:
        """Pick ``count`` distinct groups among ``available`` ones of ``pool`` (``G × K`` dataset indices).

        ``group_of`` is the group of every pool item (flattened row-major), ``centers`` marks pool items
        already in the batch that have an embedding. Every item of an available group has an embedding.
        """
        raise NotImplementedError

    # -- lazy iteration ------------------------------------------------------------------------------------

    def _build_epoch(self, epoch: int) -> np.ndarray:
        return np.concatenate([self.global_batch(epoch, g) for g in range(self._num_batches)])

    def global_batches(self, epoch: int) -> np.ndarray:
        """All global batches of ``epoch`` with the current buffer, flat (not cached: embeddings change)."""
        return self._build_epoch(check_int("epoch", epoch, 0))

    def batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of ``epoch`` with the current buffer, without touching the cursor."""
        epoch = check_int("epoch", epoch, 0)
        return [self.global_batch(epoch, g).tolist() for g in self._rank_positions().tolist()]

    def __iter__(self) -> Iterator[list[int]]:
        epoch = self._epoch
        positions = self._rank_positions().tolist()
        for i in range(self._yielded, len(positions)):
            if self._epoch != epoch:  # set_epoch/load_state_dict was called while this iterator was alive
                return
            batch = self.global_batch(epoch, positions[i]).tolist()  # built now: newest embeddings
            self._yielded = i + 1
            yield batch
        if self._epoch == epoch and self._yielded >= len(positions):
            self._epoch = epoch + 1
            self._yielded = 0

    # -- state -----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """Cursor (plain ints) plus ``embeddings`` (float32 tensor or ``None``) and ``seen`` (bool tensor).

        Tensors and ``None`` only, so checkpoints load with ``torch.load(..., weights_only=True)``; copies, so
        later updates do not change a saved state.
        """
        state: dict[str, Any] = dict(super().state_dict())
        state["embeddings"] = None if self._embeddings is None else self._embeddings.clone()
        state["seen"] = self._seen.clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the cursor and, when ``embeddings`` and ``seen`` are present, the embedding buffer."""
        has_embeddings, has_seen = "embeddings" in state, "seen" in state
        if has_embeddings != has_seen:
            raise ConfigError("sampler state must hold both 'embeddings' and 'seen' or neither")
        embeddings = seen = None
        if has_embeddings:
            embeddings, seen = self._check_buffer_state(state["embeddings"], state["seen"])
        cursor = {key: value for key, value in state.items() if key not in ("embeddings", "seen")}
        super().load_state_dict(cursor)
        if has_embeddings:
            assert seen is not None
            self._embeddings, self._seen = embeddings, seen

    def _check_buffer_state(self, embeddings: Any, seen: Any) -> tuple[torch.Tensor | None, torch.Tensor]:
        n = len(self.labels)
        if not isinstance(seen, torch.Tensor) or seen.dtype != torch.bool or tuple(seen.shape) != (n,):
            raise ConfigError(f"sampler state 'seen' must be a bool tensor of shape ({n},), got {seen!r:.80}")
        if embeddings is None:
            if bool(seen.any()):
                raise ConfigError("sampler state has items marked 'seen' but no 'embeddings'")
            return None, seen.clone()
        if (
            not isinstance(embeddings, torch.Tensor)
            or not embeddings.dtype.is_floating_point
            or embeddings.dim() != 2
            or embeddings.shape[0] != n
        ):
            got = (
                tuple(embeddings.shape) if isinstance(embeddings, torch.Tensor) else type(embeddings).__name__
            )
            raise ConfigError(
                f"sampler state 'embeddings' must be a floating tensor of shape ({n}, D), got {got}; "
                "was it saved with another dataset?"
            )
        return embeddings.to("cpu", torch.float32).clone(), seen.clone()

    def __repr__(self) -> str:
        dim = None if self._embeddings is None else self._embeddings.shape[1]
        return (
            f"{super().__repr__()[:-1]}, samples_per_class={self.samples_per_class}, "
            f"pool_classes={self.pool_classes}, distance='{self.distance}', "
            f"seen={int(self._seen.sum())}/{len(self.labels)}, embedding_dim={dim})"
        )


@REGISTRY.register("greedy_coreset")
class GreedyCoresetSampler(EmbeddingBatchSampler):
    """Batches that are greedy k-center coresets of their candidate pool (Roth et al.'s ``greedy_coreset``).

    See :class:`EmbeddingBatchSampler` for the arguments and :func:`greedy_coreset_select` for the rule.
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray | torch.Tensor,
        batch_size: int,
        samples_per_class: int = 4,
        pool_factor: int = 4,
        batches_per_epoch: int | None = None,
        distance: str = "euclidean",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> None:
        super().__init__(
            labels,
            batch_size,
            samples_per_class=samples_per_class,
            pool_factor=pool_factor,
            batches_per_epoch=batches_per_epoch,
            distance=distance,
            seed=seed,
            rank=rank,
            world_size=world_size,
            drop_last=drop_last,
        )

    def _select(
        self,
        pool: np.ndarray,
        group_of: torch.Tensor,
        available: torch.Tensor,
        centers: torch.Tensor,
        count: int,
        rng: np.random.Generator,
    ) -> list[int]:
        dist = self.pool_distances(pool.ravel())
        return greedy_coreset_select(dist, group_of, available, centers, count, rng)


@REGISTRY.register("d2_coreset")
class D2CoresetSampler(EmbeddingBatchSampler):
    """Batches drawn from their pool by D² sampling (Roth et al.'s ``d2_coreset``).

    ``power`` (default 1, Roth et al.'s ``--data_d2_coreset_lambda``) is the exponent on the squared
    distance; ``0`` gives uniformly random groups. See :class:`EmbeddingBatchSampler` for the other
    arguments and :func:`d2_coreset_select` for the rule.
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray | torch.Tensor,
        batch_size: int,
        samples_per_class: int = 4,
        pool_factor: int = 4,
        batches_per_epoch: int | None = None,
        distance: str = "euclidean",
        power: float = 1.0,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> None:
        super().__init__(
            labels,
            batch_size,
            samples_per_class=samples_per_class,
            pool_factor=pool_factor,
            batches_per_epoch=batches_per_epoch,
            distance=distance,
            seed=seed,
            rank=rank,
            world_size=world_size,
            drop_last=drop_last,
        )
        self.power = _check_float("power", power, 0.0)

    def _select(
        self,
        pool: np.ndarray,
        group_of: torch.Tensor,
        available: torch.Tensor,
        centers: torch.Tensor,
        count: int,
        rng: np.random.Generator,
    ) -> list[int]:
        dist = self.pool_distances(pool.ravel())
        return d2_coreset_select(dist, group_of, available, centers, count, rng, power=self.power)


@REGISTRY.register("disthist_batchmatch")
class DistHistBatchMatchSampler(EmbeddingBatchSampler):
    """Candidate batches whose distance histogram matches the data's best (Roth et al.'s disthist_batchmatch).

    For each global batch: draw ``num_candidates`` batches of ``P`` random groups from the pool (groups
    that still need an embedding are in every candidate), histogram the pairwise distances of each
    candidate's images (pairs of distinct dataset items with embeddings) into ``bins`` equal bins on
    ``[0, max reference distance]``, and keep the candidate with the smallest 1-D Wasserstein distance to
    the reference histogram. The reference is the histogram of the pairwise distances of
    ``reference_size`` items drawn at random from all items with an embedding (an unbiased estimate of the
    whole dataset's histogram), or of the pool's items when ``reference_size`` is ``None`` (Roth et al.).

    Args (besides :class:`EmbeddingBatchSampler`'s):
        num_candidates: candidate batches per global batch (Roth et al.'s ``--data_batchmatch_ncomps``, 10).
        bins: histogram bins (Roth et al.: 50).
        reference_size: items of the reference sample, or ``None`` for the pool.
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray | torch.Tensor,
        batch_size: int,
        samples_per_class: int = 4,
        pool_factor: int = 4,
        batches_per_epoch: int | None = None,
        distance: str = "euclidean",
        num_candidates: int = 10,
        bins: int = 50,
        reference_size: int | None = 1024,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> None:
        super().__init__(
            labels,
            batch_size,
            samples_per_class=samples_per_class,
            pool_factor=pool_factor,
            batches_per_epoch=batches_per_epoch,
            distance=distance,
            seed=seed,
            rank=rank,
            world_size=world_size,
            drop_last=drop_last,
        )
        self.num_candidates = check_int("num_candidates", num_candidates, 1)
        self.bins = check_int("bins", bins, 1)
        self.reference_size = (
            None if reference_size is None else check_int("reference_size", reference_size, 2)
        )

    def reference_distances(self, pool_items: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        """Pairwise distances (upper triangle) of the reference sample for one global batch."""
        if self.reference_size is None:
            items = np.unique(pool_items[self._seen.numpy()[pool_items]])
        else:
            seen = torch.nonzero(self._seen).ravel().numpy()
            items = np.sort(rng.choice(seen, min(self.reference_size, len(seen)), replace=False))
        dist = self.pool_distances(items)
        upper = torch.triu_indices(len(items), len(items), offset=1)
        return dist[upper[0], upper[1]]

    def _select(
        self,
        pool: np.ndarray,
        group_of: torch.Tensor,
        available: torch.Tensor,
        centers: torch.Tensor,
        count: int,
        rng: np.random.Generator,
    ) -> list[int]:
        k = self.samples_per_class
        candidates_groups = torch.nonzero(available).ravel().numpy()
        picks = np.argsort(rng.random((self.num_candidates, len(candidates_groups))), axis=1)[:, :count]
        picked = candidates_groups[picks]  # (n_cand, count)
        reference = self.reference_distances(pool.ravel(), rng)
        top = float(reference.max()) if reference.numel() else 0.0
        if not math.isfinite(top) or top <= 0:
            return picked[0].tolist()  # no spread to match (e.g. all embeddings equal): any candidate
        ref_hist = distance_histogram(reference, torch.ones_like(reference), top, self.bins)

        fresh = torch.nonzero(~available).ravel()
        groups = torch.cat([fresh.expand(self.num_candidates, -1), torch.from_numpy(picked)], dim=1)
        positions = (groups[:, :, None] * k + torch.arange(k)).flatten(1)  # (n_cand, P*K) pool positions
        flat_pool = torch.from_numpy(pool.ravel().copy())
        has_embedding = self._seen[flat_pool]
        dist = self.pool_distances(pool.ravel())
        sub = dist[positions[:, :, None], positions[:, None, :]]
        items = flat_pool[positions]
        usable = has_embedding[positions]
        upper = torch.triu(torch.ones(positions.shape[1], positions.shape[1], dtype=torch.bool), diagonal=1)
        valid = upper & usable[:, :, None] & usable[:, None, :] & (items[:, :, None] != items[:, None, :])
        hist = distance_histogram(sub.flatten(1), valid.flatten(1), top, self.bins)
        cost = histogram_wasserstein(hist, ref_hist, top / self.bins)
        return picked[int(torch.argmin(cost))].tolist()
