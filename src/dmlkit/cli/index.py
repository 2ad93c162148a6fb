"""dmlkit index build: embed a gallery (a folder of images or a CSV) with a checkpoint and write a faiss index
of it, with its ids and the checkpoint's fingerprint, for `dmlkit search --index`.

The build is resumable (chunks of embeddings are written atomically: run the same command again after an
interruption and it continues where it stopped) and incremental (run it again on a folder with new images
and only those are embedded). The index kind follows the gallery's size: exact flat below 50 000 images,
HNSW below 1 000 000, IVF-PQ from there; --kind overrides it. See docs/serving.md."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dmlkit import distances
from dmlkit.cli.common import (
    FilesDataset,
    add_checkpoint_argument,
    add_embedding_arguments,
    list_images,
    load_model,
)
from dmlkit.cli.parser import SuggestingParser, non_negative_int, positive_int
from dmlkit.errors import ConfigError
from dmlkit.inference import compute_embeddings, resolve_device
from dmlkit.serving import index as serving_index
from dmlkit.train import checkpoint as ckpt


def add_parser(cli: SuggestingParser) -> None:
    parser = cli.add_parser("index", help="build a searchable faiss index of a gallery", description=__doc__)
    sub = parser.add_parser(
        "build",
        dest="index_command",
        help="embed a gallery and write (or extend, or finish) its faiss index",
        description=__doc__,
    )
    add_checkpoint_argument(sub)
    sub.add_argument("--images", required=True, help="folder of images (recursive) or CSV file")
    sub.add_argument("--image-column", default=None, help="CSV column with image paths (default: image/path)")
    sub.add_argument(
        "--out", required=True, metavar="DIR", help="the index folder (created, resumed or extended)"
    )
    sub.add_argument(
        "--kind",
        choices=serving_index.KINDS,
        default="auto",
        help=f"faiss index: auto (flat below {serving_index.FLAT_BELOW} images, hnsw below "
        f"{serving_index.HNSW_BELOW}, else ivfpq), flat (exact), hnsw or ivfpq",
    )
    sub.add_argument(
        "--distance",
        choices=distances.available(indexable=True),
        default=None,
        help="distance of the search (default: the index's, else cosine for a model that L2-normalises, "
        "euclidean otherwise)",
    )
    sub.add_argument(
        "--chunk-size",
        type=positive_int,
        default=serving_index.DEFAULT_CHUNK_SIZE,
        help=f"images per atomically written chunk ({serving_index.DEFAULT_CHUNK_SIZE})",
    )
    sub.add_argument(
        "--rebuild", action="store_true", help="rebuild the faiss index from the stored embeddings"
    )
    group = sub.add_argument_group("index options (default: by the gallery's size; see docs/serving.md)")
    group.add_argument("--hnsw-m", type=positive_int, default=None, help="hnsw: links per node (32)")
    group.add_argument(
        "--ef-construction", type=positive_int, default=None, help="hnsw: build candidates (80)"
    )
    group.add_argument("--ef-search", type=positive_int, default=None, help="hnsw: search candidates (128)")
    group.add_argument("--nlist", type=positive_int, default=None, help="ivfpq: cells (≈ 4·√n)")
    group.add_argument("--nprobe", type=positive_int, default=None, help="ivfpq: cells searched (nlist / 16)")
    group.add_argument("--pq-m", type=positive_int, default=None, help="ivfpq: sub-quantizers (divides d)")
    group.add_argument("--pq-bits", type=positive_int, default=None, help="ivfpq: bits per sub-quantizer (8)")
    group.add_argument("--seed", type=non_negative_int, default=None, help="ivfpq: k-means seed (0)")
    add_embedding_arguments(sub)
    sub.set_defaults(handler=run_build)


def _options(args: argparse.Namespace) -> serving_index.IndexOptions:
    keys = ("hnsw_m", "ef_construction", "ef_search", "nlist", "nprobe", "pq_m", "pq_bits", "seed")
    return serving_index.IndexOptions(kind=args.kind, **{key: getattr(args, key) for key in keys})


def embedder(
    model: torch.nn.Module, checkpoint: dict[str, Any], args: argparse.Namespace, device: torch.device
) -> serving_index.Embed:
    """``paths -> float32 embeddings``: the checkpoint's evaluation preprocessing and model."""

    def embed(paths: Sequence[Path]) -> np.ndarray:
        dataset = FilesDataset.for_checkpoint(list(paths), checkpoint)
        embeddings, _ = compute_embeddings(
            model, dataset, batch_size=args.batch_size, device=device, num_workers=args.num_workers
        )
        return embeddings.numpy()

    return embed


def run_build(args: argparse.Namespace) -> int:
    options = _options(args)  # bad options, a missing faiss and a bad --images fail before the model loads
    serving_index.import_faiss()
    paths, ids = list_images(args.images, args.image_column)
    device = resolve_device(args.device)
    model, checkpoint = load_model(args.checkpoint, device)
    file = ckpt.checkpoint_file(args.checkpoint).resolve()  # recorded: `search --index` finds it anywhere
    report = serving_index.build_index(
        args.out,
        paths,
        ids,
        embedder(model, checkpoint, args, device),
        fingerprint_hex=serving_index.fingerprint(checkpoint),
        checkpoint_name=str(file),
        source=str(Path(args.images).resolve()),
        distance=args.distance,
        default_distance="cosine" if checkpoint["model_config"].get("normalize", True) else "euclidean",
        options=options,
        chunk_size=args.chunk_size,
        rebuild=args.rebuild,
        progress=not args.no_progress,
    )
    params = ", ".join(f"{k}={v}" for k, v in report.params.items())
    print(
        f"{report.folder}: {report.total} images ({report.embedded} embedded now, {report.reused} from "
        f"earlier runs), {report.kind} index{f' ({params})' if params else ''}, {report.distance}, "
        f"{report.state}; {report.seconds:.1f} s"
        + (f", {report.images_per_second:.1f} images/s" if report.embedded else "")
    )
    if report.missing:
        shown = ", ".join(report.missing[:5]) + (", ..." if len(report.missing) > 5 else "")
        print(
            f"note: {len(report.missing)} indexed images are not in {args.images} any more and stay in the "
            f"index ({shown}); build into a new folder to drop them"
        )
    return 0


def run_search(args: argparse.Namespace) -> tuple[list[dict[str, Any]], str, int, list[str]]:
    """``dmlkit search --index DIR``: ``(listing, distance, k, ids)``, the listing of every query's
    neighbours as ``dmlkit.cli.search`` prints it, the index's distance, the k searched and its ids.

    The checkpoint is ``--checkpoint`` or the one the index records; either way its fingerprint must be
    the index's (``ConfigError`` naming both otherwise)."""
    gallery = serving_index.open_index(args.index)  # a missing or unfinished index fails before the model
    if args.distance is not None and args.distance != gallery.distance.name:
        raise ConfigError(
            f"--distance {args.distance}: index {args.index} ranks by {gallery.distance.name}; rebuild it "
            f"with `dmlkit index build --distance {args.distance}` (nothing is embedded again)"
        )
    paths, query_ids = list_images(args.query)
    device = resolve_device(args.device)
    name = args.checkpoint if args.checkpoint is not None else gallery.manifest["checkpoint"]
    model, checkpoint = load_model(name, device)
    gallery.check_checkpoint(serving_index.fingerprint(checkpoint), str(ckpt.checkpoint_file(name).resolve()))
    queries, _ = compute_embeddings(model, FilesDataset.for_checkpoint(paths, checkpoint), device=device)
    scores, rows = gallery.search(queries, args.k)
    listing = [
        {
            "query": qid,
            "neighbours": [
                {"rank": r + 1, "id": gallery.ids[int(i)], "score": float(s)}
                for r, (i, s) in enumerate(zip(rows[q], scores[q], strict=True))
                if i >= 0
            ],
        }
        for q, qid in enumerate(query_ids)
    ]
    return listing, gallery.distance.name, min(args.k, len(gallery.ids)), gallery.ids
