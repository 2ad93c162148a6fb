"""``sop``: Stanford Online Products (the official ``Ebay_train.txt`` / ``Ebay_test.txt`` split,
leave-one-out), with the 12 super-classes as categories."""

from __future__ import annotations

from pathlib import Path

from dmlkit.data.base import dataset_root
from dmlkit.data.catalog import DatasetInfo, Download, register_file_dataset
from dmlkit.data.table import ItemTable, list_rows, read_lines
from dmlkit.errors import DataError

FOLDER = "Stanford_Online_Products"
HEADER: tuple[str, ...] = ("image_id", "class_id", "super_class_id", "path")
LISTS: dict[str, str] = {"train": "Ebay_train.txt", "test": "Ebay_test.txt"}


def _read(path: Path) -> list[tuple[int, list[str]]]:
    """(1-based line, fields) of the rows of an SOP list (header line 1), the three ids checked to be
    integers."""
    rows = list_rows(path, read_lines(path, "Stanford Online Products list"), HEADER, header_line=1)
    for n, fields in rows:
        for name, value in zip(HEADER[:3], fields, strict=False):
            if not value.isdigit():
                raise DataError(f"'{path}' line {n}: {name} must be an integer, got '{value}'")
    if not rows:
        raise DataError(f"'{path}' lists no images")
    return rows


def _check_categories(rows: list[tuple[Path, int, list[str]]]) -> list[str]:
    """The super-class of every row, named by its image folder (``bicycle_final``; the id when the path has
    no folder); a super_class_id in two folders, or a folder of two super_class_ids, is an error."""
    seen: dict[tuple[str, str], tuple[str, Path, int]] = {}
    names = []
    for path, n, (_, _, super_id, relative) in rows:
        folder = relative.split("/")[0] if "/" in relative else super_id
        for key, paired in ((("super_class_id", super_id), folder), (("folder", folder), super_id)):
            known, known_path, known_line = seen.setdefault(key, (paired, path, n))
            if known != paired:
                raise DataError(
                    f"'{path}' line {n}: super_class_id {super_id} with folder '{folder}', but "
                    f"'{known_path}' line {known_line} pairs {key[0]} '{key[1]}' with '{known}'"
                )
        names.append(folder)
    return names


def sop_table(root: str | None = None) -> ItemTable:
    """Stanford Online Products: ``root`` holds ``Ebay_train.txt`` and ``Ebay_test.txt`` (or holds
    ``Stanford_Online_Products/`` with them).

    Each list has the header ``image_id class_id super_class_id path`` and one space-separated row per
    image, the path relative to the folder of the list (``bicycle_final/111085122871_0.JPG``). The
    training split is ``Ebay_train.txt`` (59,551 images of 11,318 products), the test split
    ``Ebay_test.txt`` (60,502 images of 11,316 other products), evaluated leave-one-out. Labels are the
    ``class_id`` values; categories (for the hierarchical sampler and per-category metrics) are the 12
    super-classes, named by their image folder (``bicycle_final``). Ids are the listed paths.

    A missing list, a header that is not the one above, a malformed row, a product listed in both splits
    or a super-class in two folders raises ``DataError`` naming the file and the line; so does a listed
    image that does not exist.
    """
    base = dataset_root(root, "sop", f"the folder holding Ebay_train.txt and Ebay_test.txt ({FOLDER}/)")
    folder = base / FOLDER if (base / FOLDER).is_dir() else base
    rows: list[tuple[Path, int, list[str]]] = []
    splits: list[str] = []
    first_of_class: dict[str, tuple[str, Path, int]] = {}
    for split, name in LISTS.items():
        path = folder / name
        for n, fields in _read(path):
            known = first_of_class.setdefault(fields[1], (split, path, n))
            if known[0] != split:
                raise DataError(
                    f"'{path}' line {n}: class_id {fields[1]} is also in the {known[0]} split ('{known[1]}' "
                    f"line {known[2]}); the splits must hold different products"
                )
            rows.append((path, n, fields))
            splits.append(split)
    relatives = [fields[3] for _, _, fields in rows]
    table = ItemTable(
        str(folder),
        [str(folder / r) for r in relatives],
        [fields[1] for _, _, fields in rows],
        splits,
        relatives,
        lines=[n for _, n, _ in rows],
        sources=[str(path) for path, _, _ in rows],
        categories=_check_categories(rows),
    )
    return table


sop = register_file_dataset(
    DatasetInfo(
        name="sop",
        title="Stanford Online Products (SOP)",
        protocol="Ebay_train.txt / Ebay_test.txt (zero-shot products); leave-one-out; 12 super-classes",
        citation=(
            "H. O. Song, Y. Xiang, S. Jegelka, S. Savarese. Deep Metric Learning via Lifted Structured "
            "Feature Embedding. CVPR 2016."
        ),
        licence=(
            "see the LICENSE file shipped in the archive; the images are eBay listings (research use is the "
            "usual reading)"
        ),
        homepage="https://cvgl.stanford.edu/projects/lifted_struct/",
        layout=(
            "root/Stanford_Online_Products/{Ebay_train.txt, Ebay_test.txt, <super>_final/<image>.JPG} "
            "(root may be Stanford_Online_Products itself)"
        ),
        expected={"": {"train": (59551, 11318), "test": (60502, 11316)}},
        downloads=(
            Download(
                "ftp://cs.stanford.edu/cs/cvgl/Stanford_Online_Products.zip",
                "Stanford_Online_Products.zip",
                md5="7f73d41a2f44250d4779881525aea32e",
                sha256="b04fa78210e69fab050ce73939550e1cd0f96890bdd98ec9fee732c3b756ef48",
                size=3083860082,
            ),
        ),
        manual=(
            "Download Stanford_Online_Products.zip (ftp://cs.stanford.edu/cs/cvgl/, linked from "
            "https://cvgl.stanford.edu/projects/lifted_struct/; the FTP server is unreliable and blocked by "
            "some proxies: any copy with md5 7f73d41a2f44250d4779881525aea32e will do) and extract it in "
            "root, giving root/Stanford_Online_Products/Ebay_train.txt."
        ),
        table=sop_table,
    )
)

__all__ = ["sop", "sop_table"]
