from __future__ import annotations

import pytest
import torch

from dmlkit.errors import UnknownNameError
from dmlkit.models import GeM, pooling


def _loop_gem(x: torch.Tensor, p: float, eps: float) -> torch.Tensor:
    """Independent reference: GeM written per sample and channel."""
    out = torch.empty(x.shape[:2], dtype=torch.float64)
    for b in range(x.shape[0]):
        for c in range(x.shape[1]):
            values = [max(float(v), eps) ** p for v in x[b, c].flatten()]
            out[b, c] = (sum(values) / len(values)) ** (1.0 / p)
    return out


def test_avg_and_max() -> None:
    x = torch.randn(2, 3, 4, 5)
    torch.testing.assert_close(
        pooling.build("avg")(x), torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
    )
    torch.testing.assert_close(
        pooling.build("max")(x), torch.nn.functional.adaptive_max_pool2d(x, 1).flatten(1)
    )
    assert pooling.available() == ["avg", "gem", "max"]


def test_gem_matches_a_loop_reference_and_its_limits() -> None:
    x = torch.rand(2, 3, 4, 4, dtype=torch.float64) - 0.2  # some negatives: clamped to eps
    gem = GeM(p=3.0).double()
    torch.testing.assert_close(gem(x), _loop_gem(x, 3.0, 1e-6).to(x.dtype), rtol=1e-6, atol=1e-9)
    positive = x.clamp_min(1e-6)
    torch.testing.assert_close(GeM(p=1.0).double()(positive), positive.mean(dim=(2, 3)))
    torch.testing.assert_close(GeM(p=200.0).double()(positive), positive.amax(dim=(2, 3)), rtol=0.05, atol=0)


def test_gem_exponent_is_learnable() -> None:
    gem = pooling.REGISTRY.build("gem", p=2.5)
    assert gem.p.requires_grad and gem.p.item() == 2.5
    gem(torch.rand(2, 3, 4, 4)).sum().backward()
    assert gem.p.grad is not None and torch.isfinite(gem.p.grad)
    assert not pooling.REGISTRY.build("gem", learnable=False).p.requires_grad


def test_unknown_names() -> None:
    with pytest.raises(UnknownNameError, match="gem"):
        pooling.build("gen")
    with pytest.raises(UnknownNameError, match="gem"):
        pooling.REGISTRY.get("gen")
    pooling.REGISTRY.get("gem")
    with pytest.raises(UnknownNameError, match="'p'"):
        pooling.build("gem", pp=3)
