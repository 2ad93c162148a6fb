"""fastap, ranked_list, histogram, pnp: value and gradient against PML, and independent loop formulas.

PML refuses ``ref_emb`` for all four; dmlkit accepts a reference set, checked against plain loops over
queries and references (the same loops are first checked against PML on the batch).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_miners = pytest.importorskip("pytorch_metric_learning.miners")

from test_loss_reference import MINERS, SHAPES, TOL, compare, make_batch, pml_distance  # noqa: E402

from dmlkit import losses  # noqa: E402
from dmlkit.errors import ConfigError  # noqa: E402


def pml_ranked_list(**kwargs: float) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PML warns about Tn > 5 (no overflow here: exp(Tn · α) ≤ e^12)
        return pml_losses.RankedListLoss(**{"margin": 0.4, "Tn": 10.0, **kwargs})


CONFIGS: list[tuple[str, dict, Callable[[], torch.nn.Module]]] = [
    ("fastap", {}, lambda: pml_losses.FastAPLoss()),
    (
        "fastap",
        {"num_bins": 7, "distance": "euclidean"},
        lambda: pml_losses.FastAPLoss(num_bins=7, distance=pml_distance("euclidean")),
    ),
    ("fastap", {"num_bins": 30}, lambda: pml_losses.FastAPLoss(num_bins=30)),
    ("ranked_list", {}, lambda: pml_ranked_list()),
    (
        "ranked_list",
        {"margin": 0.6, "Tn": 3.0, "Tp": 2.0, "imbalance": 0.3, "alpha": 1.1},
        lambda: pml_ranked_list(margin=0.6, Tn=3.0, Tp=2.0, imbalance=0.3, alpha=1.1),
    ),
    (
        "ranked_list",
        {
            "margin": 8.0,
            "Tn": 0.1,
            "Tp": 0.05,
            "distance": "squared_euclidean",
            "normalize_embeddings": False,
        },
        lambda: pml_ranked_list(
            margin=8.0, Tn=0.1, Tp=0.05, distance=pml_distance("squared_euclidean", False)
        ),
    ),
    ("histogram", {}, lambda: pml_losses.HistogramLoss()),
    ("histogram", {"n_bins": 10}, lambda: pml_losses.HistogramLoss(n_bins=10)),
    ("histogram", {"delta": 0.05}, lambda: pml_losses.HistogramLoss(delta=0.05)),
    ("pnp", {}, lambda: pml_losses.PNPLoss()),
    ("pnp", {"variant": "Ds", "anneal": 0.1}, lambda: pml_losses.PNPLoss(variant="Ds", anneal=0.1)),
    (
        "pnp",
        {"variant": "Dq", "anneal": 0.1, "alpha": 2.0},
        lambda: pml_losses.PNPLoss(variant="Dq", anneal=0.1, alpha=2.0),
    ),
    ("pnp", {"variant": "Iu", "anneal": 0.05}, lambda: pml_losses.PNPLoss(variant="Iu", anneal=0.05)),
    (
        "pnp",
        {"variant": "Ib", "anneal": 0.1, "b": 3.0},
        lambda: pml_losses.PNPLoss(variant="Ib", anneal=0.1, b=3.0),
    ),
]
CONFIG_IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'default'}" for name, kw, _ in CONFIGS]
DTYPES = [torch.float64, torch.float32]


@contextlib.contextmanager
def pml_default_dtype(name: str, dtype: torch.dtype) -> Iterator[None]:
    """PML's HistogramLoss computes the bin offsets ``r·Δ`` (a long tensor times a float) in the default
    dtype, i.e. float32, even for float64 inputs (errors ~1e-6 relative); with the default dtype set to the
    input's, its float64 arithmetic is exact and comparable at rtol 1e-8. dmlkit never uses the default
    dtype."""
    if name != "histogram":
        yield
        return
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


# ------------------------------------------------------------------------------------------------- vs PML


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize(("name", "kwargs", "pml_factory"), CONFIGS, ids=CONFIG_IDS)
def test_no_miner_matches_pml(name, kwargs, pml_factory, shape, dtype) -> None:
    emb, labels = make_batch(*shape, dtype, seed=sum(shape) + 3)
    with pml_default_dtype(name, dtype):
        compare(name, kwargs, pml_factory, emb, labels)


MINED_CONFIGS = [c for c in CONFIGS if c[0] in ("fastap", "histogram")]
MINED_CASES = [(m, torch.float64) for m in sorted(MINERS)] + [
    ("ms_pairs", torch.float32),
    ("semihard_triplets", torch.float32),
]


@pytest.mark.parametrize(("miner", "dtype"), MINED_CASES, ids=[f"{m}-{str(d)[-7:]}" for m, d in MINED_CASES])
@pytest.mark.parametrize(
    ("name", "kwargs", "pml_factory"),
    MINED_CONFIGS,
    ids=[CONFIG_IDS[CONFIGS.index(c)] for c in MINED_CONFIGS],
)
def test_mined_tuples_match_pml(name, kwargs, pml_factory, miner, dtype) -> None:
    """fastap: the tuple weights the queries; histogram: pairs are joined into triplets."""
    emb, labels = make_batch(24, 8, 5, dtype, seed=19)
    indices_tuple = MINERS[miner]()(emb, labels)
    with pml_default_dtype(name, dtype):
        compare(name, kwargs, pml_factory, emb, labels, indices_tuple)


EDGE_LABELS = {
    "all_same": torch.zeros(10, dtype=torch.long),
    "all_distinct": torch.arange(10),
    "singletons": torch.tensor([0, 0, 0, 1, 2, 3, 3, 4, 5, 6]),
    "one_pair": torch.tensor([0, 0, 1, 2, 3, 4, 5, 6, 7, 8]),
}


@pytest.mark.parametrize("labels_name", sorted(EDGE_LABELS))
@pytest.mark.parametrize(("name", "kwargs", "pml_factory"), CONFIGS, ids=CONFIG_IDS)
def test_degenerate_labels_match_pml(name, kwargs, pml_factory, labels_name) -> None:
    labels = EDGE_LABELS[labels_name]
    emb = torch.randn(len(labels), 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with pml_default_dtype(name, torch.float64):
        ours = compare(name, kwargs, pml_factory, emb, labels)
    if labels_name in ("all_same", "all_distinct") and name != "ranked_list":
        assert ours.item() == 0.0  # no query has both positives and negatives to rank


@pytest.mark.parametrize("name", ["ranked_list", "pnp"])
def test_losses_without_tuple_kinds_refuse_a_miner(name: str) -> None:
    emb, labels = make_batch(12, 6, 3, torch.float64, seed=0)
    with pytest.raises(ConfigError, match="no miner output"):
        losses.build(name)(emb, labels, pml_miners.MultiSimilarityMiner()(emb, labels))


# ------------------------------------------------------------------------------------------ loop formulas
#
# Straight from the papers, one query and one reference at a time; ``same_set``: the reference set is the
# batch (self pairs excluded).


def _distance(x: torch.Tensor, y: torch.Tensor, squared: bool) -> torch.Tensor:
    d2 = ((x - y) ** 2).sum()
    return d2 if squared else torch.sqrt(d2)


def fastap_loop(q, r, ql, rl, same_set, num_bins=10, squared=True) -> torch.Tensor:
    """FastAP (Cakir et al., 2019): per query, Σ_k h⁺_k H⁺_k / H_k / |P| with triangular-kernel bins."""
    q, r = F.normalize(q, dim=1), F.normalize(r, dim=1)
    top = 4.0 if squared else 2.0
    width = top / num_bins
    nodes = [k * width for k in range(num_bins + 1)]
    losses_ = []
    for i in range(len(q)):
        pos, neg = [], []
        for j in range(len(r)):
            if same_set and i == j:
                continue
            d = _distance(q[i], r[j], squared)
            (pos if ql[i] == rl[j] else neg).append(d)
        if not pos:
            continue
        h_pos = [sum(torch.clamp(1 - torch.abs(d - c) / width, min=0) for d in pos) for c in nodes]
        h_neg = [
            sum((torch.clamp(1 - torch.abs(d - c) / width, min=0) for d in neg), q.new_zeros(()))
            for c in nodes
        ]
        ap, cum_pos, cum_all = q.new_zeros(()), 0.0, 0.0
        for k in range(len(nodes)):
            cum_pos = cum_pos + h_pos[k]
            cum_all = cum_all + h_pos[k] + h_neg[k]
            if float(h_pos[k] * cum_pos) > 0 and float(cum_all) > 0:
                ap = ap + h_pos[k] * cum_pos / cum_all
        losses_.append(1 - ap / len(pos))
    return sum(losses_) / len(losses_) if losses_ else q.sum() * 0


def ranked_list_loop(q, r, ql, rl, same_set, margin=0.4, Tn=10.0, imbalance=0.5, Tp=0.0) -> torch.Tensor:
    """Ranked list loss (Wang et al., 2019), PML's weights and 1e-5 guard per reference."""
    q, r = F.normalize(q, dim=1), F.normalize(r, dim=1)
    alpha = 1 + margin / 2
    total = q.new_zeros(())
    for i in range(len(q)):
        num_p = den_p = num_n = den_n = q.new_zeros(())
        for j in range(len(r)):
            if same_set and i == j:
                continue
            d = _distance(q[i], r[j], squared=False)
            if ql[i] == rl[j] and float(d) > alpha - margin and float(d) > 0:
                w = torch.exp(Tp * (d - (alpha - margin)))
                num_p, den_p = num_p + w * (d - (alpha - margin)), den_p + w
            elif ql[i] != rl[j] and float(d) < alpha and float(d) > 0:
                w = torch.exp(Tn * (alpha - d))
                num_n, den_n = num_n + w * (alpha - d), den_n + w
        guard = 1e-5 * len(r)
        total = total + (1 - imbalance) * num_p / (den_p + guard) + imbalance * num_n / (den_n + guard)
    return total / len(q)


def histogram_loop(q, r, ql, rl, same_set, n_bins=100) -> torch.Tensor:
    """Histogram loss (Ustinova & Lempitsky, 2016): Σ_r p⁻_r Φ⁺_r over the triplets' pairs."""
    q, r = F.normalize(q, dim=1), F.normalize(r, dim=1)
    delta = 2 / n_bins
    has_pos = [
        any(ql[i] == rl[j] and not (same_set and i == j) for j in range(len(r))) for i in range(len(q))
    ]
    has_neg = [any(ql[i] != rl[j] for j in range(len(r))) for i in range(len(q))]
    if not any(p and n for p, n in zip(has_pos, has_neg, strict=True)):
        return q.sum() * 0
    pos, neg = [], []
    for i in range(len(q)):
        for j in range(len(r)):
            if same_set and j <= i:  # unordered pairs: (i, j) counts if either end anchors a triplet
                if j == i:
                    continue
                if ql[i] == rl[j] and (has_neg[i] or has_neg[j]):
                    pos.append(q[i] @ r[j])
                elif ql[i] != rl[j] and (has_pos[i] or has_pos[j]):
                    neg.append(q[i] @ r[j])
            elif not same_set:
                if ql[i] == rl[j] and has_neg[i]:
                    pos.append(q[i] @ r[j])
                elif ql[i] != rl[j] and has_pos[i]:
                    neg.append(q[i] @ r[j])
    nodes = [-1 + k * delta for k in range(n_bins + 1)]

    def density(values: list[torch.Tensor]) -> list[torch.Tensor]:
        return [
            sum(torch.clamp(1 - torch.abs(v - t) / delta, min=0) for v in values) / len(values) for t in nodes
        ]

    p_pos, p_neg = density(pos), density(neg)
    total, cdf = q.new_zeros(()), q.new_zeros(())
    for k in range(len(nodes)):
        cdf = cdf + p_pos[k]
        total = total + p_neg[k] * cdf
    return total


def pnp_loop(q, r, ql, rl, same_set, variant="O", anneal=0.01, b=2.0, alpha=1.0) -> torch.Tensor:
    """PNP (Li et al., 2022): per positive j, R = Σ_{negatives k} σ((s_ik − s_ij)/anneal), then f(R)."""
    q, r = F.normalize(q, dim=1), F.normalize(r, dim=1)
    f = {
        "O": lambda x: x,
        "Ds": lambda x: torch.log(1 + x),
        "Dq": lambda x: 1 / (1 + x) ** alpha,
        "Iu": lambda x: (1 + x) * torch.log(1 + x),
        "Ib": lambda x: (b * x - torch.log(1 + b * x)) / b**2,
    }[variant]
    per_query = []
    for i in range(len(q)):
        pos = [j for j in range(len(r)) if ql[i] == rl[j] and not (same_set and j == i)]
        neg = [k for k in range(len(r)) if ql[i] != rl[k]]
        if not pos:
            continue
        sims = {j: q[i] @ r[j] for j in range(len(r))}
        if same_set:
            pos.append(i)  # PML counts the query itself among its positives
        terms = []
        for j in pos:
            rank = sum(
                (torch.sigmoid(torch.clamp((sims[k] - sims[j]) / anneal, -50, 50)) for k in neg),
                q.new_zeros(()),
            )
            terms.append(f(rank))
        mean = sum(terms) / len(terms)
        per_query.append(1 - mean if variant == "Dq" else mean)
    return sum(per_query) / len(per_query) if per_query else q.sum() * 0


LOOPS = {
    "fastap": (fastap_loop, [{}, {"num_bins": 7, "squared": False}]),
    "ranked_list": (ranked_list_loop, [{}, {"margin": 0.6, "Tn": 3.0, "Tp": 2.0, "imbalance": 0.3}]),
    "histogram": (histogram_loop, [{}, {"n_bins": 10}]),
    "pnp": (pnp_loop, [{}, {"variant": "Dq", "anneal": 0.1, "alpha": 2.0}, {"variant": "Ib", "anneal": 0.1}]),
}
LOOP_CASES = [(name, kw) for name, (_, kws) in LOOPS.items() for kw in kws]


def our_kwargs(name: str, loop_kwargs: dict) -> dict:
    kwargs = dict(loop_kwargs)
    if name == "fastap" and "squared" in kwargs:
        kwargs["distance"] = "squared_euclidean" if kwargs.pop("squared") else "euclidean"
    return kwargs


@pytest.mark.parametrize("use_ref", [False, True], ids=["batch", "ref"])
@pytest.mark.parametrize(("name", "loop_kwargs"), LOOP_CASES, ids=[f"{n}-{kw}" for n, kw in LOOP_CASES])
def test_matches_loop_formula(name: str, loop_kwargs: dict, use_ref: bool) -> None:
    """Value and gradients (embeddings and reference set) equal the loop implementation; on the batch
    this also checks the loops themselves, since the batch values equal PML's (tests above)."""
    loop = LOOPS[name][0]
    emb, labels = make_batch(8, 5, 3, torch.float64, seed=21)
    ref, ref_labels = make_batch(11, 5, 3, torch.float64, seed=22) if use_ref else (emb, labels)
    ours_in = [emb.clone().requires_grad_(True), ref.clone().requires_grad_(True)]
    loop_in = [emb.clone().requires_grad_(True), ref.clone().requires_grad_(True)]
    if use_ref:
        ours = losses.build(name, **our_kwargs(name, loop_kwargs))(
            ours_in[0], labels, None, *ours_in[1:], ref_labels
        )
        expected = loop(loop_in[0], loop_in[1], labels.tolist(), ref_labels.tolist(), False, **loop_kwargs)
    else:
        ours = losses.build(name, **our_kwargs(name, loop_kwargs))(ours_in[0], labels)
        expected = loop(loop_in[0], loop_in[0], labels.tolist(), labels.tolist(), True, **loop_kwargs)
    torch.testing.assert_close(ours, expected, **TOL[torch.float64])
    ours.backward()
    expected.backward()
    for a, b in zip(ours_in, loop_in, strict=True):
        if a.grad is None and b.grad is None:
            continue
        ga = a.grad if a.grad is not None else torch.zeros_like(a)
        gb = b.grad if b.grad is not None else torch.zeros_like(b)
        torch.testing.assert_close(ga, gb, rtol=1e-8, atol=1e-10 * max(1.0, float(gb.abs().max())))


def test_histogram_loop_matches_pml_in_float32_default_dtype() -> None:
    """The loop (paper's kernel) agrees with PML as PML actually runs (bin offsets in float32) to ~1e-6."""
    emb, labels = make_batch(24, 8, 5, torch.float64, seed=23)
    expected = pml_losses.HistogramLoss(n_bins=20)(emb, labels)
    loop = histogram_loop(emb, emb, labels.tolist(), labels.tolist(), True, n_bins=20)
    torch.testing.assert_close(loop, expected, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(losses.build("histogram", n_bins=20)(emb, labels), loop, **TOL[torch.float64])


def test_histogram_with_identical_embeddings_is_finite() -> None:
    """A pair with similarity exactly 1 falls on the last node (PML indexes one past its histogram)."""
    emb, labels = make_batch(8, 4, 3, torch.float64, seed=5)
    emb[1] = emb[0] * 3.0
    labels[1] = labels[0]
    x = emb.clone().requires_grad_(True)
    value = losses.build("histogram", n_bins=10)(x, labels)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(x.grad).all()
    expected = histogram_loop(emb, emb, labels.tolist(), labels.tolist(), True, n_bins=10)
    assert value.item() == pytest.approx(expected.item(), rel=1e-9, abs=1e-12)


# ---------------------------------------------------------------------------------------------- contract


def test_class_attributes_and_no_parameters() -> None:
    both = frozenset({"pairs", "triplets"})
    expected = {"fastap": both, "histogram": both, "ranked_list": frozenset(), "pnp": frozenset()}
    for name, kinds in expected.items():
        loss = losses.build(name)
        assert loss.tuple_kinds == kinds
        assert loss.accepts_ref is True
        assert loss.needs == frozenset()
        assert list(loss.parameters()) == []


def test_defaults() -> None:
    assert losses.build("fastap").num_bins == 10 and losses.build("fastap").distance == "squared_euclidean"
    rll = losses.build("ranked_list")
    assert (rll.margin, rll.Tn, rll.imbalance, rll.alpha, rll.Tp) == (0.4, 10.0, 0.5, 1.2, 0.0)
    assert losses.build("histogram").n_bins == 100 and losses.build("histogram").delta == 0.02
    assert losses.build("histogram", delta=0.1).n_bins == 20
    pnp = losses.build("pnp")
    assert (pnp.b, pnp.alpha, pnp.anneal, pnp.variant) == (2.0, 1.0, 0.01, "O")


def test_bad_options_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="fastap: distance"):
        losses.build("fastap", distance="cosine")
    with pytest.raises(ConfigError, match="normalize_embeddings"):
        losses.build("fastap", normalize_embeddings=False)
    with pytest.raises(ConfigError, match="ranked_list: distance"):
        losses.build("ranked_list", distance="cosine")
    with pytest.raises(ConfigError, match="imbalance"):
        losses.build("ranked_list", imbalance=1.5)
    with pytest.raises(ConfigError, match="delta = 2 / n_bins"):
        losses.build("histogram", n_bins=10, delta=0.1)
    with pytest.raises(ConfigError, match="histogram: distance"):
        losses.build("histogram", distance="euclidean")
    with pytest.raises(ConfigError, match="variant"):
        losses.build("pnp", variant="X")
    with pytest.raises(ConfigError, match="pnp: distance"):
        losses.build("pnp", distance="euclidean")


def test_last_stats() -> None:
    emb, labels = make_batch(12, 6, 4, torch.float64, seed=9)
    same = labels[:, None] == labels[None, :]
    with_pos = float((same.sum(1) > 1).sum())
    for name in ("fastap", "pnp"):
        loss = losses.build(name)
        loss(emb, labels)
        assert loss.last_stats == {"num_anchors": with_pos}
    histogram = losses.build("histogram")
    histogram(emb, labels)
    n_pos = (int(same.sum()) - 12) / 2  # every anchor here has a negative: all unordered positive pairs
    assert histogram.last_stats["num_pos_pairs"] == n_pos
    rll = losses.build("ranked_list")
    rll(emb, labels)
    assert set(rll.last_stats) == {"num_pos_pairs", "num_neg_pairs"}


@pytest.mark.parametrize(("name", "kwargs", "pml_factory"), CONFIGS, ids=CONFIG_IDS)
def test_bf16_autocast_is_finite_and_close_to_float32(name, kwargs, pml_factory) -> None:
    emb, labels = make_batch(24, 16, 5, torch.float32, seed=5)
    loss = losses.build(name, **kwargs)
    reference = loss(emb, labels)
    for inputs in (emb, emb.bfloat16()):
        x = inputs.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            value = loss(x, labels)
        value.backward()
        assert value.dtype == torch.float32
        assert torch.isfinite(value) and torch.isfinite(x.grad.float()).all()
        # bf16 inputs carry ~3 significant digits (rank counts with a small anneal amplify them)
        tol = {"rtol": 5e-2, "atol": 2e-2} if inputs.dtype == torch.bfloat16 else {"rtol": 1e-6, "atol": 1e-7}
        torch.testing.assert_close(value, reference, **tol)


def test_loops_are_not_trivial() -> None:
    """Guard against a vacuous loop comparison: the chosen batch has losses well away from 0."""
    emb, labels = make_batch(8, 5, 3, torch.float64, seed=21)
    for name, (loop, _) in LOOPS.items():
        value = float(loop(emb, emb, labels.tolist(), labels.tolist(), True))
        assert math.isfinite(value) and value > 1e-3, name
