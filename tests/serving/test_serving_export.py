"""`dmlkit export`: the exported model's embeddings equal the checkpoint's (TorchScript; ONNX through
onnxruntime), its preprocessing is recorded inside the file and beside it, and that record is enough to
preprocess an image without dmlkit."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dmlkit import models
from dmlkit.cli import main
from dmlkit.cli.common import FilesDataset, list_images
from dmlkit.data import transforms
from dmlkit.errors import DataError
from dmlkit.inference import load_model
from dmlkit.serving.export import METADATA_KEY, export_model, load_metadata, sidecar_path
from dmlkit.serving.index import fingerprint
from dmlkit.train import checkpoint as ckpt

# torch deprecates TorchScript in favour of torch.export; these tests load the files as a user would.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.:FutureWarning")


def preprocessed(checkpoint_path: Path, paths: list[Path]) -> tuple[torch.nn.Module, torch.Tensor]:
    """The checkpoint's model and its evaluation pipeline's batch of ``paths`` (dmlkit's own)."""
    model, checkpoint = load_model(checkpoint_path, torch.device("cpu"))
    dataset = FilesDataset.for_checkpoint(paths, checkpoint)
    return model, torch.stack([dataset[i][0] for i in range(len(dataset))])


def test_torchscript_export_equals_the_checkpoint(
    trained: Path, images: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "export" / "model.pt"
    assert main(["export", "--checkpoint", str(trained), "--format", "torchscript", "--out", str(out)]) == 0
    assert "max |difference| to the checkpoint" in capsys.readouterr().out
    exported = torch.jit.load(str(out))
    model, batch = preprocessed(trained, list_images(images)[0])
    with torch.no_grad():
        expected = model(batch)
        for size in (1, 7, len(batch)):  # the batch dimension is free
            torch.testing.assert_close(exported(batch[:size]), expected[:size], rtol=0, atol=1e-6)

    metadata = json.loads(sidecar_path(out).read_text())
    extra = {f"{METADATA_KEY}.json": ""}
    torch.jit.load(str(out), _extra_files=extra)
    assert json.loads(extra[f"{METADATA_KEY}.json"]) == metadata
    checkpoint = ckpt.load(trained)
    assert metadata["fingerprint"] == fingerprint(checkpoint)  # the one its index records
    assert metadata["checkpoint"] == str(trained.resolve())
    assert (metadata["embedding_size"], metadata["distance"], metadata["normalized"]) == (16, "cosine", True)
    assert metadata["input"] == {"name": "images", "shape": ["batch", 1, 16, 16], "dtype": "float32"}
    pre = metadata["preprocessing"]
    spec = checkpoint["data_spec"]
    assert (pre["image_size"], pre["channels"], pre["color_mode"]) == (16, 1, "L")
    assert (pre["mean"], pre["std"]) == (spec["mean"], spec["std"])
    assert [step["op"] for step in pre["steps"]] == ["convert", "to_tensor", "resize", "normalize"]
    assert pre["data_spec"] == spec
    # the recorded spec rebuilds dmlkit's pipeline exactly
    image = Image.open(list_images(images)[0][1])
    torch.testing.assert_close(transforms.build("eval", **pre["data_spec"])(image), batch[1], rtol=0, atol=0)

    sidecar_path(out).unlink()  # without the sidecar, the metadata inside the file is read
    assert load_metadata(out) == metadata


def test_onnx_export_equals_the_checkpoint(trained: Path, images: Path, tmp_path: Path, capsys) -> None:
    reason = "needs onnx and onnxruntime (pip install onnxruntime onnx -c constraints.txt)"
    onnx = pytest.importorskip("onnx", reason=reason)
    ort = pytest.importorskip("onnxruntime", reason=reason)
    out = tmp_path / "model.onnx"
    assert main(["export", "--checkpoint", str(trained.parent), "--format", "onnx", "--out", str(out)]) == 0
    assert "max |difference| to the checkpoint" in capsys.readouterr().out
    model, batch = preprocessed(trained, list_images(images)[0])
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(batch).numpy()
    for size in (1, len(batch)):
        got = session.run(["embeddings"], {"images": batch[:size].numpy()})[0]
        np.testing.assert_allclose(got, expected[:size], rtol=0, atol=1e-5)
    metadata = load_metadata(out)
    assert metadata["model_format"] == "onnx" and metadata["fingerprint"] == fingerprint(ckpt.load(trained))
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(props[METADATA_KEY]) == metadata


@pytest.fixture(scope="module")
def photo_checkpoint(tmp_path_factory) -> Path:
    """An RGB model with a photo recipe (bicubic resize of the shorter side, centre crop, ImageNet
    statistics), built and saved with the library: no training needed to test the preprocessing."""
    torch.manual_seed(0)
    model = models.build_model("small_cnn", embedding_size=8, in_channels=3, image_size=24)
    spec = {"image_size": 24, "channels": 3, "recipe": "base", "interpolation": "bicubic", "crop_pct": 0.8}
    path = tmp_path_factory.mktemp("photo") / "photo.pt"
    ckpt.save_atomic({"model": model.state_dict(), "model_config": model.config, "data_spec": spec,
                      "config": {}}, path)  # fmt: skip
    return path


def follow_record(path: Path, record: dict) -> np.ndarray:
    """Preprocess one image with PIL and NumPy from the recorded steps only (no dmlkit, no torchvision)."""
    image = Image.open(path)
    for step in record["steps"]:
        if step["op"] == "convert":
            image = image.convert(step["mode"])
        elif step["op"] == "resize_shorter_side":
            width, height = image.size
            short, long = sorted((width, height))
            size = (step["size"], int(step["size"] * long / short))
            size = size if width <= height else size[::-1]
            image = image.resize(size, Image.Resampling[step["interpolation"].upper()])
        elif step["op"] == "center_crop":
            h, w = step["size"]
            top, left = round((image.height - h) / 2), round((image.width - w) / 2)
            image = image.crop((left, top, left + w, top + h))
    pixels = np.asarray(image, dtype=np.float32).reshape(image.height, image.width, -1).transpose(2, 0, 1)
    mean, std = (np.asarray(record[k], dtype=np.float32)[:, None, None] for k in ("mean", "std"))
    return (pixels / 255 - mean) / std


def test_the_record_is_enough_without_dmlkit(photo_checkpoint: Path, tmp_path: Path) -> None:
    paths = []
    rng = np.random.default_rng(1)
    for i, (w, h) in enumerate([(40, 30), (31, 45), (64, 64)]):
        smooth = np.kron(rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3)), np.ones((4, 4, 1)))[:h, :w]
        paths.append(tmp_path / f"photo_{i}.png")
        Image.fromarray(smooth.astype(np.uint8)).save(paths[-1])
    out = tmp_path / "photo.pt"
    model, checkpoint = load_model(photo_checkpoint, torch.device("cpu"))
    metadata = export_model(model, checkpoint, out, "torchscript", checkpoint_name=str(photo_checkpoint))
    assert metadata["max_abs_difference"] <= 1e-6
    record = metadata["preprocessing"]
    assert (record["resize_shorter_side"], record["center_crop"], record["interpolation"]) == (
        30,
        [24, 24],
        "bicubic",
    )
    assert record["color_mode"] == "RGB" and record["mean"] == list(transforms.IMAGENET_MEAN)

    _, batch = preprocessed(photo_checkpoint, paths)
    independent = torch.from_numpy(np.stack([follow_record(p, record) for p in paths]))
    assert independent.shape == batch.shape == (3, 3, 24, 24)
    # PIL's and torchvision's bicubic resampling round differently: one grey level at most (measured 1.0)
    assert (independent - batch).abs().max() < 1.5 / 255 / min(transforms.IMAGENET_STD)
    exported = torch.jit.load(str(out))
    with torch.no_grad():
        torch.testing.assert_close(exported(independent), model(batch), rtol=0, atol=1e-3)
        torch.testing.assert_close(exported(batch), model(batch), rtol=0, atol=1e-6)


class BatchDependent(torch.nn.Module):
    """A model whose output depends on the batch size through Python control flow (tracing freezes it)."""

    embedding_size = 4

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x.flatten(1))
        return out if x.shape[0] == 2 else -out


def test_an_export_that_differs_is_refused(tmp_path: Path) -> None:
    model = BatchDependent()
    checkpoint = {"model": model.state_dict(), "model_config": {"normalize": False},
                  "data_spec": {"image_size": 8, "channels": 1, "recipe": "glyph"}}  # fmt: skip
    out = tmp_path / "model.pt"
    with pytest.raises(DataError, match="differ from the checkpoint's"):
        export_model(model, checkpoint, out, "torchscript")
    assert not out.exists() and not sidecar_path(out).exists()


def test_export_errors(trained: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    with pytest.raises(SystemExit):
        main(["export", "--checkpoint", str(trained), "--format", "tflite", "--out", str(tmp_path / "m")])
    assert "invalid choice: 'tflite'" in capsys.readouterr().err
    assert (
        main(["export", "--checkpoint", str(trained), "--format", "torchscript", "--out", str(tmp_path)]) == 2
    )
    assert "is a folder" in capsys.readouterr().err
    assert (
        main(["export", "--checkpoint", str(tmp_path / "absent.pt"), "--format", "onnx", "--out", "m"]) == 1
    )
    assert "absent.pt" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "onnx", None)
    assert (
        main(["export", "--checkpoint", str(tmp_path / "absent.pt"), "--format", "onnx", "--out", "m"]) == 2
    )
    assert "ONNX export needs the optional package onnx" in capsys.readouterr().err
    plain = tmp_path / "plain.pt"
    torch.jit.save(torch.jit.trace(torch.nn.Linear(2, 2), torch.zeros(1, 2)), str(plain))
    with pytest.raises(DataError, match="holds no dmlkit metadata"):
        load_metadata(plain)
