"""Losses on two augmented views of the same images (self-supervised learning, ``dmlkit train --ssl``):
PML's ``SelfSupervisedLoss`` wrapper (``self_supervised``) and ``VICRegLoss`` (``vicreg``).

A two-view loss (:class:`TwoViewLoss`) is called in either of two ways:

- ``loss(view_a, ref_emb=view_b)``: PML's ``loss(embeddings, ref_emb)``; row ``i`` of both is a view of
  image ``i``;
- ``loss(embeddings, labels)``: the trainer's call. The rows hold both views of every image and ``labels``
  pair them: each label occurs exactly twice, its first row is view A and its second view B
  (:func:`two_views`). ``dmlkit train --ssl`` batches are ``[A; B]`` with labels ``[i; i]``
  (:mod:`dmlkit.data.views`).

Neither takes a miner's output nor a cross-batch memory: the positives are fixed (the other view), and
``ref_emb`` is the second view here, not a reference set (``accepts_ref`` is False, so the configuration
refuses ``--xbm-size`` for them). A pair loss run directly on ``--ssl`` batches takes both (``--loss
ntxent --miner ...``): that is what ``self_supervised``'s symmetric form computes anyway.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from dmlkit.distances import full_precision, upcast
from dmlkit.errors import ConfigError, DataError, UnknownNameError, unknown_name_message
from dmlkit.losses.base import REGISTRY, BaseLoss, Loss, register
from dmlkit.tuples import IndicesTuple, check_batch

#: Keys of the mapping form of ``self_supervised``'s ``loss``.
WRAPPED_KEYS: tuple[str, ...] = ("name", "args")


def two_views(
    embeddings: torch.Tensor, labels: torch.Tensor | None, ref_emb: torch.Tensor | None, who: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)``: the two views, row ``i`` of each a view of image ``i``.

    With ``ref_emb``: ``(embeddings, ref_emb)``, which must have the same shape. Else from ``labels``, each
    of which must occur exactly twice: its first row goes to ``A``, its second to ``B``, pairs ordered by
    label (a stable sort, so no loop over pairs; the losses here are invariant to the order of the pairs).
    """
    if ref_emb is not None:
        if labels is not None:
            raise ConfigError(
                f"loss '{who}': give the second view as ref_emb, or one tensor of both views with labels "
                "pairing its rows, not both"
            )
        if not isinstance(embeddings, torch.Tensor) or embeddings.ndim != 2:
            shape = tuple(embeddings.shape) if isinstance(embeddings, torch.Tensor) else type(embeddings)
            raise DataError(f"{who}: embeddings must be a 2-D (batch, dim) tensor, got {shape}")
        if not isinstance(ref_emb, torch.Tensor) or ref_emb.shape != embeddings.shape:
            shape = tuple(ref_emb.shape) if isinstance(ref_emb, torch.Tensor) else type(ref_emb).__name__
            raise DataError(
                f"{who}: ref_emb (the second view) must have the embeddings' shape "
                f"{tuple(embeddings.shape)}, got {shape}"
            )
        return embeddings, ref_emb
    if labels is None:
        raise ConfigError(
            f"loss '{who}' compares two views of each image: pass the second view as ref_emb=..., or both "
            "views in one tensor with labels pairing its rows (each label exactly twice)"
        )
    embeddings, labels, _, _ = check_batch(embeddings, labels, None, None, who)
    order = torch.argsort(labels, stable=True)
    ranked = labels[order]
    count = len(labels)
    # paired ⟺ sorted labels come in equal twos and neighbouring twos differ
    paired = (
        count > 0
        and count % 2 == 0
        and bool((ranked[0::2] == ranked[1::2]).all() & (ranked[2::2] != ranked[1:-1:2]).all())
    )
    if not paired:
        values, counts = torch.unique(labels, return_counts=True)
        odd = (counts != 2).nonzero()
        culprit = (
            f"label {int(values[odd[0, 0]])} occurs {int(counts[odd[0, 0]])} time(s)" if len(odd) else "none"
        )
        raise DataError(
            f"{who}: labels must pair the rows into two views of each image (every label exactly twice, as "
            f"`dmlkit train --ssl` batches are); {culprit}"
        )
    return embeddings[order[0::2]], embeddings[order[1::2]]


class TwoViewLoss(BaseLoss):
    """Base of the losses on two views (see the module docstring): :meth:`forward` finds the views,
    :meth:`views_loss` computes the loss of ``(A, B)``, in float32 at least with autocast off."""

    tuple_kinds: ClassVar[frozenset[str]] = frozenset()
    #: ``ref_emb`` is the second view, not a reference set: no cross-batch memory.
    accepts_ref: ClassVar[bool] = False
    takes_shared_options: ClassVar[bool] = False

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor | None = None,
        indices_tuple: IndicesTuple | None = None,
        ref_emb: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
        ref_exclude: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The loss of the two views of ``embeddings`` (see :func:`two_views`). ``indices_tuple``,
        ``ref_labels`` and ``ref_exclude`` are refused: the positives are the views' pairing."""
        if indices_tuple is not None:
            raise ConfigError(
                f"loss '{self.who}' takes no miner output: each row's positive is the other view of its image"
            )
        if ref_labels is not None or ref_exclude is not None:
            given = "ref_labels" if ref_labels is not None else "ref_exclude"
            raise ConfigError(
                f"loss '{self.who}' takes no {given}: ref_emb is the second view, paired with the embeddings "
                "row by row"
            )
        view_a, view_b = two_views(embeddings, labels, ref_emb, self.who)
        self._stats = {}
        with full_precision(view_a):
            view_a, view_b = upcast(view_a), upcast(view_b)
            if view_a.dtype != view_b.dtype:
                dtype = torch.promote_types(view_a.dtype, view_b.dtype)
                view_a, view_b = view_a.to(dtype), view_b.to(dtype)
            return self.views_loss(view_a, view_b)

    def views_loss(self, view_a: torch.Tensor, view_b: torch.Tensor) -> torch.Tensor:
        """The loss of views ``A`` and ``B`` (``n × d`` each, row ``i`` of both from image ``i``)."""
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------- wrapper


def _wrapped_spec(spec: object) -> tuple[str, dict[str, Any]]:
    """``(name, args)`` of a wrapped loss given as a name or ``{name, args}``."""
    if isinstance(spec, str):
        return spec, {}
    if not isinstance(spec, Mapping):
        raise ConfigError(
            "self_supervised: loss must be a loss name, {name: ..., args: {...}} or a loss module, got "
            f"{type(spec).__name__}"
        )
    for key in spec:
        if key not in WRAPPED_KEYS:
            what = "key of self_supervised: loss"
            raise UnknownNameError(unknown_name_message(what, str(key), WRAPPED_KEYS))
    name, args = spec.get("name"), spec.get("args") or {}
    if not isinstance(name, str):
        raise ConfigError(f"self_supervised: loss needs a 'name' (a registered loss), got {dict(spec)}")
    if not isinstance(args, Mapping):
        raise ConfigError(f"self_supervised: loss '{name}': args must be a mapping, got {args!r}")
    return name, dict(args)


def _check_wrappable(name: str, needs: frozenset[str], accepts_ref: bool) -> None:
    """``ConfigError`` unless loss ``name`` can compare views by index: it needs no class count or
    embedding size (class proxies or weights, which views of unlabelled images have no classes for) and
    takes a reference set (the second view, in the non-symmetric form)."""
    if needs:
        hint = " (to combine losses, put self_supervised members inside 'multiple')" * (name == "multiple")
        raise ConfigError(
            f"self_supervised cannot wrap loss '{name}': it needs {', '.join(sorted(needs))} (class proxies "
            "or weights), and two views of an image have no classes beyond the image itself; wrap a pair "
            f"loss (ntxent, supcon, contrastive, triplet, multisimilarity, ...){hint}"
        )
    if not accepts_ref:
        raise ConfigError(
            f"self_supervised cannot wrap loss '{name}': it takes no reference set (ref_emb), which the "
            "wrapper's second view is; wrap a pair loss (ntxent, supcon, contrastive, triplet, ...)"
        )


def check_wrapped(spec: object) -> None:
    """Validate ``self_supervised``'s ``loss`` without building it: a registered loss name (or ``{name,
    args}``) with valid arguments, which :func:`_check_wrappable` accepts."""
    if isinstance(spec, nn.Module):
        return
    name, args = _wrapped_spec(spec)
    REGISTRY.check_kwargs(name, args)
    cls: type[BaseLoss] = REGISTRY.get(name)  # type: ignore[assignment]
    _check_wrappable(name, cls.needs, cls.capabilities(args)[1])


@register("self_supervised")
class SelfSupervisedLoss(TwoViewLoss):
    """Any pair loss on two views, positives by index (PML ``SelfSupervisedLoss``, after its issue #411).

    With ``n`` images, views ``A`` and ``B`` and ``y = (0, 1, …, n−1)``:

    - ``symmetric=True`` (PML's default): ``L(cat(A, B), cat(y, y))``, the wrapped loss on all ``2n`` views,
      each one's positive its other view (SimCLR's batch with ``ntxent``);
    - ``symmetric=False``: ``L(A, y, ref_emb=B, ref_labels=y)``, each view of ``A`` against the views of
      ``B`` only.

    ``loss`` is a registered loss name, ``{name: ..., args: {...}}`` (so the configuration fits in
    ``--loss-args``) or a loss module (Python); default ``ntxent``. A dmlkit loss must take a reference set
    and need no class count (pair losses: ``ntxent``, ``supcon``, ``contrastive``, ``triplet``, ...); proxy
    and classification losses are refused with a ``ConfigError``. A foreign module (a PML loss) is called as
    ``loss(embeddings, labels)`` / ``loss(embeddings, labels, ref_emb=..., ref_labels=...)``.

    ``last_stats`` are the wrapped loss's.
    """

    @classmethod
    def capabilities(cls, args: Mapping[str, Any]) -> tuple[frozenset[str], bool]:
        """The class's attributes, after checking the wrapped loss (:func:`check_wrapped`)."""
        check_wrapped(args.get("loss", "ntxent"))
        return cls.tuple_kinds, cls.accepts_ref

    def configure(self, loss: str | Mapping[str, Any] | nn.Module = "ntxent", symmetric: bool = True) -> None:
        if isinstance(loss, nn.Module):
            if isinstance(loss, Loss):  # a dmlkit loss: the same rules as a named one
                _check_wrappable(getattr(loss, "who", type(loss).__name__), loss.needs, loss.accepts_ref)
            self.loss = loss
        else:
            check_wrapped(loss)
            name, args = _wrapped_spec(loss)
            self.loss = REGISTRY.build(name, **args)
        self.symmetric = bool(symmetric)

    def views_loss(self, view_a: torch.Tensor, view_b: torch.Tensor) -> torch.Tensor:
        labels = torch.arange(len(view_a), device=view_a.device)
        if self.symmetric:
            value = self.loss(torch.cat([view_a, view_b]), torch.cat([labels, labels]))
        else:
            value = self.loss(view_a, labels, ref_emb=view_b, ref_labels=labels.clone())
        return value  # type: ignore[no-any-return]

    @property
    def last_stats(self) -> dict[str, float]:
        """The wrapped loss's statistics of the last call (none for a foreign module)."""
        return dict(self.loss.last_stats) if isinstance(self.loss, Loss) else {}

    def extra_repr(self) -> str:
        return f"symmetric={self.symmetric}"


# ---------------------------------------------------------------------------------------------- VICReg


@register("vicreg")
class VICRegLoss(TwoViewLoss):
    """VICReg: variance-invariance-covariance regularisation (Bardes, Ponce & LeCun, ICLR 2022; PML
    ``VICRegLoss``).

    For views ``Z = A``, ``Z' = B`` (``n × d``, not normalised)::

        L = λ · s(Z, Z') + μ · [v(Z) + v(Z')] + ν · [c(Z) + c(Z')]
        s(Z, Z') = 1/n Σᵢ 1/d Σⱼ (zᵢⱼ − z'ᵢⱼ)²                        (invariance)
        v(Z)     = 1/d Σⱼ max(0, 1 − √(Var(z·ⱼ) + ε)) / 2               (variance; Var with n − 1)
        c(Z)     = 1/d Σ_{j≠k} C(Z)ⱼₖ²,  C(Z) = (Z − Z̄)ᵀ(Z − Z̄) / (n − 1)  (covariance)

    with PML's defaults ``λ = invariance_lambda = 25``, ``μ = variance_mu = 25``, ``ν = covariance_v = 1``,
    ``ε = eps = 1e-4``. The ``/ 2`` of the variance term is PML's (the two views' hinges averaged), so
    ``μ`` means what PML's does. The reduction is PML's default (``mean``); there is no distance. Needs at
    least 2 pairs (a variance over one sample is undefined). Statistics: ``invariance_loss``,
    ``variance_loss1``, ``variance_loss2``, ``covariance_loss`` (weighted, PML's sub-loss names).
    """

    def configure(
        self,
        invariance_lambda: float = 25.0,
        variance_mu: float = 25.0,
        covariance_v: float = 1.0,
        eps: float = 1e-4,
    ) -> None:
        weights = {"invariance_lambda": invariance_lambda, "variance_mu": variance_mu}
        for key, value in {**weights, "covariance_v": covariance_v}.items():
            if not value >= 0:
                raise ConfigError(f"loss 'vicreg': {key} must be ≥ 0, got {value}")
        if not eps > 0:  # √(Var + ε) has an infinite gradient at Var = 0 without it
            raise ConfigError(f"loss 'vicreg': eps must be > 0, got {eps}")
        self.invariance_lambda = float(invariance_lambda)
        self.variance_mu = float(variance_mu)
        self.covariance_v = float(covariance_v)
        self.eps = float(eps)

    def views_loss(self, view_a: torch.Tensor, view_b: torch.Tensor) -> torch.Tensor:
        if len(view_a) < 2:
            raise DataError(
                f"loss 'vicreg' needs at least 2 pairs of views (its variance and covariance are over the "
                f"batch), got {len(view_a)}"
            )
        invariance = self.invariance_lambda * (view_a - view_b).pow(2).mean(dim=1).mean()
        variance_a, variance_b = (self.variance_mu * self._variance(view).mean() for view in (view_a, view_b))
        covariance = self.covariance_v * (self._covariance(view_a) + self._covariance(view_b))
        self.record(
            invariance_loss=invariance,
            variance_loss1=variance_a,
            variance_loss2=variance_b,
            covariance_loss=covariance,
        )
        return invariance + variance_a + variance_b + covariance

    def _variance(self, view: torch.Tensor) -> torch.Tensor:
        """Per dimension ``max(0, 1 − √(Var + ε)) / 2``."""
        return F.relu(1.0 - torch.sqrt(view.var(dim=0) + self.eps)) / 2

    @staticmethod
    def _covariance(view: torch.Tensor) -> torch.Tensor:
        """``1/d Σ_{j≠k} C_jk²`` of the ``d × d`` covariance of ``view`` (off-diagonal entries masked rather
        than the diagonal subtracted: no cancellation when the variances dominate)."""
        n, d = view.shape
        centred = view - view.mean(dim=0)
        covariance = centred.T @ centred / (n - 1)
        diagonal = torch.eye(d, dtype=torch.bool, device=view.device)
        return covariance.masked_fill(diagonal, 0.0).pow(2).sum() / d

    def extra_repr(self) -> str:
        return (
            f"invariance_lambda={self.invariance_lambda}, variance_mu={self.variance_mu}, "
            f"covariance_v={self.covariance_v}, eps={self.eps}"
        )


__all__ = ["SelfSupervisedLoss", "TwoViewLoss", "VICRegLoss", "check_wrapped", "two_views"]
