"""The GPU input pipeline (``--gpu-decode``): JPEG bytes in, normalised training batches out, on the device.

The CPU pipeline decodes, crops, resizes and normalises every image in DataLoader workers. Here the workers
only read each file, parse its JPEG header and draw its crop; the main process then, per batch:

1. decodes every JPEG at once with nvJPEG (``torchvision.io.decode_jpeg(list, device="cuda")``); files the
   GPU cannot decode as Pillow would (PNG, CMYK, ...) arrive already decoded by the worker;
2. turns each image upright (EXIF orientation: flips and transposes, views only) and packs the batch into
   one zero-padded tensor, repeating each image's last row and column once so that sampling at its border
   sees its own edge, as a crop does;
3. crops and resizes every image to ``size × size`` in one ``torchvision.ops.roi_align`` call with one box
   per image (``aligned=True``, adaptive sampling: ``⌈box / size⌉²`` bilinear samples averaged per output
   pixel, an area filter when shrinking, bilinear interpolation when enlarging), flips the chosen ones in
   one ``torch.where``, and normalises with one fused multiply-add (``(x / 255 − mean) / std``);
4. does all that one batch ahead, in a background thread on a side CUDA stream (:class:`GpuLoader`), so the
   model's step on the main stream overlaps the next batch's decode.

The crop boxes and flips are drawn in the workers by :func:`draw_crop`, the same draws, from the same
generator state, as ``RandomResizedCrop`` + ``RandomHorizontalFlip`` make in the CPU pipeline
(:class:`~dmlkit.data.base.ImageDataset` seeds it per item with ``item_seed(seed, epoch, index)``): a batch
is a pure function of (seed, epoch, indices), and each image has the geometry it would have on the CPU. The
pixels differ slightly: ``roi_align``'s area sampling stands in for the antialiased resize, and only
bilinear interpolation exists. Only training batches of recipes that are exactly ``RandomResizedCrop`` +
flip (``photo``, ``base``, ``big``: :meth:`~dmlkit.data.augment.Recipe.crop_plan`) take this path;
evaluation stays on the CPU. Everything but nvJPEG runs on the CPU too (``device="cpu"``), which is how the
tests check it.
"""

from __future__ import annotations

import contextlib
import math
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.ops import roi_align

from dmlkit.data.augment import CropPlan
from dmlkit.data.base import FileImageDataset, item_seed
from dmlkit.data.images import (
    ImageTooLargeError,
    decode_jpegs,
    exif_orientation,
    gpu_decodable,
    jpeg_header,
    orient,
    read_bytes,
)
from dmlkit.errors import DataError

#: ``--gpu-decode`` values: ``auto`` (on when the device is CUDA and the recipe and dataset allow it), ``on``
#: (required: an error says why it cannot be), ``off``.
GPU_DECODE_MODES: tuple[str, ...] = ("auto", "on", "off")


def draw_crop(
    height: int, width: int, plan: CropPlan, generator: torch.Generator
) -> tuple[int, int, int, int, bool]:
    """``(top, left, crop_height, crop_width, flip)`` of a ``height × width`` image, drawn from
    ``generator`` exactly as ``torchvision.transforms.v2.RandomResizedCrop(scale, ratio)`` and then
    ``RandomHorizontalFlip(p)`` draw them from the global generator (same calls, same order, same float32
    log-ratio), so a generator in the same state gives the same crop and flip as the CPU pipeline.

    Up to 10 tries of an area fraction in ``scale`` and a log-uniform aspect ratio in ``ratio``; if none
    fits, the centre crop of the largest ratio-bounded size (torchvision's fallback).
    """
    area = height * width
    log_ratio = torch.log(torch.tensor(plan.ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(plan.scale[0], plan.scale[1], generator=generator).item()
        aspect = torch.exp(
            torch.empty(1).uniform_(float(log_ratio[0]), float(log_ratio[1]), generator=generator)
        ).item()
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            break
    else:
        in_ratio = width / height
        if in_ratio < min(plan.ratio):
            w, h = width, round(width / min(plan.ratio))
        elif in_ratio > max(plan.ratio):
            h, w = height, round(height * max(plan.ratio))
        else:
            w, h = width, height
        top, left = (height - h) // 2, (width - w) // 2
    flip = bool(torch.rand(1, generator=generator).item() < plan.flip)
    return top, left, h, w, flip


def item_generator(dataset: FileImageDataset, index: int) -> torch.Generator:
    """A generator in the state the CPU pipeline's is when it transforms item ``index`` of ``dataset``:
    seeded with ``item_seed(augment_seed, epoch, index)`` (0 without an ``augment_seed``)."""
    seed = dataset.augment_seed
    return torch.Generator().manual_seed(item_seed(seed, dataset.epoch, index) if seed is not None else 0)


@dataclass
class EncodedItem:
    """One training item as a worker hands it over: ``data`` is the JPEG's bytes (``encoded``; 1-D
    ``uint8``) or the decoded ``uint8`` ``C × H × W`` image, ``orientation`` its EXIF orientation (bytes
    only), ``box`` ``(top, left, height, width)`` in the upright image, ``flip`` the horizontal flip."""

    data: torch.Tensor
    encoded: bool
    orientation: int
    box: tuple[int, int, int, int]
    flip: bool
    label: int
    index: int


@dataclass
class EncodedBatch:
    """A batch of :class:`EncodedItem` (:func:`collate_encoded`); ``pin_memory`` pins what is uploaded."""

    data: list[torch.Tensor]
    encoded: list[bool]
    orientation: list[int]
    boxes: torch.Tensor
    flips: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor

    def pin_memory(self) -> EncodedBatch:
        """The batch with its decoded images and tensors in pinned memory (the DataLoader's pin thread
        calls it), so their upload overlaps other work."""
        data = [d if enc else d.pin_memory() for d, enc in zip(self.data, self.encoded, strict=True)]
        return EncodedBatch(
            data,
            self.encoded,
            self.orientation,
            self.boxes.pin_memory(),
            self.flips.pin_memory(),
            self.labels.pin_memory(),
            self.indices.pin_memory(),
        )

    def __len__(self) -> int:
        return len(self.data)


def collate_encoded(items: Sequence[EncodedItem]) -> EncodedBatch:
    """The DataLoader's ``collate_fn`` for :class:`EncodedImages`: lists for the variable-size data,
    tensors for the rest."""
    return EncodedBatch(
        [item.data for item in items],
        [item.encoded for item in items],
        [item.orientation for item in items],
        torch.tensor([item.box for item in items], dtype=torch.int64).reshape(-1, 4),
        torch.tensor([item.flip for item in items], dtype=torch.bool),
        torch.tensor([item.label for item in items], dtype=torch.int64),
        torch.tensor([item.index for item in items], dtype=torch.int64),
    )


class EncodedImages(Dataset):
    """The items of a :class:`~dmlkit.data.base.FileImageDataset` as the GPU pipeline takes them.

    A JPEG that nvJPEG decodes as Pillow would (:func:`~dmlkit.data.images.gpu_decodable`) comes as its
    bytes, after the pixel limit is checked on its header; anything else, a cached image, or a file that
    fails (with ``skip_unreadable``: its substitute) comes decoded by the dataset itself. The crop and flip
    are drawn by :func:`draw_crop` from a generator seeded with ``item_seed(augment_seed, epoch, index)``:
    what the CPU pipeline would draw for the same item, epoch and seed. ``epoch`` and ``augment_seed`` are
    read from the dataset, so ``dataset.set_epoch`` moves both pipelines alike.
    """

    def __init__(self, dataset: FileImageDataset, plan: CropPlan) -> None:
        self.dataset, self.plan = dataset, plan

    def __len__(self) -> int:
        return len(self.dataset)

    def _bytes(self, index: int) -> tuple[torch.Tensor, int, int, int] | None:
        """``(bytes, orientation, height, width)`` (upright size) of a GPU-decodable file, else None."""
        dataset = self.dataset
        if dataset.cache is not None:
            return None
        path = str(dataset.paths[index])
        data = read_bytes(path)
        header = jpeg_header(data)
        if not gpu_decodable(header, dataset.channels):
            return None
        assert header is not None
        limit = dataset.max_pixels
        if limit is not None and header.width * header.height > limit:
            raise ImageTooLargeError.of(path, (header.width, header.height), limit)
        orientation = exif_orientation(data, header)
        height, width = (header.width, header.height) if orientation >= 5 else (header.height, header.width)
        return torch.frombuffer(data, dtype=torch.uint8), orientation, height, width

    def __getitem__(self, index: int) -> EncodedItem:
        index = int(index)
        dataset = self.dataset
        try:
            found = self._bytes(index)
        except DataError:
            if not dataset.skip_unreadable:
                raise
            found = None  # the dataset's own load substitutes it and warns, naming the file
        if found is not None:
            data, orientation, height, width = found
            encoded = True
        else:
            data, orientation, encoded = dataset.load(index), 1, False
            height, width = int(data.shape[-2]), int(data.shape[-1])
        top, left, h, w, flip = draw_crop(height, width, self.plan, item_generator(dataset, index))
        return EncodedItem(
            data, encoded, orientation, (top, left, h, w), flip, int(dataset.labels[index]), index
        )


class GpuBatchPipeline:
    """Decode, crop, resize, flip and normalise an :class:`EncodedBatch` on ``device`` (see the module
    docstring): ``pipeline(batch) -> (images, labels, indices)``, images float32 ``B × channels × size ×
    size``.

    ``dataset`` is the one the batch came from: a JPEG whose header passed but whose data nvJPEG refuses is
    decoded again by ``dataset.load`` (a named ``DataError``, or its substitute with ``skip_unreadable``),
    with its crop drawn again for the image it got, as the CPU pipeline would.
    """

    def __init__(
        self,
        dataset: FileImageDataset,
        plan: CropPlan,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device | str,
    ) -> None:
        self.dataset, self.plan, self.size = dataset, plan, int(size)
        self.device = torch.device(device)
        self.channels = dataset.channels
        if len(mean) != self.channels or len(std) != self.channels:
            raise DataError(f"mean/std need {self.channels} value(s), got {list(mean)} and {list(std)}")
        # (x / 255 − mean) / std = x · scale + shift: one fused multiply-add
        stats = torch.tensor([list(mean), list(std)], dtype=torch.float32)
        self.scale = (1.0 / (255.0 * stats[1])).view(1, -1, 1, 1).to(self.device)
        self.shift = (-stats[0] / stats[1]).view(1, -1, 1, 1).to(self.device)
        # roi_align in half precision on CUDA (exact for 0–255, half the memory traffic), float32 on the CPU
        self.work_dtype = torch.float16 if self.device.type == "cuda" else torch.float32

    def _decode(self, batch: EncodedBatch) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Upright decoded images on the device, and the boxes / flips (redrawn for re-decoded items)."""
        positions = [i for i, encoded in enumerate(batch.encoded) if encoded]
        images: list[torch.Tensor | None] = [None] * len(batch)
        boxes, flips = batch.boxes.clone(), batch.flips.clone()
        if positions:
            try:
                decoded = decode_jpegs([batch.data[i] for i in positions], self.channels, self.device)
            except RuntimeError:  # one bad file fails the whole batch: find it
                decoded = [self._decode_one(batch.data[i]) for i in positions]
            for i, image in zip(positions, decoded, strict=True):
                if image is None:  # refused: the dataset decodes (or replaces) it; its crop is drawn again
                    images[i], boxes[i], flips[i] = self._reload(int(batch.indices[i]))
                else:
                    images[i] = orient(image, batch.orientation[i])
        for i, encoded in enumerate(batch.encoded):
            if not encoded:
                images[i] = batch.data[i].to(self.device, non_blocking=True)
        return [image for image in images if image is not None], boxes, flips

    def _reload(self, index: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Item ``index`` decoded by the dataset (its error, or its substitute), with the crop and flip the
        CPU pipeline would draw for that image."""
        image = self.dataset.load(index).to(self.device)
        generator = item_generator(self.dataset, index)
        top, left, h, w, flip = draw_crop(int(image.shape[-2]), int(image.shape[-1]), self.plan, generator)
        return image, torch.tensor([top, left, h, w]), flip

    def _decode_one(self, data: torch.Tensor) -> torch.Tensor | None:
        try:
            return decode_jpegs([data], self.channels, self.device)[0]
        except RuntimeError:
            return None

    def pack(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """``images`` in one zero-padded ``B × C × H × W`` tensor (``work_dtype``; float32 beyond 2048 px,
        where half precision no longer holds every pixel coordinate of the boxes), each image's last row
        and column repeated once beyond it: ``roi_align`` samples up to half a pixel past a box's far edge."""
        height = max(int(image.shape[-2]) for image in images) + 1
        width = max(int(image.shape[-1]) for image in images) + 1
        dtype = self.work_dtype if max(height, width) <= 2049 else torch.float32
        packed = torch.zeros(len(images), self.channels, height, width, dtype=dtype, device=self.device)
        for b, image in enumerate(images):
            h, w = int(image.shape[-2]), int(image.shape[-1])
            packed[b, :, :h, :w].copy_(image)
            packed[b, :, :h, w].copy_(image[:, :, w - 1])
            packed[b, :, h, : w + 1].copy_(packed[b, :, h - 1, : w + 1])
        return packed

    def crop(self, packed: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        """Crop ``boxes`` (``B × 4``: top, left, height, width) of ``packed`` to ``size × size`` (one
        ``roi_align``), flip the ``flips`` ones, normalise: float32 ``B × C × size × size``."""
        boxes = boxes.to(self.device, dtype=torch.float32)
        top, left, height, width = boxes.unbind(1)
        batch_index = torch.arange(len(boxes), device=self.device, dtype=torch.float32)
        rois = torch.stack([batch_index, left, top, left + width, top + height], dim=1)
        out = roi_align(packed, rois.to(packed.dtype), (self.size, self.size), 1.0, -1, aligned=True)
        out = torch.where(flips.to(self.device).view(-1, 1, 1, 1), out.flip(-1), out)
        return torch.addcmul(self.shift, out.float(), self.scale)

    def __call__(self, batch: EncodedBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images, boxes, flips = self._decode(batch)
        out = self.crop(self.pack(images), boxes, flips)
        labels = batch.labels.to(self.device, non_blocking=True)
        return out, labels, batch.indices.to(self.device, non_blocking=True)


_DONE = object()


class GpuLoader:
    """Training batches through the GPU pipeline: a DataLoader of :class:`EncodedImages` (``num_workers``
    processes read and parse files and draw crops), whose batches ``pipeline`` turns into images on its
    device, ``prefetch`` batches ahead in a background thread (on a side CUDA stream on a GPU).

    Iterating yields ``(images, labels, indices)`` like the CPU DataLoader, in the batch sampler's order;
    ``len`` is the sampler's. Stopping early (``break``, an error) stops the thread and the workers.
    """

    def __init__(
        self,
        dataset: FileImageDataset,
        batch_sampler: Any,
        pipeline: GpuBatchPipeline,
        *,
        num_workers: int = 0,
        generator: torch.Generator | None = None,
        prefetch: int = 1,
    ) -> None:
        self.pipeline, self.prefetch = pipeline, max(1, prefetch)
        self.loader = DataLoader(
            EncodedImages(dataset, pipeline.plan),
            batch_sampler=batch_sampler,
            num_workers=num_workers,
            collate_fn=collate_encoded,
            pin_memory=pipeline.device.type == "cuda",
            generator=generator,
        )

    def __len__(self) -> int:
        return len(self.loader)

    def _produce(self, out: queue.Queue, stop: threading.Event) -> None:
        device = self.pipeline.device
        stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        try:
            for batch in self.loader:
                if stop.is_set():
                    break
                if stream is None:
                    out.put((self.pipeline(batch), None))
                    continue
                with torch.cuda.stream(stream):
                    result = self.pipeline(batch)
                    ready = torch.cuda.Event()
                    ready.record(stream)
                out.put((result, ready))
            out.put((_DONE, None))
        except BaseException as exc:  # handed to the consumer, raised there
            out.put((exc, None))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        results: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        worker = threading.Thread(
            target=self._produce, args=(results, stop), daemon=True, name="gpu-pipeline"
        )
        worker.start()
        try:
            while True:
                result, ready = results.get()
                if result is _DONE:
                    return
                if isinstance(result, BaseException):
                    raise result
                if ready is not None:
                    current = torch.cuda.current_stream(self.pipeline.device)
                    current.wait_event(ready)
                    for tensor in result:  # made on the side stream, used on this one
                        tensor.record_stream(current)
                yield result
        finally:
            stop.set()
            while worker.is_alive():  # unblock a producer waiting to put
                with contextlib.suppress(queue.Empty):
                    results.get(timeout=0.1)
            worker.join()


__all__ = [
    "GPU_DECODE_MODES",
    "EncodedBatch",
    "EncodedImages",
    "EncodedItem",
    "GpuBatchPipeline",
    "GpuLoader",
    "collate_encoded",
    "draw_crop",
    "item_generator",
]
