"""Helpers for tests/losses/test_loss_pair.py: the PML comparison harness and loop implementations.

The loop implementations are written from the papers' formulas with plain Python loops over anchors,
pairs and triplets and scalar torch arithmetic (so autograd gives their gradients); they share no code
with dmlkit: pairs, triplets and distances are recomputed here from the labels and vectors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

TOL = {torch.float64: {"rtol": 1e-8, "atol": 1e-12}, torch.float32: {"rtol": 1e-5, "atol": 1e-7}}

SHAPES = [(8, 4, 3), (24, 8, 5), (40, 16, 12)]  # (batch, dim, classes): the last has single-sample classes

EDGE_LABELS = {
    "all_same": torch.zeros(10, dtype=torch.long),
    "all_distinct": torch.arange(10),
    "singletons": torch.tensor([0, 0, 0, 1, 2, 3, 3, 4, 5, 6]),
    "one_pair": torch.tensor([0, 0, 1, 2, 3, 4, 5, 6, 7, 8]),
}


def make_batch(
    batch: int, dim: int, classes: int, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(batch, dim, generator=g, dtype=dtype)
    labels = torch.randint(0, classes, (batch,), generator=g)
    labels[:4] = torch.tensor([0, 0, 1, 1])  # two classes with two samples at least
    return emb, labels


def pml_distance(name: str, normalize: bool = True) -> object:
    from pytorch_metric_learning import distances

    if name == "euclidean":
        return distances.LpDistance(normalize_embeddings=normalize)
    if name == "squared_euclidean":
        return distances.LpDistance(normalize_embeddings=normalize, power=2)
    if name == "cosine":
        return distances.CosineSimilarity()
    return distances.DotProductSimilarity(normalize_embeddings=normalize)


def grads_close(ours: torch.Tensor | None, theirs: torch.Tensor | None, like: torch.Tensor) -> None:
    tol = TOL[like.dtype if like.dtype in TOL else torch.float32]
    a = ours if ours is not None else torch.zeros_like(like)
    b = theirs if theirs is not None else torch.zeros_like(like)
    assert torch.isfinite(a).all()
    # gradient entries are sums of many terms that partly cancel: atol relative to the gradient's scale
    scale = float(b.abs().max()) if b.numel() else 0.0
    torch.testing.assert_close(a, b.to(a.dtype), rtol=tol["rtol"], atol=max(tol["atol"], tol["rtol"] * scale))


def compare(
    ours: torch.nn.Module,
    theirs: torch.nn.Module,
    emb: torch.Tensor,
    labels: torch.Tensor,
    indices_tuple: tuple | None = None,
    ref: torch.Tensor | None = None,
    ref_labels: torch.Tensor | None = None,
    pml_input: Callable[[torch.Tensor], torch.Tensor] | None = None,
    params: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
) -> torch.Tensor:
    """Assert our loss equals PML's in value and in gradient w.r.t. embeddings, ref and ``params``.

    ``pml_input`` maps PML's inputs first (inside the graph, so gradients are w.r.t. the raw inputs).
    ``params``: (our parameter, PML's parameter) pairs initialised identically by the caller.
    """
    tol = TOL[emb.dtype]
    ours_in = [emb.clone().requires_grad_(True), None if ref is None else ref.clone().requires_grad_(True)]
    pml_in = [emb.clone().requires_grad_(True), None if ref is None else ref.clone().requires_grad_(True)]
    value = ours(ours_in[0], labels, indices_tuple, ours_in[1], ref_labels)
    mapped = [x if (x is None or pml_input is None) else pml_input(x) for x in pml_in]
    expected = theirs(mapped[0], labels, indices_tuple, mapped[1], ref_labels)
    assert value.ndim == 0 and torch.isfinite(value)
    torch.testing.assert_close(value, expected.to(value.dtype).reshape(()), **tol)
    value.backward()
    if expected.requires_grad:
        expected.backward()
    for a, b in zip(ours_in, pml_in, strict=True):
        if a is not None:
            grads_close(a.grad, b.grad, a)
    for ours_p, pml_p in params:
        grads_close(ours_p.grad, pml_p.grad, ours_p)
    return value


# ---------------------------------------------------------------------------------------------- loops


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / torch.sqrt((x * x).sum())


def dist(x: torch.Tensor, y: torch.Tensor, distance: str, normalize: bool = True) -> torch.Tensor:
    """One distance/similarity between two vectors, from its definition."""
    if normalize or distance == "cosine":
        x, y = unit(x), unit(y)
    if distance in ("cosine", "dot"):
        return (x * y).sum()
    sq = ((x - y) ** 2).sum()
    return sq if distance == "squared_euclidean" else torch.sqrt(sq)


def farther(x, y, distance: str):
    """How much farther x is than y (``y − x`` for similarities)."""
    return y - x if distance in ("cosine", "dot") else x - y


def ref_of(emb, labels, ref, ref_labels):
    return (emb, labels, True) if ref is None else (ref, ref_labels, False)


def loop_pairs(labels, ref_labels=None):
    """All (i, j) positive and negative pairs, self pairs excluded when the reference is the batch."""
    same_set = ref_labels is None
    ref_labels = labels if ref_labels is None else ref_labels
    pos, neg = [], []
    for i in range(len(labels)):
        for j in range(len(ref_labels)):
            if same_set and i == j:
                continue
            (pos if int(labels[i]) == int(ref_labels[j]) else neg).append((i, j))
    return pos, neg


def loop_triplets(labels, ref_labels=None):
    pos, neg = loop_pairs(labels, ref_labels)
    return [(a, p, n) for a, p in pos for a2, n in neg if a2 == a]


def mean(values: list) -> torch.Tensor | float:
    return sum(values) / len(values) if values else 0.0


def avg_non_zero(values: list) -> torch.Tensor | float:
    kept = [v for v in values if float(v.detach() if isinstance(v, torch.Tensor) else v) > 0]
    return sum(kept) / len(kept) if kept else 0.0


def quadruplet_loop(
    emb,
    labels,
    triplets,
    ref=None,
    ref_labels=None,
    alpha1=0.2,
    alpha2=0.2,
    distance="euclidean",
    fourth=None,
):
    """Roth et al.'s quadruplet loss: mean_t [d_ap − d_an + α₁]₊ + mean_t [d_ap − d(n, n') + α₂]₊.

    ``fourth``: one n' per triplet (checked valid here), or None for the average over every valid n'.
    """
    R, rl, _ = ref_of(emb, labels, ref, ref_labels)
    trip, quad = [], []
    for t, (a, p, n) in enumerate(triplets):
        d_ap = dist(emb[a], R[p], distance)
        trip.append(torch.relu(farther(d_ap, dist(emb[a], R[n], distance), distance) + alpha1))
        valid = [k for k in range(len(R)) if int(rl[k]) not in (int(labels[a]), int(rl[n]))]
        if not valid:
            continue
        if fourth is not None:
            assert int(fourth[t]) in valid
            valid = [int(fourth[t])]
        terms = [torch.relu(farther(d_ap, dist(R[n], R[k], distance), distance) + alpha2) for k in valid]
        quad.append(sum(terms) / len(terms))
    return mean(trip) + mean(quad)


def lifted_loop(emb, labels, pairs, ref=None, ref_labels=None, neg_margin=1.0, pos_margin=0.0):
    """Oh Song et al. (2016) Eq. 4 as PML scales it: ½[log Σ_N exp(m⁻ − d) + d_ij − m⁺]₊², mean over
    positive pairs; N = negative pairs of i and (batch only) of j. Euclidean on unit vectors."""
    R, _, same = ref_of(emb, labels, ref, ref_labels)
    pos, neg = pairs
    if not pos or not neg:
        return 0.0
    out = []
    for i, j in pos:
        terms = [
            torch.exp(neg_margin - dist(emb[k], R[m], "euclidean"))
            for k, m in neg
            if k == i or (same and k == j)
        ]
        lse = torch.log(sum(terms)) if terms else 0.0
        out.append(torch.relu(lse + dist(emb[i], R[j], "euclidean") - pos_margin) ** 2 / 2)
    return mean(out)


def npair_loop(emb, labels, ref=None, ref_labels=None):
    """Sohn (2016): for each label its first positive pair (row-major); cross-entropy of anchor vs all
    chosen positives, cosine similarity (PML's default normalised dot product)."""
    R, _, _ = ref_of(emb, labels, ref, ref_labels)
    pos, _ = loop_pairs(labels, None if ref is None else ref_labels)
    chosen: dict[int, tuple[int, int]] = {}
    for i, j in pos:
        chosen.setdefault(int(labels[i]), (i, j))
    pairs = [chosen[c] for c in sorted(chosen)]
    out = []
    for a, p in pairs:
        s = [dist(emb[a], R[q], "cosine") for _, q in pairs]
        s_ap = dist(emb[a], R[p], "cosine")
        out.append(-s_ap + torch.log(sum(torch.exp(v) for v in s)))
    return mean(out)


def angular_loop(emb, labels, pos_pairs, ref=None, ref_labels=None, alpha=40.0):
    """Wang et al. (2017) Eq. 8/10 on unit vectors: log(1 + Σ_n exp(4tan²α (a+p)·n − 2(1+tan²α) a·p))."""
    R, rl, _ = ref_of(emb, labels, ref, ref_labels)
    t2 = math.tan(math.radians(alpha)) ** 2
    out = []
    for a, p in pos_pairs:
        xa, xp = unit(emb[a]), unit(R[p])
        fs = [
            4 * t2 * ((xa + xp) * unit(R[n])).sum() - 2 * (1 + t2) * (xa * xp).sum()
            for n in range(len(R))
            if int(rl[n]) != int(labels[a])
        ]
        out.append(torch.log(1 + sum(torch.exp(f) for f in fs)))
    return mean(out)


def tcm_loop(emb, labels, pairs, ref=None, ref_labels=None, lp=1.0, lm=1.0, mp=0.9, mm=0.5):
    """Zhang et al. (2024) Eq. 5: mean over positives below m⁺ of (m⁺ − s) and negatives above m⁻."""
    R, _, _ = ref_of(emb, labels, ref, ref_labels)
    pos, neg = pairs
    low = [mp - dist(emb[i], R[j], "cosine") for i, j in pos]
    high = [dist(emb[i], R[j], "cosine") - mm for i, j in neg]
    return lp * avg_non_zero(low) + lm * avg_non_zero(high)


def margin_loop(emb, labels, triplets, margin=0.2, beta=1.2, nu=0.0, reduction="avg_non_zero", learn=False):
    """Wu et al. (2017) Eq. 4/5; ``beta`` a scalar or a per-class 1-D tensor; elements = the 2T hinges.

    With ``learn``: + ν·β (global β) or + ν·Σ_t β_{y(a_t)} divided like the hinges (per-class β)."""
    per_class = isinstance(beta, torch.Tensor) and beta.numel() > 1
    if isinstance(beta, torch.Tensor) and not per_class:
        beta = beta.reshape(())
    if not triplets:
        return 0.0
    terms, betas = [], []
    for a, p, n in triplets:
        b = beta[int(labels[a])] if per_class else beta
        betas.append(b)
        terms.append(torch.relu(dist(emb[a], emb[p], "euclidean") - b + margin))
        terms.append(torch.relu(b - dist(emb[a], emb[n], "euclidean") + margin))
    count = {"avg_non_zero": sum(float(t.detach()) > 0 for t in terms), "mean": len(terms), "sum": 1}[
        reduction
    ]
    value = sum(terms) / count if count else 0.0
    if learn and per_class:
        value = value + (nu * sum(betas) / count if count else 0.0)
    elif learn:
        value = value + nu * beta
    return value


def dsm_loop(emb, labels, hist, min_val=-2.0, num_bins=10, momentum=0.01):
    """Zhang & Rusinkiewicz (2019) soft-histogram CDF weighting, with values past the last bin counted in
    it. Returns (loss, new histogram as a list). ``hist``: previous histogram (list) or all zeros."""
    delta = 2 * abs(min_val) / num_bins
    xs = [
        dist(emb[a], emb[p], "euclidean") - dist(emb[a], emb[n], "euclidean")
        for a, p, n in loop_triplets(labels)
    ]
    if not xs:
        return 0.0, hist
    m = momentum if sum(hist) != 0 else 1.0
    new = [(1 - m) * h for h in hist]
    bins = []
    for x in xs:
        t = min(max((float(x) - min_val) / delta, 0.0), num_bins - 1)
        i = math.floor(t)
        frac = t - i
        bins.append(i)
        new[i] += m * (1 - frac)
        new[min(i + 1, num_bins - 1)] += m * frac
    total = sum(new)
    new = [h / total for h in new]
    cdf = [sum(new[: i + 1]) for i in range(num_bins)]
    return sum(cdf[i] * x for i, x in zip(bins, xs, strict=True)) / len(xs), new
