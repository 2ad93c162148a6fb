"""dmlkit search: embed query images and print their k nearest gallery items (a gallery written by
``dmlkit embed``), as a table or JSON."""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np
import torch

from dmlkit import distances
from dmlkit.cli.common import FilesDataset, ids_path, list_images, load_model
from dmlkit.cli.parser import SuggestingParser
from dmlkit.errors import DataError
from dmlkit.inference import compute_embeddings, resolve_device
from dmlkit.search import RetrievalResults, search


def add_parser(cli: SuggestingParser) -> None:
    parser = cli.add_parser(
        "search", help="search a gallery of embeddings with query images", description=__doc__
    )
    parser.add_argument("--checkpoint", required=True, help="the checkpoint that embedded the gallery")
    parser.add_argument("--gallery", required=True, help=".npy written by `dmlkit embed` (ids beside it)")
    parser.add_argument("--query", required=True, help="an image, a folder of images or a CSV")
    parser.add_argument("-k", "--k", type=int, default=10, help="neighbours per query (default: 10)")
    parser.add_argument(
        "--distance",
        default=None,
        help=f"{', '.join(distances.available(indexable=True))} (default: the gallery's)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--device", default="auto")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.k <= 0:
        raise DataError(f"-k must be positive, got {args.k}")
    try:
        gallery = torch.from_numpy(np.load(args.gallery)).float()
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read gallery embeddings {args.gallery}: {exc}") from exc
    meta_path = ids_path(args.gallery)
    if not meta_path.is_file():
        raise DataError(f"gallery ids file {meta_path} not found (written by `dmlkit embed` beside the .npy)")
    meta = json.loads(meta_path.read_text())
    gallery_ids = meta["ids"]
    if len(gallery_ids) != len(gallery):
        raise DataError(
            f"{meta_path} lists {len(gallery_ids)} ids but {args.gallery} has {len(gallery)} rows"
        )
    device = resolve_device(args.device)
    model, checkpoint = load_model(args.checkpoint, device)
    if gallery.ndim != 2 or gallery.shape[1] != model.embedding_size:
        raise DataError(
            f"{args.gallery} has shape {tuple(gallery.shape)}; the checkpoint embeds to "
            f"{model.embedding_size} dimensions"
        )
    paths, query_ids = list_images(args.query)
    queries, _ = compute_embeddings(model, FilesDataset.for_checkpoint(paths, checkpoint), device=device)
    distance = args.distance or meta.get("distance", "cosine")
    k = min(args.k, len(gallery))
    results = _listing(search(queries, gallery, k=k, distance=distance), query_ids, gallery_ids)
    if args.json:
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
