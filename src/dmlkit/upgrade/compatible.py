"""Metric-compatible training (after Seo et al., "Metric Compatible Training for Online Backfilling in
Large-Scale Retrieval", arXiv 2301.03767).

During backfilling a query is ranked against two gallery parts at once: new-space items by z = ψ(φ_new(q))
and old-space items by r = ρ(φ_new(q)) (the reverse transformation, :mod:`dmlkit.upgrade.transform`); the
two top-k lists are merged by distance (:mod:`dmlkit.upgrade.rank_merge`). Merging by distance is only
right when a similarity means the same in both spaces. The paper calibrates them with a *cross-model
contrastive loss*; its exact equations are not available to us, so dmlkit implements this formulation:

For a batch of B items with labels y:

    z_i = normalize(ψ(φ_new(x_i)))      ψ: identity, or a learnable new-space head (``new_head``)
    r_i = normalize(ρ(φ_new(x_i)))      ρ: the reverse transformation (learnable)
    o_i = normalize(φ_old(x_i))         the old model (frozen)

The candidates of anchor i are the new-space items z_c, c ≠ i (similarity s = z_i·z_c) and the old-space
items o_c for every c, its own o_i included (similarity s = r_i·o_c): 2B − 1 candidates, scored by **one
softmax**:

    L_i = −(1/|P_i|) Σ_{p∈P_i} log( exp(s_ip/τ) / Σ_{a∈P_i ∪ N_i} exp(s_ia/τ) )

with P_i the candidates labelled y_i (never empty: o_i is one) and N_i the others — all of them, or with
``hard_negatives`` = k only the k most similar to the anchor over both spaces (mining; the selection is not
differentiated). The loss is ``(1/B) Σ_i L_i`` (:func:`cross_model_contrastive_loss`). Because old-space and
new-space similarities compete in the same denominator, a positive must outscore every negative *of either
space*: the two similarity scales are pulled onto one, which is what merging two top-k lists by distance
needs. :func:`compatible_loss` adds ``regression_weight`` × (1/B) Σ_i (1 − r_i·o_i), which anchors ρ to
the old model itself (as in :func:`~dmlkit.upgrade.transform.transform_loss`).

How this differs from the paper (as far as its summary tells): the positives are averaged outside the log
(SupCon's form) over both spaces; the regression term and the top-k negative mining are dmlkit's choices;
ψ is a residual MLP initialised to the identity (it starts from the new model's own metric rather than from
a random map); the ``after`` mode (new model already trained) is dmlkit's addition for upgrades where the new
model cannot be retrained.

Two modes:

- **joint** (:class:`CompatibleStep`, :func:`compatible_step`): the new model trains with its configured
  objective on its *raw* embeddings φ_new (the embeddings the trainer evaluates, selects and saves) plus
  ``weight`` × :func:`compatible_loss`; ρ and ψ are the step's modules (trained through
  ``extra_parameters``, saved in its ``state_dict`` under ``heads.``); the old model is a
  :class:`~dmlkit.upgrade.frozen.FrozenEncoder`. With the default ψ = identity the served new-space
  embedding is φ_new itself; with ``new_head=True`` it is ψ(φ_new), from the saved heads.
- **after** (:func:`train_compatible_after`): both models frozen; ρ and ψ are trained on precomputed
  features (:func:`~dmlkit.upgrade.transform.fit_features`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dmlkit.errors import ConfigError, DataError
from dmlkit.inference import autocast
from dmlkit.train.objective import Objective
from dmlkit.train.step import Batch, EmbeddingStep, StepFactory
from dmlkit.upgrade.frozen import FrozenEncoder
from dmlkit.upgrade.transform import (
    ReverseTransform,
    check_features,
    check_temperature,
    fit_features,
    load_module_file,
    load_state,
    save_module_file,
    seeded_module,
    supcon_rows,
)

HEADS_KIND = "compatible_heads"


def _check_options(
    temperature: float, hard_negatives: int | None, regression_weight: float, weight: float = 1.0
) -> None:
    check_temperature(temperature)
    if hard_negatives is not None and (
        not isinstance(hard_negatives, int) or isinstance(hard_negatives, bool) or hard_negatives < 1
    ):
        raise ConfigError(f"hard_negatives must be a positive int or None (all), got {hard_negatives!r}")
    if not regression_weight >= 0:
        raise ConfigError(f"regression_weight must be >= 0, got {regression_weight}")
    if not weight >= 0:
        raise ConfigError(f"the compatibility loss weight must be >= 0, got {weight}")


def cross_model_contrastive_loss(
    z: torch.Tensor,
    r: torch.Tensor,
    o: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 0.1,
    hard_negatives: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The cross-model contrastive loss (module docstring), on a ``B × 2B`` similarity matrix.

    ``z`` ``[B, d_new]`` (ψ(φ_new)), ``r`` ``[B, d_old]`` (ρ(φ_new)), ``o`` ``[B, d_old]`` (φ_old), all
    normalised here; ``labels`` ``[B]``. Stats: ``contrastive`` (the loss), ``positives`` and
    ``negatives`` (mean candidates per anchor in P_i and in the N_i used).
    """
    check_features("z", z, "o", o, labels)
    if r.shape != o.shape:
        raise ConfigError(
            f"ρ outputs {tuple(r.shape)} but the old embeddings are {tuple(o.shape)}: the transform's "
            "output size must equal the old embedding size"
        )
    _check_options(temperature, hard_negatives, 0.0)
    size = z.shape[0]
    z, r, o = (F.normalize(t.float(), dim=1) for t in (z, r, o))
    similarity = torch.cat([z @ z.T, r @ o.T], dim=1)  # columns: new-space c = 0..B−1, old-space c = 0..B−1
    labels = labels.to(z.device)
    same = labels[:, None] == labels[None, :]
    own = torch.eye(size, dtype=torch.bool, device=z.device)
    positives = torch.cat([same & ~own, same], dim=1)  # o_i (own old embedding) is always a positive
    negatives = torch.cat([~same, ~same], dim=1)
    if hard_negatives is not None and hard_negatives < 2 * size:
        # the k most similar negatives per anchor over both spaces; -inf fills rows with fewer than k
        scores = similarity.detach().masked_fill(~negatives, float("-inf"))
        top = scores.topk(hard_negatives, dim=1).indices
        negatives = torch.zeros_like(negatives).scatter_(1, top, True) & negatives
    rows = supcon_rows(similarity / temperature, positives, positives | negatives)
    loss = rows.mean()
    stats = {
        "contrastive": float(loss.detach()),
        "positives": float(positives.sum(dim=1).float().mean()),
        "negatives": float(negatives.sum(dim=1).float().mean()),
    }
    return loss, stats


def compatible_loss(
    z: torch.Tensor,
    r: torch.Tensor,
    o: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 0.1,
    hard_negatives: int | None = None,
    regression_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """:func:`cross_model_contrastive_loss` + ``regression_weight`` × (1/B) Σ_i (1 − r̂_i·ô_i).

    Stats: the contrastive loss's plus ``regression`` (unweighted).
    """
    _check_options(temperature, hard_negatives, regression_weight)
    contrastive, stats = cross_model_contrastive_loss(
        z, r, o, labels, temperature=temperature, hard_negatives=hard_negatives
    )
    regression = (1.0 - F.cosine_similarity(r.float(), o.float(), dim=1, eps=1e-12)).mean()
    stats["regression"] = float(regression.detach())
    return contrastive + regression_weight * regression, stats


class CompatibleHeads(nn.Module):
    """ρ (new → old space, a :class:`~dmlkit.upgrade.transform.ReverseTransform`) and ψ (new-space head:
    identity, or with ``new_head`` a residual MLP ``new_dim → new_dim`` starting as the identity).

    ``forward(new_embeddings) -> (ψ(x), ρ(x))`` (not normalised). Saved with :func:`save_heads`.
    """

    def __init__(
        self,
        new_dim: int,
        old_dim: int,
        *,
        hidden: int = 512,
        depth: int = 2,
        new_head: bool = False,
        layer_norm: bool = False,
    ) -> None:
        super().__init__()
        self.new_dim, self.old_dim = int(new_dim), int(old_dim)
        self.hidden, self.depth = hidden, depth
        self.new_head, self.layer_norm = bool(new_head), bool(layer_norm)
        self.rho = ReverseTransform(new_dim, old_dim, hidden, depth, layer_norm=layer_norm)
        self.psi: nn.Module = (
            ReverseTransform(new_dim, new_dim, hidden, depth, layer_norm=layer_norm, residual=True)
            if new_head
            else nn.Identity()
        )

    def forward(self, new_embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.psi(new_embeddings), self.rho(new_embeddings)

    def new_space(self, new_embeddings: torch.Tensor) -> torch.Tensor:
        """ψ(φ_new): the query/gallery embedding for the new-space part of the gallery."""
        return self.psi(new_embeddings)  # type: ignore[no-any-return]

    def old_space(self, new_embeddings: torch.Tensor) -> torch.Tensor:
        """ρ(φ_new): the query embedding for the old-space part of the gallery."""
        return self.rho(new_embeddings)  # type: ignore[no-any-return]

    def config(self) -> dict[str, Any]:
        """The constructor's arguments (plain values): ``CompatibleHeads(**config())`` rebuilds it."""
        return {
            "new_dim": self.new_dim,
            "old_dim": self.old_dim,
            "hidden": self.hidden,
            "depth": self.depth,
            "new_head": self.new_head,
            "layer_norm": self.layer_norm,
        }


def save_heads(path: str | Path, heads: CompatibleHeads, meta: Mapping[str, Any] | None = None) -> None:
    """Save the heads atomically, in :func:`~dmlkit.upgrade.transform.save_transform`'s format
    (``kind`` ``compatible_heads``)."""
    save_module_file(path, HEADS_KIND, heads.config(), heads, meta or {})


def load_heads(path: str | Path) -> tuple[CompatibleHeads, dict[str, Any]]:
    """``(heads in eval mode on the CPU, meta)``; ``DataError`` naming the file for anything else."""
    what = "compatible heads"
    data = load_module_file(path, HEADS_KIND, what)
    try:
        heads = CompatibleHeads(**data["config"])
    except (TypeError, ConfigError) as exc:
        raise DataError(f"{what} {path} has an invalid config {data['config']}: {exc}") from exc
    load_state(heads, data["state_dict"], path, what)
    return heads.eval(), data["meta"]


class CompatibleStep(EmbeddingStep):
    """Joint mode: ``objective(φ_new) + weight · compatible_loss(ψ(φ_new), ρ(φ_new), φ_old(x), y)``.

    ``old`` is held outside the ``state_dict`` (checkpoints do not store the old model) and moved to
    ``device`` here; ``heads`` are the step's own module (trained, saved, resumed). The compatibility term
    uses this process's batch (its own images for the old model), even when ``gather`` widens the
    objective's batch. Stats: the objective's plus ``compatible`` and ``compatible/<stat>``.
    """

    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        device: torch.device,
        amp: str,
        *,
        old: FrozenEncoder,
        heads: CompatibleHeads,
        weight: float = 1.0,
        temperature: float = 0.1,
        hard_negatives: int | None = None,
        regression_weight: float = 1.0,
    ) -> None:
        super().__init__(model, objective, device, amp)
        _check_options(temperature, hard_negatives, regression_weight, weight)
        d_new = getattr(model, "embedding_size", None)
        if isinstance(d_new, int) and d_new != heads.new_dim:
            raise ConfigError(f"the new model embeds in {d_new} dimensions, the heads expect {heads.new_dim}")
        self._frozen = (old.to(device),)  # a tuple: not a submodule, not in the state_dict
        self.heads = heads
        self.weight, self.temperature = float(weight), float(temperature)
        self.hard_negatives, self.regression_weight = hard_negatives, float(regression_weight)
        self._local: torch.Tensor | None = None

    @property
    def old(self) -> FrozenEncoder:
        return self._frozen[0]

    def embed(self, batch: Batch) -> torch.Tensor:
        # kept for the compatibility term: it pairs with this batch's images, whatever ``gather`` returns
        self._local = super().embed(batch)
        return self._local

    def loss(
        self, embeddings: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, batch: Batch
    ) -> tuple[torch.Tensor, dict[str, float]]:
        value, stats = super().loss(embeddings, labels, indices, batch)
        local, self._local = (self._local if self._local is not None else embeddings), None
        with autocast(self.device, self.amp):
            old = self.old(batch.images)
        old = old.float()
        if old.shape[1] != self.heads.old_dim:
            raise ConfigError(
                f"the old model embeds in {old.shape[1]} dimensions, the heads' ρ outputs "
                f"{self.heads.old_dim}"
            )
        z, r = self.heads(local.float())
        term, term_stats = compatible_loss(
            z,
            r,
            old,
            batch.labels,
            temperature=self.temperature,
            hard_negatives=self.hard_negatives,
            regression_weight=self.regression_weight,
        )
        stats = {**stats, "compatible": float(term.detach())}
        stats.update({f"compatible/{key}": val for key, val in term_stats.items()})
        return value + self.weight * term, stats


def compatible_step(
    old: FrozenEncoder,
    heads: CompatibleHeads,
    weight: float = 1.0,
    temperature: float = 0.1,
    hard_negatives: int | None = None,
    regression_weight: float = 1.0,
) -> StepFactory:
    """A :data:`~dmlkit.train.step.StepFactory` of :class:`CompatibleStep` for ``Trainer(config, step=...)``
    (options checked here, before the trainer builds anything)."""
    _check_options(temperature, hard_negatives, regression_weight, weight)

    def factory(model: nn.Module, objective: Objective, device: torch.device, amp: str) -> CompatibleStep:
        return CompatibleStep(
            model,
            objective,
            device,
            amp,
            old=old,
            heads=heads,
            weight=weight,
            temperature=temperature,
            hard_negatives=hard_negatives,
            regression_weight=regression_weight,
        )

    return factory


def train_compatible_after(
    new_features: torch.Tensor,
    old_features: torch.Tensor,
    labels: torch.Tensor,
    *,
    new_head: bool = False,
    hidden: int = 512,
    depth: int = 2,
    layer_norm: bool = False,
    epochs: int = 30,
    batch_size: int = 256,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    temperature: float = 0.1,
    hard_negatives: int | None = None,
    regression_weight: float = 1.0,
    seed: int = 0,
    samples_per_class: int | None = None,
) -> tuple[CompatibleHeads, list[dict[str, float]]]:
    """After mode: both models frozen; train ρ (and ψ with ``new_head``) on precomputed ``new_features``
    ``[N, d_new]``, ``old_features`` ``[N, d_old]`` and ``labels`` ``[N]`` with :func:`compatible_loss`.
    Batches: a seeded shuffle, or P×K with ``samples_per_class`` K (every anchor then has positives besides
    its own old embedding; on Omniglot it trained worse heads than the shuffle, BENCHMARKS.md). Returns the
    heads (eval mode, on the features' device) and the per-epoch history."""
    check_features("new_features", new_features, "old_features", old_features, labels)
    _check_options(temperature, hard_negatives, regression_weight)
    heads = seeded_module(
        seed,
        lambda: CompatibleHeads(
            new_features.shape[1],
            old_features.shape[1],
            hidden=hidden,
            depth=depth,
            new_head=new_head,
            layer_norm=layer_norm,
        ),
    )

    def loss_fn(
        module: nn.Module, new: torch.Tensor, old: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        z, r = module(new)
        return compatible_loss(
            z,
            r,
            old,
            y,
            temperature=temperature,
            hard_negatives=hard_negatives,
            regression_weight=regression_weight,
        )

    history = fit_features(
        heads,
        loss_fn,
        [new_features.float(), old_features.float(), labels.long()],
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        class_labels=labels,
        samples_per_class=samples_per_class,
        weight_decay=weight_decay,
        seed=seed,
    )
    return heads, history  # type: ignore[return-value]


__all__ = [
    "CompatibleHeads",
    "CompatibleStep",
    "compatible_loss",
    "compatible_step",
    "cross_model_contrastive_loss",
    "load_heads",
    "save_heads",
    "train_compatible_after",
]
