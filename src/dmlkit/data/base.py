"""Image datasets with class labels, stable item ids and deterministic per-item augmentation.

:class:`ImageDataset` is the common interface; :class:`ArrayImageDataset` keeps small datasets in memory as
``uint8`` tensors and :class:`FileImageDataset` decodes image files lazily into ``uint8`` tensors
(:func:`~dmlkit.data.images.load_image_tensor`), or reads them from a decoded-image cache. Builders,
registered in :data:`REGISTRY`, return a :class:`DatasetSplits` whose ``train`` and ``test`` datasets have
disjoint classes (zero-shot retrieval).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from dmlkit.data import transforms
from dmlkit.data.cache import DecodedCache, reduce
from dmlkit.data.images import DECODERS, DEFAULT_MAX_IMAGE_PIXELS, load_image_tensor
from dmlkit.errors import ConfigError, DataError
from dmlkit.registry import Registry

Transform = Callable[[Any], Any]


def item_seed(augment_seed: int, epoch: int, index: int, view: int = 0) -> int:
    """A 63-bit seed that is a pure function of ``(augment_seed, epoch, index)`` (BLAKE2b of the triple),
    and of ``view`` when it is not 0: another, unrelated stream for a further augmented view of the same
    item (self-supervised training's second view; view 0 keeps the seed supervised training has always
    used, so existing runs replay unchanged).

    A cryptographic hash rather than e.g. ``seed + index`` so neighbouring items and epochs get unrelated
    random streams.
    """
    text = f"{augment_seed}:{epoch}:{index}" + (f":{view}" if view else "")
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


#: ``num_workers auto`` never starts more workers than this: each is a process with its own memory, and
#: at ≈ 650–870 images/s per worker (BENCHMARKS.md) 32 of them feed well over 20,000 images/s.
MAX_AUTO_WORKERS = 32


def auto_workers() -> int:
    """DataLoader workers for ``num_workers auto``: one per core this process may run on
    (``os.sched_getaffinity``: what ``taskset``, cpusets and container CPU sets allow), less one for the
    main process (it runs the training step and feeds the GPU), at most :data:`MAX_AUTO_WORKERS`; 0 (load
    in the main process) with a single core."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(cores - 1, MAX_AUTO_WORKERS))


def to_float_image(image: Any) -> torch.Tensor:
    """Tensor or PIL image → float32 ``C × H × W`` tensor (``uint8`` values scaled to [0, 1])."""
    if isinstance(image, Image.Image):
        array = np.asarray(image)
        tensor = torch.from_numpy(array.copy())
        tensor = tensor.unsqueeze(0) if tensor.dim() == 2 else tensor.permute(2, 0, 1)
    elif isinstance(image, torch.Tensor):
        tensor = image.as_subclass(torch.Tensor)
    else:
        raise TypeError(f"expected a tensor or PIL image from the transform, got {type(image).__name__}")
    if tensor.dtype == torch.uint8:
        return tensor.float().div_(255.0)
    return tensor.float()


#: The evaluation protocols a split can follow (the run records which one its metrics come from).
LEAVE_ONE_OUT = "leave-one-out"
QUERY_GALLERY = "query/gallery"


@dataclass
class ItemAnnotations:
    """What a dataset may say about its items besides image and label, one entry per item (all optional).

    - ``is_query`` / ``is_gallery`` (bool): the query/gallery protocol (In-shop, an OML CSV): queries are
      searched against the gallery items, an item that is both never retrieves itself. ``None``: every item
      is a query against all others (leave-one-out).
    - ``categories`` (int64 codes into ``category_names``): a super-label (SOP's super-classes, an OML
      ``category``): the hierarchical sampler's super-classes and the per-category metrics.
    - ``sequences`` (int64): items with equal codes never retrieve each other (an OML ``sequence``: frames of
      one video, photos of one listing); an item in no sequence has a code of its own.
    - ``boxes`` (float64 ``n × 4``): crop box ``x1, y1, x2, y2`` as fractions of the image's width and
      height (so it holds at any decoded size, a reduced cache included); a row of NaN: the whole image.
    """

    is_query: np.ndarray | None = None
    is_gallery: np.ndarray | None = None
    categories: np.ndarray | None = None
    category_names: list[str] = field(default_factory=list)
    sequences: np.ndarray | None = None
    boxes: np.ndarray | None = None

    def check(self, size: int) -> None:
        """``DataError`` when an array does not hold one entry per item, or only one of the flags is set."""
        if (self.is_query is None) != (self.is_gallery is None):
            raise DataError("is_query and is_gallery go together: give both or neither")
        for name in ("is_query", "is_gallery", "categories", "sequences", "boxes"):
            value = getattr(self, name)
            if value is not None and len(value) != size:
                raise DataError(f"annotations: {len(value)} {name} for {size} items")
        if (
            self.categories is not None
            and len(self.categories)
            and (self.categories.min() < 0 or self.categories.max() >= len(self.category_names))
        ):
            raise DataError(f"categories must be codes in [0, {len(self.category_names)})")

    @property
    def protocol(self) -> str:
        """:data:`QUERY_GALLERY` when the items carry query/gallery flags, else :data:`LEAVE_ONE_OUT`."""
        return LEAVE_ONE_OUT if self.is_query is None else QUERY_GALLERY

    def select(self, indices: np.ndarray) -> ItemAnnotations:
        """The annotations of items ``indices`` (in that order)."""

        def pick(value: np.ndarray | None) -> np.ndarray | None:
            return None if value is None else value[indices]

        return ItemAnnotations(
            pick(self.is_query),
            pick(self.is_gallery),
            pick(self.categories),
            list(self.category_names),
            pick(self.sequences),
            pick(self.boxes),
        )


def crop_to_box(image: torch.Tensor, box: np.ndarray) -> torch.Tensor:
    """The part of a ``C × H × W`` image inside ``box`` (fractions ``x1, y1, x2, y2``; NaN: the whole
    image), rounded outwards to whole pixels and at least one pixel wide and high."""
    if np.isnan(box).any():
        return image
    height, width = image.shape[-2:]
    # a tolerance far below a pixel, so a box recorded on whole pixels maps back to them exactly
    x1 = min(int(np.floor(box[0] * width + 1e-6)), width - 1)
    y1 = min(int(np.floor(box[1] * height + 1e-6)), height - 1)
    x2 = max(int(np.ceil(box[2] * width - 1e-6)), x1 + 1)
    y2 = max(int(np.ceil(box[3] * height - 1e-6)), y1 + 1)
    return image[..., y1:y2, x1:x2]


class ImageDataset(Dataset):
    """A labelled image dataset: ``dataset[i] == (image, label, i)``.

    - ``labels``: ``int64`` array of contiguous class codes ``0 .. C-1``; ``class_names[code]`` names them;
    - ``ids``: stable item ids (relative file paths, ``class/sample`` names), preserved by :meth:`subset`;
    - ``annotations``: query/gallery flags, categories, sequences and crop boxes
      (:class:`ItemAnnotations`), preserved by :meth:`subset`; a crop box is applied to the stored image
      before the transform;
    - ``transform``: applied to the stored image (``uint8`` ``C × H × W`` tensor or PIL image); without one
      the image is returned as a float tensor in [0, 1];
    - ``augment_seed`` / ``epoch``: when ``augment_seed`` is set, the transform of item ``i`` runs under a
      forked torch RNG seeded with :func:`item_seed` ``(augment_seed, epoch, i)``, so augmentation is a pure
      function of (seed, epoch, index) whatever the DataLoader worker or order — resumed runs replay it.
      An item drawn twice in one epoch is augmented the same way both times, so samplers that draw more
      than one pass should advance the epoch (:meth:`set_epoch`) once per pass.
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        class_names: Sequence[str],
        ids: Sequence[str],
        transform: Transform | None = None,
        channels: int = 3,
    ) -> None:
        self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        self.class_names = [str(name) for name in class_names]
        self.ids = [str(item) for item in ids]
        if len(self.ids) != len(self.labels):
            raise DataError(f"{len(self.ids)} ids for {len(self.labels)} labels")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
            raise DataError(
                f"labels must be codes in [0, {len(self.class_names)}), got range "
                f"[{self.labels.min()}, {self.labels.max()}]"
            )
        self.transform = transform
        self.channels = channels
        self.augment_seed: int | None = None
        self.epoch = 0
        self.annotations = ItemAnnotations()

    def annotate(self, annotations: ItemAnnotations) -> ImageDataset:
        """Attach ``annotations`` (checked: one entry per item); returns ``self``."""
        annotations.check(len(self))
        self.annotations = annotations
        return self

    # -- to be provided by subclasses ---------------------------------------------------------------------
    def load(self, index: int) -> Any:
        """The stored image of item ``index`` before any transform."""
        raise NotImplementedError

    def _select(self, indices: np.ndarray, labels: np.ndarray, class_names: list[str]) -> ImageDataset:
        """A new dataset of the same kind holding items ``indices`` with the given remapped labels."""
        raise NotImplementedError

    # -- common behaviour ---------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def item_categories(self) -> np.ndarray | None:
        """Per-item category codes (``annotations.categories``; None without categories): the hierarchical
        sampler's super-labels."""
        return self.annotations.categories

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that (with ``augment_seed``) determines the augmentation of every item."""
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        index = self._checked_index(index)
        return self.image(index), int(self.labels[index]), index

    def _checked_index(self, index: int) -> int:
        """``index`` as a non-negative int (a negative one counts from the end); ``IndexError`` outside."""
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} items")
        return index

    def image(self, index: int, view: int = 0) -> torch.Tensor:
        """Item ``index``'s image (crop box, then transform) as a float tensor: ``dataset[index][0]``.
        ``view`` > 0 draws a further augmentation of it, independent of view 0 and as reproducible
        (:func:`item_seed` with ``view``): the second view of self-supervised training
        (:class:`dmlkit.data.views.TwoViews`)."""
        index = self._checked_index(index)
        image = self.load(index)
        boxes = self.annotations.boxes
        if boxes is not None:
            image = crop_to_box(image, boxes[index])
        if self.transform is not None:
            if self.augment_seed is not None:
                # Seed only the CPU generator and restore it after: torch.random.fork_rng costs ~20× more
                # per item, and reseeding CUDA generators is not needed for CPU-side transforms.
                generator = torch.default_generator
                saved = generator.get_state()
                generator.manual_seed(item_seed(self.augment_seed, self.epoch, index, view))
                try:
                    image = self.transform(image)
                finally:
                    generator.set_state(saved)
            else:
                image = self.transform(image)
        return to_float_image(image)

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> ImageDataset:
        """Items ``indices`` (in that order) as a new dataset; labels are remapped to contiguous codes
        (ordered as in this dataset), ids, transform, ``augment_seed`` and ``epoch`` are kept."""
        if isinstance(indices, torch.Tensor):
            indices = indices.cpu().numpy()
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"subset indices out of range for a dataset of {len(self)} items")
        idx = np.where(idx < 0, idx + len(self), idx)
        used, codes = np.unique(self.labels[idx], return_inverse=True)
        part = self._select(idx, codes.astype(np.int64), [self.class_names[u] for u in used])
        part.transform = self.transform
        part.augment_seed = self.augment_seed
        part.epoch = self.epoch
        part.annotations = self.annotations.select(idx)
        return part

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(items={len(self)}, classes={self.num_classes}, channels={self.channels})"
        )


class ArrayImageDataset(ImageDataset):
    """Images held in memory as one ``uint8`` tensor ``N × C × H × W`` (small datasets)."""

    def __init__(
        self,
        images: np.ndarray | torch.Tensor,
        labels: Sequence[int] | np.ndarray,
        class_names: Sequence[str],
        ids: Sequence[str],
        transform: Transform | None = None,
    ) -> None:
        tensor = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images
        if tensor.dtype != torch.uint8:
            raise DataError(f"in-memory images must be uint8, got {tensor.dtype}")
        if tensor.dim() == 3:  # N × H × W grayscale
            tensor = tensor.unsqueeze(1)
        elif tensor.dim() == 4 and tensor.shape[-1] in (1, 3) and tensor.shape[1] not in (1, 3):
            tensor = tensor.permute(0, 3, 1, 2)  # N × H × W × C
        if tensor.dim() != 4:
            raise DataError(f"images must be N×H×W, N×H×W×C or N×C×H×W, got shape {tuple(tensor.shape)}")
        super().__init__(labels, class_names, ids, transform, channels=int(tensor.shape[1]))
        if len(tensor) != len(self.labels):
            raise DataError(f"{len(tensor)} images for {len(self.labels)} labels")
        self.images = tensor.contiguous()

    def load(self, index: int) -> torch.Tensor:
        return self.images[index]

    def _select(self, indices: np.ndarray, labels: np.ndarray, class_names: list[str]) -> ImageDataset:
        return ArrayImageDataset(
            self.images[torch.from_numpy(indices)], labels, class_names, [self.ids[i] for i in indices]
        )


class SharedCounter:
    """A count that DataLoader worker processes add to and the main process reads (:attr:`value`).

    It lives in a shared-memory tensor: forked workers share its pages, spawned / forkserver ones receive it
    through torch's multiprocessing pickler (a handle to the same memory), and plain pickling (``copy``,
    ``pickle``) copies the count. Each process adds only to its own slot (the main process to slot 0,
    worker ``w`` to slot ``1 + w mod (SLOTS − 1)``), so no lock is needed and no increment is lost (as long
    as one DataLoader at a time iterates the dataset, as training and evaluation do).
    """

    SLOTS = 64

    def __init__(self) -> None:
        self._slots = torch.zeros(self.SLOTS, dtype=torch.int64).share_memory_()

    def add(self, count: int = 1) -> None:
        """Add ``count`` in this process's slot."""
        info = torch.utils.data.get_worker_info()
        slot = 0 if info is None else 1 + info.id % (self.SLOTS - 1)
        self._slots[slot] += count

    @property
    def value(self) -> int:
        """The total over every process."""
        return int(self._slots.sum())


class FileImageDataset(ImageDataset):
    """Images decoded lazily from files with :func:`~dmlkit.data.images.load_image_tensor` into ``uint8``
    tensors (3 channels, or 1 when ``channels == 1``), refusing images above ``max_pixels`` pixels (``None``:
    no limit); ``decoder`` (``torchvision``: libjpeg-turbo for JPEGs, the default; ``pil``) picks the decoder,
    :attr:`cache` (a :class:`~dmlkit.data.cache.DecodedCache`, see :meth:`build_cache`) serves reduced
    decoded images instead.

    A file that fails to load raises ``DataError`` naming it, unless ``skip_unreadable``: the item is then
    replaced by another image of the same class, chosen by a pure function of (``augment_seed``, ``epoch``,
    index) (a resumed run replays the same substitutes), with a warning naming the file (once per process,
    DataLoader workers included: each prints it on the shared standard error);
    :attr:`substituted` counts the replacements, in the DataLoader workers too.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        labels: Sequence[int] | np.ndarray,
        class_names: Sequence[str],
        ids: Sequence[str],
        transform: Transform | None = None,
        channels: int = 3,
        *,
        skip_unreadable: bool = False,
        max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        decoder: str = "torchvision",
        cache: DecodedCache | None = None,
    ) -> None:
        if channels not in (1, 3):
            raise DataError(f"file datasets decode to 1 or 3 channels, got channels={channels}")
        if decoder not in DECODERS:
            raise ConfigError(f"decoder must be one of {', '.join(DECODERS)}, got '{decoder}'")
        if cache is not None and len(cache) != len(labels):
            raise DataError(f"a cache of {len(cache)} images for {len(labels)} files")
        super().__init__(labels, class_names, ids, transform, channels=channels)
        # a numpy array of strings, not a list: DataLoader workers would touch (and copy) every list item
        self.paths = np.asarray([str(p) for p in paths], dtype=np.str_)
        if len(self.paths) != len(self.labels):
            raise DataError(f"{len(self.paths)} paths for {len(self.labels)} labels")
        self.skip_unreadable = skip_unreadable
        self.max_pixels = max_pixels
        self.decoder = decoder
        self.cache = cache
        self._substituted = SharedCounter()

    @property
    def substituted(self) -> int:
        """How many loads failed and were replaced by another image of the class (``skip_unreadable``),
        since this dataset was made, in every process (DataLoader workers included)."""
        return self._substituted.value

    def build_cache(self, size: int, directory: str | Path | None = None) -> DecodedCache:
        """Decode every image once into :attr:`cache` at shorter side ``size`` (in shared memory, or in a
        file under ``directory``): see :class:`~dmlkit.data.cache.DecodedCache`."""
        self.cache = DecodedCache.build(
            self.paths.tolist(),
            size,
            channels=self.channels,
            max_pixels=self.max_pixels,
            decoder=self.decoder,
            directory=directory,
            skip_unreadable=self.skip_unreadable,
        )
        return self.cache

    def _decode(self, index: int) -> torch.Tensor:
        if self.cache is not None:
            cached = self.cache.get(index)
            if cached is not None:
                return cached
        image = load_image_tensor(
            str(self.paths[index]), self.channels, max_pixels=self.max_pixels, decoder=self.decoder
        )
        if self.cache is not None:  # a file that failed while the cache was built and reads now
            return reduce(image, self.cache.size)
        return image

    def load(self, index: int) -> torch.Tensor:
        try:
            return self._decode(index)
        except DataError as exc:
            if not self.skip_unreadable:
                raise
            return self._substitute(index, exc)

    def _substitute(self, index: int, failure: DataError) -> torch.Tensor:
        """The first loadable image of ``index``'s class in an order drawn from ``(augment_seed, epoch,
        index)``; ``DataError`` when none of them loads."""
        label = self.labels[index]
        others = np.flatnonzero(self.labels == label)
        others = others[others != index]
        rng = np.random.default_rng(item_seed(self.augment_seed or 0, self.epoch, index))
        order = rng.permutation(others)
        for other in order:
            try:
                image = self._decode(int(other))
            except DataError:
                continue
            self._substituted.add()
            # the same text every time for one file: Python shows it once per process, not once per draw
            name = self.class_names[label]
            warnings.warn(
                f"{failure} (skip_unreadable: replaced by another image of class '{name}')", stacklevel=3
            )
            return image
        raise DataError(
            f"{failure}; no other image of class '{self.class_names[label]}' loads either (skip_unreadable)"
        )

    def _select(self, indices: np.ndarray, labels: np.ndarray, class_names: list[str]) -> ImageDataset:
        return FileImageDataset(
            self.paths[indices].tolist(),
            labels,
            class_names,
            [self.ids[i] for i in indices],
            channels=self.channels,
            skip_unreadable=self.skip_unreadable,
            max_pixels=self.max_pixels,
            decoder=self.decoder,
            cache=self.cache.select(indices) if self.cache is not None else None,
        )


@dataclass
class DatasetSplits:
    """What a dataset builder returns: class-disjoint ``train`` and ``test`` (zero-shot) datasets, and the
    dataset's own ``val`` split when it has one (an OML CSV's ``validation`` rows next to ``test`` ones).
    ``test`` is None only for a dataset without labels (``unlabelled``: self-supervised training alone).

    ``transform_args`` are the keyword arguments of :func:`dmlkit.data.transforms.build` besides the kind,
    size and channels (``recipe``, ``mean``, ``std``, ``native_size``), as plain data. :meth:`spec` gathers
    everything needed to rebuild the pipelines (e.g. from a checkpoint): ``transforms.build(kind, **spec)``.
    Builders set ``train.transform = transform("train")`` and ``test.transform = transform("eval")``; give
    the eval pipeline to any part of ``train`` used for validation.
    """

    train: ImageDataset
    test: ImageDataset | None
    image_size: int
    channels: int
    name: str
    transform_args: dict[str, Any] = field(default_factory=dict)
    val: ImageDataset | None = None

    def spec(self) -> dict[str, Any]:
        """``{"image_size", "channels", **transform_args}``: plain data for ``transforms.build``."""
        return {"image_size": self.image_size, "channels": self.channels, **self.transform_args}

    def transform(self, kind: str) -> Transform:
        """The dataset's ``train`` or ``eval`` pipeline."""
        return transforms.build(kind, **self.spec())

    @classmethod
    def checked(
        cls,
        train: ImageDataset,
        test: ImageDataset,
        image_size: int,
        channels: int,
        name: str,
        transform_args: dict[str, Any],
        source: str,
        val: ImageDataset | None = None,
    ) -> DatasetSplits:
        """What every builder returns: the splits, each checked by :func:`check_split` (``source`` names the
        data in the error), with ``train.transform = transform("train")`` and ``test.transform =
        transform("eval")`` (and ``val``'s, when given)."""
        check_split(train, "train", source)
        check_split(test, "test", source)
        if val is not None:
            check_split(val, "validation", source)
        splits = cls(train, test, image_size, channels, name, transform_args, val)
        train.transform, test.transform = splits.transform("train"), splits.transform("eval")
        if val is not None:
            val.transform = splits.transform("eval")
        return splits


#: The dataset builders: ``REGISTRY.build(name, root=..., **kwargs)`` → :class:`DatasetSplits`.
REGISTRY: Registry[DatasetSplits] = Registry("dataset")


def dataset_root(root: str | None, dataset: str, expected: str) -> Path:
    """``root`` with ``~`` expanded; ``ConfigError`` naming ``dataset`` and the ``expected`` root if None."""
    if root is None:
        raise ConfigError(f"dataset '{dataset}' needs root: {expected}")
    return Path(root).expanduser()


def dataset_file(root: str | None, dataset: str, expected: str, default_name: str, what: str) -> Path:
    """The data file ``root``, or ``root/default_name`` when ``root`` is a folder (see :func:`dataset_root`).

    Raises ``DataError`` ``"<what> not found: '<path>'"`` when that file does not exist.
    """
    path = dataset_root(root, dataset, expected)
    if path.is_dir():
        path = path / default_name
    if not path.is_file():
        raise DataError(f"{what} not found: '{path}'")
    return path


def check_split(dataset: ImageDataset, split: str, source: str) -> None:
    """Raise ``DataError`` naming ``source`` if the ``split`` has fewer than 2 classes (retrieval needs 2)."""
    if dataset.num_classes < 2:
        raise DataError(
            f"the {split} split of '{source}' has {dataset.num_classes} class(es) "
            f"({', '.join(dataset.class_names) or 'none'}); retrieval needs at least 2"
        )


__all__ = [
    "LEAVE_ONE_OUT",
    "MAX_AUTO_WORKERS",
    "QUERY_GALLERY",
    "REGISTRY",
    "ArrayImageDataset",
    "DatasetSplits",
    "FileImageDataset",
    "ImageDataset",
    "ItemAnnotations",
    "SharedCounter",
    "auto_workers",
    "check_split",
    "crop_to_box",
    "dataset_file",
    "dataset_root",
    "item_seed",
    "to_float_image",
]
