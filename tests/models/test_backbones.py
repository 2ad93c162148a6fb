from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from torch import nn

from dmlkit.errors import ConfigError, UnknownNameError
from dmlkit.models import backbones, build_model


def test_available_backbones() -> None:
    assert backbones.available() == ["small_cnn", "timm:<model>", "torchvision:<model>"]
    for name in ("small_cnn", "timm:resnet18", "torchvision:resnet18"):
        assert backbones.exists(name)
    for name in ("small_cn", "timm:resnet81", "torchvision:resnet81", "resnet18"):
        assert not backbones.exists(name)
    with pytest.raises(UnknownNameError, match="small_cnn"):
        build_model("small_cn")


def test_the_backbone_registry_resolves_prefixed_names() -> None:
    registry = backbones.REGISTRY
    assert registry.kind == "backbone" and registry.available() == backbones.available()
    assert "timm:resnet18" in registry and "small_cnn" in registry and "timm:resnet81" not in registry
    with pytest.raises(UnknownNameError, match="did you mean 'timm:resnet18'"):
        registry.get("timm:resnet81")
    with pytest.raises(UnknownNameError, match="Valid choices: small_cnn, timm:<model>, torchvision:<model>"):
        backbones.build("keras:resnet18")  # not a family: an unknown built-in name
    with pytest.raises(UnknownNameError, match="'widths'"):
        backbones.build("small_cnn", width=[8])


def test_heads_registry() -> None:
    from dmlkit.models import heads

    assert heads.available() == ["identity", "linear"]
    assert heads.build("linear", in_features=6, embedding_size=3)(torch.randn(2, 6)).shape == (2, 3)
    assert (
        heads.for_embedding_size(6, 3).out_features == 3
        and heads.for_embedding_size(6, None).out_features == 6
    )


def test_timm_resnet_on_small_grayscale_images() -> None:
    model = build_model("timm:resnet18", embedding_size=16, pooling="gem", in_channels=1)
    assert model.feature_dim == 512
    out = model(torch.randn(2, 1, 32, 32))
    assert out.shape == (2, 16)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))
    assert not any("fc" in k for k in model.backbone.state_dict())  # classifier removed


def test_timm_vit_tokens_become_a_feature_map() -> None:
    model = build_model("timm:vit_tiny_patch16_224", embedding_size=8, image_size=32)
    assert model.backbone(torch.randn(2, 3, 32, 32)).shape == (2, 192, 2, 2)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 8)


def test_timm_local_weights_use_timm_key_names(tmp_path: Path) -> None:
    import timm

    reference = timm.create_model("resnet18", pretrained=False)  # with its classifier, like a downloaded file
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    model = build_model("timm:resnet18", 8, pretrained_weights=str(tmp_path / "resnet18.pth"))
    report = model.weights_report
    assert report is not None and not report.missing and sorted(report.unexpected) == ["fc.bias", "fc.weight"]
    torch.testing.assert_close(model.backbone.model.conv1.weight, reference.conv1.weight)


def test_unknown_timm_model_or_argument() -> None:
    with pytest.raises(UnknownNameError, match="timm:resnet18"):
        build_model("timm:resnet81")
    with pytest.raises(ConfigError, match="drop_rat"):
        build_model("timm:resnet18", drop_rat=0.1)


def test_torchvision_mobilenet() -> None:
    model = build_model("torchvision:mobilenet_v2", embedding_size=8)
    assert model.feature_dim == 1280
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 8)
    assert not any(k.startswith("classifier") for k in model.backbone.state_dict())


def test_torchvision_resnet_keeps_official_key_names(tmp_path: Path) -> None:
    import torchvision

    reference = torchvision.models.resnet18(weights=None)
    torch.save(reference.state_dict(), tmp_path / "resnet18-official.pth")
    model = build_model(
        "torchvision:resnet18", 8, in_channels=1, pretrained_weights=str(tmp_path / "resnet18-official.pth")
    )
    assert model.backbone.conv1.in_channels == 1
    assert model.weights_report is not None and model.weights_report.adapted == ["conv1.weight"]
    torch.testing.assert_close(model.backbone.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 8)


def test_torchvision_model_without_a_feature_map_is_rejected() -> None:
    with pytest.raises(ConfigError, match="googlenet"):
        build_model("torchvision:googlenet", init_weights=False)
    with pytest.raises(UnknownNameError, match="torchvision:resnet18"):
        build_model("torchvision:resnet-18")


@pytest.mark.slow
def test_small_cnn_throughput() -> None:
    """fwd+bwd on 32×32 grayscale, batch 128: at least 1500 images/s on 2 CPU threads."""
    torch.set_num_threads(2)
    model = build_model("small_cnn", 64, in_channels=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(128, 1, 32, 32)

    def step() -> None:
        optimizer.zero_grad()
        model(x).sum().backward()
        optimizer.step()

    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(20):
        step()
    rate = 20 * 128 / (time.perf_counter() - start)
    print(f"small_cnn: {rate:.0f} img/s")
    assert rate >= 1500
    assert isinstance(model.backbone, nn.Module)
