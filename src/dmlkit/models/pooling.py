"""Global pooling of a backbone feature map ``B × C × H × W`` into ``B × C`` descriptors.

Every pooling is registered in :data:`REGISTRY` (``avg``, ``max``, ``gem``) and built with
:func:`build` ``(name, **kwargs)``; :func:`available` lists the names.
"""

from __future__ import annotations

import torch
from torch import nn

from dmlkit.errors import ConfigError
from dmlkit.registry import Registry

REGISTRY: Registry[nn.Module] = Registry("pooling")


def _check_map(x: torch.Tensor) -> None:
    if x.dim() != 4:
        raise ConfigError(f"pooling expects a B×C×H×W feature map, got shape {tuple(x.shape)}")


@REGISTRY.register("avg")
class AvgPool(nn.Module):
    """Global average pooling: ``f_c = 1/|Ω| Σ_{(h,w)∈Ω} x_{c,h,w}``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_map(x)
        return x.mean(dim=(2, 3))


@REGISTRY.register("max")
class MaxPool(nn.Module):
    """Global max pooling (MAC, Tolias et al. 2016): ``f_c = max_{(h,w)} x_{c,h,w}``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_map(x)
        return x.amax(dim=(2, 3))


@REGISTRY.register("gem")
class GeM(nn.Module):
    """Generalised-mean pooling with a learnable exponent.

    ``f_c = (1/|Ω| Σ_{(h,w)} max(x_{c,h,w}, ε)^p)^{1/p}`` (Radenović, Tolias, Chum, "Fine-tuning CNN Image
    Retrieval with No Human Annotation", TPAMI 2018). ``p = 1`` is average pooling, ``p → ∞`` max pooling;
    the paper initialises ``p = 3``. Activations are clamped at ``ε`` because a fractional power of a negative
    number is undefined.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6, learnable: bool = True) -> None:
        super().__init__()
        if p <= 0:
            raise ConfigError(f"gem pooling needs p > 0, got p={p}")
        self.eps = eps
        self.p = nn.Parameter(torch.tensor(float(p)), requires_grad=learnable)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_map(x)
        p = self.p.clamp_min(1e-3)  # keeps 1/p finite if the optimiser pushes p towards 0
        return x.clamp_min(self.eps).pow(p).mean(dim=(2, 3)).pow(1.0 / p)

    def extra_repr(self) -> str:
        return f"p={self.p.item():.3f}, eps={self.eps}"


def build(name: str, /, **kwargs: object) -> nn.Module:
    """Build the pooling registered as ``name`` (misspelt names and keywords raise ``UnknownNameError``)."""
    return REGISTRY.build(name, **kwargs)


def available() -> list[str]:
    """Names accepted by :func:`build`."""
    return REGISTRY.available()


__all__ = ["REGISTRY", "AvgPool", "GeM", "MaxPool", "available", "build"]
