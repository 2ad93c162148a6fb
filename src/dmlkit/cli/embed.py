"""dmlkit embed: embeddings of a folder or CSV of images (float32 .npy, one row per image) and their
ids (<out>.ids.json: paths relative to the folder, or the CSV's image column)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from dmlkit.cli.common import (
    FilesDataset,
    add_checkpoint_argument,
    add_embedding_arguments,
    embed,
    ids_path,
    list_images,
    load_model,
)
from dmlkit.cli.parser import SuggestingParser
from dmlkit.errors import ConfigError
from dmlkit.inference import resolve_device


def add_parser(cli: SuggestingParser) -> None:
    parser = cli.add_parser("embed", help="embed a folder or CSV of images", description=__doc__)
    add_checkpoint_argument(parser)
    parser.add_argument("--images", required=True, help="folder of images (recursive) or CSV file")
    parser.add_argument(
        "--image-column", default=None, help="CSV column with image paths (default: image/path)"
    )
    parser.add_argument("--out", required=True, help="output .npy file")
    add_embedding_arguments(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.suffix != ".npy":
        out = out.with_name(out.name + ".npy")
    if out.is_dir():  # found now, not after every image is embedded
        raise ConfigError(f"--out {args.out}: {out} is a folder; give the .npy file to write")
    paths, ids = list_images(args.images, args.image_column)  # a bad --images fails before the model loads
    device = resolve_device(args.device)
    model, checkpoint = load_model(args.checkpoint, device)
    embeddings, _ = embed(model, FilesDataset.for_checkpoint(paths, checkpoint), args, device, "embed")
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, embeddings.numpy().astype(np.float32))
    distance = "cosine" if checkpoint["model_config"].get("normalize", True) else "euclidean"
    ids_path(out).write_text(
        json.dumps({"ids": ids, "checkpoint": str(args.checkpoint), "distance": distance})
    )
    print(f"wrote {len(ids)} embeddings of size {embeddings.shape[1]} to {out} (ids: {ids_path(out)})")
    return 0
