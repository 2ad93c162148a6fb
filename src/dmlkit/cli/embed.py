"""``dmlkit embed``: embeddings of a folder or CSV of images, as ``.npy`` plus an ids file."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from dmlkit.cli.common import FilesDataset, eval_transform, ids_path, list_images, load_model
from dmlkit.inference import compute_embeddings, resolve_device


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "embed",
        allow_abbrev=False,
        help="embed a folder or CSV of images",
        description="Write embeddings (float32 .npy, one row per image) and their ids (<out>.ids.json: "
        "paths relative to the folder, or the CSV's image column).",
    )
    parser.add_argument(
        "--checkpoint", required=True, help="checkpoint file (best.pt, last.pt) or run folder"
    )
    parser.add_argument("--images", required=True, help="folder of images (recursive) or CSV file")
    parser.add_argument(
        "--image-column", default=None, help="CSV column with image paths (default: image/path)"
    )
    parser.add_argument("--out", required=True, help="output .npy file")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    model, checkpoint = load_model(args.checkpoint, device)
    paths, ids = list_images(args.images, args.image_column)
    dataset = FilesDataset(paths, eval_transform(checkpoint), checkpoint["data_spec"]["channels"])
    embeddings, _ = compute_embeddings(
        model,
        dataset,
        batch_size=args.batch_size,
        device=device,
        num_workers=args.num_workers,
        progress=not args.no_progress,
        description="embed",
    )
    out = Path(args.out)
    if out.suffix != ".npy":
        out = out.with_name(out.name + ".npy")
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, embeddings.numpy().astype(np.float32))
    distance = "cosine" if checkpoint["model_config"].get("normalize", True) else "euclidean"
    ids_path(out).write_text(
        json.dumps({"ids": ids, "checkpoint": str(args.checkpoint), "distance": distance})
    )
    print(f"wrote {len(ids)} embeddings of size {embeddings.shape[1]} to {out} (ids: {ids_path(out)})")
    return 0
