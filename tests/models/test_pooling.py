from __future__ import annotations

import pytest
import torch

from dmlkit.errors import ConfigError, UnknownNameError
from dmlkit.models import GeM, TokenLayout, build_model, pooling


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
    assert pooling.available() == ["avg", "cls", "cls+avg", "gem", "max"]


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


# ------------------------------------------------------------------------------------------------- tokens


def _tokens(prefix: int = 5, patches: int = 9, channels: int = 4) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(2, prefix + patches, channels)


def test_token_pooling_leaves_class_and_register_tokens_out() -> None:
    layout = TokenLayout(prefix=5, class_token=True)  # 1 class + 4 register tokens (DINOv2 reg4)
    x = _tokens()
    patches = x[:, 5:]
    torch.testing.assert_close(pooling.build("avg", tokens=layout)(x), patches.mean(dim=1))
    torch.testing.assert_close(pooling.build("max", tokens=layout)(x), patches.amax(dim=1))
    gem = pooling.build("gem", tokens=layout).double()
    grid = patches.double().transpose(1, 2).reshape(2, 4, 3, 3)  # the same patches as a map
    torch.testing.assert_close(gem(x.double()), _loop_gem(grid, 3.0, 1e-6))
    torch.testing.assert_close(pooling.build("cls", tokens=layout)(x), x[:, 0])
    both = pooling.build("cls+avg", tokens=layout)
    assert both.out_features(4) == 8 and pooling.build("avg").out_features(4) == 4
    torch.testing.assert_close(both(x), torch.cat([x[:, 0], patches.mean(dim=1)], dim=1))


def test_class_token_poolings_refuse_backbones_without_one() -> None:
    for name in ("cls", "cls+avg"):
        with pytest.raises(
            ConfigError, match=f"pooling '{name.replace('+', '[+]')}' needs a backbone with a class token"
        ):
            pooling.build(name)
        with pytest.raises(ConfigError, match="class token"):
            build_model("small_cnn", pooling=name)
    with pytest.raises(ConfigError, match="class token"):
        build_model("timm:mixer_s16_224", pooling="cls", image_size=32)  # tokens, but no class token


def test_vit_pools_cls_token_and_patch_tokens_as_timm_does() -> None:
    """Reference: timm's own head pooling (``forward_head(pre_logits=True)``) with global_pool 'token' and
    'avg' (timm's avg also leaves the prefix tokens out)."""
    for name, kwargs in [
        ("vit_tiny_patch16_224", {"img_size": 32}),
        ("vit_small_patch14_reg4_dinov2", {"img_size": 28}),
    ]:
        model = build_model(f"timm:{name}", 0, pooling="cls", image_size=kwargs["img_size"]).eval()
        vit = model.backbone.model
        assert model.backbone.tokens == TokenLayout(prefix=vit.num_prefix_tokens, class_token=True)
        x = torch.randn(2, 3, kwargs["img_size"], kwargs["img_size"])
        with torch.no_grad():
            tokens = vit.forward_features(x)
            torch.testing.assert_close(model.features(x), tokens[:, 0])
            for pool, timm_pool in (("avg", "avg"), ("cls", "token")):
                model.pool = pooling.build(pool, tokens=model.backbone.tokens)
                vit.global_pool = timm_pool
                torch.testing.assert_close(model.pool(tokens), vit.forward_head(tokens, pre_logits=True))


def test_swin_channel_last_map_is_pooled_over_positions() -> None:
    model = build_model("timm:swin_tiny_patch4_window7_224", 0, pooling="avg", image_size=64).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        nhwc = model.backbone.model.forward_features(x)
        assert nhwc.shape[-1] == 768 and model.backbone(x).shape == (1, 768, 2, 2)
        torch.testing.assert_close(model.features(x), nhwc.mean(dim=(1, 2)))


def test_distilled_deit_class_token_is_the_first_of_two_prefix_tokens() -> None:
    model = build_model("timm:deit_tiny_distilled_patch16_224", 0, pooling="cls+avg", image_size=32).eval()
    assert model.backbone.tokens == TokenLayout(prefix=2, class_token=True) and model.feature_dim == 384
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.backbone.model.forward_features(x)  # [class, distillation, 4 patches]
        torch.testing.assert_close(model.features(x), torch.cat([tokens[:, 0], tokens[:, 2:].mean(1)], dim=1))
