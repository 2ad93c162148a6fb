from __future__ import annotations

import itertools
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


def test_timm_resnet_on_small_grayscale_images() -> None:
    model = build_model("timm:resnet18", embedding_size=16, pooling="gem", in_channels=1)
    assert model.feature_dim == 512
    out = model(torch.randn(2, 1, 32, 32))
    assert out.shape == (2, 16)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))
    assert not any("fc" in k for k in model.backbone.state_dict())  # classifier removed


def test_timm_vit_gives_tokens_with_their_layout() -> None:
    model = build_model("timm:vit_tiny_patch16_224", embedding_size=8, image_size=32)
    assert model.backbone(torch.randn(2, 3, 32, 32)).shape == (2, 5, 192)  # class token + 2×2 patches
    assert model.backbone.tokens == backbones.TokenLayout(prefix=1, class_token=True)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 8)
    assert build_model("timm:resnet18", 8).backbone.tokens == backbones.TokenLayout()


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


def test_torchvision_googlenet_without_aux_heads() -> None:
    """GoogLeNet (the XBM paper's backbone) builds; its auxiliary classifiers are left out of the backbone
    but created, so torchvision's official file (which has them) maps one to one."""
    import torchvision

    model = build_model("torchvision:googlenet", 8, image_size=64).eval()
    assert model.feature_dim == 1024 and model(torch.randn(2, 3, 64, 64)).shape == (2, 8)
    assert not any(k.startswith(("aux1", "aux2", "fc")) for k in model.backbone.state_dict())
    reference = torchvision.models.googlenet(weights=None, init_weights=True, aux_logits=True).eval()
    model.backbone.load_state_dict(
        {k: v for k, v in reference.state_dict().items() if k in model.backbone.state_dict()}
    )
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():  # the pooled features are the classifier's input (aux heads only train)
        reference.fc = nn.Identity()
        torch.testing.assert_close(model.features(x), reference(x))


def test_torchvision_model_without_a_feature_map_is_rejected() -> None:
    with pytest.raises(ConfigError, match="vit_b_16"):
        build_model("torchvision:vit_b_16", image_size=64)
    with pytest.raises(UnknownNameError, match="torchvision:resnet18"):
        build_model("torchvision:resnet-18")


def test_inception_v3_is_probed_at_a_size_it_accepts() -> None:
    model = build_model("torchvision:inception_v3", 8)  # 64 px is too small for it: probed at 224
    assert model.feature_dim == 2048


# ------------------------------------------------------------------------------------------------- blocks


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("small_cnn", ["features.0", "features.2", "features.4", "features.6"]),
        ("timm:resnet18", ["conv1+bn1", "layer1", "layer2", "layer3", "layer4"]),
        ("torchvision:resnet18", ["conv1+bn1", "layer1", "layer2", "layer3", "layer4"]),
        (
            "timm:swin_tiny_patch4_window7_224",
            ["patch_embed", "layers.0", "layers.1", "layers.2", "layers.3+norm"],
        ),
        (
            "timm:tf_efficientnet_lite0",
            ["conv_stem+bn1", *(f"blocks.{i}" for i in range(6)), "blocks.6+conv_head+bn2"],
        ),
        (
            "timm:vit_tiny_patch16_224",
            ["cls_token+pos_embed+patch_embed", *(f"blocks.{i}" for i in range(11)), "blocks.11+norm"],
        ),
        (
            "torchvision:vgg11",
            ["features.0", "features.3", *(f"features.{i}+features.{i + 2}" for i in (6, 11, 16))],
        ),
        ("torchvision:densenet121", None),
        ("torchvision:mobilenet_v2", [f"features.{i}" for i in range(19)]),
    ],
)
def test_blocks_are_the_stages_stem_first_and_cover_every_parameter(name: str, expected) -> None:
    backbone = build_model(name, 8, image_size=64).backbone
    blocks = backbone.blocks()
    if expected is not None:
        assert [b.name for b in blocks] == expected
    listed = [p for block in blocks for p in block.parameters]
    assert sorted(listed) == sorted(k for k, _ in backbone.named_parameters())  # each exactly once
    # in order: every parameter of a block comes before those of the next (forward order)
    order = {k: i for i, (k, _) in enumerate(backbone.named_parameters())}
    assert all(
        max(order[p] for p in a.parameters) < min(order[p] for p in b.parameters)
        for a, b in itertools.pairwise(blocks)
    )


def test_timm_blocks_are_timms_coarse_groups() -> None:
    """Reference: ``timm.models.group_parameters(model, model.group_matcher(coarse=True))``."""
    from timm.models import group_parameters

    backbone = build_model("timm:resnet18", 8).backbone
    groups = group_parameters(backbone.model, backbone.model.group_matcher(coarse=True))
    assert [list(b.parameters) for b in backbone.blocks()] == [
        [f"model.{n}" for n in g] for g in groups.values()
    ]


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
