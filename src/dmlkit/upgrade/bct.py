"""Backward-compatible training (BCT; Shen, Xiong, Xia, Soatto, "Towards Backward-Compatible Representation
Learning", CVPR 2020).

The new model φ_new is trained with its own objective plus an *influence loss*: its embeddings must be
classified correctly by the old model's frozen classifier, which ties them to the old embedding space so
that new-model queries can search an old-model gallery (no backfilling):

    L = L_new(φ_new) + λ · L_influence,
    L_influence = (1/B) Σ_i −log softmax_c( s · ⟨φ̂_new(x_i), ŵ_c⟩ )[y_i]                (1)

with ``ŵ_c`` the old classifier's L2-normalised row of class ``c``, ``φ̂`` the L2-normalised embedding and
``s`` a scale (``scale``, default 16). BCT itself uses the old *linear* classifier's logits ``W_old φ_new``;
most metric-learning models have no classifier, so dmlkit uses cosine logits with a scale — the standard
normalised-softmax form (NormFace), whose logits have the bounded range a classifier built from prototypes
needs. For classes the old classifier never saw (and, without an old classifier, for every class), BCT
*synthesises* the classifier row as the mean old-model embedding of the class's images
(:func:`class_prototypes`). The influence loss needs ``d_new == d_old``.

A classifier the user has (e.g. an old softmax/proxy loss's weights, ``[C, d]`` rows in the training split's
class-code order) is passed as the same ``classifier`` argument instead of the prototypes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dmlkit.errors import ConfigError, DataError
from dmlkit.train.objective import Objective
from dmlkit.train.step import Batch, EmbeddingStep, StepFactory

DEFAULT_SCALE = 16.0


def class_prototypes(embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[C, d]``: row ``c`` = normalize(mean of ``embeddings[labels == c]``) (BCT's synthesised classifier).

    ``embeddings`` are the old model's (``[N, d]``; pass them L2-normalised for a cosine-metric model, as
    dmlkit models output them), ``labels`` int class codes in ``0 … num_classes − 1``. A class without any
    item, or a code out of range, raises ``DataError`` naming it. Computed in float32 by one ``index_add``.
    """
    if embeddings.dim() != 2 or labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
        raise DataError(
            f"prototypes need [N, d] embeddings and N labels, got shapes {tuple(embeddings.shape)} and "
            f"{tuple(labels.shape)}"
        )
    if num_classes < 1:
        raise ConfigError(f"num_classes must be at least 1, got {num_classes}")
    labels = labels.to(device=embeddings.device, dtype=torch.long)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)][0]
        raise DataError(f"class code {int(bad)} is outside 0 … {num_classes - 1}")
    counts = torch.bincount(labels, minlength=num_classes)
    empty = torch.nonzero(counts == 0).flatten()
    if empty.numel():
        more = f" (and {empty.numel() - 1} more)" if empty.numel() > 1 else ""
        raise DataError(f"class code {int(empty[0])} has no item: no prototype for it{more}")
    sums = embeddings.new_zeros(num_classes, embeddings.shape[1], dtype=torch.float32)
    sums.index_add_(0, labels, embeddings.float())
    # normalize(sum) == normalize(mean): the division by the count is skipped
    return F.normalize(sums, dim=1)


def influence_loss(
    new_embeddings: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor, scale: float = DEFAULT_SCALE
) -> torch.Tensor:
    """Eq. (1): cross-entropy of ``scale · normalize(new) @ normalize(classifier).T`` against ``labels``.

    ``classifier`` is ``[C, d_old]`` (prototypes or an old classifier's weights; frozen by the caller).
    ``ConfigError`` when ``d_new != d_old`` (naming both), ``DataError`` for a label without a row.
    """
    if classifier.dim() != 2:
        raise ConfigError(f"the old classifier must be [C, d], got shape {tuple(classifier.shape)}")
    d_new, d_old = new_embeddings.shape[-1], classifier.shape[1]
    if d_new != d_old:
        raise ConfigError(
            f"BCT needs the new embedding size to equal the old one: the new model embeds in {d_new} "
            f"dimensions, the old classifier/prototypes in {d_old}"
        )
    if labels.numel() and int(labels.max()) >= classifier.shape[0]:
        raise DataError(
            f"class code {int(labels.max())} has no row in the old classifier ({classifier.shape[0]} classes)"
        )
    logits = scale * F.normalize(new_embeddings.float(), dim=1) @ F.normalize(classifier.float(), dim=1).T
    return F.cross_entropy(logits, labels)


def _check_options(weight: float, scale: float) -> None:
    if not weight >= 0:
        raise ConfigError(f"the BCT influence weight must be >= 0, got {weight}")
    if not scale > 0:
        raise ConfigError(f"the BCT scale must be > 0, got {scale}")


class BCTStep(EmbeddingStep):
    """The default step plus ``weight`` × the influence loss (1): ``objective(φ_new) + λ · L_influence``.

    ``classifier`` (``[C, d]``) is a buffer: saved with the step's ``state_dict`` (so a checkpoint holds it
    and a resumed run continues with the same one) and moved with the step. Stats: the objective's plus
    ``influence`` (the unweighted influence loss). Any configured dmlkit objective combines with it.
    """

    classifier: torch.Tensor

    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        device: torch.device,
        amp: str,
        *,
        classifier: torch.Tensor,
        weight: float = 1.0,
        scale: float = DEFAULT_SCALE,
    ) -> None:
        super().__init__(model, objective, device, amp)
        _check_options(weight, scale)
        if classifier.dim() != 2:
            raise ConfigError(f"the old classifier must be [C, d], got shape {tuple(classifier.shape)}")
        d_new = getattr(model, "embedding_size", None)
        if isinstance(d_new, int) and d_new != classifier.shape[1]:
            raise ConfigError(
                f"BCT needs the new embedding size to equal the old one: the new model embeds in {d_new} "
                f"dimensions, the old classifier/prototypes in {classifier.shape[1]}"
            )
        self.weight = float(weight)
        self.scale = float(scale)
        self.register_buffer("classifier", classifier.detach().float().clone().to(device))

    def loss(
        self, embeddings: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, batch: Batch
    ) -> tuple[torch.Tensor, dict[str, float]]:
        value, stats = super().loss(embeddings, labels, indices, batch)
        influence = influence_loss(embeddings, labels, self.classifier, self.scale)
        return value + self.weight * influence, {**stats, "influence": float(influence.detach())}


def bct_step(classifier: torch.Tensor, weight: float = 1.0, scale: float = DEFAULT_SCALE) -> StepFactory:
    """A :data:`~dmlkit.train.step.StepFactory` of :class:`BCTStep` for ``Trainer(config, step=...)``.

    Options are checked here, before the trainer builds anything.
    """
    _check_options(weight, scale)
    if classifier.dim() != 2:
        raise ConfigError(f"the old classifier must be [C, d], got shape {tuple(classifier.shape)}")

    def factory(model: nn.Module, objective: Objective, device: torch.device, amp: str) -> BCTStep:
        return BCTStep(model, objective, device, amp, classifier=classifier, weight=weight, scale=scale)

    return factory


__all__ = ["DEFAULT_SCALE", "BCTStep", "bct_step", "class_prototypes", "influence_loss"]
