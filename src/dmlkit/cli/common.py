"""Helpers shared by the subcommands that work from a checkpoint: load it, list and embed image files."""

from __future__ import annotations

import argparse
import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dmlkit.cli.parser import non_negative_int, positive_int
from dmlkit.data import transforms
from dmlkit.data.images import EMBED_EXTENSIONS, image_files, load_image
from dmlkit.errors import DataError
from dmlkit.inference import compute_embeddings
from dmlkit.inference import load_model as load_model  # re-exported: the commands load checkpoints through it


def _csv_images(source: Path, image_column: str | None) -> tuple[list[Path], list[str]]:
    """The images a CSV's image column lists (relative to the CSV's folder; a missing suffix is guessed)."""
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
            path = next((path.with_suffix(e) for e in EMBED_EXTENSIONS if path.with_suffix(e).exists()), path)
        if not path.is_file():
            raise DataError(f"{source}: image '{item}' not found at {path}")
        paths.append(path)
    return paths, ids


def list_images(source: str | Path, image_column: str | None = None) -> tuple[list[Path], list[str]]:
    """Image files of a folder (recursive, sorted) or of a CSV's image column; returns (paths, ids).

    Ids are paths relative to the folder (or as written in the CSV). Extensions: ``EMBED_EXTENSIONS`` of
    :mod:`dmlkit.data.images` (any case).
    """
    source = Path(source)
    if source.is_dir():
        paths = image_files(source, recursive=True, extensions=EMBED_EXTENSIONS, skip_hidden=False)
        if not paths:
            raise DataError(f"no image files ({', '.join(EMBED_EXTENSIONS)}) under {source}")
        return paths, [str(p.relative_to(source)) for p in paths]
    if source.is_file() and source.suffix.lower() == ".csv":
        return _csv_images(source, image_column)
    if source.is_file() and source.suffix.lower() in EMBED_EXTENSIONS:
        return [source], [source.name]
    raise DataError(f"{source}: not an image, a folder of images or a CSV file")


def ids_path(embeddings_path: str | Path) -> Path:
    """Where the ids of an embeddings ``.npy`` file live: ``<name>.ids.json`` beside it."""
    path = Path(embeddings_path)
    return path.with_name(path.name.removesuffix(".npy") + ".ids.json")


def eval_transform(checkpoint: dict[str, Any]) -> Any:
    """The checkpoint's evaluation pipeline (``transforms.build("eval", **data_spec)``)."""
    return transforms.build("eval", **checkpoint["data_spec"])


class FilesDataset(torch.utils.data.Dataset):
    """Unlabelled image files for ``embed`` / ``search``: yields ``(image, -1, index)``.

    Files are decoded by :func:`dmlkit.data.images.load_image` (``L`` for one channel, else ``RGB``).
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
        self.channels = channels
        self.boxes = boxes

    @classmethod
    def for_checkpoint(
        cls,
        paths: list[Path],
        checkpoint: dict[str, Any],
        boxes: Sequence[tuple[float, float, float, float] | None] | None = None,
    ) -> FilesDataset:
        """The files as the checkpoint's model sees them: its eval pipeline and number of channels."""
        return cls(paths, eval_transform(checkpoint), checkpoint["data_spec"]["channels"], boxes)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        image = load_image(self.paths[index], self.channels)
        box = self.boxes[index] if self.boxes is not None else None
        if box is not None:
            image = image.crop(box)
        return self.transform(image), -1, index


def add_checkpoint_argument(
    parser: argparse.ArgumentParser,
    help: str = "checkpoint file (best.pt, last.pt) or run folder (its best.pt)",
) -> None:
    """Add the required ``--checkpoint`` (a checkpoint file or a run folder), read by :func:`load_model`."""
    parser.add_argument("--checkpoint", required=True, help=help)


def add_embedding_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--batch-size``, ``--num-workers``, ``--device`` and ``--no-progress`` (read by :func:`embed`);
    a batch size below 1 or a negative worker count is refused while the arguments are parsed."""
    parser.add_argument("--batch-size", type=positive_int, default=256, help="images per batch (256)")
    parser.add_argument(
        "--num-workers", type=non_negative_int, default=0, help="DataLoader worker processes (0)"
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def embed(
    model: torch.nn.Module, dataset: Any, args: argparse.Namespace, device: Any, what: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeddings, labels) of ``dataset`` with the options of :func:`add_embedding_arguments`
    (``--batch-size``, ``--num-workers``, ``--no-progress``); ``what`` labels the progress bar."""
    return compute_embeddings(
        model,
        dataset,
        batch_size=args.batch_size,
        device=device,
        num_workers=args.num_workers,
        progress=not args.no_progress,
        description=what,
    )
