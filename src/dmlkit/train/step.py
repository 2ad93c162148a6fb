"""The training step: what one batch contributes to the loss. The loop around it never changes.

The loop hands a :class:`Batch` to the step and gets a :class:`StepOutput` back (a scalar loss, float
statistics for the logs, and the batch's embeddings); the loop then does everything every step shares:
the non-finite checks (embeddings, loss, gradient: a step failing one is skipped), ``backward`` with
gradient scaling, clipping, the optimizer and the schedule. With ``accumulate`` N the step still sees one
batch at a time; the loop back-propagates each loss divided by N and updates after every N batches.

The default :class:`EmbeddingStep` is embed → gather → objective (memory, miner, loss). A feature that
needs a different step subclasses it or writes a new one and passes its factory to
:class:`~dmlkit.train.loop.Trainer` (``step=``):

- gathering the embeddings of every process (multi-GPU, ``torchrun``) is :meth:`EmbeddingStep.gather`,
  which every step derived from it inherits;
- backward-compatible training adds a frozen old model's term in :meth:`EmbeddingStep.loss`;
- transformation training embeds with a frozen model and trains a head (:meth:`EmbeddingStep.embed`).

Modules the step trains besides the model and the objective are its own ``nn.Module`` attributes:
:meth:`TrainingStep.extra_parameters` gives them to the optimizer, and they are saved with the step's
``state_dict``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from dmlkit import distributed
from dmlkit.inference import autocast
from dmlkit.train.objective import Objective


@dataclass
class Batch:
    """One training batch on the training device: images, int64 labels and int64 dataset indices."""

    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor


@dataclass
class StepOutput:
    """What a step returns: the scalar loss to minimise, statistics (plain floats, logged as epoch means),
    and the embeddings with the labels and dataset indices they belong to (detached; the loop checks them
    for non-finite values, since a loss may mask those, and samplers that choose batches from embeddings
    receive them)."""

    loss: torch.Tensor
    stats: dict[str, float]
    embeddings: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor


@runtime_checkable
class TrainingStep(Protocol):
    """A replaceable training step (see the module docstring)."""

    def __call__(self, batch: Batch) -> StepOutput: ...

    def set_progress(self, progress: float) -> None:
        """How far training is, 0 → 1 (annealed hyperparameters follow it)."""

    def extra_parameters(self) -> Iterator[nn.Parameter]:
        """Trainable parameters owned by the step itself (not the model's, not the objective's)."""

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> object: ...


class EmbeddingStep(nn.Module):
    """The default step: ``embed`` → ``gather`` → ``loss`` (the objective), each overridable.

    ``model`` and ``objective`` are owned by the trainer (they have their own checkpoint entries); the
    step keeps references to them outside its ``state_dict``.
    """

    def __init__(self, model: nn.Module, objective: Objective, device: torch.device, amp: str) -> None:
        super().__init__()
        self._parts = (model, objective)  # a tuple: not registered as submodules, not in state_dict
        self.device = device
        self.amp = amp

    @property
    def model(self) -> nn.Module:
        return self._parts[0]

    @property
    def objective(self) -> Objective:
        return self._parts[1]  # type: ignore[return-value]

    def forward(self, batch: Batch) -> StepOutput:
        embeddings = self.embed(batch)
        embeddings, labels, indices = self.gather(embeddings, batch.labels, batch.indices)
        loss, stats = self.loss(embeddings, labels, indices, batch)
        return StepOutput(loss, stats, embeddings.detach(), labels, indices)

    def embed(self, batch: Batch) -> torch.Tensor:
        """The model's embeddings of the batch (under the configured mixed precision)."""
        with autocast(self.device, self.amp):
            return self.model(batch.images)  # type: ignore[no-any-return]

    def gather(
        self, embeddings: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The embeddings the loss sees: the global batch. With several processes every rank's rows are
        gathered in rank order, with autograd (:func:`dmlkit.distributed.gather_rows`); in one process the
        batch itself."""
        return distributed.gather_rows(embeddings, labels, indices)  # type: ignore[return-value]

    def loss(
        self, embeddings: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, batch: Batch
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The objective in float32 (similarity exponentials overflow or lose precision in half precision)."""
        return self.objective(embeddings.float(), labels, indices)

    def set_progress(self, progress: float) -> None:
        self.objective.set_progress(progress)

    def extra_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.parameters() if p.requires_grad)


#: Builds a step from the trainer's model, objective, device and mixed-precision mode. With ``compile`` the
#: model is the ``torch.compile`` wrapper of the trainer's model (same parameters), which the step trains.
StepFactory = Callable[[nn.Module, Objective, torch.device, str], TrainingStep]
