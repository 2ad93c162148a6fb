"""Common machinery of every batch sampler: epochs, rank sharding, resumable iteration.

A batch sampler yields lists of dataset indices and is passed to
``torch.utils.data.DataLoader(dataset, batch_sampler=sampler)``. Every sampler here follows the same
contract, implemented once in :class:`BatchSampler`:

* The *global* batches of an epoch are a pure function of ``(seed, epoch)`` and the labels; they do not
  depend on ``rank``, ``world_size`` or on how often the sampler was iterated before.
* Rank ``r`` of ``world_size`` ranks gets the global batches ``r, r + W, r + 2W, ...`` (the strided
  scheme of ``torch.utils.data.DistributedSampler``, applied to whole batches). Every rank yields the
  same number of batches: with ``drop_last`` the last ``B mod W`` global batches are dropped, otherwise
  the share is padded by wrapping around to the first batches of the epoch.
* The sampler keeps a cursor ``(epoch, batches_yielded)``. Iteration resumes at the cursor, advances it
  before handing out each batch and, once the epoch is exhausted, moves it to ``(epoch + 1, 0)``, so a
  loop that never calls :meth:`BatchSampler.set_epoch` still sees a new (reproducible) order every epoch.
  :meth:`~BatchSampler.state_dict` / :meth:`~BatchSampler.load_state_dict` save and restore the cursor.

A trainer drives every sampler through the :class:`BatchSampler` interface alone: ``len``, ``iter``,
``set_epoch``, ``state_dict`` / ``load_state_dict`` and, when the class declares ``needs_embeddings``,
``update_embeddings(indices, embeddings)`` after every step.
"""

from __future__ import annotations

import math
import sys
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import Sampler

from dmlkit.errors import ConfigError, DataError, UnknownNameError, unknown_name_message
from dmlkit.registry import Registered, Registry, SharedOptions

REGISTRY: Registry[BatchSampler] = Registry("sampler")

_STATE_KEYS = ("epoch", "batches_yielded", "seed", "world_size")


def as_label_array(labels: Any) -> np.ndarray:
    """Validate ``labels`` (1-D integers: list, numpy array or tensor) and return them as int64 numpy.

    Floating-point or boolean labels are rejected rather than cast: a float label is almost always a
    bug upstream (e.g. labels loaded through a float column), and rounding would silently merge classes.
    """
    if isinstance(labels, torch.Tensor):
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise DataError(f"labels must be an integer tensor, got dtype {labels.dtype}")
        array = labels.detach().cpu().numpy()
    else:
        array = np.asarray(labels)
        if array.size == 0 and array.dtype == np.float64:
            array = array.astype(np.int64)  # np.asarray([]) is float64; an empty list is still an error below
    if array.dtype.kind not in "iu":
        raise DataError(f"labels must be integers, got dtype {array.dtype}")
    if array.ndim != 1:
        raise DataError(f"labels must be 1-D (one label per dataset item), got shape {tuple(array.shape)}")
    if array.size == 0:
        raise DataError("labels are empty: a batch sampler needs at least one dataset item")
    if array.dtype == np.uint64 and array.max() > np.iinfo(np.int64).max:
        raise DataError("labels do not fit into int64")
    return np.ascontiguousarray(array, dtype=np.int64)


def check_int(name: str, value: Any, minimum: int | None = None) -> int:
    """Return ``value`` as ``int`` if it is an integer (bools excluded) ``>= minimum``, else raise."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    """Generator seeded from ``(seed, epoch)`` only, so an epoch's batches are reproducible in isolation.

    ``SeedSequence`` hashes the pair into well-mixed state, so neighbouring seeds or epochs give
    unrelated streams (unlike ``seed + epoch``, where seed 0 epoch 1 would equal seed 1 epoch 0).
    """
    return np.random.default_rng(np.random.SeedSequence([seed % 2**64, epoch]))


def caller_stacklevel() -> int:
    """``stacklevel`` for ``warnings.warn`` called from here that points at the first frame outside dmlkit.

    Samplers are usually built through ``dmlkit.samplers.build`` and the registry, so a fixed stacklevel
    would blame dmlkit's own files instead of the user's script.
    """
    package_dir = __file__.rsplit("samplers", 1)[0]
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(package_dir):
        frame, level = frame.f_back, level + 1
    return level


class BatchSampler(Registered, SharedOptions, Sampler[list[int]], ABC):
    """Base class: subclasses define the global batches of an epoch; this class shards and resumes.

    Options every sampler takes (declared once, by :meth:`shared_options`):

    Args:
        labels: class label of every dataset item (1-D integers; list, numpy array or tensor).
        batch_size: number of indices per batch on each rank.
        seed: base seed; an epoch's batches depend only on ``(seed, epoch)``.
        rank: index of this process in ``[0, world_size)``.
        world_size: number of processes sharing each epoch.
        drop_last: drop incomplete batches and the global batches that cannot be shared evenly across
            ranks, instead of padding the ranks' shares by wrapping around.

    A sampler's constructor is ``(labels, batch_size, <its own options>, *, seed, rank, world_size,
    drop_last)`` (see :class:`dmlkit.registry.SharedOptions`): a subclass declares its own options as the
    parameters of :meth:`configure`, which checks and stores them once the shared options are set, and
    changes a shared default in ``defaults`` (``random``: ``{"drop_last": True}``). Subclasses implement
    :attr:`num_global_batches` and :meth:`_build_epoch`, and call :meth:`_check_shareable` at the end of
    their ``configure``.

    ``needs_embeddings`` declares whether the sampler chooses batches from embeddings: a trainer must then
    call :meth:`update_embeddings` after every training step (see
    :class:`dmlkit.samplers.coreset.EmbeddingBatchSampler`). It is ``False`` here, and such samplers refuse
    embeddings.
    """

    #: True for samplers that read embeddings: the trainer calls :meth:`update_embeddings` after each step.
    needs_embeddings: ClassVar[bool] = False
    #: keys :meth:`load_state_dict` accepts; subclasses with more state extend it.
    state_keys: ClassVar[tuple[str, ...]] = _STATE_KEYS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Arguments as in the class's signature (``inspect.signature(cls)``); a wrong one raises
        ``TypeError`` (``build`` names the closest valid keyword instead)."""
        super().__init__()
        self._epoch = 0
        self._yielded = 0
        self._cache: tuple[int, np.ndarray] | None = None
        self.apply_arguments(args, kwargs)

    def shared_options(
        self,
        labels: Sequence[int] | np.ndarray | torch.Tensor,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> None:
        """Check and store the options every sampler takes (see the class docstring)."""
        self.labels = as_label_array(labels)
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.seed = check_int("seed", seed)
        self.world_size = check_int("world_size", world_size, 1)
        self.rank = check_int("rank", rank, 0)
        if self.rank >= self.world_size:
            raise ConfigError(f"rank must be < world_size, got rank={rank} with world_size={world_size}")
        if not isinstance(drop_last, bool | np.bool_):
            raise ConfigError(f"drop_last must be a bool, got {drop_last!r}")
        self.drop_last = bool(drop_last)

    # -- to be defined by subclasses ------------------------------------------------------------------

    @property
    @abstractmethod
    def num_global_batches(self) -> int:
        """Number of batches of one epoch over all ranks (before sharding)."""

    @abstractmethod
    def _build_epoch(self, epoch: int) -> np.ndarray:
        """Flat int64 array of dataset indices: global batch ``i`` is ``flat[i*batch_size:(i+1)*batch_size]``.

        Only the last batch may be shorter. Must depend on ``(self.seed, epoch)`` and the labels only.
        """

    # -- sharding ----------------------------------------------------------------------------------------

    def _check_shareable(self) -> None:
        """Raise at construction if ``drop_last`` would leave some rank without any batch."""
        if self.drop_last and self.num_global_batches < self.world_size:
            raise ConfigError(
                f"with drop_last=True an epoch has only {self.num_global_batches} batch(es) of "
                f"batch_size={self.batch_size}, fewer than world_size={self.world_size}; "
                "use a smaller batch_size or drop_last=False"
            )

    def __len__(self) -> int:
        """Number of batches this rank yields per epoch (the same on every rank)."""
        total = self.num_global_batches
        if self.drop_last:
            return total // self.world_size
        return math.ceil(total / self.world_size)

    def global_batches(self, epoch: int) -> np.ndarray:
        """Flat index array of the global batches of ``epoch`` (see :meth:`_build_epoch`); cached."""
        epoch = check_int("epoch", epoch, 0)
        if self._cache is None or self._cache[0] != epoch:
            flat = self._build_epoch(epoch)
            flat.setflags(write=False)
            self._cache = (epoch, flat)
        return self._cache[1]

    def _rank_positions(self) -> np.ndarray:
        """Global batch numbers this rank yields, in order (wrapping around when padding)."""
        total = len(self) * self.world_size
        return np.arange(self.rank, total, self.world_size) % self.num_global_batches

    def _global_batch(self, epoch: int, index: int) -> list[int]:
        """Global batch ``index`` of ``epoch``, built when it is handed out (lazy samplers override this)."""
        flat = self.global_batches(epoch)  # cached: slicing one batch costs no rebuild
        return flat[index * self.batch_size : (index + 1) * self.batch_size].tolist()

    def batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of ``epoch``, without touching the iteration cursor."""
        epoch = check_int("epoch", epoch, 0)
        return [self._global_batch(epoch, g) for g in self._rank_positions().tolist()]

    # -- iteration and state -----------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        """Epoch the next iteration draws from."""
        return self._epoch

    @property
    def batches_yielded(self) -> int:
        """Batches of :attr:`epoch` already handed out on this rank."""
        return self._yielded

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate next.

        Setting a different epoch rewinds the cursor to its first batch; setting the current epoch keeps
        the position, so ``load_state_dict(state); set_epoch(state["epoch"])`` still resumes mid-epoch.
        """
        epoch = check_int("epoch", epoch, 0)
        if epoch != self._epoch:
            self._epoch = epoch
            self._yielded = 0

    def __iter__(self) -> Iterator[list[int]]:
        epoch = self._epoch
        positions = self._rank_positions().tolist()
        for i in range(self._yielded, len(positions)):
            if self._epoch != epoch:  # set_epoch/load_state_dict was called while this iterator was alive
                return
            batch = self._global_batch(epoch, positions[i])
            # Count before yielding: the consumer holds the batch as soon as next() returns, and a
            # checkpoint written while processing it must not replay it.
            self._yielded = i + 1
            yield batch
        if self._epoch == epoch and self._yielded >= len(positions):
            self._epoch = epoch + 1
            self._yielded = 0

    def update_embeddings(self, indices: torch.Tensor, embeddings: torch.Tensor) -> None:
        """Feed the embeddings of a training batch (``indices``: its dataset indices).

        Only samplers with ``needs_embeddings`` take them (they override this); the others raise
        ``ConfigError`` naming the sampler, so a trainer must check ``needs_embeddings`` first.
        """
        raise ConfigError(
            f"sampler {type(self).__name__} does not choose batches from embeddings (needs_embeddings is "
            "False); call update_embeddings only when sampler.needs_embeddings"
        )

    def state_dict(self) -> dict[str, int]:
        """Cursor plus the settings it is valid for; plain ints, safe for ``torch.load(weights_only=True)``.

        ``batches_yielded`` counts batches handed out by ``__iter__``. A ``DataLoader`` with workers
        prefetches, so it runs ahead of training; a trainer that checkpoints mid-epoch should store the
        number of batches it has actually consumed in this key (and its own epoch in ``epoch``).
        """
        return {
            "epoch": self._epoch,
            "batches_yielded": self._yielded,
            "seed": self.seed,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the cursor: the next iteration continues at batch ``batches_yielded`` of ``epoch``.

        ``seed`` and ``world_size`` are optional; when present they must match this sampler, because
        the same cursor addresses different batches under another seed or rank layout.
        """
        for key in state:
            if key not in self.state_keys:
                raise UnknownNameError(unknown_name_message("sampler state key", str(key), self.state_keys))
        for key in ("epoch", "batches_yielded"):
            if key not in state:
                raise ConfigError(f"sampler state is missing '{key}' (got keys {sorted(state)})")
        epoch = check_int("state 'epoch'", state["epoch"], 0)
        yielded = check_int("state 'batches_yielded'", state["batches_yielded"], 0)
        if yielded > len(self):
            raise ConfigError(
                f"state 'batches_yielded'={yielded} exceeds the {len(self)} batches per epoch of this "
                "sampler; was it saved with another dataset, batch_size or batches_per_epoch?"
            )
        for key in ("seed", "world_size"):
            if key in state and check_int(f"state '{key}'", state[key]) != getattr(self, key):
                raise ConfigError(
                    f"sampler state was saved with {key}={state[key]} but this sampler has "
                    f"{key}={getattr(self, key)}; resuming would not continue the same batch sequence"
                )
        self._epoch = epoch
        self._yielded = yielded

    def _describe(self) -> dict[str, Any]:
        """Settings shown by ``repr``; subclasses add theirs."""
        return {
            "num_items": len(self.labels),
            "batch_size": self.batch_size,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "drop_last": self.drop_last,
            "batches_per_rank": len(self),
        }

    def __repr__(self) -> str:
        fields = ", ".join(f"{key}={value}" for key, value in self._describe().items())
        return f"{type(self).__name__}({fields})"


@REGISTRY.register("random")
class RandomBatchSampler(BatchSampler):
    """Plain shuffled batches: a fresh permutation of all items per epoch, cut into ``batch_size`` chunks.

    One epoch is one pass over the dataset: ``len(labels) // batch_size`` global batches with
    ``drop_last=True`` (default: a tiny last batch gives losses no pairs and breaks BatchNorm),
    ``ceil(len(labels) / batch_size)`` with ``drop_last=False`` (the last batch may be shorter).
    Labels are only used for their length; no class balancing.
    """

    defaults: ClassVar[dict[str, Any]] = {"drop_last": True}

    def configure(self) -> None:
        if self.drop_last and len(self.labels) < self.batch_size:
            raise ConfigError(
                f"batch_size={self.batch_size} exceeds the dataset size {len(self.labels)} with "
                "drop_last=True, so an epoch would have no batch"
            )
        self._check_shareable()

    @property
    def num_global_batches(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _build_epoch(self, epoch: int) -> np.ndarray:
        perm = epoch_rng(self.seed, epoch).permutation(len(self.labels))
        return perm[: self.num_global_batches * self.batch_size] if self.drop_last else perm
