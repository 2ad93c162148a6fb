"""The datasets of a run, built once from its configuration (shared by training and ``dmlkit eval``), and
the loader of its training batches (the CPU pipeline in DataLoader workers, or the GPU pipeline).

The data spec (what a checkpoint records to rebuild the evaluation pipeline) resolves every preprocessing
field of a photo recipe with one precedence: a ``data`` flag (``--image-size``, ``--mean``, ``--std``,
``--interpolation``, ``--crop-pct``; ``image_size`` in ``--dataset-args`` counts as the flag) > what the
recipe fixes itself (``big``: 256 px, crop ratio 1) > the backbone's preprocessing
(:func:`dmlkit.models.preprocessing.of_backbone`: timm's ``pretrained_cfg``, torchvision's weights
metadata) > the dataset's (its ``image_size`` default, its measured statistics) > the recipe's defaults
(ImageNet statistics, bilinear, crop ratio 0.875 or ``photo``'s 1/1.14). The ``glyph`` recipe keeps its
dataset's statistics and size: the backbone's preprocessing does not apply to it.

Self-supervised runs (``ssl``) train on :class:`~dmlkit.data.views.TwoViews` of the training part: batches of
``2B`` images, both augmented views of ``B`` images, each image its own class (docs/ssl.md). A dataset
without labels (``unlabelled``) has no validation or test split: such a run measures no retrieval metric.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from dmlkit import data as data_lib
from dmlkit.config import DataSection, TrainConfig
from dmlkit.data import DatasetSplits, FileImageDataset, ImageDataset, transforms
from dmlkit.data.gpu_pipeline import GpuBatchPipeline, GpuLoader
from dmlkit.data.views import TwoViews, collate_views
from dmlkit.errors import ConfigError
from dmlkit.models import preprocessing

log = logging.getLogger(__name__)

#: The data-spec fields a flag, the backbone or the dataset may set (see the module docstring).
PREPROCESSING_FIELDS: tuple[str, ...] = ("mean", "std", "interpolation", "crop_pct")


@dataclass
class RunData:
    """The training part, the class-disjoint validation part (None with ``val_fraction`` 0), the test split
    (classes unseen in training; None for a dataset without labels) and the spec that rebuilds the
    evaluation preprocessing; ``ssl``: the training part is seen as two views per image, without labels."""

    train: ImageDataset
    val: ImageDataset | None
    test: ImageDataset | None
    spec: dict[str, Any]
    ssl: bool = False

    @property
    def num_classes(self) -> int:
        """Classes of the training part (what classification-style losses need)."""
        return len(np.unique(self.train.labels))

    def split(self, name: str) -> ImageDataset:
        """``train``, ``val`` or ``test``; ``val`` of a run without a validation split, or ``test`` of a
        dataset without labels, is an error."""
        if name == "val" and self.val is None:
            raise ConfigError("the run has no validation split (val_fraction 0)")
        if name == "test" and self.test is None:
            raise ConfigError(
                "the run's dataset has no labels, so no test split: evaluate the checkpoint on a labelled "
                "dataset (--dataset, --data-root)"
            )
        parts = {"train": self.train, "val": self.val, "test": self.test}
        if name not in parts:
            raise ConfigError(f"split must be train, val or test, got '{name}'")
        return parts[name]  # type: ignore[return-value]

    def parts(self) -> list[ImageDataset]:
        """The train, validation (when there is one) and test datasets."""
        return [part for part in (self.train, self.val, self.test) if part is not None]

    def protocols(self) -> dict[str, str]:
        """How each evaluation split is evaluated: ``{"val": ..., "test": ...}``, each ``leave-one-out`` or
        ``query/gallery`` (the dataset's flags; see :func:`dmlkit.inference.evaluate_embeddings`)."""
        found = {} if self.test is None else {"test": self.test.annotations.protocol}
        if self.val is not None:
            found = {"val": self.val.annotations.protocol, **found}
        return found

    def describe(self, dataset: str) -> str:
        def part(split: ImageDataset) -> str:
            text = f"{len(split)} images / {len(np.unique(split.labels))} classes"
            flags = split.annotations
            if flags.is_query is not None and flags.is_gallery is not None:
                text += f" ({int(flags.is_query.sum())} queries, {int(flags.is_gallery.sum())} gallery)"
            return text

        val_text = part(self.val) if self.val is not None else "none"
        train_text = (
            f"{len(self.train)} images (self-supervised: two views each, labels unused)"
            if self.ssl
            else f"{len(self.train)} images / {self.num_classes} classes"
        )
        if self.test is None:
            return f"data: {dataset} — train {train_text}; no labels, so no validation or test split"
        return (
            f"data: {dataset} — train {train_text}, val {val_text}, test {part(self.test)}; protocol "
            f"{', '.join(f'{k} {v}' for k, v in self.protocols().items())}"
        )


def pipeline_spec(
    section: DataSection,
    splits: DatasetSplits,
    backbone: str | None = None,
    pretrained_weights: str | None = None,
) -> dict[str, Any]:
    """The run's data spec: the dataset's (``splits.spec()``) with the augmentation recipe of
    ``section.augment`` and the preprocessing fields resolved as the module docstring says; plain data
    for ``transforms.build(kind, **spec)``. Only fields that are set are recorded, so a run without flags
    or backbone preprocessing records what the dataset gives."""
    spec = splits.spec()
    if section.augment is not None:
        spec["recipe"] = section.augment.name
        spec.pop("recipe_args", None)
        if section.augment.args:
            spec["recipe_args"] = dict(section.augment.args)
    recipe = transforms.recipe_of(spec.get("recipe", "photo"), spec.get("recipe_args"))
    if recipe.family == "glyph":
        for key in ("interpolation", "crop_pct"):
            if getattr(section, key) is not None:
                raise ConfigError(
                    f"{key}: the '{spec['recipe']}' recipe resizes glyphs bilinearly and crops nothing; "
                    "it applies to photo recipes (--augment base, ...)"
                )
        backbone_fields: dict[str, Any] = {}
    else:
        found = (
            preprocessing.of_backbone(backbone, pretrained_weights=pretrained_weights) if backbone else None
        )
        backbone_fields = found.given() if found is not None else {}
    if recipe.default_size is not None:  # the recipe's own choices rank above the backbone's
        backbone_fields.pop("input_size", None)
        backbone_fields.pop("crop_pct", None)
    explicit_size = section.image_size is not None or "image_size" in section.dataset.args
    if not explicit_size:
        size = recipe.default_size or backbone_fields.get("input_size")
        if size is not None:
            spec["image_size"] = int(size)
    for key in PREPROCESSING_FIELDS:
        value = getattr(section, key)
        value = value if value is not None else backbone_fields.get(key, spec.get(key))
        if value is not None:
            spec[key] = [float(v) for v in value] if key in ("mean", "std") else value
    transforms.build("eval", **spec)  # a bad combination (3 means for 1 channel, ...) fails here, named
    return spec


def build_data(
    section: DataSection,
    seed: int,
    backbone: str | None = None,
    pretrained_weights: str | None = None,
    *,
    spec: dict[str, Any] | None = None,
) -> RunData:
    """Load the dataset, take its own validation split or split off validation classes (seeded;
    ``val_fraction`` 0: no validation either way) and attach the transforms: training
    augmentation (a pure function of ``seed``, epoch and item) on the training part, evaluation
    preprocessing on the others, both from :func:`pipeline_spec` (``backbone``: whose preprocessing the
    photo recipes take), or from a recorded ``spec`` (a checkpoint's ``data_spec``: ``dmlkit eval``)."""
    splits = data_lib.build(section.dataset.name, section.data_root, **section.dataset_kwargs())
    if spec is None:
        spec = pipeline_spec(section, splits, backbone, pretrained_weights)
    if section.val_fraction > 0 and splits.val is not None:
        train, val = splits.train, splits.val
        log.info("validation: the dataset's own split (%d images); val_fraction is not used", len(val))
    elif section.val_fraction > 0:
        train, val = data_lib.class_disjoint_split(splits.train, section.val_fraction, seed)
    else:
        train, val = splits.train, None
    if section.train_classes < 1.0:
        train = _first_classes(train, section.train_classes)
    train.transform = transforms.build("train", **spec)
    train.augment_seed = seed
    evaluation = transforms.build("eval", **spec)
    for part in (val, splits.test):
        if part is not None:
            part.transform = evaluation
    if splits.test is None:
        log.info(
            "dataset '%s' has no labels: no validation or test split, so the run measures no retrieval "
            "metric and best.pt is the last epoch",
            section.dataset.name,
        )
    return RunData(train, val, splits.test, spec, ssl=section.ssl)


def _first_classes(train: ImageDataset, fraction: float) -> ImageDataset:
    """The items of the first ``round(fraction × C)`` training classes (in class-code order, which is the
    dataset's class order): the same classes for every seed, so an old model trained on them and a new one
    trained on all share their validation and test splits."""
    keep = round(fraction * train.num_classes)
    if keep < 2:
        raise ConfigError(
            f"train_classes {fraction} keeps {keep} of the {train.num_classes} training classes; metric "
            "learning needs at least 2"
        )
    return train.subset(np.flatnonzero(train.labels < keep))


def build_caches(data: RunData, section: DataSection) -> None:
    """Decode every image of every part once into a cache at ``section.cache_size`` (in shared memory, or
    under ``section.cache_dir``): :class:`~dmlkit.data.cache.DecodedCache`."""
    if section.cache_size is None:
        return
    parts = data.parts()
    if not all(isinstance(part, FileImageDataset) for part in parts):
        raise ConfigError(
            f"cache_size: dataset '{section.dataset.name}' holds its images in memory already (the cache is "
            "for datasets of image files)"
        )
    for part in parts:
        assert isinstance(part, FileImageDataset)
        part.build_cache(section.cache_size, section.cache_dir)


def run_data(config: TrainConfig) -> RunData:
    """:func:`build_data` of a configuration (with its backbone's preprocessing), its caches built."""
    model = config.model
    data = build_data(config.data, config.run.seed, model.backbone, model.pretrained_weights)
    build_caches(data, config.data)
    return data


def gpu_decode_obstacles(section: DataSection, data: RunData, device: torch.device) -> list[str]:
    """Why the GPU pipeline cannot make this run's training batches (empty: it can)."""
    obstacles = []
    if device.type != "cuda":
        obstacles.append(f"the device is {device}, not CUDA")
    if data.ssl:
        obstacles.append("ssl draws two views of each image (the CPU pipeline does)")
    if not isinstance(data.train, FileImageDataset):
        obstacles.append(f"dataset '{section.dataset.name}' holds decoded images, not image files")
    recipe = transforms.recipe_of(data.spec.get("recipe", "photo"), data.spec.get("recipe_args"))
    if recipe.crop_plan() is None:
        name = data.spec.get("recipe", "photo")
        obstacles.append(f"the '{name}' recipe is not RandomResizedCrop + flip (photo, base, big)")
    if data.train.annotations.boxes is not None:
        obstacles.append(f"dataset '{section.dataset.name}' has crop boxes (the CPU pipeline crops them)")
    if section.interpolation not in (None, "bilinear"):
        obstacles.append(f"interpolation {section.interpolation}: the GPU crop samples bilinearly")
    return obstacles


def uses_gpu_pipeline(section: DataSection, data: RunData, device: torch.device) -> bool:
    """Whether ``--gpu-decode`` (``auto``/``on``/``off``) takes the GPU pipeline for this run; ``on`` when it
    cannot raises ``ConfigError`` saying why, ``auto`` logs it on a CUDA device."""
    if section.gpu_decode == "off":
        return False
    obstacles = gpu_decode_obstacles(section, data, device)
    if obstacles and section.gpu_decode == "on":
        raise ConfigError(f"gpu_decode on: {'; '.join(obstacles)}")
    if obstacles:
        if device.type == "cuda":
            log.info("training batches decoded on the CPU (gpu_decode auto): %s", "; ".join(obstacles))
        return False
    return True


def train_loader(
    data: RunData, batch_sampler: Any, config: TrainConfig, device: torch.device
) -> Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The training batches ``(images, labels, indices)`` in ``batch_sampler``'s order, with
    ``config.data.workers`` workers: a DataLoader over the CPU pipeline (images on the CPU, pinned for a
    CUDA device), or the GPU pipeline's :class:`~dmlkit.data.gpu_pipeline.GpuLoader` (images already on
    ``device``) when :func:`uses_gpu_pipeline`. Either way a batch is a pure function of the seed, the
    epoch (``data.train.set_epoch``) and its indices. With ``ssl`` a batch of ``B`` sampled images is the
    ``2B`` views of :func:`~dmlkit.data.views.collate_views`, labelled by image index."""
    section = config.data
    generator = torch.Generator().manual_seed(config.run.seed)
    workers = section.workers
    if uses_gpu_pipeline(section, data, device):
        train = data.train
        assert isinstance(train, FileImageDataset)
        spec = data.spec
        recipe = transforms.recipe_of(spec.get("recipe", "photo"), spec.get("recipe_args"))
        plan = recipe.crop_plan()
        assert plan is not None
        mean, std = transforms.normalisation(recipe.family, train.channels, spec.get("mean"), spec.get("std"))
        if spec.get("interpolation", "bilinear") != "bilinear":
            log.info(
                "the GPU pipeline resamples bilinearly (the backbone asks for %s)", spec["interpolation"]
            )
        pipeline = GpuBatchPipeline(train, plan, int(spec["image_size"]), mean, std, device)
        log.info("training batches: GPU pipeline (nvJPEG decode, roi_align crops), %d worker(s)", workers)
        return GpuLoader(train, batch_sampler, pipeline, num_workers=workers, generator=generator)
    if data.ssl:
        return DataLoader(
            TwoViews(data.train),
            batch_sampler=batch_sampler,
            num_workers=workers,
            collate_fn=collate_views,
            pin_memory=device.type == "cuda",
            generator=generator,
        )
    return DataLoader(
        data.train,
        batch_sampler=batch_sampler,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        generator=generator,
    )


__all__ = [
    "PREPROCESSING_FIELDS",
    "RunData",
    "build_caches",
    "build_data",
    "gpu_decode_obstacles",
    "pipeline_spec",
    "run_data",
    "train_loader",
    "uses_gpu_pipeline",
]
