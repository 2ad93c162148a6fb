"""``dmlkit.data.gpu_pipeline`` on the CPU: everything but nvJPEG (crop draws, roi_align crops, packing,
flips, normalisation, determinism, the loader thread, the auto → off fallback)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2

from bad_images import truncated_jpeg
from dmlkit.config import make_config
from dmlkit.data import FileImageDataset, augment, item_seed, transforms
from dmlkit.data.base import ItemAnnotations
from dmlkit.data.gpu_pipeline import (
    EncodedImages,
    GpuBatchPipeline,
    GpuLoader,
    collate_encoded,
    draw_crop,
)
from dmlkit.errors import ConfigError, DataError
from dmlkit.train.data import RunData, gpu_decode_obstacles, train_loader, uses_gpu_pipeline

PLAN = augment.CropPlan(augment.DEFAULT_SCALE, augment.DEFAULT_RATIO, 0.5)


@pytest.mark.parametrize(("height", "width"), [(200, 300), (224, 168), (17, 40), (1, 120), (500, 3)])
def test_crop_draws_are_torchvisions(height: int, width: int) -> None:
    """Same seed → the same crop as ``v2.RandomResizedCrop.make_params`` and the same flip as
    ``RandomHorizontalFlip`` (one ``torch.rand(1)`` after it), fallback included (very thin images)."""
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    crop = v2.RandomResizedCrop(32, antialias=True)
    for seed in range(40):
        torch.manual_seed(seed)
        params = crop.make_params([image])
        flip = bool(torch.rand(1) < 0.5)
        ours = draw_crop(height, width, PLAN, torch.Generator().manual_seed(seed))
        assert ours == (params["top"], params["left"], params["height"], params["width"], flip), seed


def test_crop_draws_stay_in_bounds_and_follow_scale_and_ratio() -> None:
    height, width, scale, ratio = 180, 240, (0.25, 0.75), (0.5, 2.0)
    plan = augment.CropPlan(scale, ratio, 0.3)
    draws = [draw_crop(height, width, plan, torch.Generator().manual_seed(s)) for s in range(3000)]
    top, left, h, w, flip = (np.array(column) for column in zip(*draws, strict=True))
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    area = h * w / (height * width)
    assert area.min() > scale[0] * 0.95 and area.max() < scale[1] * 1.05
    assert (w / h).min() > ratio[0] * 0.9 and (w / h).max() < ratio[1] * 1.1
    assert abs(flip.mean() - 0.3) < 0.03
    # where no draw is rejected (a large square, small areas), the ratio is log-uniform and the area uniform
    square = augment.CropPlan((0.05, 0.2), ratio, 0.5)
    draws = [draw_crop(400, 400, square, torch.Generator().manual_seed(s)) for s in range(3000)]
    h, w = (np.array(column) for column in list(zip(*draws, strict=True))[2:4])
    log_ratio, area = np.log(w / h), h * w / 400**2
    assert abs(log_ratio.mean()) < 0.03 and abs(log_ratio.std() - np.log(2) / np.sqrt(3)) < 0.02
    assert abs(area.mean() - 0.125) < 0.005


def _pipeline(dataset: FileImageDataset, size: int, mean=(0.0,) * 3, std=(1.0,) * 3) -> GpuBatchPipeline:
    return GpuBatchPipeline(dataset, PLAN, size, mean, std, "cpu")


def _images(tmp_path: Path, shapes: list[tuple[int, int]], suffix: str = "jpg") -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate(shapes):
        # smooth images (a gradient plus noise), so resampling differences stay small
        base = np.linspace(0, 200, w)[None, :, None] + np.linspace(0, 50, h)[:, None, None]
        pixels = np.clip(base + rng.normal(0, 3, (h, w, 3)), 0, 255).astype(np.uint8)
        path = tmp_path / f"{i}.{suffix}"
        Image.fromarray(pixels).save(path, **({"quality": 95} if suffix == "jpg" else {}))
        paths.append(str(path))
    return paths


def _dataset(paths: list[str], **kwargs: object) -> FileImageDataset:
    labels = [i % 2 for i in range(len(paths))]
    return FileImageDataset(paths, labels, ["a", "b"], [Path(p).name for p in paths], **kwargs)  # type: ignore[arg-type]


def test_roi_align_crop_is_bilinear_resize_when_enlarging(tmp_path: Path) -> None:
    """A whole-image box enlarged: roi_align (aligned, one sample per output pixel) is exactly
    ``F.interpolate(bilinear, align_corners=False)``, edges included (the packed copy repeats the last row
    and column, as the interpolation clamps)."""
    dataset = _dataset(_images(tmp_path, [(10, 14)]))
    pipeline = _pipeline(dataset, 32, std=(1 / 255,) * 3)  # output = pixel values
    image = dataset.load(0)
    packed = pipeline.pack([image, torch.zeros(3, 20, 30, dtype=torch.uint8)])  # padded to a larger one
    out = pipeline.crop(packed[:1], torch.tensor([[0, 0, 10, 14]]), torch.tensor([False]))
    reference = F.interpolate(image[None].float(), size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, reference, atol=1e-3, rtol=0)


def test_roi_align_crop_at_scale_one_is_the_pixels(tmp_path: Path) -> None:
    dataset = _dataset(_images(tmp_path, [(40, 50)]))
    pipeline = _pipeline(dataset, 16, std=(1 / 255,) * 3)
    image = dataset.load(0)
    out = pipeline.crop(pipeline.pack([image]), torch.tensor([[5, 7, 16, 16]]), torch.tensor([True]))
    torch.testing.assert_close(out[0], image[:, 5:21, 7:23].flip(-1).float(), atol=1e-3, rtol=0)


def test_roi_align_crop_when_shrinking_is_close_to_an_antialiased_resize(clothing_paths: list[str]) -> None:
    """Area sampling (⌈box / size⌉² samples per pixel) against torchvision's crop + antialiased resize, on
    real photos: within 3 grey levels on average, less than half the error of a resize without
    antialiasing (what sampling one point per pixel would give)."""
    dataset = _dataset(clothing_paths[:6])
    pipeline = _pipeline(dataset, 48, std=(1 / 255,) * 3)
    loaded = [dataset.load(i) for i in range(6)]
    boxes = torch.tensor([[10, 5, 150, 120], [0, 0, 200, 160], [30, 40, 100, 90]] * 2)
    out = pipeline.crop(pipeline.pack(loaded), boxes, torch.zeros(6, dtype=torch.bool))
    for b, (image, (top, left, h, w)) in enumerate(zip(loaded, boxes.tolist(), strict=True)):
        reference = v2.functional.resized_crop(image, top, left, h, w, [48, 48], antialias=True).float()
        aliased = v2.functional.resized_crop(image, top, left, h, w, [48, 48], antialias=False).float()
        error = (out[b] - reference).abs().mean()
        assert error < 3.0 and error < 0.5 * (aliased - reference).abs().mean()


def test_batches_match_the_cpu_pipeline(clothing_paths: list[str]) -> None:
    """Same (seed, epoch, index) → the same crop and flip as the CPU pipeline, pixels within a fraction of
    the normalised range; the mean and std are fused in."""
    dataset = _dataset(clothing_paths[:16])
    dataset.transform = transforms.build("train", 64, recipe="base")
    dataset.augment_seed = 3
    dataset.set_epoch(2)
    batch = collate_encoded([EncodedImages(dataset, PLAN)[i] for i in range(16)])
    assert all(batch.encoded)
    images, labels, indices = _pipeline(dataset, 64, transforms.IMAGENET_MEAN, transforms.IMAGENET_STD)(batch)
    cpu = torch.stack([dataset[i][0] for i in range(16)])
    assert images.shape == cpu.shape and images.dtype == torch.float32
    assert (images - cpu).abs().mean() < 0.04
    error = (images - cpu).abs().mean(dim=(1, 2, 3))
    assert ((images.flip(-1) - cpu).abs().mean(dim=(1, 2, 3)) > error).all()  # each flip as on the CPU
    assert labels.tolist() == dataset.labels[:16].tolist() and indices.tolist() == list(range(16))


def test_png_and_oriented_jpeg_items(tmp_path: Path) -> None:
    """A PNG comes decoded from the worker; an EXIF-rotated JPEG comes as bytes and is turned upright in
    the pipeline: both give what the decoded upright image gives."""
    (tmp_path / "png").mkdir()
    png = _images(tmp_path / "png", [(30, 40)], "png")
    rng = np.random.default_rng(1)
    rotated = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    exif = rotated.getexif()
    exif[0x0112] = 6
    rotated.save(tmp_path / "rotated.jpg", quality=95, exif=exif)
    dataset = _dataset([*png, str(tmp_path / "rotated.jpg")])
    dataset.augment_seed = 0
    encoded = EncodedImages(dataset, PLAN)
    items = [encoded[0], encoded[1]]
    assert not items[0].encoded and items[1].encoded and items[1].orientation == 6
    pipeline = _pipeline(dataset, 24)
    out, _, _ = pipeline(collate_encoded(items))
    upright = [dataset.load(0), dataset.load(1)]
    assert upright[1].shape == (3, 40, 30)
    boxes = torch.tensor([item.box for item in items])
    expected = pipeline.crop(pipeline.pack(upright), boxes, torch.tensor([item.flip for item in items]))
    torch.testing.assert_close(out, expected)


def test_deterministic_whatever_the_batch_and_the_workers(clothing_paths: list[str]) -> None:
    dataset = _dataset(clothing_paths[:12])
    dataset.augment_seed = 11
    pipeline = _pipeline(dataset, 32)
    encoded = EncodedImages(dataset, PLAN)
    whole, _, _ = pipeline(collate_encoded([encoded[i] for i in range(12)]))
    pair, _, _ = pipeline(collate_encoded([encoded[7], encoded[2]]))
    torch.testing.assert_close(pair, whole[[7, 2]], rtol=0, atol=0)
    sampler = [list(range(0, 6)), list(range(6, 12))]
    for workers in (0, 2):
        loader = GpuLoader(dataset, sampler, pipeline, num_workers=workers)
        assert len(loader) == 2
        batches = list(loader)
        torch.testing.assert_close(torch.cat([b[0] for b in batches]), whole, rtol=0, atol=0)
        assert torch.cat([b[2] for b in batches]).tolist() == list(range(12))
    dataset.set_epoch(1)
    moved, _, _ = pipeline(collate_encoded([encoded[i] for i in range(12)]))
    assert not torch.equal(moved, whole)


def test_the_loader_thread_stops_when_iteration_stops(clothing_paths: list[str]) -> None:
    dataset = _dataset(clothing_paths[:20])
    loader = GpuLoader(dataset, [[i, i + 1] for i in range(0, 20, 2)], _pipeline(dataset, 16))
    before = threading.active_count()
    for number, _ in enumerate(loader):
        if number == 1:
            break
    assert threading.active_count() == before


def test_a_file_the_decoder_refuses_is_named_or_replaced(tmp_path: Path) -> None:
    """The header passes, the data does not: the batch decode fails, the pipeline finds the file and lets
    the dataset name it (or replace it, with skip_unreadable) and draws the crop for the image it got."""
    paths = _images(tmp_path, [(30, 30), (40, 40), (35, 35)])
    paths.append(str(truncated_jpeg(tmp_path / "cut.jpg")))
    for skip in (False, True):
        dataset = _dataset(paths, skip_unreadable=skip)
        dataset.augment_seed = 4
        batch = collate_encoded([EncodedImages(dataset, PLAN)[i] for i in (1, 3)])
        assert batch.encoded == [True, True]  # the truncated file's header is fine
        pipeline = _pipeline(dataset, 16)
        if not skip:
            with pytest.raises(DataError, match=r"cut\.jpg': image file is truncated"):
                pipeline(batch)
            continue
        with pytest.warns(UserWarning, match=r"cut\.jpg.*replaced by another image of class 'b'"):
            out, _, _ = pipeline(batch)
        assert out.shape == (2, 3, 16, 16) and dataset.substituted == 1
        with pytest.warns(UserWarning, match="replaced"):
            substitute = dataset.load(3)
        expected = draw_crop(*substitute.shape[-2:], PLAN, torch.Generator().manual_seed(item_seed(4, 0, 3)))
        packed = pipeline.pack([substitute])
        reference = pipeline.crop(packed, torch.tensor([expected[:4]]), torch.tensor([expected[4]]))
        torch.testing.assert_close(out[1:], reference)


def _run_data(dataset: FileImageDataset, spec: dict) -> RunData:
    return RunData(dataset, None, dataset, spec)


def test_gpu_decode_auto_falls_back_without_cuda(clothing_paths: list[str]) -> None:
    dataset = _dataset(clothing_paths[:8])
    base = {"image_size": 32, "channels": 3, "recipe": "base"}
    config = make_config({"gpu_decode": "auto", "batch_size": 4, "samples_per_class": 2})
    section, cpu, cuda = config.data, torch.device("cpu"), torch.device("cuda")
    assert not uses_gpu_pipeline(section, _run_data(dataset, base), cpu)
    assert gpu_decode_obstacles(section, _run_data(dataset, base), cuda) == []
    assert uses_gpu_pipeline(section, _run_data(dataset, base), cuda)  # on a GPU, auto takes it
    off = section.model_copy(update={"gpu_decode": "off"})
    assert not uses_gpu_pipeline(off, _run_data(dataset, base), cuda)
    randaugment = _run_data(dataset, {**base, "recipe": "randaugment"})
    reasons = gpu_decode_obstacles(section, randaugment, cuda)
    assert reasons == ["the 'randaugment' recipe is not RandomResizedCrop + flip (photo, base, big)"]
    required = section.model_copy(update={"gpu_decode": "on"})
    with pytest.raises(ConfigError, match=r"gpu_decode on: the device is cpu, not CUDA"):
        uses_gpu_pipeline(required, _run_data(dataset, base), cpu)
    bicubic = section.model_copy(update={"interpolation": "bicubic"})
    assert "bilinearly" in gpu_decode_obstacles(bicubic, _run_data(dataset, base), cuda)[0]
    loader = train_loader(_run_data(dataset, base), [[0, 1, 2, 3]], config, cpu)
    assert isinstance(loader, torch.utils.data.DataLoader)  # the CPU pipeline
    boxed = _dataset(clothing_paths[:8])
    boxed.annotate(ItemAnnotations(boxes=np.tile([0.1, 0.1, 0.9, 0.9], (8, 1))))
    assert "has crop boxes" in gpu_decode_obstacles(section, _run_data(boxed, base), cuda)[0]
