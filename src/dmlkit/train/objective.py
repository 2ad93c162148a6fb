"""What the training loop minimises: a loss, optionally fed by a miner and a cross-batch memory.

The loop only calls ``objective(embeddings, labels, indices)``; features such as the cross-batch
memory live here, never in the loop.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dmlkit import foreign, losses, miners
from dmlkit.config import TrainConfig
from dmlkit.errors import ConfigError
from dmlkit.losses.base import check_trainable, without_regularization
from dmlkit.memory import CrossBatchMemory, build_memory
from dmlkit.tuples import all_pairs, drop_excluded


def _valid_negatives(stats: dict[str, float]) -> float | None:
    """Negative pairs with a non-zero loss (pair losses), else the negative pairs used (matrix losses)."""
    for key in ("num_active_neg_pairs", "num_neg_pairs", "num_active_triplets"):
        if key in stats:
            return stats[key]
    return None


class Objective(nn.Module):
    """``loss(embeddings, labels, miner(...))`` + ``weight`` × the same against a cross-batch memory.

    With a ``memory``: from iteration ``memory_start`` on, each batch's anchors are also compared with
    the memory contents through the loss's ``ref_emb/ref_labels`` path (with the miner, if any, mining
    against the memory); then the batch is enqueued. Enqueuing *after* use means a batch is never its
    own reference set; stored copies of the same dataset items from earlier iterations are excluded by
    dataset index (``ref_exclude``, or by filtering mined tuples). With several processes the embeddings
    are the global batch (the training step gathers them), so every rank's memory holds the same entries.
    """

    def __init__(
        self,
        loss: nn.Module,
        miner: nn.Module | None = None,
        memory: CrossBatchMemory | None = None,
        memory_weight: float = 1.0,
        memory_start: int = 0,
        miner_schedule: miners.MinerSchedule | None = None,
    ) -> None:
        super().__init__()
        self.miner_schedule = miner_schedule
        self._schedule_stats: dict[str, float] = {}
        self.loss = loss
        self.miner = miner
        self.memory = memory
        self.memory_weight = float(memory_weight)
        self.memory_start = int(memory_start)
        # A dmlkit loss or miner (the Loss / Miner protocols) takes ref_exclude; a foreign module gets the
        # same exclusion through explicit tuples (slower: every anchor × memory pair listed).
        self._loss_takes_exclude = isinstance(loss, losses.Loss)
        self._miner_takes_exclude = isinstance(miner, miners.Miner)
        self._stats: dict[str, float] = {}

    def set_progress(self, progress: float) -> None:
        """Tell the objective how far training is (0 → 1); anneals the miner's hardness knob if scheduled."""
        if self.miner_schedule is not None and self.miner is not None:
            value = self.miner_schedule.apply(self.miner, progress)
            self._schedule_stats = {f"miner/schedule/{self.miner_schedule.knob_for(self.miner)}": value}

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Return the scalar loss and a flat dict of statistics (loss, miner and memory counters).

        ``indices`` are the dataset indices of the batch items (needed with a memory).
        """
        indices_tuple = self.miner(embeddings, labels) if self.miner is not None else None
        value = self.loss(embeddings, labels, indices_tuple=indices_tuple)
        stats = self._collect("")
        stats.update(self._schedule_stats)
        if self.memory is not None:
            if indices is None:
                raise ConfigError("a cross-batch memory needs the dataset indices of the batch")
            value = value + self._memory_term(embeddings, labels, indices, stats)
        return value, stats

    def _memory_term(
        self, embeddings: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, stats: dict[str, float]
    ) -> torch.Tensor:
        memory = self.memory
        assert memory is not None
        iteration = int(memory.iteration)
        memory.iteration += 1
        term = embeddings.new_zeros(())
        batch_negatives = _valid_negatives({k.removeprefix("loss/"): v for k, v in stats.items()})
        stats["xbm/valid_neg_pairs_batch"] = batch_negatives if batch_negatives is not None else float("nan")
        if iteration < self.memory_start:
            stats["xbm/active"] = 0.0
            return term
        stats["xbm/active"] = 1.0
        if len(memory) > 0:
            ref_emb, ref_labels, ref_indices = memory.contents()
            ref_emb = ref_emb.to(embeddings.dtype)
            own_copy = indices[:, None] == ref_indices[None, :]
            refs = {"ref_emb": ref_emb, "ref_labels": ref_labels}
            mined = None
            if self.miner is not None:
                if self._miner_takes_exclude:
                    mined = self.miner(embeddings, labels, **refs, ref_exclude=own_copy)
                else:
                    mined = drop_excluded(self.miner(embeddings, labels, **refs), own_copy)
            if self._loss_takes_exclude:
                # the regularizers already counted once, on the batch term (as PML's one-call XBM)
                with without_regularization(self.loss):
                    term = self.loss(embeddings, labels, indices_tuple=mined, **refs, ref_exclude=own_copy)
            else:
                if mined is None:
                    mined = all_pairs(labels, ref_labels, own_copy)
                term = self.loss(embeddings, labels, indices_tuple=mined, **refs)
            memory_stats = self._collect("xbm/")
            stats.update(memory_stats)
            memory_negatives = _valid_negatives(
                {k.removeprefix("xbm/loss/"): v for k, v in memory_stats.items()}
            )
            stats["xbm/valid_neg_pairs_memory"] = (
                memory_negatives if memory_negatives is not None else float("nan")
            )
        stats["xbm/fill"] = float(len(memory))
        if torch.isfinite(embeddings).all():  # a non-finite batch (to be skipped) must not poison the memory
            # the step gathered every rank's batch already (dmlkit.distributed): every rank enqueues the
            # same global batch, so the memories stay identical
            memory.enqueue(embeddings.detach(), labels, indices)
        return self.memory_weight * term

    def _collect(self, prefix: str) -> dict[str, float]:
        """The last call's statistics of a dmlkit loss and miner (foreign modules report none)."""
        out: dict[str, float] = {}
        for name, module, reports in (
            ("loss", self.loss, self._loss_takes_exclude),
            ("miner", self.miner, self._miner_takes_exclude),
        ):
            if reports:
                out.update({f"{prefix}{name}/{key}": float(val) for key, val in module.last_stats.items()})
        return out


def _miner_args(name: str, args: dict[str, Any], loss: nn.Module) -> dict[str, Any]:
    """The miner's arguments, with its loss's triplet margin as its ``margin`` where the miner mines by its
    loss's margin (Roth's ``semihard``: ``triplet`` + ``semihard`` is one margin, 0.05 by default, not
    the loss's 0.05 and the miner's 0.2) and the config gives it none."""
    margin_attribute = loss.triplet_margin if isinstance(loss, losses.BaseLoss) else None
    if margin_attribute is None or "margin" in args or not miners.REGISTRY.get(name).takes_loss_margin:
        return dict(args)
    return {**args, "margin": float(getattr(loss, margin_attribute))}


def build_objective(
    config: TrainConfig,
    num_classes: int,
    embedding_size: int,
    train_size: int | None = None,
    device: torch.device | str | None = None,
) -> Objective:
    """Loss, miner and memory from the config (``num_classes``/``embedding_size`` to losses needing them).

    The memory is allocated on ``device`` (default: the CPU), after a check that it fits there.
    """
    objective, memory_config = config.objective, config.memory
    loss_spec = objective.loss
    if foreign.is_foreign(loss_spec.name):  # another library's loss: ``pml:ContrastiveLoss``
        loss = foreign.build(
            loss_spec.name, loss_spec.args, "loss", num_classes=num_classes, embedding_size=embedding_size
        )
    else:
        needs = losses.REGISTRY.get(loss_spec.name).needs
        kwargs = dict(loss_spec.args)
        if "num_classes" in needs:
            kwargs.setdefault("num_classes", num_classes)
        if "embedding_size" in needs:
            kwargs.setdefault("embedding_size", embedding_size)
        loss = losses.build(loss_spec.name, **kwargs)
        check_trainable(loss)  # reduction do_nothing returns per-element losses: nothing to minimise
    miner_spec = objective.miner
    miner = None
    if miner_spec is not None:
        if foreign.is_foreign(miner_spec.name):
            miner = foreign.build(miner_spec.name, miner_spec.args, "miner")
        else:
            miner = miners.build(miner_spec.name, **_miner_args(miner_spec.name, miner_spec.args, loss))
    memory = None
    if memory_config.xbm_size is not None:
        if train_size is None:
            raise ConfigError("a cross-batch memory sized as a ratio needs the training-set size")
        memory = build_memory(
            memory_config.xbm_size, train_size, embedding_size, memory_config.xbm_dtype, device
        )
    schedule = (
        miners.check_schedule(miner_spec.name, objective.miner_schedule)
        if miner_spec is not None and objective.miner_schedule is not None
        else None
    )
    return Objective(loss, miner, memory, memory_config.xbm_weight, memory_config.xbm_start, schedule)
