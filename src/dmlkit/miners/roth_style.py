"""Batch miners of Roth et al., *Revisiting Training Strategies and Generalization Performance in Deep
Metric Learning*, ICML 2020 (their ``--batch_mining`` flags and ``--miner_<flag>_<name>`` options).

Roth et al.'s miners loop over anchors in NumPy; these are vectorised versions drawing from the same
distributions. Differences from their code are listed in ``docs/miners.md`` (anchors without a positive
or a negative are skipped instead of producing degenerate triplets or an error; ``distance`` applies its
upper cutoff; ``parametric`` works). Every miner also takes a reference set (``ref_emb``/``ref_labels``):
positives and negatives are then drawn from it.

Randomness: see :class:`dmlkit.miners.pml_style.StochasticMiner` (``seed=None``: torch's global RNG).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from dmlkit.errors import ConfigError
from dmlkit.miners.base import BaseMiner, check_choice, check_count, check_number, register
from dmlkit.miners.pml_style import StochasticMiner, gumbel_argmax, inverse_sphere_log_weights, log_mask
from dmlkit.tuples import Batch, Pairs, Triplets, empty_triplets, label_masks, masked_pairs


def _uniform(mask: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    """Per row, an index drawn uniformly among ``mask`` (arbitrary for an empty row)."""
    return gumbel_argmax(log_mask(mask), gen)


def _rows_with(mask: torch.Tensor) -> torch.Tensor:
    return mask.any(dim=1, keepdim=True)


def _distance_like(mat: torch.Tensor, is_similarity: bool) -> torch.Tensor:
    # with a similarity, -s orders pairs the way a distance does (larger = farther)
    return -mat if is_similarity else mat


def _anchors_triplets(ok: torch.Tensor, p: torch.Tensor, n: torch.Tensor) -> Triplets:
    a = torch.nonzero(ok, as_tuple=True)[0]
    if a.numel() == 0:
        return empty_triplets(ok.device)
    return a, p[a], n[a]


class _DistanceSampling(StochasticMiner):
    """Shared by ``distance``, ``rho_distance`` and ``random_distance``: Wu et al.'s negative sampling.

    A negative is drawn with probability ∝ ``q(max(d, lower_cutoff))^-1`` among the anchor's negatives
    with ``max(d, lower_cutoff) ≤ upper_cutoff``; if an anchor has none there, among all its negatives
    (the weights of Roth et al.'s released code, which leaves the upper cutoff out).
    """

    knob_ranges: ClassVar[dict[str, tuple[float, float]]] = {
        "lower_cutoff": (0.0, 2.0),
        "upper_cutoff": (0.0, math.inf),
    }

    def configure(self, lower_cutoff: float = 0.5, upper_cutoff: float = 1.4) -> None:
        self.require_unit_euclidean("its weights are the inverse density of distances on the unit sphere")
        self.lower_cutoff = check_number("lower_cutoff", lower_cutoff, *self.knob_ranges["lower_cutoff"])
        self.upper_cutoff = check_number("upper_cutoff", upper_cutoff, *self.knob_ranges["upper_cutoff"])

    def sample_negatives(
        self, mat: torch.Tensor, neg: torch.Tensor, dim: int, gen: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One distance-weighted negative per row and whether the row had one."""
        log_w = inverse_sphere_log_weights(mat, dim, self.lower_cutoff)
        finite = neg & torch.isfinite(log_w)
        within = finite & (mat.clamp_min(self.lower_cutoff) <= self.upper_cutoff)
        allowed = torch.where(_rows_with(within), within, finite)
        n = gumbel_argmax(log_w.masked_fill(~allowed, -torch.inf), gen)
        return n, allowed.any(dim=1)

    def distance_triplets(
        self, mat: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, dim: int
    ) -> Triplets:
        gen = self.generator(mat.device)
        p = _uniform(pos, gen)
        n, has_neg = self.sample_negatives(mat, neg, dim, gen)
        return _anchors_triplets(pos.any(dim=1) & has_neg, p, n)

    def extra_repr(self) -> str:
        return f"lower_cutoff={self.lower_cutoff}, upper_cutoff={self.upper_cutoff}, " + super().extra_repr()


@register("distance")
class DistanceMiner(_DistanceSampling):
    """Roth et al.'s ``distance`` miner (Wu et al., *Sampling Matters in Deep Embedding Learning*, ICCV
    2017): one triplet per anchor with a positive and a negative; the positive uniform, the negative
    distance-weighted with both cutoffs (``--miner_distance_lower_cutoff 0.5``,
    ``--miner_distance_upper_cutoff 1.4``). Needs ``distance='euclidean'`` on unit vectors. Outputs
    triplets. Hardness knob: ``lower_cutoff`` (lower prefers closer, harder negatives).
    """

    output_kind = "triplets"
    hardness_knob = "lower_cutoff"

    def mine(self, mat: torch.Tensor, batch: Batch) -> Triplets:
        pos, neg = batch.label_masks()
        return self.distance_triplets(mat, pos, neg, batch.embeddings.shape[1])


@register("random_distance")
class RandomDistanceMiner(_DistanceSampling):
    """Roth et al.'s ``random_distance`` control: the ``distance`` miner run on randomly permuted labels
    (batch and reference labels permuted independently), so "positives" and "negatives" ignore the
    classes. Same cutoffs as ``distance`` (``--miner_distance_*``). Outputs triplets. No hardness knob.
    """

    output_kind = "triplets"
    hardness_knob = None

    def mine(self, mat: torch.Tensor, batch: Batch) -> Triplets:
        gen = self.generator(mat.device)
        labels, ref_labels = batch.labels, batch.ref_labels
        shuffled = labels[torch.randperm(labels.numel(), generator=gen, device=labels.device)]
        shuffled_ref = None
        if ref_labels is not None:
            shuffled_ref = ref_labels[torch.randperm(ref_labels.numel(), generator=gen, device=labels.device)]
        pos, neg = label_masks(shuffled, shuffled_ref, batch.exclude)
        return self.distance_triplets(mat, pos, neg, batch.embeddings.shape[1])


@register("rho_distance")
class RhoDistanceMiner(_DistanceSampling):
    """Roth et al.'s ρ-regularised ``distance`` miner (``--batch_mining rho_distance``, Sec. 5 of the
    paper): for each anchor with a positive, with probability ``cp`` (``--miner_rho_distance_cp``) the
    negative is replaced by a positive of the anchor's class, pushing same-class samples apart; otherwise
    the triplet is the ``distance`` miner's (cutoffs ``--miner_rho_distance_lower_cutoff 0.5`` /
    ``--miner_rho_distance_upper_cutoff 1.4``).

    A replaced triplet is, as in their code, ``(a, a, p')``: the anchor as its own positive and a uniform
    positive ``p' ≠ a`` as the negative. With an explicit reference set the anchor is not in it, so a
    replaced triplet is ``(a, p, p')`` with two different reference positives (anchors with a single
    reference positive are not replaced). ``last_stats['num_replaced']`` counts replaced triplets. Outputs
    triplets. Hardness knob: ``lower_cutoff``; ``cp`` can be scheduled with ``knob=cp``.
    """

    output_kind = "triplets"
    hardness_knob = "lower_cutoff"
    knob_ranges: ClassVar[dict[str, tuple[float, float]]] = {
        **_DistanceSampling.knob_ranges,
        "cp": (0.0, 1.0),
    }

    def configure(  # type: ignore[override]
        self, lower_cutoff: float = 0.5, upper_cutoff: float = 1.4, cp: float = 0.2
    ) -> None:
        super().configure(lower_cutoff, upper_cutoff)
        self.cp = check_number("cp", cp, *self.knob_ranges["cp"])

    def mine(self, mat: torch.Tensor, batch: Batch) -> Triplets:
        pos, neg = batch.label_masks()
        gen = self.generator(mat.device)
        rows = torch.arange(mat.shape[0], device=mat.device)
        p = _uniform(pos, gen)
        n, has_neg = self.sample_negatives(mat, neg, batch.embeddings.shape[1], gen)
        flip = torch.rand(mat.shape[0], generator=gen, device=mat.device, dtype=torch.float64) < self.cp
        if batch.own_reference:
            can_flip = pos.any(dim=1)
            new_p, new_n = rows, p
        else:
            others = pos.clone()
            others[rows, p] = False
            can_flip = others.any(dim=1)
            new_p, new_n = p, _uniform(others, gen)
        flip &= can_flip
        p = torch.where(flip, new_p, p)
        n = torch.where(flip, new_n, n)
        ok = pos.any(dim=1) & (has_neg | flip)
        self._extra_stats["num_replaced"] = (flip & ok).sum()
        return _anchors_triplets(ok, p, n)

    def extra_repr(self) -> str:
        return f"cp={self.cp}, " + super().extra_repr()


@register("semihard")
class SemihardMiner(StochasticMiner):
    """Roth et al.'s ``semihard`` miner (after Schroff et al., *FaceNet*, CVPR 2015): per anchor with a
    positive and a negative, a uniform positive ``p`` and a uniform negative among the semihard ones,
    ``d(a, p) < d(a, n) < d(a, p) + margin``, or among all negatives if there is none. ``margin`` is
    their loss margin (``--loss_<loss>_margin``, 0.2 for the triplet loss).

    ``hard_fraction`` (an addition, default 0 = their miner): with this probability per anchor the
    negative is drawn among the hard ones, ``d(a, n) ≤ d(a, p)``, falling back to semihard and then to
    any negative; scheduling it from 0 to 1 is progressive hard mining. For a similarity the inequalities
    flip. Outputs triplets. Hardness knob: ``hard_fraction``; ``margin`` with ``knob=margin``.
    """

    output_kind = "triplets"
    hardness_knob = "hard_fraction"
    knob_ranges: ClassVar[dict[str, tuple[float, float]]] = {
        "hard_fraction": (0.0, 1.0),
        "margin": (0.0, math.inf),
    }

    takes_loss_margin: ClassVar[bool] = True

    def configure(self, margin: float = 0.2, hard_fraction: float = 0.0) -> None:
        self.margin = check_number("margin", margin, *self.knob_ranges["margin"])
        self.hard_fraction = check_number("hard_fraction", hard_fraction, *self.knob_ranges["hard_fraction"])

    def mine(self, mat: torch.Tensor, batch: Batch) -> Triplets:
        pos, neg = batch.label_masks()
        gen = self.generator(mat.device)
        dist = _distance_like(mat, self.is_similarity)
        p = _uniform(pos, gen)
        dp = dist.gather(1, p.unsqueeze(1))
        semihard = neg & (dist > dp) & (dist < dp + self.margin)
        candidates = torch.where(_rows_with(semihard), semihard, neg)
        if self.hard_fraction > 0:
            hard = neg & (dist <= dp)
            coin = torch.rand(mat.shape[0], generator=gen, device=mat.device, dtype=torch.float64)
            use_hard = (coin < self.hard_fraction) & hard.any(dim=1)
            candidates = torch.where(use_hard.unsqueeze(1), hard, candidates)
        n = _uniform(candidates, gen)
        return _anchors_triplets(pos.any(dim=1) & neg.any(dim=1), p, n)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, hard_fraction={self.hard_fraction}, " + super().extra_repr()


@register("softhard")
class SofthardMiner(StochasticMiner):
    """Roth et al.'s ``softhard`` miner: per anchor with a positive and a negative, a uniform positive
    among those farther than its closest negative (else among all positives) and a uniform negative among
    those closer than its farthest positive (else among all negatives). Outputs triplets. No hardness
    knob.
    """

    output_kind = "triplets"
    hardness_knob = None

    def mine(self, mat: torch.Tensor, batch: Batch) -> Triplets:
        pos, neg = batch.label_masks()
        gen = self.generator(mat.device)
        dist = _distance_like(mat, self.is_similarity)
        farthest_pos = dist.masked_fill(~pos, -torch.inf).amax(dim=1, keepdim=True)
        closest_neg = dist.masked_fill(~neg, torch.inf).amin(dim=1, keepdim=True)
        hard_pos = pos & (dist > closest_neg)
        hard_neg = neg & (dist < farthest_pos)
        p = _uniform(torch.where(_rows_with(hard_pos), hard_pos, pos), gen)
        n = _uniform(torch.where(_rows_with(hard_neg), hard_neg, neg), gen)
        return _anchors_triplets(pos.any(dim=1) & neg.any(dim=1), p, n)


@register("random")
class RandomMiner(StochasticMiner):
    """Roth et al.'s ``random`` miner: as many triplets as the batch has items, drawn uniformly without
    replacement from all valid triplets ``(a, p, n)`` (all of them if there are fewer). Outputs
    triplets. No hardness knob.
    """

    output_kind = "triplets"
    hardness_knob = None

    def mine(self, mat: torch.Tensor, batch: Batch) -> Triplets:
        pos, neg = batch.label_masks()
        num_pos, num_neg = pos.sum(dim=1), neg.sum(dim=1)
        per_anchor = num_pos * num_neg
        ends = torch.cumsum(per_anchor, 0)
        total = int(ends[-1]) if ends.numel() else 0
        count = min(batch.labels.numel(), total)
        if count == 0:
            return empty_triplets(mat.device)
        flat = _distinct_below(total, count, self.generator(mat.device), mat.device)
        # flat index t ↦ anchor a (block of per_anchor[a] triplets), then (positive rank, negative rank)
        a = torch.searchsorted(ends, flat, right=True)
        offset = flat - (ends - per_anchor)[a]
        p_rank, n_rank = offset // num_neg[a], offset % num_neg[a]
        # column indices of each row's positives (negatives) first, in increasing order
        pos_cols = torch.sort((~pos).to(torch.int8), dim=1, stable=True).indices
        neg_cols = torch.sort((~neg).to(torch.int8), dim=1, stable=True).indices
        return a, pos_cols[a, p_rank], neg_cols[a, n_rank]


def _distinct_below(
    total: int, count: int, gen: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """``count`` distinct integers drawn uniformly from ``range(total)`` (a uniform random subset)."""
    if total <= max(1 << 20, 4 * count):
        return torch.randperm(total, generator=gen, device=device)[:count]
    # sparse case: i.i.d. draws, deduplicated; a uniform subset of a uniform random set is uniform
    found = torch.empty(0, dtype=torch.long, device=device)
    while found.numel() < count:
        draws = torch.randint(0, total, (2 * count,), generator=gen, device=device)
        found = torch.unique(torch.cat([found, draws]))
    keep = torch.randperm(found.numel(), generator=gen, device=device)[:count]
    return found[keep]


@register("intra_random")
class IntraRandomMiner(StochasticMiner):
    """Roth et al.'s ``intra_random`` control: as many triplets as the batch has items; for each, a class
    drawn uniformly among the batch's classes (present in the reference set, if given), then anchor,
    "positive" and "negative" drawn uniformly with replacement among that class's items (the anchor from
    the batch, the others from the reference set). All three share a label by design. Outputs triplets.
    No hardness knob.
    """

    output_kind = "triplets"
    hardness_knob = None

    def mine(self, mat: torch.Tensor, batch: Batch) -> Triplets:
        labels, ref = batch.labels, batch.reference_labels
        classes = torch.unique(labels)
        if not batch.own_reference:
            classes = classes[torch.isin(classes, ref)]
        if classes.numel() == 0:
            return empty_triplets(mat.device)
        gen = self.generator(mat.device)
        count = labels.numel()
        chosen = classes[torch.randint(0, classes.numel(), (count,), generator=gen, device=labels.device)]
        a = _member(labels, chosen, gen)
        return a, _member(ref, chosen, gen), _member(ref, chosen, gen)


def _member(labels: torch.Tensor, wanted: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    """For each entry of ``wanted``, a uniform index ``i`` with ``labels[i] == wanted`` (must exist)."""
    sorted_labels, order = torch.sort(labels, stable=True)
    first = torch.searchsorted(sorted_labels, wanted)
    size = torch.searchsorted(sorted_labels, wanted, right=True) - first
    u = torch.rand(wanted.shape, generator=gen, device=labels.device, dtype=torch.float64)
    return order[first + torch.minimum((u * size).long(), size - 1)]


@register("npair")
class NPairMiner(StochasticMiner):
    """Roth et al.'s ``npair`` miner (Sohn, *Improved Deep Metric Learning with Multi-class N-pair Loss
    Objective*, NeurIPS 2016): every anchor with a positive gets one uniform positive and all of its
    negatives. Outputs pairs: one positive pair per anchor and every ``(anchor, negative)`` pair (a
    triplet loss joins them into ``(a, p, n)`` for every negative ``n``). No hardness knob.
    """

    output_kind = "pairs"
    hardness_knob = None

    def mine(self, mat: torch.Tensor, batch: Batch) -> Pairs:
        pos, neg = batch.label_masks()
        has_pos = pos.any(dim=1)
        p = _uniform(pos, self.generator(mat.device))
        a1 = torch.nonzero(has_pos, as_tuple=True)[0]
        a2, n = torch.nonzero(neg & has_pos.unsqueeze(1), as_tuple=True)
        return a1, p[a1], a2, n


@register("lifted")
class LiftedMiner(BaseMiner):
    """Roth et al.'s ``lifted`` miner (Oh Song et al., *Deep Metric Learning via Lifted Structured Feature
    Embedding*, CVPR 2016): every anchor with a positive, with all of its positives and all of its
    negatives. Deterministic. Outputs pairs. No hardness knob.
    """

    output_kind = "pairs"
    hardness_knob = None

    def mine(self, mat: torch.Tensor, batch: Batch) -> Pairs:
        pos, neg = batch.label_masks()
        return masked_pairs(pos, neg & pos.any(dim=1, keepdim=True))


@register("parametric")
class ParametricMiner(StochasticMiner):
    """Roth et al.'s ``parametric`` miner, working: negatives drawn from a histogram over distance bins.

    ``support_lim = (low, high)`` is cut into ``n_support − 1`` equal bins at ``n_support`` support points
    (``--miner_parametric_n_support``, ``--miner_parametric_support_lim``); bin ``b`` holds values in
    ``(s_b, s_{b+1}]`` (the first also ``s_0``). The bin weights ``h`` come from ``histogram`` (one
    non-negative weight per bin) or from ``mode`` (``--miner_parametric_mode``), evaluated at bin centres
    ``c``: ``uniform`` 1; ``hards`` ``c ≤ 0.5``; ``semihards`` ``0.3 ≤ c ≤ 0.7``; ``veryhards``
    ``c ≤ 0.3``; other bins get 1e-15 (their clipping, so an anchor without negatives in the preferred
    bins still gets one). Per anchor with a positive, the positive is uniform; for the negative, a bin
    is drawn with probability ∝ ``h[b]`` among the bins holding at least one of its negatives, then a
    negative uniformly inside it, so the drawn distances follow ``h`` (renormalised to the non-empty
    bins). Negatives outside ``support_lim`` are never drawn. Bins are in the miner's distance values.
    Outputs triplets. No hardness knob.
    """

    output_kind = "triplets"
    hardness_knob = None
    MODES: ClassVar[tuple[str, ...]] = ("uniform", "hards", "semihards", "veryhards")

    def configure(
        self,
        mode: str = "uniform",
        n_support: int = 100,
        support_lim: tuple[float, float] = (0.0, 2.0),
        histogram: Sequence[float] | None = None,
    ) -> None:
        self.mode = check_choice("mode", mode, self.MODES)
        self.n_support = check_count("n_support", n_support, 2)
        try:
            low, high = (float(v) for v in support_lim)
        except (TypeError, ValueError):
            raise ConfigError(f"support_lim must be a (low, high) pair, got {support_lim!r}") from None
        if not low < high:
            raise ConfigError(f"support_lim must have low < high, got {support_lim!r}")
        self.support_lim = (low, high)
        self.histogram = None if histogram is None else self._check_histogram(histogram)

    def _check_histogram(self, histogram: Sequence[float]) -> list[float]:
        values: list[Any] = list(histogram)
        bins = self.n_support - 1
        if len(values) != bins:
            raise ConfigError(
                f"histogram has {len(values)} bins but n_support={self.n_support} makes {bins}; "
                f"pass n_support={len(values) + 1}"
            )
        out = [check_number(f"histogram[{i}]", v, 0.0) for i, v in enumerate(values)]
        if not all(math.isfinite(v) for v in out) or sum(out) <= 0:
            raise ConfigError(f"histogram must be finite with a positive sum, got {values!r}")
        return out

    def bin_weights(self) -> torch.Tensor:
        """The weight ``h[b]`` of every bin (float64, not normalised)."""
        if self.histogram is not None:
            return torch.tensor(self.histogram, dtype=torch.float64)
        support = torch.linspace(*self.support_lim, self.n_support, dtype=torch.float64)
        centre = (support[:-1] + support[1:]) / 2
        if self.mode == "uniform":
            return torch.ones_like(centre)
        if self.mode == "hards":
            keep = centre <= 0.5
        elif self.mode == "semihards":
            keep = (centre >= 0.3) & (centre <= 0.7)
        else:
            keep = centre <= 0.3
        return keep.to(torch.float64).clamp_min(1e-15)

    def mine(self, mat: torch.Tensor, batch: Batch) -> Triplets:
        pos, neg = batch.label_masks()
        gen = self.generator(mat.device)
        low, high = self.support_lim
        support = torch.linspace(low, high, self.n_support, dtype=mat.dtype, device=mat.device)
        bins = torch.bucketize(mat, support[1:-1])  # inner support points < value
        candidates = neg & (mat >= low) & (mat <= high)
        weights = self.bin_weights().to(mat.device)
        counts = torch.zeros(mat.shape[0], weights.numel(), dtype=torch.float64, device=mat.device)
        counts.scatter_add_(1, bins, candidates.to(torch.float64))
        # each negative weighs h[b] / (anchor's negatives in b): bin b is drawn with probability ∝ h[b]
        log_w = torch.log(weights[bins]) - torch.log(counts.gather(1, bins))
        n = gumbel_argmax(log_w.masked_fill(~candidates, -torch.inf), gen)
        has_neg = (candidates & (weights[bins] > 0)).any(dim=1)
        p = _uniform(pos, gen)
        return _anchors_triplets(pos.any(dim=1) & has_neg, p, n)

    def extra_repr(self) -> str:
        histogram = "" if self.histogram is None else f", histogram={self.histogram}"
        return (
            f"mode={self.mode!r}, n_support={self.n_support}, support_lim={self.support_lim}{histogram}, "
            + super().extra_repr()
        )
