from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from dmlkit.errors import ConfigError, DataError
from dmlkit.models import (
    EmbeddingModel,
    build_model,
    freeze_batchnorm,
    load_local_weights,
    map_state_dict_by_position,
    pooling,
)


def test_shapes_and_normalisation() -> None:
    torch.manual_seed(0)
    model = build_model("small_cnn", embedding_size=16, in_channels=1)
    out = model(torch.randn(4, 1, 32, 32))
    assert out.shape == (4, 16) and model.embedding_size == 16 and model.feature_dim == 128
    torch.testing.assert_close(out.norm(dim=1), torch.ones(4))
    raw = build_model("small_cnn", embedding_size=16, normalize=False, in_channels=1)
    assert not torch.allclose(raw(torch.randn(4, 1, 32, 32)).norm(dim=1), torch.ones(4))
    # embedding_size 0 / None: the pooled features are the embedding
    for size in (0, None):
        identity = build_model("small_cnn", embedding_size=size, pooling="gem", widths=[8, 16])
        assert isinstance(identity.head, nn.Identity) and identity(torch.randn(2, 3, 28, 28)).shape == (2, 16)
    with pytest.raises(ConfigError, match="embedding_size"):
        build_model(embedding_size=-3)


def test_small_cnn_layout() -> None:
    model = build_model("small_cnn")
    convs = [m for m in model.backbone.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64, 128, 128]
    assert model.backbone(torch.randn(1, 3, 32, 32)).shape == (1, 128, 4, 4)


def test_rebuild_from_config_gives_the_same_model() -> None:
    torch.manual_seed(0)
    model = build_model("small_cnn", 24, pooling="gem", in_channels=1, widths=(16, 32, 32))
    assert json.loads(json.dumps(model.config)) == model.config  # plain data for checkpoints
    assert model.config["widths"] == [16, 32, 32] and model.config["pretrained_weights"] is None
    torch.manual_seed(1)
    rebuilt = build_model(**model.config)
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(3, 1, 32, 32)
    model.eval()
    rebuilt.eval()
    torch.testing.assert_close(rebuilt(x), model(x))
    assert isinstance(rebuilt, EmbeddingModel)
    with pytest.raises(ConfigError, match="act"):
        build_model("small_cnn", act=nn.ReLU)


def test_freeze_batchnorm() -> None:
    model = build_model("small_cnn", 8, in_channels=1)
    count = freeze_batchnorm(model)
    assert count == 4
    model.train()  # an EmbeddingModel keeps its BatchNorm frozen
    batchnorms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(not m.training and not m.weight.requires_grad for m in batchnorms)
    before = batchnorms[0].running_mean.clone()
    model(torch.randn(4, 1, 32, 32)).sum().backward()
    torch.testing.assert_close(batchnorms[0].running_mean, before)
    assert batchnorms[0].weight.grad is None
    # a plain module needs freeze_batchnorm again after train()
    plain = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    freeze_batchnorm(plain)
    plain.train()
    assert plain[1].training and not plain[1].weight.requires_grad


def _save(state: dict[str, torch.Tensor], path: Path) -> Path:
    torch.save(state, path)
    return path


def test_local_weights_are_loaded_into_the_backbone(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = build_model("small_cnn", 8)
    # wrapped like a training checkpoint, with a DataParallel prefix
    state = {"state_dict": {f"module.{k}": v for k, v in source.backbone.state_dict().items()}}
    path = _save(state, tmp_path / "weights.pth")
    torch.manual_seed(1)
    model = build_model("small_cnn", 8, pretrained_weights=str(path))
    for key, value in source.backbone.state_dict().items():
        torch.testing.assert_close(model.backbone.state_dict()[key], value)
    assert model.weights_report is not None and model.weights_report.complete
    assert model.weights_report.prefix == "module."
    assert model.pretrained_weights == str(path) and model.config["pretrained_weights"] is None


def test_safetensors_and_partial_weights(tmp_path: Path) -> None:
    safetensors = pytest.importorskip("safetensors.torch")
    source = build_model("small_cnn", 8).backbone.state_dict()
    partial = {k: v for k, v in source.items() if k.startswith("features.0.")}
    partial["extra.weight"] = torch.zeros(3)
    safetensors.save_file(partial, str(tmp_path / "part.safetensors"))
    with pytest.raises(DataError, match="only partly"):
        build_model("small_cnn", 8, pretrained_weights=str(tmp_path / "part.safetensors"))
    model = build_model(
        "small_cnn", 8, pretrained_weights=str(tmp_path / "part.safetensors"), allow_partial_weights=True
    )
    report = model.weights_report
    assert report is not None and not report.complete
    assert "extra.weight" in report.unexpected and "features.2.0.weight" in report.missing
    torch.testing.assert_close(
        model.backbone.state_dict()["features.0.0.weight"], source["features.0.0.weight"]
    )
    assert "missing" in str(report)


def test_input_channels_are_adapted_when_loading(tmp_path: Path) -> None:
    rgb = build_model("small_cnn", 8, in_channels=3).backbone.state_dict()
    path = _save(rgb, tmp_path / "rgb.pt")
    gray = build_model("small_cnn", 8, in_channels=1, pretrained_weights=str(path))
    assert gray.weights_report is not None and gray.weights_report.adapted == ["features.0.0.weight"]
    torch.testing.assert_close(
        gray.backbone.state_dict()["features.0.0.weight"], rgb["features.0.0.weight"].sum(1, keepdim=True)
    )


def test_weights_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"absent\.pt"):
        build_model("small_cnn", pretrained_weights=str(tmp_path / "absent.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match=r"junk\.pt"):
        build_model("small_cnn", pretrained_weights=str(tmp_path / "junk.pt"))
    other = _save(nn.Linear(3, 4).state_dict(), tmp_path / "other.pth")
    with pytest.raises(DataError, match=r"no tensor.*other\.pth"):
        build_model("small_cnn", pretrained_weights=str(other))
    wrong_shapes = _save(
        build_model("small_cnn", widths=[8, 8, 8, 8]).backbone.state_dict(), tmp_path / "w.bin"
    )
    with pytest.raises(DataError, match=r"w\.bin"):
        build_model("small_cnn", pretrained_weights=str(wrong_shapes))
    with pytest.raises(DataError, match=r"no tensor.*w\.bin"):  # even allowed, nothing would load
        build_model("small_cnn", pretrained_weights=str(wrong_shapes), allow_partial_weights=True)


def test_map_state_dict_by_position(tmp_path: Path) -> None:
    target = build_model("small_cnn", 8, widths=[4, 8]).backbone
    source = build_model("small_cnn", 8, widths=[4, 8]).backbone.state_dict()
    renamed_source = {f"layer_{i}": v for i, (k, v) in enumerate(source.items())}
    mapped = map_state_dict_by_position(renamed_source, target)
    assert list(mapped) == [k for k in target.state_dict() if not k.endswith("num_batches_tracked")]
    path = _save(renamed_source, tmp_path / "renamed.pt")
    report = load_local_weights(target, path, by_position=True)
    assert report.complete
    torch.testing.assert_close(target.state_dict()["features.2.0.weight"], source["features.2.0.weight"])
    with pytest.raises(DataError, match="tensor #0"):
        map_state_dict_by_position({"a": torch.zeros(1), **dict(list(renamed_source.items())[1:])}, target)
    with pytest.raises(DataError, match="by position"):
        map_state_dict_by_position({"a": torch.zeros(1)}, target)


# ------------------------------------------------------------------------------------ partial fine-tuning


def _trainable(model: EmbeddingModel) -> set[str]:
    return {k for k, p in model.backbone.named_parameters() if p.requires_grad}


def test_trainable_blocks_freeze_the_first_stages() -> None:
    model = build_model("small_cnn", 8, trainable_blocks=1)
    blocks = model.backbone.blocks()
    assert _trainable(model) == set(blocks[-1].parameters) and model.trainable_blocks == 1
    assert all(p.requires_grad for p in model.head_parameters())
    model.train()
    frozen_bn = model.backbone.features[0][1]
    assert not frozen_bn.training and model.backbone.features[6][1].training  # frozen stages: eval mode
    before = frozen_bn.running_mean.clone()
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    torch.testing.assert_close(frozen_bn.running_mean, before)  # a frozen stage computes what it did
    assert (
        model.backbone.features[0][0].weight.grad is None
        and model.backbone.features[6][0].weight.grad is not None
    )
    from dmlkit.models import set_trainable_blocks

    set_trainable_blocks(model, None)  # unfreeze (after a warm-up)
    assert _trainable(model) == {k for k, _ in model.backbone.named_parameters()}
    model.train()
    assert frozen_bn.training


def test_no_trainable_block_freezes_the_backbone_not_the_head() -> None:
    model = build_model(
        "timm:vit_tiny_patch16_224", 8, pooling="gem", image_size=32, trainable_blocks=0
    ).train()
    assert not _trainable(model) and not model.backbone.training
    assert (
        all(p.requires_grad for p in model.head_parameters()) and len(model.head_parameters()) == 3
    )  # p, W, b
    assert {id(p) for p in model.backbone_parameters()} | {id(p) for p in model.head_parameters()} == {
        id(p) for p in model.parameters()
    }
    vit = build_model("timm:vit_tiny_patch16_224", 8, image_size=32, trainable_blocks=2)
    last_two = {
        k
        for k, _ in vit.backbone.named_parameters()
        if k.startswith(("model.blocks.10.", "model.blocks.11."))
    }
    assert _trainable(vit) == last_two | {
        "model.norm.weight",
        "model.norm.bias",
    }  # the final norm goes with them


def test_trainable_blocks_keep_frozen_batchnorm_frozen() -> None:
    from dmlkit.models import set_trainable_blocks

    model = build_model("timm:resnet18", 8, trainable_blocks=2)
    freeze_batchnorm(model)
    set_trainable_blocks(model, None)
    bn = model.backbone.model.layer1[0].bn1
    assert not bn.weight.requires_grad and model.backbone.model.layer1[0].conv1.weight.requires_grad


def test_trainable_blocks_out_of_range() -> None:
    with pytest.raises(ConfigError, match=r"trainable_blocks=6.*has 5 blocks: conv1\+bn1, layer1"):
        build_model("timm:resnet18", 8, trainable_blocks=6)


def test_a_vit_trains_with_class_token_pooling(tmp_path: Path) -> None:
    """``dmlkit train`` with a tiny ViT and ``--pooling cls`` on 32-px images (a few seconds on CPU)."""
    from dmlkit.cli import main
    from tests_support import tiny_argv

    argv = tiny_argv(tmp_path, name="vit", epochs=1)
    argv[argv.index("--dataset-args") + 1] = json.dumps(
        {"num_classes": 8, "samples_per_class": 8, "image_size": 32, "test_fraction": 0.5}
    )
    argv += [
        "--backbone",
        "timm:vit_tiny_patch16_224",
        "--pooling",
        "cls",
        "--batch-size",
        "8",
        "--lr",
        "1e-4",
    ]
    assert main(["train", *argv]) == 0
    results = json.loads((tmp_path / "vit" / "results.json").read_text())
    assert set(results["test_after"]) == {"recall@1", "map@r"}
    history = [json.loads(line) for line in (tmp_path / "vit" / "history.jsonl").read_text().splitlines()]
    assert history[-1]["step"] == 3 and history[-1]["skipped_steps"] == 0 and history[-1]["train_loss"] > 0
    checkpoint = torch.load(tmp_path / "vit" / "best.pt", weights_only=True)
    assert checkpoint["model_config"]["pooling"] == "cls"
    assert checkpoint["model_config"]["backbone"] == "timm:vit_tiny_patch16_224"
    from dmlkit.inference import load_model

    model, _ = load_model(tmp_path / "vit" / "best.pt", torch.device("cpu"))  # rebuilt from the checkpoint
    assert isinstance(model.pool, pooling.ClassToken)
