"""Proxy-based losses (dmlkit.losses.proxy) against pytorch-metric-learning (PML): value and gradients
w.r.t. the embeddings and the proxies, with identical initial parameters; loop implementations of the
papers' formulas for the documented deviations and the non-PML reductions."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from proxy_checks import (
    EDGE_CLASSES,
    EDGE_LABELS,
    SHAPES,
    TOL,
    compare_twins,
    grads_close,
    make_batch,
    one_step_reduces_loss,
    pml_distance,
    twins,
)

from dmlkit import losses, miners
from dmlkit.errors import ConfigError, DataError
from dmlkit.losses.proxy import cosine_matrix, sample_weights

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
lmu = pytest.importorskip("pytorch_metric_learning.utils.loss_and_miner_utils")

NAMES = ["proxynca", "proxyanchor", "softtriple", "normsoftmax", "manifold"]

# (name, our kwargs, PML kwargs): defaults first, then other hyperparameters and distances
CONFIGS: list[tuple[str, dict, dict]] = [
    ("proxynca", {}, {}),
    ("proxynca", {"softmax_scale": 3.0}, {"softmax_scale": 3.0}),
    ("proxynca", {"distance": "cosine"}, {"distance": pml_distance("cosine")}),
    ("proxynca", {"distance": "euclidean"}, {"distance": pml_distance("euclidean")}),
    (
        "proxynca",
        {"distance": "dot", "normalize_embeddings": False, "softmax_scale": 0.5},
        {"distance": pml_distance("dot", False), "softmax_scale": 0.5},
    ),
    ("proxyanchor", {}, {}),
    ("proxyanchor", {"margin": 0.2, "alpha": 16.0}, {"margin": 0.2, "alpha": 16.0}),
    (
        "proxyanchor",
        {"distance": "euclidean", "alpha": 4.0},
        {"distance": pml_distance("euclidean"), "alpha": 4.0},
    ),
    ("softtriple", {}, {}),
    (
        "softtriple",
        {"centers_per_class": 3, "la": 10.0, "gamma": 0.05, "margin": 0.2},
        {"centers_per_class": 3, "la": 10.0, "gamma": 0.05, "margin": 0.2},
    ),
    # 2/γ beyond the float64 exp range: the per-class maximum shift instead of the constant one
    ("softtriple", {"centers_per_class": 2, "gamma": 0.002}, {"centers_per_class": 2, "gamma": 0.002}),
    (
        "softtriple",
        {"centers_per_class": 4, "distance": "dot", "normalize_embeddings": False, "la": 2.0},
        {"centers_per_class": 4, "distance": pml_distance("dot", False), "la": 2.0},
    ),
    ("normsoftmax", {}, {}),
    ("normsoftmax", {"temperature": 0.5}, {"temperature": 0.5}),
    ("normsoftmax", {"distance": "euclidean"}, {"distance": pml_distance("euclidean")}),
    (
        "normsoftmax",
        {"distance": "dot", "normalize_embeddings": False, "temperature": 2.0},
        {"distance": pml_distance("dot", False), "temperature": 2.0},
    ),
]
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'default'}" for n, kw, _ in CONFIGS]
DEFAULTS = [c for c in CONFIGS if not c[1]]
DEFAULT_IDS = [c[0] for c in DEFAULTS]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize(("name", "ours_kw", "pml_kw"), CONFIGS, ids=IDS)
def test_no_miner_matches_pml(name, ours_kw, pml_kw, shape, dtype) -> None:
    batch, dim, classes = shape
    emb, labels = make_batch(batch, dim, classes, dtype, seed=sum(shape))
    ours, theirs = twins(name, classes, dim, dtype, ours_kw, pml_kw, seed=batch)
    compare_twins(name, ours, theirs, emb, labels)


MINERS = {
    "ms_pairs": lambda: pml_miners.MultiSimilarityMiner(epsilon=0.1),
    "batch_hard_triplets": lambda: pml_miners.BatchHardMiner(),
}
MINED_CASES = [(m, torch.float64) for m in MINERS] + [("ms_pairs", torch.float32)]


@pytest.mark.parametrize(("miner", "dtype"), MINED_CASES, ids=[f"{m}-{str(d)[-7:]}" for m, d in MINED_CASES])
@pytest.mark.parametrize(("name", "ours_kw", "pml_kw"), CONFIGS, ids=IDS)
def test_mined_tuples_weigh_samples_as_pml(name, ours_kw, pml_kw, miner, dtype) -> None:
    """PML's proxy losses turn a miner's output into per-sample weights (``convert_to_weights``)."""
    emb, labels = make_batch(24, 8, 5, dtype, seed=7)
    indices_tuple = MINERS[miner]()(emb, labels)
    assert all(len(t) > 1 for t in indices_tuple)
    ours, theirs = twins(name, 5, 8, dtype, ours_kw, pml_kw, seed=3)
    compare_twins(name, ours, theirs, emb, labels, indices_tuple)


@pytest.mark.parametrize("labels_name", sorted(EDGE_LABELS))
@pytest.mark.parametrize(("name", "ours_kw", "pml_kw"), DEFAULTS, ids=DEFAULT_IDS)
def test_degenerate_labels_match_pml(name, ours_kw, pml_kw, labels_name) -> None:
    labels = EDGE_LABELS[labels_name]
    emb = torch.randn(len(labels), 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours, theirs = twins(name, EDGE_CLASSES, 6, torch.float64, ours_kw, pml_kw)
    compare_twins(name, ours, theirs, emb, labels)


def test_sample_weights_match_pml_convert_to_weights() -> None:
    emb, labels = make_batch(24, 8, 5, torch.float64, seed=1)
    for miner in MINERS.values():
        tuples = miner()(emb, labels)
        for anchors_only in (False, True):
            expected = lmu.convert_to_weights(tuples, labels, dtype=torch.float64, using_ref=anchors_only)
            torch.testing.assert_close(sample_weights(tuples, 24, torch.float64, anchors_only), expected)
    empty = tuple(torch.empty(0, dtype=torch.long) for _ in range(3))
    assert sample_weights(empty, 24, torch.float64) is None
    assert sample_weights(None, 24, torch.float64) is None


# ---------------------------------------------------------------------------------------------- manifold


MANIFOLD_CONFIGS = [
    {},
    {"lambdaC": 0.3, "alpha": 0.5, "margin": 0.05},
    {"lambdaC": 0.0},
]


@pytest.mark.parametrize(
    "kwargs", MANIFOLD_CONFIGS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()) or "default"
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_manifold_matches_pml(kwargs, dtype) -> None:
    """PML's ManifoldLoss takes no labels: its ``indices_tuple`` is the proxy assignment, our labels.

    PML inverts ``I − αS̄`` in float32 whatever the input dtype (we invert in the input dtype), so the
    comparison holds to float32 precision; float64 is checked tightly against the loop formula below.
    """
    emb, labels = make_batch(16, 6, 4, dtype, seed=2)
    ours, theirs = twins("manifold", 4, 6, dtype, kwargs, kwargs, seed=5)
    compare_twins("manifold", ours, theirs, emb, labels, tol={"rtol": 2e-4, "atol": 1e-6})


def manifold_loop(
    emb: torch.Tensor,
    proxies: torch.Tensor,
    labels: torch.Tensor,
    lambda_c: float = 1.0,
    alpha: float = 0.8,
    margin: float = 5e-4,
) -> torch.Tensor:
    """Aziere & Todorovic (CVPR 2019) manifold proxy loss, entry by entry (PML's reading of it)."""
    nodes = [v / v.norm() for v in list(emb) + list(proxies)]
    n, size = len(emb), len(emb) + len(proxies)
    rows = []
    for u in range(size):
        rows.append(
            torch.stack(
                [
                    torch.zeros((), dtype=emb.dtype)
                    if u == v
                    else torch.exp(torch.clamp(nodes[u] @ nodes[v], min=0) / 0.5)
                    for v in range(size)
                ]
            )
        )
    s = torch.stack(rows)
    degree = [s[u].sum() for u in range(size)]
    s_bar = torch.stack(
        [torch.stack([s[u, v] / torch.sqrt(degree[u] * degree[v]) for v in range(size)]) for u in range(size)]
    )
    f = (1 - alpha) * torch.linalg.inv(torch.eye(size, dtype=emb.dtype) - alpha * s_bar)

    def term(score: Callable[[int, int], torch.Tensor], i: int) -> torch.Tensor:
        y = int(labels[i])
        total = torch.zeros((), dtype=emb.dtype)
        for k in range(len(proxies)):
            if k == y:
                continue
            e = score(i, k) - score(i, y) + margin
            if e >= 0:
                total = total + torch.exp(e)
        return torch.log(1 + total)

    def intrinsic(i: int, k: int) -> torch.Tensor:
        return f[i, n + k]

    def context(i: int, k: int) -> torch.Tensor:
        return (f[i] @ f[n + k]) / (f[i].norm() * f[n + k].norm())

    if math.isinf(lambda_c):
        return sum(term(context, i) for i in range(n)) / n
    losses_int = sum(term(intrinsic, i) for i in range(n)) / n
    return losses_int + lambda_c * sum(term(context, i) for i in range(n)) / n


@pytest.mark.parametrize("lambda_c", [1.0, 0.4, 0.0, math.inf])
def test_manifold_matches_loop_formula_in_float64(lambda_c) -> None:
    emb, labels = make_batch(7, 4, 3, torch.float64, seed=9)
    loss = losses.build("manifold", num_classes=3, embedding_size=4, lambdaC=lambda_c, margin=0.05).double()
    x = emb.clone().requires_grad_(True)
    value = loss(x, labels)
    value.backward()
    x_ref = emb.clone().requires_grad_(True)
    proxies = loss.proxies.detach().clone().requires_grad_(True)
    expected = manifold_loop(x_ref, proxies, labels, lambda_c, margin=0.05)
    expected.backward()
    torch.testing.assert_close(value, expected, **TOL[torch.float64])
    grads_close(x.grad, x_ref.grad, x, TOL[torch.float64])
    grads_close(loss.proxies.grad, proxies.grad, proxies, TOL[torch.float64])


def test_manifold_lambda_inf_is_the_context_loss_and_finite() -> None:
    """Deviation: PML returns ``0 + inf · L_ctx`` = inf for ``lambdaC=inf``; dmlkit returns ``L_ctx``."""
    emb, labels = make_batch(10, 4, 3, torch.float64, seed=1)
    value = losses.build("manifold", num_classes=3, embedding_size=4, lambdaC=math.inf)(emb.float(), labels)
    assert torch.isfinite(value)


def test_manifold_rejects_bad_options() -> None:
    with pytest.raises(ConfigError, match="lambdaC"):
        losses.build("manifold", num_classes=3, embedding_size=4, lambdaC=-1)
    with pytest.raises(ConfigError, match="alpha"):
        losses.build("manifold", num_classes=3, embedding_size=4, alpha=1.0)
    with pytest.raises(ConfigError, match="distance"):
        losses.build("manifold", num_classes=3, embedding_size=4, distance="euclidean")


# ---------------------------------------------------------------------------------------------- loop formulas


def proxy_anchor_loop(
    emb: torch.Tensor,
    proxies: torch.Tensor,
    labels: torch.Tensor,
    margin: float,
    alpha: float,
    reduction: str,
) -> torch.Tensor:
    """Kim et al. (CVPR 2020), Eq. 4, with loops over proxies and samples; ``reduction`` of each term."""
    pos_terms, neg_terms = [], []
    for c in range(len(proxies)):
        p = proxies[c] / proxies[c].norm()
        pos = [(x / x.norm()) @ p for x, y in zip(emb, labels, strict=True) if int(y) == c]
        neg = [(x / x.norm()) @ p for x, y in zip(emb, labels, strict=True) if int(y) != c]
        if pos:
            pos_terms.append(torch.log(1 + sum(torch.exp(-alpha * (s - margin)) for s in pos)))
        neg_terms.append(
            torch.log(1 + sum(torch.exp(alpha * (s + margin)) for s in neg)) if neg else emb.sum() * 0
        )

    def reduce(terms: list[torch.Tensor], count: int) -> torch.Tensor:
        total = sum(terms)
        if reduction == "sum":
            return total
        if reduction == "mean":
            return total / count
        nonzero = sum(1 for t in terms if t > 0)
        return total / max(nonzero, 1)

    return reduce(pos_terms, len(pos_terms)) + reduce(neg_terms, len(proxies))


@pytest.mark.parametrize("reduction", ["mean", "sum", "avg_non_zero"])
def test_proxyanchor_matches_loop_formula(reduction) -> None:
    """``mean`` is PML's; ``sum`` and ``avg_non_zero`` (no PML counterpart) apply to each per-proxy term."""
    emb, labels = make_batch(12, 5, 6, torch.float64, seed=3)
    loss = losses.build(
        "proxyanchor", num_classes=6, embedding_size=5, reduction=reduction, alpha=8.0
    ).double()
    x = emb.clone().requires_grad_(True)
    value = loss(x, labels)
    value.backward()
    x_ref = emb.clone().requires_grad_(True)
    proxies = loss.proxies.detach().clone().requires_grad_(True)
    expected = proxy_anchor_loop(x_ref, proxies, labels, 0.1, 8.0, reduction)
    expected.backward()
    torch.testing.assert_close(value, expected, **TOL[torch.float64])
    grads_close(x.grad, x_ref.grad, x, TOL[torch.float64])
    grads_close(loss.proxies.grad, proxies.grad, proxies, TOL[torch.float64])


def test_proxyanchor_reports_proxies_with_positives() -> None:
    emb, labels = make_batch(12, 5, 6, torch.float64, seed=3)
    loss = losses.build("proxyanchor", num_classes=9, embedding_size=5)
    loss(emb.float(), labels)
    assert loss.last_stats == {"num_pos_proxies": float(len(set(labels.tolist())))}


def test_proxynca_keeps_samples_whose_target_probability_underflows() -> None:
    """Deviation: PML computes softmax then log and drops samples whose target probability is exactly 0;
    dmlkit uses log-softmax and keeps them, matching the formula (checked with a stable loop)."""
    emb, labels = make_batch(8, 4, 3, torch.float32, seed=2)
    loss, theirs = twins("proxynca", 3, 4, torch.float32, {"softmax_scale": 200.0}, {"softmax_scale": 200.0})
    value = loss(emb, labels)
    x = F.normalize(emb.double(), dim=1)
    p = F.normalize(loss.proxies.detach().double(), dim=1)
    total = 0.0
    for i in range(len(x)):
        logits = [-200.0 * float((x[i] - p[c]).pow(2).sum()) for c in range(3)]
        top = max(logits)
        total += top + math.log(sum(math.exp(v - top) for v in logits)) - logits[int(labels[i])]
    assert value.item() == pytest.approx(total / len(x), rel=1e-5)
    probs = torch.softmax(200.0 * -(torch.cdist(x, p) ** 2).float(), dim=1)[torch.arange(8), labels]
    assert (probs == 0).any() and (probs > 0).any()  # float32 underflow: the samples PML drops
    assert theirs(emb, labels).item() < value.item()


# ------------------------------------------------------------------------------------ fused backward passes


@pytest.mark.parametrize("columns", [True, False], ids=["columns", "rows"])
def test_cosine_matrix_gradcheck(columns) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, generator=g, dtype=torch.float64)
    w = (w if columns else w.t().contiguous()).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: cosine_matrix(a, b, columns), (x, w))
    expected = F.normalize(x, dim=1) @ F.normalize(w if columns else w.t(), dim=0)
    torch.testing.assert_close(cosine_matrix(x, w, columns), expected, **TOL[torch.float64])


@pytest.mark.parametrize("shift", [1.0, None], ids=["constant-shift", "max-shift"])
def test_softtriple_similarity_gradcheck(shift) -> None:
    from dmlkit.losses.proxy import _SoftTripleSimilarity

    sims = torch.rand(4, 3, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
    sims.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: _SoftTripleSimilarity.apply(s, 7.0, shift), (sims,))
    expected = (torch.softmax(sims * 7.0, dim=2) * sims).sum(2)
    torch.testing.assert_close(_SoftTripleSimilarity.apply(sims, 7.0, shift), expected, **TOL[torch.float64])


# ---------------------------------------------------------------------------------------------- contract


@pytest.mark.parametrize("name", NAMES)
def test_class_attributes_and_parameters(name) -> None:
    cls = losses.REGISTRY.get(name)
    assert cls.needs == {"num_classes", "embedding_size"}
    assert cls.accepts_ref is False
    assert cls.tuple_kinds == (frozenset() if name == "manifold" else frozenset({"pairs", "triplets"}))
    loss = losses.build(name, num_classes=4, embedding_size=6)
    params = list(loss.parameters())
    assert len(params) == 1 and isinstance(params[0], torch.nn.Parameter) and params[0].requires_grad


@pytest.mark.parametrize("name", NAMES)
def test_one_optimizer_step_reduces_the_loss(name) -> None:
    emb, labels = make_batch(16, 6, 4, torch.float32, seed=4)
    torch.manual_seed(0)
    loss = losses.build(name, num_classes=4, embedding_size=6)
    one_step_reduces_loss(loss, emb, labels, lr=0.05 if name == "softtriple" else 0.01)


@pytest.mark.parametrize("name", NAMES)
def test_ref_emb_is_rejected_but_the_batch_itself_is_fine(name) -> None:
    emb, labels = make_batch(8, 6, 4, torch.float32, seed=0)
    loss = losses.build(name, num_classes=4, embedding_size=6)
    with pytest.raises(ConfigError, match="does not accept ref_emb"):
        loss(emb, labels, ref_emb=emb.clone(), ref_labels=labels.clone())
    torch.testing.assert_close(loss(emb, labels, ref_emb=emb, ref_labels=labels), loss(emb, labels))


@pytest.mark.parametrize("name", NAMES)
def test_labels_outside_the_classes_are_named(name) -> None:
    emb, labels = make_batch(8, 6, 4, torch.float32, seed=0)
    loss = losses.build(name, num_classes=4, embedding_size=6)
    with pytest.raises(DataError, match=r"label 7 is not a class index 0\.\.3"):
        loss(emb, torch.where(labels == 1, 7, labels))
    with pytest.raises(DataError, match=r"label -1 is not a class index"):
        loss(emb, torch.where(labels == 1, -1, labels))
    with pytest.raises(DataError, match="int64"):
        loss(emb, labels.float())
    with pytest.raises(DataError, match="embedding_size=6"):
        loss(torch.randn(8, 5), labels)


def test_manifold_takes_no_miner_output() -> None:
    emb, labels = make_batch(8, 6, 4, torch.float32, seed=0)
    loss = losses.build("manifold", num_classes=4, embedding_size=6)
    with pytest.raises(ConfigError, match="takes no miner output"):
        loss(emb, labels, miners.build("batch_hard")(emb, labels))


@pytest.mark.parametrize("name", NAMES)
def test_bad_constructor_arguments(name) -> None:
    with pytest.raises(ConfigError, match="num_classes"):
        losses.build(name, num_classes=0, embedding_size=6)
    with pytest.raises(ConfigError, match="embedding_size"):
        losses.build(name, num_classes=3, embedding_size=2.5)


@pytest.mark.parametrize("name", NAMES)
def test_bf16_autocast_is_finite_and_close_to_float32(name) -> None:
    emb, labels = make_batch(24, 16, 5, torch.float32, seed=5)
    torch.manual_seed(0)
    loss = losses.build(name, num_classes=5, embedding_size=16)
    reference = loss(emb, labels)
    for inputs in (emb, emb.bfloat16()):
        x = inputs.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            value = loss(x, labels)
        value.backward()
        assert value.dtype == torch.float32
        assert torch.isfinite(value) and torch.isfinite(x.grad.float()).all()
        tol = {"rtol": 5e-2, "atol": 5e-3} if inputs.dtype == torch.bfloat16 else {"rtol": 1e-6, "atol": 1e-7}
        torch.testing.assert_close(value, reference, **tol)


def test_parameters_keep_their_dtype_with_float64_inputs() -> None:
    emb, labels = make_batch(8, 6, 4, torch.float64, seed=0)
    loss = losses.build("proxyanchor", num_classes=4, embedding_size=6)
    value = loss(emb, labels)
    value.backward()
    assert value.dtype == torch.float64
    assert loss.proxies.dtype == torch.float32 and loss.proxies.grad.dtype == torch.float32
