"""dmlkit search: embed query images and print their k nearest gallery items (a gallery written by
``dmlkit embed``, or an index folder written by ``dmlkit index build``), as a table or JSON; with
--threshold, only those that match (a value, or a threshold.json of `dmlkit eval --calibrate-fmr`)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dmlkit import distances
from dmlkit.cli.common import FilesDataset, ids_path, list_images, load_model
from dmlkit.cli.parser import SuggestingParser, positive_int
from dmlkit.errors import ConfigError, DataError, unknown_name_message
from dmlkit.files import read_json
from dmlkit.inference import compute_embeddings, resolve_device
from dmlkit.metrics.verification import Threshold, apply_threshold, check_threshold_value
from dmlkit.search import RetrievalResults, search
from dmlkit.serving import index as serving_index


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
    parser.add_argument(
        "--threshold",
        default=None,
        metavar="VALUE|FILE",
        help="keep only the neighbours that match: a number in the distance's units (cosine: similarity "
        ">= VALUE; euclidean: distance <= VALUE), or a threshold.json written by `dmlkit eval "
        "--calibrate-fmr` (its distance is then the search's); a query may get no match",
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
    meta = read_json(path, "gallery ids file")
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


def read_threshold(text: str) -> Threshold | float:
    """``--threshold``: a finite number, or a threshold file (:meth:`Threshold.from_json`). A word that is
    neither, NaN or ±inf raise ``ConfigError`` naming the option; a malformed file ``DataError`` naming it."""
    try:
        value = float(text)
    except ValueError:
        path = Path(text)
        if not path.is_file():
            raise ConfigError(
                f"--threshold {text!r} is neither a number nor an existing file (give a value in the "
                "search distance's units, or a threshold.json written by `dmlkit eval --calibrate-fmr`)"
            ) from None
        return Threshold.from_json(path)
    if not math.isfinite(value):
        raise ConfigError(f"--threshold must be a finite number, got {text!r}")
    return value


def _check_threshold(threshold: Threshold | float, distance: str, where: str) -> Threshold | float:
    """The threshold, checked against the distance searched (``where`` names the search in messages)."""
    if isinstance(threshold, Threshold):
        threshold.check_distance(distance, where)
        return threshold
    return check_threshold_value(threshold, distance, "--threshold")


def _check_checkpoint(threshold: Threshold | float | None, fingerprint_hex: str, name: str) -> None:
    """``ConfigError`` naming both when a threshold file was calibrated on another checkpoint's embeddings
    (their distances are not comparable); a file without a recorded checkpoint is taken as it is."""
    if not isinstance(threshold, Threshold) or threshold.fingerprint is None:
        return
    if threshold.fingerprint != fingerprint_hex:
        raise ConfigError(
            f"the threshold from {threshold.source or 'its file'} was calibrated on the embeddings of a "
            f"checkpoint with fingerprint {serving_index.short(threshold.fingerprint)}; {name} has "
            f"fingerprint {serving_index.short(fingerprint_hex)}: calibrate it again with `dmlkit eval "
            "--checkpoint ... --calibrate-fmr F`"
        )


def _check_index_threshold(folder: str, threshold: Threshold | float) -> Threshold | float:
    """An index's threshold checked against what its manifest records (the distance it ranks by, the
    checkpoint that built it) before any model loads; an index that cannot be read is left to the search
    to report."""
    manifest = serving_index.read_manifest(Path(folder))
    if manifest is None or not isinstance(manifest.get("index"), dict):
        return threshold
    threshold = _check_threshold(threshold, str(manifest["index"]["distance"]), f"index {folder}")
    _check_checkpoint(threshold, str(manifest["fingerprint"]), f"the checkpoint that built index {folder}")
    return threshold


def run(args: argparse.Namespace) -> int:
    threshold = None if args.threshold is None else read_threshold(args.threshold)
    if args.index is not None:
        from dmlkit.cli.index import run_search

        if threshold is not None:
            threshold = _check_index_threshold(args.index, threshold)
        listing, distance, k, ids = run_search(args)
        if threshold is not None:
            listing = _within(listing, threshold, distance)
        return _print(listing, distance, k, ids, args.json, threshold)
    if args.checkpoint is None:
        raise ConfigError("--checkpoint is required with --gallery (the checkpoint that embedded it)")
    # The gallery, its ids, the threshold and the queries are checked before the model is loaded.
    gallery = torch.from_numpy(read_gallery(args.gallery)).float()
    gallery_ids, gallery_distance = read_gallery_ids(args.gallery, len(gallery))
    # A calibrated threshold is only meaningful in its own distance, so it picks the default one.
    calibrated = threshold.distance if isinstance(threshold, Threshold) else None
    distance = args.distance or calibrated or gallery_distance or "cosine"
    if threshold is not None:
        where = "--distance" if args.distance else f"the search of {args.gallery}"
        threshold = _check_threshold(threshold, distance, where)
    paths, query_ids = list_images(args.query)
    device = resolve_device(args.device)
    model, checkpoint = load_model(args.checkpoint, device)
    _check_checkpoint(threshold, serving_index.fingerprint(checkpoint), str(args.checkpoint))
    if gallery.shape[1] != model.embedding_size:
        raise DataError(
            f"{args.gallery} has shape {tuple(gallery.shape)}; the checkpoint embeds to "
            f"{model.embedding_size} dimensions"
        )
    queries, _ = compute_embeddings(model, FilesDataset.for_checkpoint(paths, checkpoint), device=device)
    k = min(args.k, len(gallery))
    found = search(queries, gallery, k=k, distance=distance)
    if threshold is not None:
        found = apply_threshold(found, threshold)
    return _print(_listing(found, query_ids, gallery_ids), distance, k, gallery_ids, args.json, threshold)


def _rule(threshold: Threshold | float, distance: str) -> str:
    """The match rule in words: ``cosine >= 0.73``, ``euclidean <= 1.2``."""
    if isinstance(threshold, Threshold):
        return threshold.rule
    similarity = distances.build(distance).is_similarity
    return f"{distance} {'>=' if similarity else '<='} {threshold:.6g}"


def _within(
    listing: list[dict[str, Any]], threshold: Threshold | float, distance: str
) -> list[dict[str, Any]]:
    """The listing with the neighbours beyond ``threshold`` dropped (scores are in ``distance``'s units;
    a pair matches at ``score >= value`` for a similarity, ``score <= value`` for a distance)."""
    value = threshold.value if isinstance(threshold, Threshold) else threshold
    similarity = distances.build(distance).is_similarity

    def matches(score: float) -> bool:
        return score >= value if similarity else score <= value

    return [
        {**entry, "neighbours": [n for n in entry["neighbours"] if matches(n["score"])]} for entry in listing
    ]


def _threshold_json(threshold: Threshold | float, distance: str) -> dict[str, Any]:
    if isinstance(threshold, Threshold):
        return threshold.to_dict()
    return {"value": threshold, "distance": distance, "rule": _rule(threshold, distance)}


def _print(
    results: list[dict[str, Any]],
    distance: str,
    k: int,
    gallery_ids: list[str],
    as_json: bool,
    threshold: Threshold | float | None = None,
) -> int:
    """Print the listing (:func:`_listing`) as JSON or as a table per query; with a threshold, a query
    without a match says so (JSON: an empty ``neighbours`` list)."""
    if as_json:
        out: dict[str, Any] = {"distance": distance, "k": k}
        if threshold is not None:
            out["threshold"] = _threshold_json(threshold, distance)
        print(json.dumps({**out, "results": results}, indent=2))
        return 0
    if threshold is not None:
        calibrated = ""
        if isinstance(threshold, Threshold):
            calibrated = (
                f" (calibrated at FMR {threshold.fmr:.4g} for a target of {threshold.target_fmr:g}, FNMR "
                f"{threshold.fnmr:.4f}{f', on {threshold.source}' if threshold.source else ''})"
            )
        print(f"threshold: a match is {_rule(threshold, distance)}{calibrated}")
    width = max(len(g) for g in gallery_ids[:10000]) if gallery_ids else 10
    for entry in results:
        print(f"query: {entry['query']}  ({distance})")
        if not entry["neighbours"]:
            reason = "" if threshold is None else f": none of the top {k} has {_rule(threshold, distance)}"
            print(f"  no match{reason}")
            continue
        print(f"  {'rank':>4}  {'id':<{width}}  {'score':>10}")
        for n in entry["neighbours"]:
            print(f"  {n['rank']:>4}  {n['id']:<{width}}  {n['score']:>10.4f}")
    return 0


def _listing(found: RetrievalResults, query_ids: list[str], gallery_ids: list[str]) -> list[dict[str, Any]]:
    """Per query, its neighbours as ``{"rank", "id", "score"}`` (score in the distance's units); empty
    slots (a neighbour beyond a threshold) are left out."""
    return [
        {
            "query": qid,
            "neighbours": [
                {"rank": r + 1, "id": gallery_ids[int(i)], "score": float(s)}
                for r, (i, s) in enumerate(zip(found.topk_indices[q], found.topk_distances[q], strict=True))
                if i >= 0
            ],
        }
        for q, qid in enumerate(query_ids)
    ]
