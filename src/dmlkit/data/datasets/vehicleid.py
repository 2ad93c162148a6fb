"""``vehicleid``: PKU VehicleID (Liu et al., CVPR 2016), read from its ``train_test_split`` lists.

``root`` is the ``VehicleID_V1.0`` folder (or the folder holding it): ``image/<image id>.jpg`` and
``train_test_split/train_list.txt``, ``test_list_800.txt``, ``test_list_1600.txt``, ``test_list_2400.txt``,
whose rows are ``<image id> <vehicle id>`` (no header, one space).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np

from dmlkit.data.base import dataset_root
from dmlkit.data.catalog import DatasetInfo, register_file_dataset
from dmlkit.data.table import ItemTable, list_rows, read_lines
from dmlkit.errors import ConfigError, DataError

#: The test list of each size: its number of vehicles.
SIZES: dict[str, int] = {"small": 800, "medium": 1600, "large": 2400}
PROTOCOLS: tuple[str, ...] = ("metric", "reid")
FOLDER = "VehicleID_V1.0"
LISTS = "train_test_split"


def _read_list(path: Path, split: str, base: Path) -> ItemTable:
    """The rows of one VehicleID list file (``<image id> <vehicle id>``)."""
    images: list[str] = []
    vehicles: list[str] = []
    lines: list[int] = []
    for n, (image, vehicle) in list_rows(
        path, read_lines(path, "VehicleID list file"), ("image_id", "vehicle_id")
    ):
        for what, value in (("image id", image), ("vehicle id", vehicle)):
            if not value.isdigit():
                raise DataError(f"'{path}' line {n}: {what} must be an integer, got '{value}'")
        images.append(image)
        vehicles.append(vehicle)
        lines.append(n)
    if not images:
        raise DataError(f"'{path}' lists no images")
    ids = [f"image/{image}.jpg" for image in images]
    table = ItemTable(
        str(path), [str(base / i) for i in ids], vehicles, np.full(len(ids), split), ids, lines=lines
    )
    return table


def reid_flags(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(is_query, is_gallery)`` of the re-id protocol: one gallery image per vehicle, drawn uniformly
    (``numpy.random.default_rng(seed)``), every other image a query (a vehicle with one image has no
    query)."""
    order = np.random.default_rng(seed).permutation(len(labels))
    _, codes = np.unique(labels, return_inverse=True)
    _, first = np.unique(codes[order], return_index=True)
    is_gallery = np.zeros(len(labels), dtype=bool)
    is_gallery[order[first]] = True
    return ~is_gallery, is_gallery


def vehicleid_table(
    root: str | None = None,
    size: Literal["small", "medium", "large"] = "small",
    protocol: Literal["metric", "reid"] = "metric",
    gallery_seed: int = 0,
) -> ItemTable:
    """VehicleID: ``train_list.txt`` is the train split, ``test_list_{800,1600,2400}.txt`` (``size`` small,
    medium, large) the test split; labels are the vehicle ids.

    ``protocol``: ``metric`` (the metric-learning one of XBM and Roth et al.: every test image is a query
    against all the others, leave-one-out) or ``reid`` (the paper's: one gallery image per vehicle, drawn
    with ``numpy.random.default_rng(gallery_seed)``, every other test image a query; the paper averages
    over several draws: vary ``gallery_seed``).

    Counts: the released lists hold 113,346 train images of 13,164 vehicles and 6,493 / 13,377 / 19,777
    test images of 800 / 1,600 / 2,400 vehicles, which ``dmlkit datasets check`` compares against; the
    paper quotes 110,178 train images of 13,134 vehicles (papers quote 7,332 / 12,995 / 20,038 test images).

    A missing list file, a row that is not two integers, or a listed image that does not exist raises
    ``DataError`` naming the file and the line; an unknown ``size`` or ``protocol`` raises ``ConfigError``.
    """
    if size not in SIZES:
        raise ConfigError(f"vehicleid size must be one of {', '.join(SIZES)}, got '{size}'")
    if protocol not in PROTOCOLS:
        raise ConfigError(f"vehicleid protocol must be one of {', '.join(PROTOCOLS)}, got '{protocol}'")
    base = dataset_root(root, "vehicleid", f"the {FOLDER} folder (holding image/ and {LISTS}/)")
    if not (base / LISTS).is_dir() and (base / FOLDER / LISTS).is_dir():
        base = base / FOLDER
    lists = base / LISTS
    train = _read_list(lists / "train_list.txt", "train", base)
    test = _read_list(lists / f"test_list_{SIZES[size]}.txt", "test", base)
    if protocol == "reid":
        test.is_query, test.is_gallery = reid_flags(test.labels, gallery_seed)
        train.is_query = train.is_gallery = np.zeros(len(train), dtype=bool)
    return ItemTable.concatenate([train, test], str(lists))


_TRAIN = (113_346, 13_164)

vehicleid = register_file_dataset(
    DatasetInfo(
        name="vehicleid",
        title="PKU VehicleID",
        protocol=(
            "train_list.txt train; test_list_800/1600/2400.txt test (size small/medium/large); "
            "protocol metric: leave-one-out over the test images; protocol reid: one random gallery image "
            "per vehicle (gallery_seed), the rest queries. Counts are the released lists' (the paper quotes "
            "110,178 train images / 13,134 vehicles, and 7,332 / 12,995 / 20,038 test images)"
        ),
        citation=(
            'H. Liu, Y. Tian, Y. Wang, L. Pang, T. Huang, "Deep Relative Distance Learning: Tell the '
            'Difference Between Similar Vehicles", CVPR 2016, pp. 2167-2175'
        ),
        licence="licence-gated: granted by the authors on request, for research use",
        homepage="https://pkuml.org/resources/pku-vehicleid.html",
        layout=(
            f"root = {FOLDER}/ (or its parent): image/<image id>.jpg, {LISTS}/train_list.txt, "
            f"{LISTS}/test_list_800.txt, test_list_1600.txt, test_list_2400.txt "
            "(rows '<image id> <vehicle id>')"
        ),
        expected={
            "small": {"train": _TRAIN, "test": (6_493, 800)},
            "medium": {"train": _TRAIN, "test": (13_377, 1_600)},
            "large": {"train": _TRAIN, "test": (19_777, 2_400)},
        },
        variant_option="size",
        manual=(
            "VehicleID is licence-gated: request it from the authors (the agreement and contact are on "
            "https://pkuml.org/resources/pku-vehicleid.html), then unpack it so that root holds "
            f"{FOLDER}/image/ and {FOLDER}/{LISTS}/ (or point root at {FOLDER} itself)"
        ),
        table=vehicleid_table,
    )
)

__all__ = ["SIZES", "reid_flags", "vehicleid", "vehicleid_table"]
