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

Embeddings come from the trainer, which (as ``needs_embeddings`` is true) calls
:meth:`EmbeddingBatchSampler.update_embeddings` after every step with the batch's dataset indices and
(detached) embeddings. The sampler keeps them in an ``N × D`` float32 CPU buffer, allocated at the first
call, and builds each batch only when the iterator is asked for it, so every batch uses the newest
embeddings. Groups with an image that has no embedding yet are put into
the batch first (in random order): they must be embedded before they can be compared, which plays the role
of Roth et al.'s initial pass embedding the whole training set. Before any embedding exists, batches are
random ``P``-group subsets of the pools.

Reproducibility: global batch ``g`` of epoch ``e`` is a pure function of ``(seed, e, g)`` and the buffer
contents when it is built. The buffer is part of :meth:`~EmbeddingBatchSampler.state_dict`, so resuming
from a checkpoint taken after a step continues with the same batches, given the same embeddings.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from dmlkit import distances
from dmlkit.errors import ConfigError, DataError
from dmlkit.registry import extends
from dmlkit.samplers.base import REGISTRY, BatchSampler, check_int, epoch_rng
from dmlkit.samplers.class_balanced import ClassVisitSampler, class_rounds

#: Distances the selection can use: metrics (``cosine`` is turned into the distance ``1 − cos``).
SELECTION_DISTANCES = ("euclidean", "squared_euclidean", "cosine")


def _check_float(name: str, value: Any, minimum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value < minimum:
        raise ConfigError(f"{name} must be a finite number >= {minimum}, got {value}")
    return float(value)


#: A selection rule: given every pool item's distance to its nearest chosen item (``nearest``), the items
#: that may be picked (``selectable``: those of the available groups) and the generator, the item whose
#: group is added next; ``-1`` asks for a uniformly random available group.
SelectionRule = Callable[[torch.Tensor, torch.Tensor, np.random.Generator], int]


def farthest_item(nearest: torch.Tensor, selectable: torch.Tensor, rng: np.random.Generator) -> int:
    """Greedy k-center rule (Sener & Savarese, ICLR 2018; Roth et al. 2020): the selectable item
    ``argmax_i min_{j ∈ chosen} dist[i, j]``, farthest from the chosen items (``rng`` is not used)."""
    score = torch.where(selectable, nearest, torch.full_like(nearest, -math.inf))
    return int(torch.argmax(score))


def d2_rule(power: float = 1.0) -> SelectionRule:
    """D² sampling rule (k-means++ seeding; Arthur & Vassilvitskii, SODA 2007) with exponent ``power``.

    Draws a selectable item ``i`` with probability ``∝ (min_{j ∈ chosen} dist[i, j]²)^power``, so a group is
    drawn with probability proportional to the summed weights of its items; ``-1`` (a uniform group) when
    all weights vanish. ``power = 0`` gives uniformly random items.
    """

    def drawn(nearest: torch.Tensor, selectable: torch.Tensor, rng: np.random.Generator) -> int:
        # float64: (d²)^power of small distances underflows in float32 for large powers
        weight = nearest.double().square().pow(power) * selectable
        total = float(weight.sum())
        if not (math.isfinite(total) and total > 0):
            return -1
        cumulative = torch.cumsum(weight, 0)
        item = int(torch.searchsorted(cumulative, torch.tensor([rng.random() * total]), right=True))
        return min(item, int(torch.nonzero(weight).max()))  # rounding at the top end

    return drawn


def coreset_select(
    dist: torch.Tensor,
    group_of: torch.Tensor,
    available: torch.Tensor,
    centers: torch.Tensor,
    count: int,
    rng: np.random.Generator,
    rule: SelectionRule = farthest_item,
) -> list[int]:
    """Select ``count`` groups one at a time with ``rule`` (greedy k-center by default, or :func:`d2_rule`).

    ``dist`` is the ``M × M`` distance matrix of the pool items, ``group_of`` the group of every item,
    ``available`` marks the selectable groups and ``centers`` the items already in the batch. Every item's
    distance to its nearest chosen item, ``nearest[i] = min_{j ∈ chosen} dist[i, j]``, is updated with each
    added group's items; each step adds the group of the item ``rule`` picks among the items of available
    groups. The first group without any chosen item, or any step where the rule returns ``-1``, is drawn
    uniformly among the available groups.
    """
    available = available.clone()
    nearest = dist[:, centers].min(dim=1).values if bool(centers.any()) else None
    chosen: list[int] = []
    for _ in range(count):
        item = -1 if nearest is None else rule(nearest, available[group_of], rng)
        uniform = item < 0
        group = int(rng.choice(torch.nonzero(available).ravel().numpy())) if uniform else int(group_of[item])
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


@dataclass(frozen=True)
class PoolState:
    """One candidate pool at selection time (the arguments of a selection rule besides the distances).

    ``pool``: ``G × K`` dataset indices (group ``g`` is row ``g``); ``group_of``: the group of every pool
    item, flattened row-major; ``available``: ``G`` bools, the groups that may still be picked (every item of
    them has an embedding); ``centers``: pool items already in the batch that have an embedding.
    """

    pool: np.ndarray
    group_of: torch.Tensor
    available: torch.Tensor
    centers: torch.Tensor


class EmbeddingBatchSampler(ClassVisitSampler):
    """Base class of samplers that pick each batch from a candidate pool using the current embeddings.

    Trainer interface:

    * ``needs_embeddings`` (class attribute) is ``True``: a trainer calls :meth:`update_embeddings`.
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

    Args (besides the shared options of :class:`~dmlkit.samplers.base.BatchSampler`):
        samples_per_class: ``K``, images per class in a batch (and in the pool); ``batch_size`` must be a
            multiple of it.
        pool_factor: the pool holds ``min(C, pool_factor × P)`` classes, ``K`` images each.
        batches_per_epoch: global batches per epoch; ``None`` for ``max(1, len(labels) // batch_size)``.
        distance: ``euclidean`` (default, as Roth et al.), ``squared_euclidean`` or ``cosine`` (as
            ``1 − cos``); the embeddings are compared with that :class:`dmlkit.distances.Distance`'s
            ``matrix``.

    ``drop_last`` drops the last ``batches mod world_size`` global batches instead of padding the ranks'
    shares (padding builds the wrapped-around batches again, with the then current embeddings).
    """

    needs_embeddings: ClassVar[bool] = True
    state_keys: ClassVar[tuple[str, ...]] = (*BatchSampler.state_keys, "embeddings", "seen")

    def configure(
        self,
        samples_per_class: int = 4,
        pool_factor: int = 4,
        batches_per_epoch: int | None = None,
        distance: str = "euclidean",
    ) -> None:
        p = self._set_layout(samples_per_class)
        self.pool_factor = check_int("pool_factor", pool_factor, 1)
        distances.REGISTRY.get(distance)  # an unknown name raises UnknownNameError with the closest one
        if distance not in SELECTION_DISTANCES:
            raise ConfigError(
                f"distance='{distance}' is not a metric; batch selection needs one of {SELECTION_DISTANCES}"
            )
        self.distance = distance
        self._metric = distances.build(distance)
        self.pool_classes = min(self._group_classes(needed=p), self.pool_factor * p)
        self._set_batches_per_epoch(batches_per_epoch, self._one_pass())

        self._pool_cache: tuple[int, np.ndarray] | None = None
        self._embeddings: torch.Tensor | None = None
        self._seen = torch.zeros(len(self.labels), dtype=torch.bool)

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
            pools = self._cycle_images(schedule, rng).reshape(
                self._num_batches, self.pool_classes, self.samples_per_class
            )
            pools.setflags(write=False)
            self._pool_cache = (epoch, pools)
        return self._pool_cache[1]

    def pool_distances(self, items: np.ndarray) -> torch.Tensor:
        """``M × M`` float32 distances between the buffer rows of ``items`` (1-D dataset indices)."""
        assert self._embeddings is not None
        emb = self._embeddings[torch.from_numpy(np.array(items, dtype=np.int64))]  # copy: pools are read-only
        dist = self._metric.matrix(emb)
        if self._metric.is_similarity:  # cosine, the only similarity SELECTION_DISTANCES admits
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
        chosen = self._select(PoolState(pool, group_of, available, centers), p - len(fresh), rng)
        return pool[np.concatenate([fresh, np.asarray(chosen, dtype=np.int64)])].ravel()

    @abstractmethod
    def _select(self, state: PoolState, count: int, rng: np.random.Generator) -> list[int]:
        """Pick ``count`` distinct groups among the available ones of ``state.pool`` (see
        :class:`PoolState`)."""

    # -- lazy iteration ------------------------------------------------------------------------------------

    def _build_epoch(self, epoch: int) -> np.ndarray:
        return np.concatenate([self.global_batch(epoch, g) for g in range(self._num_batches)])

    def global_batches(self, epoch: int) -> np.ndarray:
        """All global batches of ``epoch`` with the current buffer, flat (not cached: embeddings change)."""
        return self._build_epoch(check_int("epoch", epoch, 0))

    def _global_batch(self, epoch: int, index: int) -> list[int]:
        # built when handed out (by batches() and iteration), so every batch sees the newest embeddings
        return self.global_batch(epoch, index).tolist()

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

    def _describe(self) -> dict[str, Any]:
        return {  # the pool layout instead of the P×K samplers' number of classes and epoch length
            **BatchSampler._describe(self),
            "samples_per_class": self.samples_per_class,
            "pool_classes": self.pool_classes,
            "distance": f"'{self.distance}'",
            "seen": f"{int(self._seen.sum())}/{len(self.labels)}",
            "embedding_dim": None if self._embeddings is None else self._embeddings.shape[1],
        }


@REGISTRY.register("greedy_coreset")
class GreedyCoresetSampler(EmbeddingBatchSampler):
    """Batches that are greedy k-center coresets of their candidate pool (Roth et al.'s ``greedy_coreset``).

    See :class:`EmbeddingBatchSampler` for the arguments (it takes no others) and
    :func:`coreset_select` for the rule.
    """

    def _select(self, state: PoolState, count: int, rng: np.random.Generator) -> list[int]:
        dist = self.pool_distances(state.pool.ravel())
        return coreset_select(dist, state.group_of, state.available, state.centers, count, rng)


@REGISTRY.register("d2_coreset")
class D2CoresetSampler(EmbeddingBatchSampler):
    """Batches drawn from their pool by D² sampling (Roth et al.'s ``d2_coreset``).

    ``power`` (default 1, Roth et al.'s ``--data_d2_coreset_lambda``) is the exponent on the squared
    distance; ``0`` gives uniformly random groups. See :class:`EmbeddingBatchSampler` for the other
    arguments and :func:`d2_rule` for the rule.
    """

    @extends(EmbeddingBatchSampler.configure)
    def configure(self, power: float = 1.0, **inherited: Any) -> None:
        super().configure(**inherited)
        self.power = _check_float("power", power, 0.0)
        self._rule = d2_rule(self.power)

    def _select(self, state: PoolState, count: int, rng: np.random.Generator) -> list[int]:
        dist = self.pool_distances(state.pool.ravel())
        return coreset_select(dist, state.group_of, state.available, state.centers, count, rng, self._rule)


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

    @extends(EmbeddingBatchSampler.configure)
    def configure(
        self, num_candidates: int = 10, bins: int = 50, reference_size: int | None = 1024, **inherited: Any
    ) -> None:
        super().configure(**inherited)
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

    def _select(self, state: PoolState, count: int, rng: np.random.Generator) -> list[int]:
        k, pool, available = self.samples_per_class, state.pool, state.available
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
