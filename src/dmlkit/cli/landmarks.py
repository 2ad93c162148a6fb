"""``dmlkit eval --revisited`` / ``--gldv2``: landmark-retrieval benchmarks of a checkpoint.

- ``--revisited GND_FILE --images DIR``: revisited Oxford/Paris (revisitop's ``gnd_roxford5k.pkl`` /
  ``gnd_rparis6k.pkl`` or the same structure as JSON; images ``DIR/<name>.jpg``). Queries are cropped to
  their ``bbx`` before the checkpoint's eval transform (revisitop's protocol) unless ``--no-query-crop``.
  Metrics: :func:`dmlkit.metrics.revisited_map` (Easy/Medium/Hard mAP and mP@1/5/10).
- ``--gldv2 SOLUTION_CSV --query-images QDIR --index-images IDIR``: Google Landmarks v2 retrieval mAP@100
  (:func:`dmlkit.metrics.gldv2_map`) on the queries of ``--usage`` (private, public or all).

File formats and checks: :mod:`dmlkit.data.landmarks`. Every input file and image is checked before the
model is loaded, so a missing image fails before any embedding is computed.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from dmlkit import metrics as metrics_lib
from dmlkit import search
from dmlkit.cli.common import FilesDataset, embed, load_model
from dmlkit.config import config_from_checkpoint
from dmlkit.data import landmarks as files
from dmlkit.errors import ConfigError, DataError
from dmlkit.inference import resolve_device
from dmlkit.metrics.landmarks import LandmarkResults, gldv2_map, revisited_map
from dmlkit.search import rerank

USAGES: tuple[str, ...] = ("private", "public", "all")
#: Options (argparse destinations) of the ordinary ``dmlkit eval`` that a landmark benchmark replaces.
DATASET_OPTIONS: tuple[str, ...] = ("dataset", "data_root", "dataset_args", "split", "metrics")
#: Options that only one landmark benchmark reads, and those both read.
REVISITED_OPTIONS: tuple[str, ...] = ("images", "no_query_crop")
GLDV2_OPTIONS: tuple[str, ...] = ("query_images", "index_images", "usage")
SHARED_OPTIONS: tuple[str, ...] = ("image_ext",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the landmark-benchmark options to the ``eval`` parser."""
    group = parser.add_argument_group(
        "landmark retrieval",
        "evaluate on a landmark benchmark instead of a dataset split (not with --dataset, --data-root, "
        "--dataset-args, --split, --metrics); see docs/metrics.md",
    )
    modes = group.add_mutually_exclusive_group()
    modes.add_argument(
        "--revisited",
        default=None,
        metavar="GND_FILE",
        help="revisited Oxford/Paris ground truth: revisitop's gnd_roxford5k.pkl / gnd_rparis6k.pkl (read "
        "with pickle: trusted files only) or the same structure as .json; needs --images",
    )
    modes.add_argument(
        "--gldv2",
        default=None,
        metavar="SOLUTION_CSV",
        help="Google Landmarks v2 retrieval solution (retrieval_solution_v2.1.csv: id,images,Usage); "
        "needs --query-images and --index-images",
    )
    group.add_argument(
        "--images", default=None, metavar="DIR", help="--revisited: folder of the images, DIR/<name>.jpg"
    )
    group.add_argument(
        "--image-ext", default=None, metavar="EXT", help="image file extension (default: .jpg)"
    )
    group.add_argument(
        "--no-query-crop",
        action="store_true",
        help="--revisited: embed whole query images (default: cropped to their bbx, revisitop's protocol)",
    )
    group.add_argument(
        "--query-images", default=None, metavar="QDIR", help="--gldv2: query images, QDIR/a/b/c/abc....jpg"
    )
    group.add_argument(
        "--index-images",
        default=None,
        metavar="IDIR",
        help="--gldv2: index images in the same layout (every image there is in the gallery)",
    )
    group.add_argument(
        "--usage",
        choices=USAGES,
        default=None,
        help="--gldv2: the queries scored (Usage column; all = public + private; default: private)",
    )


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _given(args: argparse.Namespace, options: tuple[str, ...]) -> list[str]:
    """The flags of ``options`` that were given."""
    return [_flag(dest) for dest in options if getattr(args, dest, None) not in (None, False)]


def dispatch(args: argparse.Namespace) -> int | None:
    """Run a landmark benchmark if ``--revisited`` or ``--gldv2`` was given (exit code), else check that
    no landmark-only option was given and return ``None`` (the ordinary ``dmlkit eval`` goes on)."""
    mode = "--revisited" if args.revisited is not None else "--gldv2" if args.gldv2 is not None else None
    if mode is None:
        stray = _given(args, REVISITED_OPTIONS + GLDV2_OPTIONS + SHARED_OPTIONS)
        if stray:
            raise ConfigError(f"{', '.join(stray)} only apply with --revisited or --gldv2")
        return None
    conflicts = _given(args, DATASET_OPTIONS)
    if conflicts:
        raise ConfigError(
            f"{mode} cannot be combined with {', '.join(conflicts)}: the benchmark fixes the images, the "
            "queries and the metrics"
        )
    if mode == "--revisited":
        return run_revisited(args)
    return run_gldv2(args)


def _extension(args: argparse.Namespace) -> str:
    ext = args.image_ext or ".jpg"
    return ext if ext.startswith(".") else f".{ext}"


def _finite(values: dict[str, float]) -> dict[str, float | None]:
    return {name: value if math.isfinite(value) else None for name, value in values.items()}


def _report(args: argparse.Namespace, results: LandmarkResults, header: str, fields: dict[str, Any]) -> None:
    if args.json:
        report = {
            "checkpoint": str(args.checkpoint),
            "protocol": results.protocol,
            **fields,
            "num_queries": results.num_queries,
            "metrics": _finite(results.metrics),
            "num_queries_without_relevant": dict(results.num_queries_without_relevant),
        }
        print(json.dumps(report, indent=2, allow_nan=False))
    else:
        print(header)
        print(results.table())


def run_revisited(args: argparse.Namespace) -> int:
    """``dmlkit eval --revisited GND_FILE --images DIR``."""
    wrong = _given(args, GLDV2_OPTIONS)
    if wrong:
        raise ConfigError(f"{', '.join(wrong)} only apply with --gldv2, not with --revisited")
    if args.images is None:
        raise ConfigError("--revisited needs --images DIR (the benchmark's jpg folder, e.g. roxford5k/jpg)")
    if args.backend not in (None, "torch"):
        raise ConfigError(
            f"--revisited ranks the whole gallery exactly (backend torch); --backend {args.backend} is not "
            "supported there"
        )
    if args.distance is not None:
        search.check_searchable(args.distance)
    steps = getattr(args, "rerank_steps", [])
    unfitted = [step.who for step in steps if not step.fitted]
    if unfitted:
        raise ConfigError(
            f"--rerank {unfitted[0]} needs state=FILE with --revisited (no training split to fit on)"
        )
    ground_truth = files.load_revisited_gnd(args.revisited)
    images = Path(args.images)
    if not images.is_dir():
        raise DataError(f"image folder not found: {images}")
    ext = _extension(args)
    gallery_paths = files.image_paths(images, ground_truth.imlist, ext)
    query_paths = files.image_paths(images, ground_truth.qimlist, ext)
    files.check_images(gallery_paths, "gallery image")
    files.check_images(query_paths, "query image")
    crop = not args.no_query_crop
    if crop:
        for i, box in enumerate(ground_truth.bbx):
            if box is None:
                raise DataError(
                    f"{ground_truth.path}: gnd[{i}] (query '{ground_truth.qimlist[i]}') has no 'bbx' to crop "
                    "the query to; use --no-query-crop to embed whole query images"
                )

    device = resolve_device(args.device)
    model, checkpoint = load_model(args.checkpoint, device)
    distance = (
        args.distance or config_from_checkpoint(checkpoint["config"], str(args.checkpoint)).eval.eval_distance
    )
    gallery, _ = embed(model, FilesDataset.for_checkpoint(gallery_paths, checkpoint), args, device, "gallery")
    boxes = ground_truth.bbx if crop else None
    queries = FilesDataset.for_checkpoint(query_paths, checkpoint, boxes)
    query, _ = embed(model, queries, args, device, "queries")
    if steps:  # the whole gallery, ranked after the steps (k_reciprocal re-ranks all of it)
        ranked = rerank.search(query, gallery, steps=steps, k=len(gallery), distance=distance, device=device)
        results = revisited_map(ground_truth.gnd, ranked)
    else:
        results = revisited_map(
            ground_truth.gnd, query=query, gallery=gallery, distance=distance, device=device
        )
    header = (
        f"revisited {ground_truth.path.name}: {results.num_queries} queries "
        f"({'cropped to bbx' if crop else 'whole images'}), {len(gallery)} gallery images, {distance}; "
        "queries without a positive are left out of a protocol's means"
    )
    fields = {
        "ground_truth": str(ground_truth.path),
        "num_gallery": len(gallery),
        "distance": distance,
        "backend": "torch",
        "query_crop": crop,
        "rerank": [step.spec() for step in steps],
    }
    _report(args, results, header, fields)
    return 0


def run_gldv2(args: argparse.Namespace) -> int:
    """``dmlkit eval --gldv2 SOLUTION_CSV --query-images QDIR --index-images IDIR [--usage U]``."""
    wrong = _given(args, REVISITED_OPTIONS)
    if wrong:
        raise ConfigError(f"{', '.join(wrong)} only apply with --revisited, not with --gldv2")
    missing = [_flag(dest) for dest in ("query_images", "index_images") if getattr(args, dest) is None]
    if missing:
        raise ConfigError(
            f"--gldv2 needs {' and '.join(missing)} (folders in the GLDv2 a/b/c/abc....jpg layout)"
        )
    # A bad --distance / --backend (or faiss missing) fails before anything is read.
    metrics_lib.check_options([], args.distance or "cosine", args.backend or "torch")
    steps = getattr(args, "rerank_steps", [])
    unfitted = [step.who for step in steps if not step.fitted]
    if unfitted:
        raise ConfigError(
            f"--rerank {unfitted[0]} needs state=FILE with --gldv2 (no training split to fit on)"
        )
    usage = args.usage or "private"
    solution_path = Path(args.gldv2)
    scored = files.select_gldv2(files.load_gldv2_solution(solution_path), usage)
    if not scored:
        raise DataError(f"{solution_path}: no query has Usage {usage}")
    ext = _extension(args)
    index_ids, index_paths = files.list_gldv2_images(args.index_images, ext)
    position = {image_id: i for i, image_id in enumerate(index_ids)}
    for query in scored:
        for image_id in query.relevant:
            if image_id not in position:
                expected = files.gldv2_image_path(args.index_images, image_id, ext)
                raise DataError(
                    f"{solution_path}: query '{query.id}' lists index image '{image_id}', which is not in "
                    f"the index folder (expected at {expected})"
                )
    query_root = Path(args.query_images)
    if not query_root.is_dir():
        raise DataError(f"GLDv2 query image folder not found: {query_root}")
    query_paths = [files.gldv2_image_path(query_root, query.id, ext) for query in scored]
    files.check_images(query_paths, "query image")

    device = resolve_device(args.device)
    model, checkpoint = load_model(args.checkpoint, device)
    trained = config_from_checkpoint(checkpoint["config"], str(args.checkpoint)).eval
    distance = args.distance or trained.eval_distance
    backend = args.backend or trained.eval_backend
    metrics_lib.check_options([], distance, backend)
    gallery, _ = embed(model, FilesDataset.for_checkpoint(index_paths, checkpoint), args, device, "index")
    query, _ = embed(model, FilesDataset.for_checkpoint(query_paths, checkpoint), args, device, "queries")
    relevant = [[position[image_id] for image_id in q.relevant] for q in scored]
    if steps:
        ranked = rerank.search(
            query,
            gallery,
            steps=steps,
            k=min(100, len(gallery)),
            distance=distance,
            backend=backend,
            device=device,
        )
        results = gldv2_map(relevant, ranked)
    else:
        results = gldv2_map(
            relevant, query=query, gallery=gallery, distance=distance, backend=backend, device=device
        )
    header = (
        f"gldv2 {solution_path.name} ({usage}): {results.num_queries} queries, {len(gallery)} index images, "
        f"{distance}, {backend}; queries without a relevant image are left out of the mean"
    )
    fields = {
        "ground_truth": str(solution_path),
        "usage": usage,
        "num_gallery": len(gallery),
        "distance": distance,
        "backend": backend,
        "rerank": [step.spec() for step in steps],
    }
    _report(args, results, header, fields)
    return 0
