"""Helpers for the proxy / classification loss tests (test_loss_proxy.py, test_loss_margin_softmax.py,
test_loss_combine.py): building a dmlkit loss and its pytorch-metric-learning (PML) twin with identical
parameters, and comparing values and gradients (embeddings and parameters)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from dmlkit import losses

TOL = {torch.float64: {"rtol": 1e-8, "atol": 1e-12}, torch.float32: {"rtol": 1e-5, "atol": 1e-7}}

SHAPES = [(8, 4, 3), (24, 8, 5), (40, 16, 12)]  # (batch, dim, classes): the last has single-sample classes

EDGE_LABELS = {
    "all_same": torch.zeros(10, dtype=torch.long),
    "all_distinct": torch.arange(10),
    "singletons": torch.tensor([0, 0, 0, 1, 2, 3, 3, 4, 5, 6]),
}
EDGE_CLASSES = 12  # more classes than any edge batch uses: some proxies have no sample


def _pml() -> Any:
    from pytorch_metric_learning import losses as pml_losses

    return pml_losses


# name -> (PML factory(num_classes, embedding_size, **kwargs), our parameter, PML's parameter)
PML_TWINS: dict[str, tuple[Callable[..., torch.nn.Module], str, str]] = {
    "proxynca": (lambda c, d, **kw: _pml().ProxyNCALoss(c, d, **kw), "proxies", "proxies"),
    "proxyanchor": (lambda c, d, **kw: _pml().ProxyAnchorLoss(c, d, **kw), "proxies", "proxies"),
    "softtriple": (lambda c, d, **kw: _pml().SoftTripleLoss(c, d, **kw), "fc", "fc"),
    "normsoftmax": (lambda c, d, **kw: _pml().NormalizedSoftmaxLoss(c, d, **kw), "W", "W"),
    "manifold": (lambda c, d, **kw: _pml().ManifoldLoss(d, K=c, **kw), "proxies", "proxies"),
    "arcface": (lambda c, d, **kw: _pml().ArcFaceLoss(c, d, **kw), "W", "W"),
    "subcenter_arcface": (
        lambda c, d, **kw: _pml().SubCenterArcFaceLoss(num_classes=c, embedding_size=d, **kw),
        "W",
        "W",
    ),
    "cosface": (lambda c, d, **kw: _pml().CosFaceLoss(c, d, **kw), "W", "W"),
    "sphereface": (lambda c, d, **kw: _pml().SphereFaceLoss(c, d, **kw), "W", "W"),
    "large_margin_softmax": (lambda c, d, **kw: _pml().LargeMarginSoftmaxLoss(c, d, **kw), "W", "W"),
    "p2sgrad": (lambda c, d, **kw: _pml().P2SGradLoss(d, c, **kw), "weight", "weight"),
}


def pml_distance(name: str, normalize: bool = True) -> object:
    from pytorch_metric_learning import distances

    if name == "euclidean":
        return distances.LpDistance(normalize_embeddings=normalize)
    if name == "squared_euclidean":
        return distances.LpDistance(normalize_embeddings=normalize, power=2)
    if name == "cosine":
        return distances.CosineSimilarity()
    return distances.DotProductSimilarity(normalize_embeddings=normalize)


def make_batch(
    batch: int, dim: int, classes: int, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(batch, dim, generator=g, dtype=dtype)
    labels = torch.randint(0, classes, (batch,), generator=g)
    labels[:4] = torch.tensor([0, 0, 1, 1])  # two classes with two samples at least
    return emb, labels


def twins(
    name: str,
    num_classes: int,
    dim: int,
    dtype: torch.dtype,
    ours_kwargs: dict | None = None,
    pml_kwargs: dict | None = None,
    seed: int = 0,
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(ours, PML's), in ``dtype``, with our parameter overwritten by PML's freshly initialised one."""
    factory, ours_attr, pml_attr = PML_TWINS[name]
    torch.manual_seed(seed)
    theirs = factory(num_classes, dim, **(pml_kwargs or {})).to(dtype)
    ours = losses.build(name, num_classes=num_classes, embedding_size=dim, **(ours_kwargs or {})).to(dtype)
    ours_param, pml_param = getattr(ours, ours_attr), getattr(theirs, pml_attr)
    assert ours_param.shape == pml_param.shape, (ours_param.shape, pml_param.shape)
    with torch.no_grad():
        ours_param.copy_(pml_param)
    return ours, theirs


def grads_close(
    ours: torch.Tensor | None, theirs: torch.Tensor | None, like: torch.Tensor, tol: dict
) -> None:
    a = ours if ours is not None else torch.zeros_like(like)
    b = theirs if theirs is not None else torch.zeros_like(like)
    assert torch.isfinite(a).all()
    # gradient entries are sums of many terms that partly cancel: atol relative to the gradient's scale
    scale = float(b.abs().max()) if b.numel() else 0.0
    torch.testing.assert_close(a, b.to(a.dtype), rtol=tol["rtol"], atol=max(tol["atol"], tol["rtol"] * scale))


def compare_twins(
    name: str,
    ours: torch.nn.Module,
    theirs: torch.nn.Module,
    emb: torch.Tensor,
    labels: torch.Tensor,
    indices_tuple: tuple | None = None,
    tol: dict | None = None,
) -> torch.Tensor:
    """Assert value, embedding gradient and parameter gradient equal PML's; return our loss."""
    tol = tol or TOL[emb.dtype]
    _, ours_attr, pml_attr = PML_TWINS[name]
    x_ours, x_pml = emb.clone().requires_grad_(True), emb.clone().requires_grad_(True)
    value = ours(x_ours, labels, indices_tuple)
    # PML's ManifoldLoss takes no labels: the proxy assignment is its indices_tuple
    manifold = name == "manifold"
    reference = theirs(x_pml, None, labels) if manifold else theirs(x_pml, labels, indices_tuple)
    assert value.ndim == 0 and torch.isfinite(value)
    torch.testing.assert_close(value, reference.to(value.dtype), **tol)
    value.backward()
    reference.backward()
    grads_close(x_ours.grad, x_pml.grad, x_ours, tol)
    p_ours, p_pml = getattr(ours, ours_attr), getattr(theirs, pml_attr)
    grads_close(p_ours.grad, p_pml.grad, p_ours, tol)
    return value


def one_step_reduces_loss(loss: torch.nn.Module, emb: torch.Tensor, labels: torch.Tensor, lr: float) -> None:
    """One SGD step on the loss's own parameters lowers the loss on the same batch."""
    params = list(loss.parameters())
    assert params and all(isinstance(p, torch.nn.Parameter) for p in params)
    before = loss(emb, labels)
    optimizer = torch.optim.SGD(params, lr=lr)
    optimizer.zero_grad()
    before.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    optimizer.step()
    with torch.no_grad():
        after = loss(emb, labels)
    assert after.item() < before.item()
