"""One global batch, sharded over the training processes: :class:`ShardedBatchSampler`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from dmlkit.errors import ConfigError
from dmlkit.samplers.base import BatchSampler


class ShardedBatchSampler:
    """Rank ``rank``'s shard of every batch of ``sampler``, a single-process sampler of the *global* batch.

    The global batch is formed once, exactly as one process would form it (the same class structure, the
    same sequence of batches for the same seed, whatever ``world_size``); rank ``r`` takes the ``r``-th of
    ``world_size`` contiguous, equal parts of it (``batch_size`` must be divisible by ``world_size``; a
    shorter last batch is split into parts that differ by at most one item). The parts are disjoint, every
    rank yields the same number of batches, and the state is the wrapped sampler's cursor in global batches:
    a run resumes on any number of processes at the same batch. Samplers that choose batches from embeddings
    (``needs_embeddings``) receive the global batch's embeddings on every rank, so they stay identical.

    This differs from the ``rank``/``world_size`` of :class:`BatchSampler`, which hands whole batches to the
    ranks in turn (each rank's batch is one of ``batch_size``).
    """

    def __init__(self, sampler: BatchSampler, rank: int, world_size: int) -> None:
        if sampler.world_size != 1:
            raise ConfigError("ShardedBatchSampler shards a single-process sampler (world_size 1)")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in [0, {world_size}), got {rank}")
        if sampler.batch_size % world_size:
            raise ConfigError(
                f"batch_size {sampler.batch_size} (the global batch) is not divisible by the {world_size} "
                "processes: every rank must get an equal part"
            )
        self.sampler = sampler
        self.rank = rank
        self.world_size = world_size

    @property
    def needs_embeddings(self) -> bool:
        return bool(self.sampler.needs_embeddings)

    @property
    def batch_size(self) -> int:
        """Items of a global batch (the shard holds ``batch_size // world_size``)."""
        return self.sampler.batch_size

    def shard(self, batch: list[int]) -> list[int]:
        """This rank's part of a global ``batch``."""
        return np.array_split(np.asarray(batch, dtype=np.int64), self.world_size)[self.rank].tolist()

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.sampler:
            yield self.shard(batch)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def update_embeddings(self, indices: torch.Tensor, embeddings: torch.Tensor) -> None:
        """The global batch's embeddings (gathered from every rank), the same on every rank."""
        self.sampler.update_embeddings(indices, embeddings)

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)

    def __repr__(self) -> str:
        return (
            f"ShardedBatchSampler(rank={self.rank}, world_size={self.world_size}, sampler={self.sampler!r})"
        )


__all__ = ["ShardedBatchSampler"]
