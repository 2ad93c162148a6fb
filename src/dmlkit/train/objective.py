"""What the training loop minimises: a loss, optionally fed by a miner.

The loop only calls ``objective(embeddings, labels, indices)``; later additions (cross-batch memory,
loss combinations) extend this object, never the loop.
"""

from __future__ import annotations

import torch
from torch import nn

from dmlkit import losses, miners
from dmlkit.config import TrainConfig


class Objective(nn.Module):
    """``loss(embeddings, labels, miner(embeddings, labels))`` with statistics for logging."""

    def __init__(self, loss: nn.Module, miner: nn.Module | None = None) -> None:
        super().__init__()
        self.loss = loss
        self.miner = miner

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Return the scalar loss and a flat dict of statistics (miner and loss counters).

        ``indices`` are the dataset indices of the batch items; the base objective does not need them
        but memory-based objectives do (to exclude an item's own stored copy).
        """
        indices_tuple = self.miner(embeddings, labels) if self.miner is not None else None
        value = self.loss(embeddings, labels, indices_tuple)
        return value, self.stats()

    def stats(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for prefix, module in (("loss", self.loss), ("miner", self.miner)):
            for key, val in (getattr(module, "last_stats", None) or {}).items():
                out[f"{prefix}/{key}"] = float(val)
        return out


def build_objective(config: TrainConfig, num_classes: int, embedding_size: int) -> Objective:
    """Loss and miner from the config; ``num_classes`` / ``embedding_size`` go to losses that need them."""
    loss_cls = losses.REGISTRY.get(config.loss)
    needs = getattr(loss_cls, "needs", frozenset())
    kwargs = dict(config.loss_args)
    if "num_classes" in needs:
        kwargs.setdefault("num_classes", num_classes)
    if "embedding_size" in needs:
        kwargs.setdefault("embedding_size", embedding_size)
    loss = losses.build(config.loss, **kwargs)
    miner = miners.build(config.miner, **config.miner_args) if config.miner else None
    return Objective(loss, miner)
