"""Global pooling of backbone features into ``B × D`` descriptors.

A backbone gives a feature map ``B × C × H × W`` (CNNs, Swin) or tokens ``B × N × C`` (ViT, DeiT, DINOv2),
whose first ``prefix`` tokens are no image patches (class, distillation, register tokens; the
backbone's :class:`~dmlkit.models.backbones.TokenLayout`). Every pooling is registered in :data:`REGISTRY`
and built with :func:`build` ``(name, tokens=layout, **kwargs)``; :func:`available` lists the names:

- ``avg``, ``max``, ``gem``: over the map's positions, or over the *patch* tokens only (prefix tokens,
  registers included, are left out);
- ``cls``: the class token (token backbones with one only);
- ``cls+avg``: the class token and the patch-token average, concatenated (``D = 2C``).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from dmlkit.errors import ConfigError
from dmlkit.models.backbones import TokenLayout
from dmlkit.registry import Registered, Registry

#: The layout of a feature map (no tokens): the default of every pooling.
NO_TOKENS = TokenLayout()


class Pooling(Registered, nn.Module):
    """Base of the poolings: ``forward`` reduces a map over ``H, W`` or tokens over the patch tokens.

    Subclasses implement :meth:`reduce` (``x`` and the dimensions to reduce); ``tokens`` is the backbone's
    layout, given by :func:`dmlkit.models.build_model`. ``needs_class_token`` is declared by poolings that
    read the class token; they refuse a layout without one.
    """

    needs_class_token: ClassVar[bool] = False

    def __init__(self, tokens: TokenLayout = NO_TOKENS) -> None:
        super().__init__()
        if self.needs_class_token and not tokens.class_token:
            raise ConfigError(
                f"pooling '{self.who}' needs a backbone with a class token (a timm ViT, DeiT or DINOv2); "
                "this backbone gives a feature map or tokens without one: use avg, max or gem"
            )
        self.tokens = tokens

    def out_features(self, channels: int) -> int:
        """``D``, the size of the pooled descriptor of ``channels``-dimensional features."""
        return channels

    def patches(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """``(features, dims to reduce)``: the map and ``(2, 3)``, or the patch tokens and ``(1,)``."""
        if x.dim() == 4:
            return x, (2, 3)
        if x.dim() == 3:
            return x[:, self.tokens.prefix :], (1,)
        raise ConfigError(f"pooling expects B×C×H×W maps or B×N×C tokens, got shape {tuple(x.shape)}")

    def reduce(self, x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features, dims = self.patches(x)
        return self.reduce(features, dims)

    def extra_repr(self) -> str:
        layout = self.tokens
        return f"prefix_tokens={layout.prefix}" if layout.prefix else ""


REGISTRY: Registry[Pooling] = Registry("pooling")


@REGISTRY.register("avg")
class AvgPool(Pooling):
    """Global average pooling: ``f_c = 1/|Ω| Σ_{ω∈Ω} x_{c,ω}`` over the positions / patch tokens ``Ω``."""

    def reduce(self, x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        return x.mean(dim=dims)


@REGISTRY.register("max")
class MaxPool(Pooling):
    """Global max pooling (MAC, Tolias et al. 2016): ``f_c = max_{ω∈Ω} x_{c,ω}``."""

    def reduce(self, x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        return x.amax(dim=dims)


@REGISTRY.register("gem")
class GeM(Pooling):
    """Generalised-mean pooling with a learnable exponent.

    ``f_c = (1/|Ω| Σ_{ω∈Ω} max(x_{c,ω}, ε)^p)^{1/p}`` (Radenović, Tolias, Chum, "Fine-tuning CNN Image
    Retrieval with No Human Annotation", TPAMI 2018). ``p = 1`` is average pooling, ``p → ∞`` max pooling;
    the paper initialises ``p = 3``. Activations are clamped at ``ε`` because a fractional power of a negative
    number is undefined (on transformer tokens, which are signed, negative entries count as ``ε``).
    """

    def __init__(
        self, p: float = 3.0, eps: float = 1e-6, learnable: bool = True, tokens: TokenLayout = NO_TOKENS
    ) -> None:
        super().__init__(tokens)
        if p <= 0:
            raise ConfigError(f"gem pooling needs p > 0, got p={p}")
        self.eps = eps
        self.p = nn.Parameter(torch.tensor(float(p)), requires_grad=learnable)

    def reduce(self, x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        p = self.p.clamp_min(1e-3)  # keeps 1/p finite if the optimiser pushes p towards 0
        return x.clamp_min(self.eps).pow(p).mean(dim=dims).pow(1.0 / p)

    def extra_repr(self) -> str:
        return ", ".join(filter(None, [f"p={self.p.item():.3f}, eps={self.eps}", super().extra_repr()]))


@REGISTRY.register("cls")
class ClassToken(Pooling):
    """The class token ``x[:, 0]`` of a ViT-like backbone (e.g. DINOv2's image embedding)."""

    needs_class_token = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3:
            raise ConfigError(f"pooling 'cls' expects B×N×C tokens, got shape {tuple(x.shape)}")
        return x[:, 0]


@REGISTRY.register("cls+avg")
class ClassTokenAndAvg(Pooling):
    """``[x_cls, mean of the patch tokens]``, concatenated: ``D = 2C`` (the DINOv2 linear-probe input)."""

    needs_class_token = True

    def out_features(self, channels: int) -> int:
        return 2 * channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3:
            raise ConfigError(f"pooling 'cls+avg' expects B×N×C tokens, got shape {tuple(x.shape)}")
        return torch.cat([x[:, 0], x[:, self.tokens.prefix :].mean(dim=1)], dim=1)


def build(name: str, /, **kwargs: object) -> Pooling:
    """Build the pooling registered as ``name`` (misspelt names and keywords raise ``UnknownNameError``)."""
    return REGISTRY.build(name, **kwargs)


def available() -> list[str]:
    """Names accepted by :func:`build`."""
    return REGISTRY.available()


__all__ = [
    "REGISTRY",
    "AvgPool",
    "ClassToken",
    "ClassTokenAndAvg",
    "GeM",
    "MaxPool",
    "Pooling",
    "available",
    "build",
]
