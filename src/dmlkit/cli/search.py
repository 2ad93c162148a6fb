"""dmlkit search: embed query images and print their k nearest gallery items (a gallery written by
``dmlkit embed``, or an index folder written by ``dmlkit index build``), as a table or JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dmlkit import distances
from dmlkit.cli.common import FilesDataset, ids_path, list_images, load_model
from dmlkit.cli.parser import SuggestingParser, positive_int
from dmlkit.errors import ConfigError, DataError, unknown_name_message
from dmlkit.inference import compute_embeddings, resolve_device
from dmlkit.search import RetrievalResults, search


def add_parser(cli: SuggestingParser) -> None:
    parser = cli.add_parser(
        "search", help="search a gallery of embeddings with query images", description=__doc__
    )
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="the checkpoint that embedded the gallery, or its run folder (with --index: default the one "
        "the index records; another one is refused)",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--gallery", help=".npy written by `dmlkit embed` (ids beside it)")
    source.add_argument("--index", metavar="DIR", help="index folder written by `dmlkit index build`")
    parser.add_argument("--query", required=True, help="an image, a folder of images or a CSV")
    parser.add_argument("-k", "--k", type=positive_int, default=10, help="neighbours per query (default: 10)")
    parser.add_argument(
        "--distance",
        choices=distances.available(indexable=True),
        default=None,
        help="distance of the search (default: the gallery's, from its .ids.json)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--device", default="auto")
    parser.set_defaults(handler=run)


def read_gallery(path: str | Path) -> np.ndarray:
    """The embeddings of a gallery ``.npy``: a 2-D array of finite numbers, one row per item.

    The header is read before the data, so a file of strings or Python objects is refused by its dtype
    and shape (``allow_pickle=False``: nothing in the file is executed). Raises ``DataError`` naming the
    file, its dtype and shape, or the first rows that are not finite.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"gallery embeddings not found: {path}")
    try:
        with path.open("rb") as handle:
            version = np.lib.format.read_magic(handle)
            # Version 3.0 differs from 2.0 only by a utf-8 header, which numbers and dtypes do not need.
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
            else:
                shape, _, dtype = np.lib.format.read_array_header_2_0(handle)
    except (OSError, ValueError) as exc:
        raise DataError(f"gallery {path} is not a NumPy .npy file ({' '.join(str(exc).split())})") from exc
    if dtype.kind not in "fiu" or len(shape) != 2 or 0 in shape:
        raise DataError(
            f"gallery {path} has dtype {dtype} and shape {shape}; expected a 2-D array of numbers, one "
            "embedding per row (as `dmlkit embed` writes)"
        )
    try:
        gallery = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"cannot read gallery {path}: {' '.join(str(exc).split())}") from exc
    bad = np.flatnonzero(~np.isfinite(gallery).all(axis=1))
    if bad.size:
        shown = ", ".join(map(str, bad[:5])) + (", ..." if bad.size > 5 else "")
        raise DataError(
            f"gallery {path} (dtype {dtype}, shape {shape}) has NaN or infinite values in {bad.size} of "
            f"{shape[0]} rows (rows {shown})"
        )
    return gallery


def read_gallery_ids(gallery_path: str | Path, rows: int) -> tuple[list[str], str | None]:
    """``(ids, distance)`` from the ``.ids.json`` beside a gallery (:func:`ids_path`): one string id per
    row and the distance it was embedded for (``None``: not recorded). Raises ``DataError`` naming the
    file and what is wrong with it."""
    path = ids_path(gallery_path)
    if not path.is_file():
        raise DataError(f"gallery ids file {path} not found (written by `dmlkit embed` beside the .npy)")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"gallery ids file {path} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict) or "ids" not in meta:
        found = f"keys {sorted(meta)}" if isinstance(meta, dict) else f"a {type(meta).__name__}"
        raise DataError(f"gallery ids file {path} must be an object with an 'ids' list; found {found}")
    ids = meta["ids"]
    if not isinstance(ids, list):
        raise DataError(
            f"gallery ids file {path}: 'ids' must be a list of strings, got a {type(ids).__name__}"
        )
    wrong = next((i for i, item in enumerate(ids) if not isinstance(item, str)), None)
    if wrong is not None:
        raise DataError(f"gallery ids file {path}: ids[{wrong}] is {ids[wrong]!r}, not a string")
    if len(ids) != rows:
        raise DataError(f"{path} lists {len(ids)} ids but {gallery_path} has {rows} rows")
    distance = meta.get("distance")
    if distance is not None and distance not in distances.available(indexable=True):
        valid = distances.available(indexable=True)
        raise DataError(f"gallery ids file {path}: " + unknown_name_message("distance", str(distance), valid))
    return ids, distance


def run(args: argparse.Namespace) -> int:
    if args.index is not None:
        from dmlkit.cli.index import run_search

        return _print(*run_search(args), args.json)
    if args.checkpoint is None:
        raise ConfigError("--checkpoint is required with --gallery (the checkpoint that embedded it)")
    # The gallery, its ids and the queries are checked before the model is loaded.
    gallery = torch.from_numpy(read_gallery(args.gallery)).float()
    gallery_ids, gallery_distance = read_gallery_ids(args.gallery, len(gallery))
    paths, query_ids = list_images(args.query)
    device = resolve_device(args.device)
    model, checkpoint = load_model(args.checkpoint, device)
    if gallery.shape[1] != model.embedding_size:
        raise DataError(
            f"{args.gallery} has shape {tuple(gallery.shape)}; the checkpoint embeds to "
            f"{model.embedding_size} dimensions"
        )
    queries, _ = compute_embeddings(model, FilesDataset.for_checkpoint(paths, checkpoint), device=device)
    distance = args.distance or gallery_distance or "cosine"
    k = min(args.k, len(gallery))
    results = _listing(search(queries, gallery, k=k, distance=distance), query_ids, gallery_ids)
    return _print(results, distance, k, gallery_ids, args.json)


def _print(
    results: list[dict[str, Any]], distance: str, k: int, gallery_ids: list[str], as_json: bool
) -> int:
    """Print the listing (:func:`_listing`) as JSON or as a table per query."""
    if as_json:
        print(json.dumps({"distance": distance, "k": k, "results": results}, indent=2))
        return 0
    width = max(len(g) for g in gallery_ids[:10000]) if gallery_ids else 10
    for entry in results:
        print(f"query: {entry['query']}  ({distance})")
        print(f"  {'rank':>4}  {'id':<{width}}  {'score':>10}")
        for n in entry["neighbours"]:
            print(f"  {n['rank']:>4}  {n['id']:<{width}}  {n['score']:>10.4f}")
    return 0


def _listing(found: RetrievalResults, query_ids: list[str], gallery_ids: list[str]) -> list[dict[str, Any]]:
    """Per query, its neighbours as ``{"rank", "id", "score"}`` (score in the distance's units)."""
    return [
        {
            "query": qid,
            "neighbours": [
                {"rank": r + 1, "id": gallery_ids[int(i)], "score": float(s)}
                for r, (i, s) in enumerate(zip(found.topk_indices[q], found.topk_distances[q], strict=True))
            ],
        }
        for q, qid in enumerate(query_ids)
    ]
