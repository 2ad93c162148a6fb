"""Distance objects (dmlkit.distances) against PML's distances, plain formulas and autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dmlkit import distances
from dmlkit.distances import SNR, Cosine, Dot, Euclidean, SquaredEuclidean
from dmlkit.errors import UnknownNameError
from tests_support import plain_matrix

pml_distances = pytest.importorskip("pytorch_metric_learning.distances")

NAMES = ["euclidean", "squared_euclidean", "cosine", "dot"]

#: (name, normalize_embeddings) → PML's distance
PML = {
    ("euclidean", True): lambda: pml_distances.LpDistance(),
    ("euclidean", False): lambda: pml_distances.LpDistance(normalize_embeddings=False),
    ("squared_euclidean", True): lambda: pml_distances.LpDistance(power=2),
    ("squared_euclidean", False): lambda: pml_distances.LpDistance(power=2, normalize_embeddings=False),
    ("cosine", True): lambda: pml_distances.CosineSimilarity(),
    ("dot", True): lambda: pml_distances.DotProductSimilarity(),
    ("dot", False): lambda: pml_distances.DotProductSimilarity(normalize_embeddings=False),
    ("snr", True): lambda: pml_distances.SNRDistance(),
    ("snr", False): lambda: pml_distances.SNRDistance(normalize_embeddings=False),
}


def rows(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch (7 × 5) and a reference set (9 × 5), each with a zero row and duplicated rows."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 5, generator=g, dtype=torch.float64)
    y = torch.randn(9, 5, generator=g, dtype=torch.float64)
    x[2] = 0.0
    x[5] = x[1]  # duplicate within the batch
    y[4] = 0.0
    y[7] = x[3]  # a batch row in the reference set
    return x.to(dtype), y.to(dtype)


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    return {"rtol": 1e-7, "atol": 1e-7} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}


def pml_paired(pml: object, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PML's row-wise distance with its own normalisation and power (``pairwise_distance`` has neither)."""
    value = pml.pairwise_distance(pml.maybe_normalize(a), pml.maybe_normalize(b))  # type: ignore[attr-defined]
    return value**pml.power  # type: ignore[attr-defined]


# With autograd an L2 distance takes the Gram form, ~sqrt(eps) between equal rows: float64 only.
CASES = [
    (name, normalize, dtype, grad)
    for name, normalize in sorted(PML)
    for dtype in (torch.float32, torch.float64)
    for grad in (False, True)
    if not (grad and dtype == torch.float32 and "euclidean" in name)
]


@pytest.mark.parametrize(("name", "normalize", "dtype", "grad"), CASES)
def test_matrix_and_paired_match_pml(name: str, normalize: bool, dtype: torch.dtype, grad: bool) -> None:
    ours = distances.build(name, normalize_embeddings=normalize)
    x, y = rows(dtype)
    x.requires_grad_(grad)
    pml = PML[(name, normalize)]()
    tol = tolerance(dtype)
    nan = {"equal_nan": True}  # SNR of a zero (constant) anchor row: 0/0 in both
    mat = ours.matrix(x, y)
    assert mat.dtype == dtype
    torch.testing.assert_close(mat, pml(x, y), **tol, **nan)
    torch.testing.assert_close(ours.matrix(x), pml(x), **tol, **nan)
    torch.testing.assert_close(ours.matrix(x, x), ours.matrix(x), **tol, **nan)  # same tensor: self matrix
    torch.testing.assert_close(ours.paired(x, y[:7]), pml_paired(pml, x, y[:7]), rtol=1e-5, atol=1e-5, **nan)
    torch.testing.assert_close(ours.paired(x, y[:7]), mat.diagonal(), **tol, **nan)
    values = torch.linspace(-1, 1, 5, dtype=dtype)
    torch.testing.assert_close(ours.margin(values, values.flip(0)), pml.margin(values, values.flip(0)))
    assert ours.margin(0.3, 0.1) == pml.margin(0.3, 0.1)
    assert ours.is_similarity == pml.is_inverted


@pytest.mark.parametrize(("name", "normalize"), [k for k in sorted(PML) if k[0] in NAMES])
def test_distance_matrix_matches_pml(name: str, normalize: bool) -> None:
    g = torch.Generator().manual_seed(0)
    x, y = (
        torch.randn(7, 5, generator=g, dtype=torch.float64),
        torch.randn(9, 5, generator=g, dtype=torch.float64),
    )
    distance = distances.build(name, normalize_embeddings=normalize)
    pml = PML[(name, normalize)]()
    torch.testing.assert_close(distance.matrix(x, y), pml(x, y))
    ours_self = distance.matrix(x)
    off_diag = ~torch.eye(7, dtype=torch.bool)
    torch.testing.assert_close(ours_self[off_diag], pml(x)[off_diag])
    # row-wise variant agrees with the matrix
    torch.testing.assert_close(distance.paired(x, y[:7]), distance.matrix(x, y[:7]).diagonal())


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("power", [1, 2])
def test_no_grad_l2_matrix_is_pmls_cdist(normalize: bool, power: int) -> None:
    x, y = rows(torch.float32)
    ours = (Euclidean if power == 1 else SquaredEuclidean)(normalize_embeddings=normalize)
    pml = pml_distances.LpDistance(power=power, normalize_embeddings=normalize)
    assert torch.equal(ours.matrix(x, y), pml(x, y))
    with torch.no_grad():
        assert torch.equal(ours.matrix(x.requires_grad_(), y), pml(x, y))


def test_distance_matrix_upcasts_half_precision() -> None:
    x = torch.randn(4, 3).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mat = distances.build("cosine").matrix(x, None)
    assert mat.dtype == torch.float32
    torch.testing.assert_close(mat, distances.build("cosine").matrix(x.float(), None))
    assert distances.upcast(x).dtype == torch.float32 and distances.upcast(x.double()).dtype == torch.float64


# ------------------------------------------------------------------------------------------ gradients


def batch(n: int, ref: bool, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, dtype=torch.float64, generator=g)
    r = torch.randn(2 * n, 6, dtype=torch.float64, generator=g) if ref else None
    return x, r


@pytest.mark.parametrize("distance", NAMES)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("ref", [False, True])
def test_closed_form_backward_matches_autograd(distance: str, normalize: bool, ref: bool) -> None:
    fused_distance = distances.build(distance, normalize_embeddings=normalize)
    x, r = batch(7, ref)
    weights = torch.randn(7, 14 if ref else 7, dtype=torch.float64)
    if not ref:
        weights.fill_diagonal_(0)  # the distance of an item to itself has no derivative
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    r1 = r2 = None
    if r is not None:
        r1, r2 = r.clone().requires_grad_(), r.clone().requires_grad_()
    fused = fused_distance.matrix(x1, r1)
    plain = plain_matrix(x2, r2, distance, normalize)
    torch.testing.assert_close(fused, plain, rtol=0, atol=1e-14)
    (fused * weights).sum().backward()
    (plain * weights).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-12, atol=1e-13)
    if ref:
        torch.testing.assert_close(r1.grad, r2.grad, rtol=1e-12, atol=1e-13)
        assert torch.autograd.gradcheck(lambda a, b: fused_distance.matrix(a, b), (x1, r1))
    else:
        assert torch.autograd.gradcheck(lambda a: fused_distance.matrix(a, None) * weights, (x1,))


@pytest.mark.parametrize("scale", [1.0, 12.5])
def test_fused_similarity_scale(scale: float) -> None:
    x, r = batch(5, True)
    x = x.requires_grad_()
    cosine = Cosine()
    assert torch.autograd.gradcheck(lambda a: cosine.matrix(a, r, scale), (x,))
    torch.testing.assert_close(cosine.matrix(x, r, scale), scale * F.normalize(x) @ F.normalize(r).T)


@pytest.mark.parametrize("distance", [*NAMES, "snr"])
@pytest.mark.parametrize("grad", [False, True])
def test_scale_multiplies_every_distance(distance: str, grad: bool) -> None:
    x, r = batch(5, True)
    d = distances.build(distance)
    x.requires_grad_(grad)
    torch.testing.assert_close(d.matrix(x, r, -2.5), -2.5 * d.matrix(x, r), rtol=1e-12, atol=1e-12)
    if grad:
        assert torch.autograd.gradcheck(lambda a: d.matrix(a, r, -2.5), (x,))


def test_snr_gradients_match_pml_autograd() -> None:
    x, r = batch(6, True)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    weights = torch.randn(6, 12, dtype=torch.float64)
    (SNR(normalize_embeddings=True).matrix(x1, r) * weights).sum().backward()
    (pml_distances.SNRDistance()(x2, r) * weights).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------ identity, search


def test_registry_names_and_errors() -> None:
    assert distances.available() == ["cosine", "dot", "euclidean", "snr", "squared_euclidean"]
    assert distances.available(indexable=True) == ["cosine", "dot", "euclidean", "squared_euclidean"]
    with pytest.raises(UnknownNameError, match="unknown distance 'cosin'; did you mean 'cosine'"):
        distances.build("cosin")
    with pytest.raises(UnknownNameError, match="normalize_embedding"):
        distances.build("dot", normalize_embedding=True)
    cosine = distances.resolve("cosine")
    assert distances.resolve(cosine) is cosine


def test_objects_compare_equal_to_their_name() -> None:
    assert Cosine() == "cosine" and str(Cosine()) == "cosine"
    assert Euclidean() != "cosine" and Euclidean() == "euclidean"
    assert Dot(normalize_embeddings=True) != Dot() and Dot() == Dot(normalize_embeddings=False)
    assert Cosine(normalize_embeddings=False) == Cosine()  # a cosine always normalises
    assert len({Euclidean(), Euclidean(), SquaredEuclidean()}) == 2
    assert repr(SNR()) == "SNR(normalize_embeddings=False)"


def test_kinds_and_search_conversions() -> None:
    assert [distances.build(n).is_similarity for n in NAMES] == [False, False, True, True]
    assert SNR().index_metric is None and not SNR().is_similarity
    assert Cosine().worst == float("-inf") and Euclidean().worst == float("inf")
    assert Cosine().is_cosine and Dot(normalize_embeddings=True).is_cosine
    assert not Dot().is_cosine and not Euclidean(normalize_embeddings=True).is_cosine
    x, y = rows(torch.float64)
    for distance in (Euclidean(normalize_embeddings=True), SquaredEuclidean(), Dot(), Cosine()):
        a, b = distance.prepare(x), distance.prepare(y)
        score = a @ b.T if distance.index_metric == "inner_product" else torch.cdist(a, b).pow(2)
        torch.testing.assert_close(distance.from_index(score), distance.matrix(x, y))
