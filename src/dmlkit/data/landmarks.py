"""Readers of the landmark-retrieval benchmark files, for :mod:`dmlkit.metrics.landmarks`.

**Revisited Oxford / Paris** (Radenović et al., CVPR 2018; github.com/filipradenovic/revisitop):
:func:`load_revisited_gnd` reads ``gnd_roxford5k.pkl`` / ``gnd_rparis6k.pkl``, a pickled dict with

- ``imlist``: gallery image names (no extension), ``qimlist``: query image names;
- ``gnd``: one dict per query with ``bbx`` (``[x1, y1, x2, y2]``, the query's region of interest, pixels)
  and the lists ``easy``, ``hard``, ``junk`` of gallery indices (positions in ``imlist``).

The same structure is accepted as a ``.json`` file. A ``.pkl`` / ``.pickle`` file is read with
:mod:`pickle`, which can run arbitrary code: load only the official files or files you trust. Images live
in one folder as ``<name><ext>`` (revisitop: ``data/datasets/roxford5k/jpg/<name>.jpg``), see
:func:`image_paths` and :func:`check_images`.

**Google Landmarks v2 retrieval** (Weyand et al., CVPR 2020): :func:`load_gldv2_solution` reads the
challenge's ``retrieval_solution_v2.1.csv`` (columns ``id,images,Usage``; ``images``: space-separated index
image ids, or ``None`` for a non-landmark query; ``Usage``: ``Public``, ``Private`` or ``Ignored``). The
image of id ``X`` is ``<folder>/X[0]/X[1]/X[2]/X.jpg`` (:func:`gldv2_image_path`);
:func:`list_gldv2_images` lists every image of an index folder in that layout.

Every reader raises :class:`~dmlkit.errors.DataError` naming the file and the key, query or image at fault.
"""

from __future__ import annotations

import csv
import json
import math
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dmlkit.errors import ConfigError, DataError

#: The gallery-index lists of one revisited query.
REVISITED_LISTS: tuple[str, ...] = ("easy", "hard", "junk")
#: Values of the GLDv2 solution's ``Usage`` column (lower case); ``ignored`` rows are never scored.
GLDV2_USAGES: tuple[str, ...] = ("public", "private", "ignored")
#: The columns :func:`load_gldv2_solution` needs.
GLDV2_COLUMNS: tuple[str, ...] = ("id", "images", "Usage")
#: A box ``(x1, y1, x2, y2)`` in pixels.
Box = tuple[float, float, float, float]


# ---------------------------------------------------------------------------------------------------------
# Revisited Oxford / Paris
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RevisitedGroundTruth:
    """The content of a revisitop ``gnd_*.pkl`` file, validated.

    - ``imlist``: gallery image names; ``qimlist``: query image names (no extension);
    - ``gnd``: per query, ``{"easy": [...], "hard": [...], "junk": [...]}`` (sorted unique ``int`` gallery
      indices, ready for :func:`dmlkit.metrics.revisited_map`);
    - ``bbx``: per query, its box ``(x1, y1, x2, y2)`` or ``None`` when the file gives none.
    """

    path: Path
    imlist: list[str]
    qimlist: list[str]
    gnd: list[dict[str, list[int]]]
    bbx: list[Box | None]


def _read_structure(path: Path) -> Any:
    suffix = path.suffix.lower()
    if not path.is_file():
        raise DataError(f"ground-truth file not found: {path}")
    try:
        if suffix == ".json":
            with path.open(encoding="utf-8") as handle:
                return json.load(handle)
        if suffix in (".pkl", ".pickle"):
            with path.open("rb") as handle:
                # revisitop's official format; pickle runs code from the file: trusted files only.
                return pickle.load(handle)
    except Exception as exc:
        raise DataError(f"{path}: cannot read the ground truth ({type(exc).__name__}: {exc})") from exc
    raise DataError(f"{path}: unsupported ground-truth file type '{path.suffix}' (.pkl, .pickle or .json)")


def _names(value: Any, path: Path, key: str) -> list[str]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence | np.ndarray):
        raise DataError(f"{path}: '{key}' must be a list of image names, not {type(value).__name__}")
    names = []
    for i, name in enumerate(value):
        if not isinstance(name, str) or not name:
            raise DataError(f"{path}: {key}[{i}] must be a non-empty image name, got {name!r}")
        names.append(name)
    return names


def _indices(value: Any, path: Path, where: str, n_gallery: int) -> list[int]:
    array = np.asarray(value if value is not None else [], dtype=object).reshape(-1)
    out = []
    for item in array:
        if isinstance(item, bool) or not isinstance(item, int | np.integer):
            raise DataError(f"{path}: {where} must hold integer gallery indices, got {item!r}")
        index = int(item)
        if not 0 <= index < n_gallery:
            raise DataError(
                f"{path}: {where} lists gallery index {index}, out of range: 'imlist' has {n_gallery} images"
            )
        out.append(index)
    return sorted(set(out))


def _box(value: Any, path: Path, where: str) -> Box:
    try:
        numbers = [float(v) for v in np.asarray(value, dtype=object).reshape(-1)]
    except (TypeError, ValueError):
        raise DataError(f"{path}: {where} must be four numbers [x1, y1, x2, y2], got {value!r}") from None
    if len(numbers) != 4 or not all(math.isfinite(v) for v in numbers):
        raise DataError(f"{path}: {where} must be four finite numbers [x1, y1, x2, y2], got {value!r}")
    x1, y1, x2, y2 = numbers
    if not (x1 < x2 and y1 < y2):
        raise DataError(f"{path}: {where} = {numbers} is empty (needs x1 < x2 and y1 < y2)")
    return x1, y1, x2, y2


def load_revisited_gnd(path: str | Path) -> RevisitedGroundTruth:
    """Read and validate a revisitop ground-truth file (``.pkl``/``.pickle`` with pickle, or ``.json``).

    Raises :class:`~dmlkit.errors.DataError` naming the file and the key or query on a missing key
    (``imlist``, ``qimlist``, ``gnd``; per query ``easy``, ``hard``, ``junk``), ``len(gnd) !=
    len(qimlist)``, a gallery index outside ``imlist``, an index in two lists, or a malformed ``bbx``.
    ``.pkl`` files are unpickled: load only the official files or files you trust.
    """
    path = Path(path)
    data = _read_structure(path)
    if not isinstance(data, Mapping):
        raise DataError(f"{path}: need a dict of 'imlist', 'qimlist' and 'gnd', not {type(data).__name__}")
    for key in ("imlist", "qimlist", "gnd"):
        if key not in data:
            raise DataError(f"{path}: missing key '{key}' (found: {', '.join(map(str, data)) or 'none'})")
    imlist = _names(data["imlist"], path, "imlist")
    qimlist = _names(data["qimlist"], path, "qimlist")
    entries = data["gnd"]
    if isinstance(entries, (str, bytes, Mapping)) or not isinstance(entries, Sequence | np.ndarray):
        raise DataError(f"{path}: 'gnd' must be a list with one dict per query, not {type(entries).__name__}")
    if len(entries) != len(qimlist):
        raise DataError(f"{path}: 'gnd' has {len(entries)} entries but 'qimlist' has {len(qimlist)} queries")
    if not qimlist:
        raise DataError(f"{path}: 'qimlist' is empty: there are no queries")
    gnd: list[dict[str, list[int]]] = []
    boxes: list[Box | None] = []
    for i, (name, entry) in enumerate(zip(qimlist, entries, strict=True)):
        query = f"gnd[{i}] (query '{name}')"
        if not isinstance(entry, Mapping):
            raise DataError(f"{path}: {query} must be a dict, not {type(entry).__name__}")
        lists = {}
        for key in REVISITED_LISTS:
            if key not in entry:
                raise DataError(f"{path}: {query} has no key '{key}'")
            lists[key] = _indices(entry[key], path, f"{query}['{key}']", len(imlist))
        for a, b in (("easy", "hard"), ("easy", "junk"), ("hard", "junk")):
            both = sorted(set(lists[a]) & set(lists[b]))
            if both:
                raise DataError(f"{path}: {query}: gallery index {both[0]} is in both '{a}' and '{b}'")
        gnd.append(lists)
        boxes.append(_box(entry["bbx"], path, f"{query}['bbx']") if entry.get("bbx") is not None else None)
    return RevisitedGroundTruth(path, imlist, qimlist, gnd, boxes)


def image_paths(folder: str | Path, names: Sequence[str], ext: str = ".jpg") -> list[Path]:
    """``folder/<name><ext>`` for every name (revisitop's ``config_imname``); nothing is checked here."""
    folder = Path(folder)
    return [folder / f"{name}{ext}" for name in names]


def check_images(paths: Sequence[Path], what: str = "image", shown: int = 5) -> None:
    """Raise :class:`~dmlkit.errors.DataError` naming the missing files (the first ``shown``) if any of
    ``paths`` is not a file; call it before embedding anything, so no work is lost."""
    missing = [p for p in paths if not p.is_file()]
    if missing:
        listed = ", ".join(str(p) for p in missing[:shown])
        more = f" (and {len(missing) - shown} more)" if len(missing) > shown else ""
        raise DataError(f"{len(missing)} of {len(paths)} {what} files not found: {listed}{more}")


# ---------------------------------------------------------------------------------------------------------
# Google Landmarks v2
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GLDv2Query:
    """One row of the GLDv2 retrieval solution: query ``id``, the ids of its relevant index images
    (empty for a non-landmark query, ``None`` in the file) and its ``usage`` (lower case)."""

    id: str
    relevant: tuple[str, ...]
    usage: str


def load_gldv2_solution(path: str | Path) -> list[GLDv2Query]:
    """Read the GLDv2 retrieval solution CSV (``retrieval_solution_v2.1.csv``: ``id,images,Usage``).

    ``images`` is a space-separated list of index image ids or ``None``; ``Usage`` is ``Public``,
    ``Private`` or ``Ignored`` (any case). Raises :class:`~dmlkit.errors.DataError` naming the file and row
    on a missing column, an empty or repeated query id, or an unknown usage.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"GLDv2 solution file not found: {path}")
    queries: list[GLDv2Query] = []
    seen: set[str] = set()
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        for column in GLDV2_COLUMNS:
            if column not in columns:
                raise DataError(f"{path}: missing column '{column}' (columns are {columns})")
        for line, row in enumerate(reader, start=2):
            query_id = (row["id"] or "").strip()
            if not query_id:
                raise DataError(f"{path}: line {line} has an empty 'id'")
            if query_id in seen:
                raise DataError(f"{path}: line {line}: query id '{query_id}' appears twice")
            seen.add(query_id)
            usage = (row["Usage"] or "").strip().lower()
            if usage not in GLDV2_USAGES:
                raise DataError(
                    f"{path}: line {line} (query '{query_id}'): unknown Usage '{row['Usage']}' "
                    "(expected Public, Private or Ignored)"
                )
            images = (row["images"] or "").split()
            relevant = () if images in ([], ["None"]) else tuple(dict.fromkeys(images))
            queries.append(GLDv2Query(query_id, relevant, usage))
    if not queries:
        raise DataError(f"{path}: no rows")
    return queries


def select_gldv2(queries: Sequence[GLDv2Query], usage: str) -> list[GLDv2Query]:
    """The queries scored under ``usage``: ``public``, ``private`` or ``all`` (public + private); ignored
    rows never are."""
    wanted = {"public": ("public",), "private": ("private",), "all": ("public", "private")}
    if usage not in wanted:
        raise ConfigError(f"unknown GLDv2 usage '{usage}' (expected public, private or all)")
    return [q for q in queries if q.usage in wanted[usage]]


def gldv2_image_path(folder: str | Path, image_id: str, ext: str = ".jpg") -> Path:
    """``folder/X[0]/X[1]/X[2]/X<ext>``: where GLDv2 stores the image of id ``X``."""
    if len(image_id) < 3 or any(c in image_id for c in "/\\"):
        raise DataError(f"'{image_id}' is not a GLDv2 image id (needs at least 3 characters, no slash)")
    return Path(folder, image_id[0], image_id[1], image_id[2], f"{image_id}{ext}")


def list_gldv2_images(folder: str | Path, ext: str = ".jpg") -> tuple[list[str], list[Path]]:
    """(ids, paths) of every ``*<ext>`` file under ``folder``, sorted by id; the id is the file stem.

    Raises :class:`~dmlkit.errors.DataError` if the folder is missing or holds no image, or if an image is
    not at its GLDv2 place ``X[0]/X[1]/X[2]/X<ext>`` (e.g. the parent of the index folder was given).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"GLDv2 image folder not found: {folder}")
    paths = sorted((p for p in folder.rglob(f"*{ext}") if p.is_file()), key=lambda p: p.stem)
    if not paths:
        raise DataError(f"no '*{ext}' images under {folder}")
    ids = []
    for path in paths:
        expected = gldv2_image_path(folder, path.stem, ext) if len(path.stem) >= 3 else None
        if path != expected:
            raise DataError(
                f"{path} is not in the GLDv2 layout {folder}/X[0]/X[1]/X[2]/X{ext} (is {folder} the image "
                "folder itself?)"
            )
        ids.append(path.stem)
    return ids, paths


__all__ = [
    "GLDV2_COLUMNS",
    "GLDV2_USAGES",
    "REVISITED_LISTS",
    "Box",
    "GLDv2Query",
    "RevisitedGroundTruth",
    "check_images",
    "gldv2_image_path",
    "image_paths",
    "list_gldv2_images",
    "load_gldv2_solution",
    "select_gldv2",
]
