"""Miners that reproduce pytorch-metric-learning's (PML) miners.

Deterministic miners return PML's set of tuples (the order may differ); stochastic ones
(``distance_weighted``, ``uniform_histogram``) draw from PML's distribution. Also home of
:class:`StochasticMiner` and the sampling helpers shared with :mod:`dmlkit.miners.roth_style`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from dmlkit.distances import Euclidean
from dmlkit.errors import ConfigError
from dmlkit.miners.base import BaseMiner, check_choice, check_count, check_number, register
from dmlkit.tuples import Batch, Pairs, Triplets, empty_triplets, masked_pairs

# Bound on the elements of one (positive pairs × reference) block built by triplet miners: the work is
# done in chunks of positive pairs so a 60,000-item reference set does not need gigabytes at once, and
# blocks of ~4 MB stay in cache across the few passes made over each (measured ~1.5x faster than 64 MB).
_CHUNK_ELEMENTS = 1 << 20
# The angle of AngularMiner is measured on the embeddings as passed (PML's pairwise_distance)
_PLAIN_EUCLIDEAN = Euclidean(normalize_embeddings=False)


@register("multisimilarity")
class MultiSimilarityMiner(BaseMiner):
    """Multi-similarity pair mining (Wang et al., CVPR 2019, Sec. 3.3; PML ``MultiSimilarityMiner``).

    With similarities ``S``, keep positive pair ``(i, j)`` if ``S_ij − ε < max_{k∈N_i} S_ik`` and negative
    pair ``(i, k)`` if ``S_ik + ε > min_{j∈P_i} S_ij`` (anchors without negatives keep no positives and
    vice versa). For a distance the inequalities flip: positives with ``d_ij + ε > min_{N_i} d`` and
    negatives with ``d_ik − ε < max_{P_i} d``. Outputs pairs.
    """

    output_kind = "pairs"
    hardness_knob = "epsilon"
    defaults: ClassVar[dict[str, Any]] = {"distance": "cosine"}

    def configure(self, epsilon: float = 0.1) -> None:
        self.epsilon = float(epsilon)

    def mine(self, mat: torch.Tensor, batch: Batch) -> Pairs:
        pos, neg = batch.label_masks()
        inf = torch.inf
        if self.is_similarity:
            hardest_neg = mat.masked_fill(~neg, -inf).amax(dim=1, keepdim=True)
            hardest_pos = mat.masked_fill(~pos, inf).amin(dim=1, keepdim=True)
            hard_pos = pos & (mat - self.epsilon < hardest_neg)
            hard_neg = neg & (mat + self.epsilon > hardest_pos)
        else:
            hardest_neg = mat.masked_fill(~neg, inf).amin(dim=1, keepdim=True)
            hardest_pos = mat.masked_fill(~pos, -inf).amax(dim=1, keepdim=True)
            hard_pos = pos & (mat + self.epsilon > hardest_neg)
            hard_neg = neg & (mat - self.epsilon < hardest_pos)
        return masked_pairs(hard_pos, hard_neg)

    def extra_repr(self) -> str:
        return f"epsilon={self.epsilon}, " + super().extra_repr()


@register("batch_hard")
class BatchHardMiner(BaseMiner):
    """Batch-hard triplet mining (Hermans, Beyer & Leibe, "In Defense of the Triplet Loss for Person
    Re-Identification", 2017; PML ``BatchHardMiner``).

    For every anchor that has a positive and a negative: its farthest positive and its closest negative
    (largest/smallest similarity for ``cosine``/``dot``), giving one triplet per anchor. Candidates whose
    value lies outside ``allowed_pos_range`` / ``allowed_neg_range`` (inclusive ``(low, high)``) are
    ignored. Ties go to the lowest index. Outputs triplets.
    """

    output_kind = "triplets"
    hardness_knob = None

    def configure(
        self,
        allowed_pos_range: tuple[float, float] | None = None,
        allowed_neg_range: tuple[float, float] | None = None,
    ) -> None:
        self.allowed_pos_range = _check_range(allowed_pos_range, "allowed_pos_range")
        self.allowed_neg_range = _check_range(allowed_neg_range, "allowed_neg_range")

    def mine(self, mat: torch.Tensor, batch: Batch) -> Triplets:
        pos, neg = batch.label_masks()
        if self.allowed_pos_range is not None:
            pos &= _in_range(mat, self.allowed_pos_range)
        if self.allowed_neg_range is not None:
            neg &= _in_range(mat, self.allowed_neg_range)
        inf = torch.inf
        if self.is_similarity:
            _, p = mat.masked_fill(~pos, inf).min(dim=1)
            _, n = mat.masked_fill(~neg, -inf).max(dim=1)
        else:
            _, p = mat.masked_fill(~pos, -inf).max(dim=1)
            _, n = mat.masked_fill(~neg, inf).min(dim=1)
        a = torch.nonzero(pos.any(dim=1) & neg.any(dim=1), as_tuple=True)[0]
        return a, p[a], n[a]

    def extra_repr(self) -> str:
        return (
            super().extra_repr()
            + f", allowed_pos_range={self.allowed_pos_range}, allowed_neg_range={self.allowed_neg_range}"
        )


def _check_range(value: tuple[float, float] | None, name: str) -> tuple[float, float] | None:
    if value is None:
        return None
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a (low, high) pair of numbers, got {value!r}") from None
    if low > high:
        raise ConfigError(f"{name} must have low <= high, got {value!r}")
    return low, high


def _in_range(mat: torch.Tensor, bounds: tuple[float, float]) -> torch.Tensor:
    return (mat >= bounds[0]) & (mat <= bounds[1])


# ---------------------------------------------------------------------------------------------- randomness


class StochasticMiner(BaseMiner):
    """A miner that draws random numbers: from torch's global RNG, or from its own generator if ``seed``.

    Without ``seed`` every draw uses torch's global (per-device) RNG, so seeding torch and restoring its
    RNG state on resume (as the trainer does) reproduces the draws. With ``seed``, the miner owns one
    ``torch.Generator`` per device, seeded with ``seed`` on first use; its state is part of
    ``miner.state_dict()`` (module extra state), so a checkpoint of a module holding the miner resumes
    the same stream.
    """

    def shared_options(self, *, seed: int | None = None, **shared: Any) -> None:
        """The miner options plus ``seed`` (an int, or None for torch's global RNG)."""
        super().shared_options(**shared)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ConfigError(f"seed must be an integer or None, got {seed!r}")
        self.seed = seed
        self._generators: dict[str, torch.Generator] = {}
        self._restored: dict[str, torch.Tensor] = {}

    def generator(self, device: torch.device) -> torch.Generator | None:
        """The miner's generator on ``device`` (None: use torch's global RNG)."""
        if self.seed is None:
            return None
        key = str(device)
        gen = self._generators.get(key)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            if key in self._restored:
                gen.set_state(self._restored.pop(key))
            self._generators[key] = gen
        return gen

    def get_extra_state(self) -> dict[str, Any]:
        states = {key: gen.get_state() for key, gen in self._generators.items()}
        return {"seed": self.seed, "generators": {**self._restored, **states}}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("seed") != self.seed:
            raise ConfigError(
                f"miner {self.registry_name!r}: checkpoint was saved with seed={state.get('seed')!r}, "
                f"this miner has seed={self.seed!r}"
            )
        self._generators = {}
        self._restored = dict(state.get("generators", {}))

    def extra_repr(self) -> str:
        return super().extra_repr() + ("" if self.seed is None else f", seed={self.seed}")


def gumbel_argmax(log_weights: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One index per row drawn with probability ∝ ``exp(log_weights)`` (Gumbel-max trick).

    Works in log space, so rows whose weights span hundreds of orders of magnitude (q(d)^-1 in 128
    dimensions) do not underflow. ``-inf`` entries are never drawn; a row of only ``-inf`` returns an
    arbitrary index, so callers must drop such rows. A uniform draw among a mask is
    ``gumbel_argmax(log_mask(mask))``.
    """
    u = torch.rand(log_weights.shape, generator=generator, device=log_weights.device, dtype=torch.float64)
    gumbel = -torch.log(-torch.log(u.clamp_min(torch.finfo(torch.float64).tiny)))
    return (log_weights.to(torch.float64) + gumbel).argmax(dim=1)


def log_mask(mask: torch.Tensor) -> torch.Tensor:
    """0 where ``mask``, ``-inf`` elsewhere (log-weights of a uniform draw among ``mask``)."""
    out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    return out.masked_fill_(~mask, -torch.inf)


def inverse_sphere_log_weights(dist: torch.Tensor, dim: int, lower_cutoff: float) -> torch.Tensor:
    """``log q(d)^-1`` for ``d = max(dist, lower_cutoff)``, with ``q`` the density of the distance between
    two uniform points on the unit sphere in ``dim`` dimensions (Wu et al., *Sampling Matters in Deep
    Embedding Learning*, ICCV 2017, Sec. 4): ``q(d) ∝ d^(n−2) (1 − d²/4)^((n−3)/2)``. Non-finite where
    ``d ≥ 2``.
    """
    d = dist.clamp_min(lower_cutoff)
    n = float(dim)
    return (2.0 - n) * torch.log(d) - ((n - 3.0) / 2.0) * torch.log(1.0 - 0.25 * d.pow(2))


# ---------------------------------------------------------------------------------------------- triplets


def triplets_where(
    mat: torch.Tensor,
    pos: torch.Tensor,
    neg: torch.Tensor,
    keep: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    nan_safe: bool = False,
) -> Triplets:
    """Every triplet ``(a, p, n)`` (``pos[a, p]``, ``neg[a, n]``) with ``keep(a, p, ap, an)`` true.

    ``keep`` receives the anchors and positives of a chunk of positive pairs (shape ``(P, 1)``), their
    values ``ap = mat[a, p]`` (``(P, 1)``) and ``an = mat[a]`` (``(P, R)``), and returns a ``(P, R)`` mask.
    With ``nan_safe`` (``keep`` is false wherever ``an`` is NaN, e.g. it only compares ``an``), ``an`` is
    NaN outside the negatives instead of the mask being intersected with them, which saves two passes.
    The triplets come out in lexicographic ``(a, p, n)`` order, as PML's ``get_all_triplets_indices``.
    """
    a1, p = torch.nonzero(pos, as_tuple=True)
    values = mat.masked_fill(~neg, torch.nan) if nan_safe else mat
    rows = max(1, _CHUNK_ELEMENTS // max(1, mat.shape[1]))
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for start in range(0, a1.numel(), rows):  # chunks bound the memory; each chunk is vectorised
        a, pp = a1[start : start + rows], p[start : start + rows]
        an = values[a]
        ap = mat[a, pp].unsqueeze(1)
        mask = keep(a.unsqueeze(1), pp.unsqueeze(1), ap, an)
        if not nan_safe:
            mask &= neg[a]
        k, n = torch.nonzero(mask, as_tuple=True)
        parts.append((a[k], pp[k], n))
    if not parts:
        return empty_triplets(mat.device)
    if len(parts) == 1:
        return parts[0]
    return tuple(torch.cat(t) for t in zip(*parts, strict=True))  # type: ignore[return-value]


@register("triplet_margin")
class TripletMarginMiner(BaseMiner):
    """Triplets that violate the margin (PML ``TripletMarginMiner``; the margin of Schroff et al.,
    *FaceNet*, CVPR 2015).

    With ``m = d(a, n) − d(a, p)`` (``s(a, p) − s(a, n)`` for a similarity), over all valid triplets:
    ``all``: ``m ≤ margin``; ``hard``: ``m ≤ 0`` (and ``≤ margin``); ``semihard``: ``0 < m ≤ margin``;
    ``easy``: ``m > margin``. Outputs triplets. Hardness knob: ``margin``.
    """

    output_kind = "triplets"
    hardness_knob = "margin"
    TYPES: ClassVar[tuple[str, ...]] = ("all", "hard", "semihard", "easy")

    def configure(self, margin: float = 0.2, type_of_triplets: str = "all") -> None:
        self.margin = check_number("margin", margin)
        self.type_of_triplets = check_choice("type_of_triplets", type_of_triplets, self.TYPES)

    def mine(self, mat: torch.Tensor, batch: Batch) -> Triplets:
        pos, neg = batch.label_masks()
        margin, kind, sim = self.margin, self.type_of_triplets, self.is_similarity

        def keep(a: torch.Tensor, p: torch.Tensor, ap: torch.Tensor, an: torch.Tensor) -> torch.Tensor:
            m = ap - an if sim else an - ap  # PML's arithmetic, so boundary cases agree
            if kind == "easy":
                return m > margin
            mask = m <= margin
            if kind == "hard":
                mask &= m <= 0
            elif kind == "semihard":
                mask &= m > 0
            return mask

        return triplets_where(mat, pos, neg, keep, nan_safe=True)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, type_of_triplets={self.type_of_triplets!r}, " + super().extra_repr()


@register("angular")
class AngularMiner(BaseMiner):
    """Triplets whose angle at the negative exceeds ``angle`` degrees (PML ``AngularMiner``; the angle of
    Wang et al., *Deep Metric Learning with Angular Loss*, ICCV 2017).

    For every valid triplet, with ``c = (a + p)/2``: keep it if ``atan(‖a − p‖ / (2‖n − c‖)) > angle``.
    As in PML, the angle is measured on the embeddings as passed (PML's ``LpDistance.pairwise_distance``
    does not normalise), and the distance must be ``euclidean`` with ``normalize_embeddings=True``
    (PML asserts it; it only affects ``last_stats`` here). Outputs triplets. Hardness knob: ``angle``.
    """

    output_kind = "triplets"
    hardness_knob = "angle"
    knob_ranges: ClassVar[dict[str, tuple[float, float]]] = {"angle": (0.0, 90.0)}

    def configure(self, angle: float = 20.0) -> None:
        self.require_unit_euclidean("as PML's AngularMiner")
        self.angle = check_number("angle", angle, *self.knob_ranges["angle"])

    def mine(self, mat: torch.Tensor, batch: Batch) -> Triplets:
        pos, neg = batch.label_masks()
        x = batch.embeddings
        y = x if batch.ref_emb is None else batch.ref_emb.to(x.dtype)
        threshold = math.radians(self.angle)

        def keep(a: torch.Tensor, p: torch.Tensor, ap: torch.Tensor, an: torch.Tensor) -> torch.Tensor:
            xa, yp = x[a.squeeze(1)], y[p.squeeze(1)]
            ap_dist = F.pairwise_distance(xa, yp).unsqueeze(1)
            nc_dist = _PLAIN_EUCLIDEAN.matrix((xa + yp) / 2, y)
            return torch.atan(ap_dist / (2 * nc_dist)) > threshold

        return triplets_where(mat, pos, neg, keep)

    def extra_repr(self) -> str:
        return f"angle={self.angle}, " + super().extra_repr()


# ---------------------------------------------------------------------------------------------- pairs


@register("pair_margin")
class PairMarginMiner(BaseMiner):
    """Positive pairs farther than ``pos_margin`` and negative pairs closer than ``neg_margin`` (PML
    ``PairMarginMiner``); for a similarity: positives with ``s < pos_margin``, negatives with
    ``s > neg_margin``. Outputs pairs. Hardness knob: ``neg_margin`` (lower is harder for a distance);
    ``pos_margin`` can be scheduled with ``knob=pos_margin``.
    """

    output_kind = "pairs"
    hardness_knob = "neg_margin"

    def configure(self, pos_margin: float = 0.2, neg_margin: float = 0.8) -> None:
        self.pos_margin = check_number("pos_margin", pos_margin)
        self.neg_margin = check_number("neg_margin", neg_margin)

    def mine(self, mat: torch.Tensor, batch: Batch) -> Pairs:
        pos, neg = batch.label_masks()
        if self.is_similarity:
            pos &= mat < self.pos_margin
            neg &= mat > self.neg_margin
        else:
            pos &= mat > self.pos_margin
            neg &= mat < self.neg_margin
        return masked_pairs(pos, neg)

    def extra_repr(self) -> str:
        return f"pos_margin={self.pos_margin}, neg_margin={self.neg_margin}, " + super().extra_repr()


@register("hdc")
class HDCMiner(BaseMiner):
    """Hard-aware cascaded mining (Yuan, Yang & Zhang, *Hard-Aware Deeply Cascaded Embedding*, ICCV 2017;
    PML ``HDCMiner``): of all positive pairs keep the ``ceil(filter_percentage · #pos)`` hardest
    (farthest), of all negative pairs the ``ceil(filter_percentage · #neg)`` hardest (closest). Outputs
    pairs. Hardness knob: ``filter_percentage`` (lower is harder). PML's ``set_idx_externally`` (filtering
    another miner's output) is not offered.
    """

    output_kind = "pairs"
    hardness_knob = "filter_percentage"
    knob_ranges: ClassVar[dict[str, tuple[float, float]]] = {"filter_percentage": (0.0, 1.0)}

    def configure(self, filter_percentage: float = 0.5) -> None:
        self.filter_percentage = check_number(
            "filter_percentage", filter_percentage, *self.knob_ranges["filter_percentage"]
        )

    def mine(self, mat: torch.Tensor, batch: Batch) -> Pairs:
        a1, p, a2, n = batch.all_pairs()
        a1, p = self._hardest(mat, a1, p, largest=not self.is_similarity)
        a2, n = self._hardest(mat, a2, n, largest=self.is_similarity)
        return a1, p, a2, n

    def _hardest(
        self, mat: torch.Tensor, anchors: torch.Tensor, others: torch.Tensor, largest: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if anchors.numel() == 0:
            return anchors, others
        k = math.ceil(self.filter_percentage * anchors.numel())  # PML's rounding
        _, idx = torch.topk(mat[anchors, others], k=k, largest=largest)
        return anchors[idx], others[idx]

    def extra_repr(self) -> str:
        return f"filter_percentage={self.filter_percentage}, " + super().extra_repr()


@register("batch_easy_hard")
class BatchEasyHardMiner(BaseMiner):
    """One positive and one negative per anchor, each chosen by a strategy (Xuan, Stylianou, Liu & Pless,
    *Improved Embeddings with Easy Positive Triplet Mining*, WACV 2020; PML ``BatchEasyHardMiner``).

    Strategies: ``easy`` (closest positive / farthest negative), ``hard`` (farthest positive / closest
    negative), ``semihard`` (the hard choice among candidates on the right side of the other chosen pair:
    a negative farther than the chosen positive, or a positive closer than the chosen negative), ``all``
    (every pair). ``allowed_*_range = (low, high)`` (inclusive) filters candidates, except for ``all``
    (as PML). Outputs pairs ``(a, p, a, n)`` (with ``all``: all positive or negative pairs).
    """

    output_kind = "pairs"
    hardness_knob = None
    STRATEGIES: ClassVar[tuple[str, ...]] = ("hard", "semihard", "easy", "all")

    def configure(
        self,
        pos_strategy: str = "easy",
        neg_strategy: str = "semihard",
        allowed_pos_range: tuple[float, float] | None = None,
        allowed_neg_range: tuple[float, float] | None = None,
    ) -> None:
        self.pos_strategy = check_choice("pos_strategy", pos_strategy, self.STRATEGIES)
        self.neg_strategy = check_choice("neg_strategy", neg_strategy, self.STRATEGIES)
        if pos_strategy == neg_strategy == "semihard":
            raise ConfigError("pos_strategy and neg_strategy cannot both be 'semihard'")
        if {pos_strategy, neg_strategy} == {"semihard", "all"}:
            raise ConfigError("'semihard' cannot be combined with 'all' (pos_strategy / neg_strategy)")
        self.allowed_pos_range = _check_range(allowed_pos_range, "allowed_pos_range")
        self.allowed_neg_range = _check_range(allowed_neg_range, "allowed_neg_range")

    def mine(self, mat: torch.Tensor, batch: Batch) -> Pairs:
        pos, neg = batch.label_masks()
        ps, ns = self.pos_strategy, self.neg_strategy
        # On a distance-like matrix, "hard" is the largest positive and the smallest negative.
        dist = -mat if self.is_similarity else mat
        if ps != "all" and self.allowed_pos_range is not None:
            pos &= _in_range(mat, self.allowed_pos_range)
        if ns != "all" and self.allowed_neg_range is not None:
            neg &= _in_range(mat, self.allowed_neg_range)
        if ps == "semihard":  # negatives first, then positives closer than the chosen negative
            n_val, n_idx, n_ok = _pick(dist, neg, largest=ns == "easy")
            p_val, p_idx, p_ok = _pick(dist, pos & (dist < n_val.unsqueeze(1)), largest=True)
        else:
            if ps != "all":
                p_val, p_idx, p_ok = _pick(dist, pos, largest=ps == "hard")
            if ns == "semihard":  # negatives farther than the chosen positive
                n_val, n_idx, n_ok = _pick(dist, neg & (dist > p_val.unsqueeze(1)), largest=False)
            elif ns != "all":
                n_val, n_idx, n_ok = _pick(dist, neg, largest=ns == "easy")
        if ps != "all" and ns != "all":
            a = torch.nonzero(p_ok & n_ok, as_tuple=True)[0]
            return a, p_idx[a], a, n_idx[a]
        if ps == "all" and ns == "all":
            return batch.all_pairs()
        if ps == "all":
            a1, p = torch.nonzero(pos, as_tuple=True)
            a2 = torch.nonzero(n_ok, as_tuple=True)[0]
            return a1, p, a2, n_idx[a2]
        a1 = torch.nonzero(p_ok, as_tuple=True)[0]
        a2, n = torch.nonzero(neg, as_tuple=True)
        return a1, p_idx[a1], a2, n

    def extra_repr(self) -> str:
        return (
            f"pos_strategy={self.pos_strategy!r}, neg_strategy={self.neg_strategy!r}, "
            f"allowed_pos_range={self.allowed_pos_range}, allowed_neg_range={self.allowed_neg_range}, "
            + super().extra_repr()
        )


def _pick(
    dist: torch.Tensor, mask: torch.Tensor, largest: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row, the largest (or smallest) ``dist`` among ``mask``: values (±inf for empty rows), indices,
    and whether the row had a candidate."""
    if largest:
        val, idx = dist.masked_fill(~mask, -torch.inf).max(dim=1)
    else:
        val, idx = dist.masked_fill(~mask, torch.inf).min(dim=1)
    return val, idx, mask.any(dim=1)


# ---------------------------------------------------------------------------------------------- stochastic


@register("distance_weighted")
class DistanceWeightedMiner(StochasticMiner):
    """Distance-weighted sampling (Wu, Manmatha, Smola & Krähenbühl, *Sampling Matters in Deep Embedding
    Learning*, ICCV 2017; PML ``DistanceWeightedMiner``).

    Negatives of anchor ``a`` are drawn with probability ∝ ``q(max(d, cutoff))^-1`` (see
    :func:`inverse_sphere_log_weights`, ``n`` = embedding width) among those with
    ``max(d, cutoff) < nonzero_loss_cutoff``; weights that are not finite are 0. As PML's
    ``get_random_triplet_indices``, each anchor with a positive and a non-zero negative weight gets as
    many triplets as the reference set has items of its label (the batch: its class size), positives
    drawn uniformly with replacement. Needs ``distance='euclidean'``, ``normalize_embeddings=True``.
    Outputs triplets. Hardness knob: ``cutoff`` (lower prefers closer, harder negatives).
    """

    output_kind = "triplets"
    hardness_knob = "cutoff"
    knob_ranges: ClassVar[dict[str, tuple[float, float]]] = {
        "cutoff": (0.0, 2.0),
        "nonzero_loss_cutoff": (0.0, math.inf),
    }

    def configure(self, cutoff: float = 0.5, nonzero_loss_cutoff: float = 1.4) -> None:
        self.require_unit_euclidean("its weights are the inverse density of distances on the unit sphere")
        self.cutoff = check_number("cutoff", cutoff, *self.knob_ranges["cutoff"])
        self.nonzero_loss_cutoff = check_number(
            "nonzero_loss_cutoff", nonzero_loss_cutoff, *self.knob_ranges["nonzero_loss_cutoff"]
        )

    def mine(self, mat: torch.Tensor, batch: Batch) -> Triplets:
        pos, neg = batch.label_masks()
        log_w = inverse_sphere_log_weights(mat, batch.embeddings.shape[1], self.cutoff)
        valid = neg & torch.isfinite(log_w) & (mat.clamp_min(self.cutoff) < self.nonzero_loss_cutoff)
        anchors = torch.nonzero(pos.any(dim=1) & valid.any(dim=1), as_tuple=True)[0]
        if anchors.numel() == 0:
            return empty_triplets(mat.device)
        # triplets per anchor: reference items sharing its label (the anchor itself counts in the batch)
        per_anchor = pos[anchors].sum(dim=1) + (1 if batch.own_reference else 0)
        k = int(per_anchor.max())
        log_w = log_w[anchors].masked_fill(~valid[anchors], -torch.inf)
        # per-row max (PML subtracts the global one, which can underflow whole rows to zero in float32)
        weights = torch.exp(log_w - log_w.amax(dim=1, keepdim=True))
        gen = self.generator(mat.device)
        n = torch.multinomial(weights, k, replacement=True, generator=gen)
        p = torch.multinomial(pos[anchors].to(weights.dtype), k, replacement=True, generator=gen)
        take = torch.arange(k, device=mat.device).unsqueeze(0) < per_anchor.unsqueeze(1)
        return anchors.unsqueeze(1).expand(-1, k)[take], p[take], n[take]

    def extra_repr(self) -> str:
        return (
            f"cutoff={self.cutoff}, nonzero_loss_cutoff={self.nonzero_loss_cutoff}, " + super().extra_repr()
        )


@register("uniform_histogram")
class UniformHistogramMiner(StochasticMiner):
    """Pairs spread uniformly over the range of distances (PML ``UniformHistogramMiner``).

    Positive (negative) pairs' values are split into ``num_bins`` equal-width bins between their min and
    max (``[s, e)``, the last bin closed); from every non-empty bin, ``pos_per_bin`` (``neg_per_bin``)
    pairs are drawn uniformly with replacement. Outputs pairs.
    """

    output_kind = "pairs"
    hardness_knob = None

    def configure(self, num_bins: int = 100, pos_per_bin: int = 10, neg_per_bin: int = 10) -> None:
        self.num_bins = check_count("num_bins", num_bins)
        self.pos_per_bin = check_count("pos_per_bin", pos_per_bin, 0)
        self.neg_per_bin = check_count("neg_per_bin", neg_per_bin, 0)

    def mine(self, mat: torch.Tensor, batch: Batch) -> Pairs:
        a1, p, a2, n = batch.all_pairs()
        gen = self.generator(mat.device)
        keep_pos = self._per_bin(mat[a1, p], self.pos_per_bin, gen)
        keep_neg = self._per_bin(mat[a2, n], self.neg_per_bin, gen)
        return a1[keep_pos], p[keep_pos], a2[keep_neg], n[keep_neg]

    def _per_bin(self, values: torch.Tensor, per_bin: int, gen: torch.Generator | None) -> torch.Tensor:
        if values.numel() == 0:
            return torch.empty(0, dtype=torch.long, device=values.device)
        edges = torch.linspace(
            values.min(), values.max(), steps=self.num_bins + 1, device=values.device, dtype=values.dtype
        )
        # number of inner edges <= value: bin i holds edges[i] <= v < edges[i + 1]; the maximum lands in
        # the last bin, which PML closes on the right
        bins = torch.bucketize(values, edges[1:-1], right=True)
        order = torch.argsort(bins)
        counts = torch.bincount(bins, minlength=self.num_bins)
        starts = torch.cumsum(counts, 0) - counts
        filled = torch.nonzero(counts, as_tuple=True)[0]
        size = counts[filled].repeat_interleave(per_bin)
        first = starts[filled].repeat_interleave(per_bin)
        u = torch.rand(size.shape, generator=gen, device=values.device, dtype=torch.float64)
        offset = torch.minimum((u * size).long(), size - 1)
        return order[first + offset]

    def extra_repr(self) -> str:
        return (
            f"num_bins={self.num_bins}, pos_per_bin={self.pos_per_bin}, neg_per_bin={self.neg_per_bin}, "
            + super().extra_repr()
        )
