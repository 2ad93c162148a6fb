"""Helpers shared by the subcommands that work from a checkpoint."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dmlkit import models
from dmlkit.errors import DataError
from dmlkit.train import checkpoint as ckpt

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def load_model(path: str | Path, device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the model stored in a checkpoint (no training state needed) and load its weights."""
    checkpoint = ckpt.load(path, map_location="cpu")
    model_config = dict(checkpoint["model_config"])
    model_config["pretrained_weights"] = None  # the checkpoint's own weights replace them
    model = models.build_model(**model_config)
    model.load_state_dict(checkpoint["model"])
    return model.to(device).eval(), checkpoint


def list_images(source: str | Path, image_column: str | None = None) -> tuple[list[Path], list[str]]:
    """Image files of a folder (recursive, sorted) or of a CSV's image column; returns (paths, ids).

    Ids are paths relative to the folder (or as written in the CSV).
    """
    source = Path(source)
    if source.is_dir():
        paths = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not paths:
            raise DataError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {source}")
        return paths, [str(p.relative_to(source)) for p in paths]
    if source.is_file() and source.suffix.lower() == ".csv":
        with source.open(newline="") as handle:
            reader = csv.DictReader(handle)
            columns = reader.fieldnames or []
            column = image_column or next(
                (c for c in ("image", "path", "file", "filename") if c in columns), None
            )
            if column is None or column not in columns:
                raise DataError(
                    f"{source}: no image column (looked for {image_column or 'image/path/file/filename'}; "
                    f"columns are {columns})"
                )
            ids = [row[column] for row in reader]
        paths = []
        for item in ids:
            path = Path(item) if Path(item).is_absolute() else source.parent / item
            if not path.suffix and not path.exists():
                path = next(
                    (path.with_suffix(e) for e in IMAGE_EXTENSIONS if path.with_suffix(e).exists()), path
                )
            if not path.is_file():
                raise DataError(f"{source}: image '{item}' not found at {path}")
            paths.append(path)
        return paths, ids
    if source.is_file() and source.suffix.lower() in IMAGE_EXTENSIONS:
        return [source], [source.name]
    raise DataError(f"{source}: not an image, a folder of images or a CSV file")


def ids_path(embeddings_path: str | Path) -> Path:
    """Where the ids of an embeddings ``.npy`` file live: ``<name>.ids.json`` beside it."""
    path = Path(embeddings_path)
    return path.with_name(path.name.removesuffix(".npy") + ".ids.json")


def write_json(obj: Any) -> str:
    return json.dumps(obj, indent=2)


class FilesDataset(torch.utils.data.Dataset):
    """Unlabelled image files for ``embed`` / ``search``: yields ``(image, -1, index)``.

    ``boxes`` (optional, one per path): crop image i to ``boxes[i]`` = ``(x1, y1, x2, y2)`` pixels with
    PIL's ``Image.crop`` before ``transform`` (``None``: the whole image), as revisitop crops queries.
    """

    def __init__(
        self,
        paths: list[Path],
        transform: Any,
        channels: int,
        boxes: Sequence[tuple[float, float, float, float] | None] | None = None,
    ) -> None:
        if boxes is not None and len(boxes) != len(paths):
            raise ValueError(f"{len(boxes)} boxes for {len(paths)} images")
        self.paths = paths
        self.transform = transform
        self.mode = "L" if channels == 1 else "RGB"
        self.boxes = boxes

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        from PIL import Image

        path = self.paths[index]
        try:
            with Image.open(path) as image:
                image = image.convert(self.mode)
        except Exception as exc:
            raise DataError(f"cannot read image {path}: {exc}") from exc
        box = self.boxes[index] if self.boxes is not None else None
        if box is not None:
            image = image.crop(box)
        return self.transform(image), -1, index


def eval_transform(checkpoint: dict[str, Any]) -> Any:
    from dmlkit.data import transforms

    return transforms.build("eval", **checkpoint["data_spec"])
