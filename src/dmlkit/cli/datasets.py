"""dmlkit datasets: the catalogue of datasets, and getting one ready (docs/datasets.md).

dmlkit datasets list [--data-root DIR] [--json]            every dataset: protocol, official counts; with
                                                           --data-root, what is found there and what is not
dmlkit datasets download NAME --root DIR [--force]         fetch, check and unpack the official files
dmlkit datasets check NAME --root DIR [--full] [--json]    a prepared tree against the official counts:
                                                           images and classes per split, missing and
                                                           unreadable files (exit 0: all good, 1: not)
dmlkit datasets convert NAME --root DIR --out FILE.csv     the dataset as an OML-compatible CSV (loads
                                                           back with --dataset csv)

--dataset-args takes the dataset's options (as for dmlkit train), e.g. '{size: large}' for vehicleid.
Under a common --data-root DIR, a benchmark is looked for in DIR/<name> when that exists, else in DIR
itself; the bring-your-own datasets (folder, csv: no official counts) only in DIR/<name>.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

import numpy as np

from dmlkit.cli.parser import SuggestingParser, positive_int
from dmlkit.config import parse_mapping
from dmlkit.errors import ConfigError, DataError, DmlkitError
from dmlkit.files import write_text_atomic

#: Problems ``check`` prints (``--json`` lists them all).
MAX_PROBLEMS = 20
#: The columns ``convert`` writes, in OML's order (the optional ones only when the dataset has them).
OML_COLUMNS: tuple[str, ...] = ("label", "path", "split", "is_query", "is_gallery")
OML_BOX_COLUMNS: tuple[str, ...] = ("x_1", "x_2", "y_1", "y_2")


def add_parser(cli: SuggestingParser) -> None:
    parser = cli.add_parser(
        "datasets", help="list, download, check and convert datasets", description=__doc__
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter

    sub = parser.add_parser(
        "list",
        dest="datasets_command",
        help="every dataset with its protocol and official counts",
        description="Every catalogued dataset: title, protocol, official counts and whether it downloads. "
        "With --data-root DIR, also whether its list files are found there (DIR/<name>, else DIR for a "
        "benchmark) and how many images each split lists, or what is missing.",
    )
    sub.add_argument("--data-root", "--root", dest="data_root", metavar="DIR", help="where to look")
    sub.add_argument("--json", action="store_true", help="print JSON (a list of datasets)")
    sub.set_defaults(handler=run_list)

    sub = parser.add_parser(
        "download",
        dest="datasets_command",
        help="fetch, check and unpack a dataset's official files",
        description="Fetch each official file into DIR (resuming an interrupted HTTP transfer), check its "
        "size and checksum, and unpack archives into DIR, the folder to pass as the dataset's root. A file "
        "already fetched and checked is not fetched again. A dataset without a public URL prints where to "
        "get it (exit status 1).",
    )
    sub.add_argument("name", metavar="NAME", help="the dataset (dmlkit datasets list)")
    _add_root(sub)
    sub.add_argument("--force", action="store_true", help="fetch and unpack everything again")
    sub.add_argument(
        "--timeout", type=positive_int, default=60, help="seconds a connection may stay silent (60)"
    )
    sub.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    sub.set_defaults(handler=run_download)

    sub = parser.add_parser(
        "check",
        dest="datasets_command",
        help="check a prepared dataset against its official counts",
        description="Read the dataset's list files under DIR and compare images and classes per split with "
        "the official counts; find missing files and unreadable ones (their header; --full decodes "
        "them). Prints a table, then the first 20 problems, each naming its list file and line. Exit "
        "status 0 when everything matches, 1 otherwise.",
    )
    sub.add_argument("name", metavar="NAME", help="the dataset (dmlkit datasets list)")
    _add_root(sub)
    _add_dataset_args(sub)
    sub.add_argument("--full", action="store_true", help="decode every image (slower) instead of its header")
    sub.add_argument("--json", action="store_true", help="print the report as JSON (every problem)")
    sub.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    sub.set_defaults(handler=run_check)

    sub = parser.add_parser(
        "convert",
        dest="datasets_command",
        help="write a dataset as an OML-compatible CSV",
        description="Write the items of a dataset as a CSV in the open-metric-learning format: label, "
        "path, split, is_query, is_gallery (then x_1, x_2, y_1, y_2, category, sequence when the dataset "
        "has them). Paths are relative to the CSV's folder when the images are inside it, else absolute. "
        "The evaluation rows are written as split 'validation' (OML's name) unless the dataset has "
        "validation rows of its own; leave-one-out rows are both query and gallery. Load it back with "
        "--dataset csv --data-root FILE.csv.",
    )
    sub.add_argument("name", metavar="NAME", help="the dataset (dmlkit datasets list)")
    _add_root(sub)
    sub.add_argument("--out", required=True, metavar="FILE.csv", help="the CSV to write (replaced)")
    _add_dataset_args(sub)
    sub.add_argument(
        "--integer-labels",
        action="store_true",
        help="write integer labels (OML's format checker requires them): class names that are not "
        "integers become 0, 1, ... in sorted order, the names go to a label_name column",
    )
    sub.set_defaults(handler=run_convert)


def _add_root(parser: SuggestingParser) -> None:
    parser.add_argument(
        "--root", "--data-root", dest="root", required=True, metavar="DIR", help="the dataset's folder"
    )


def _add_dataset_args(parser: SuggestingParser) -> None:
    parser.add_argument(
        "--dataset-args",
        type=parse_mapping,
        default=None,
        metavar="MAP",
        help="the dataset's options, as for dmlkit train (e.g. '{size: large}')",
    )


# ------------------------------------------------------------------------------------------- shared
def catalogued(name: str) -> Any:
    """The :class:`~dmlkit.data.catalog.DatasetInfo` of ``name`` (every dataset module imported first);
    an unknown name raises ``UnknownNameError`` with the closest one."""
    import dmlkit.data  # noqa: F401  (imports every dataset module, which catalogues it)
    from dmlkit.data.catalog import CATALOG

    return CATALOG.get(name)


def dataset_options(info: Any, given: Mapping[str, Any] | None, verb: str) -> tuple[dict, dict]:
    """``--dataset-args`` checked against the dataset's builder (names and types, before any file is
    read), split into (the table function's options, the options every file dataset shares)."""
    from dmlkit.data.base import REGISTRY

    if info.table is None:
        raise ConfigError(f"dataset '{info.name}' is not read from image files: there is nothing to {verb}")
    given = dict(given or {})
    if "root" in given:
        raise ConfigError("--dataset-args: give the dataset's folder with --root, not as 'root'")
    REGISTRY.check_kwargs(info.name, given)
    own = set(inspect.signature(info.table).parameters) - {"root"}
    return {k: v for k, v in given.items() if k in own}, {k: v for k, v in given.items() if k not in own}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _counts_text(counts: Mapping[str, Sequence[int]]) -> str:
    return " · ".join(f"{split} {images:,} images / {classes:,} classes" for split, (images, classes) in
                      counts.items())  # fmt: skip


# ------------------------------------------------------------------------------------------- list
def dataset_location(info: Any, data_root: str | Path) -> Path:
    """Where ``datasets list --data-root`` looks for ``info`` under ``data_root``: ``data_root/<name>``
    when it exists; else ``data_root`` itself for a benchmark (one with official counts, whose list files
    have fixed names), while a bring-your-own dataset (``folder``, ``csv``) is only looked for in
    ``data_root/<name>``."""
    base = Path(data_root).expanduser()
    own = base / info.name
    return own if own.exists() or not info.expected else base


def found_under(info: Any, data_root: str | Path) -> dict[str, Any]:
    """What ``data_root`` holds of ``info`` (the table function with its default options, listing only):
    ``status`` ``found`` with the counts per split and whether they are the official ones, ``missing``
    with the ``problem`` (the first line of the error), or ``not files`` for a dataset not read from
    image files."""
    if info.table is None:
        return {"status": "not files"}
    where = dataset_location(info, data_root)
    if not where.exists():
        return {"root": str(where), "status": "missing", "problem": f"'{where}' does not exist"}
    try:
        table = info.table(str(where))
    except (DmlkitError, OSError) as exc:
        return {"root": str(where), "status": "missing", "problem": _first_line(exc)}
    missing = table.missing_files()
    if len(missing):
        i = int(missing[0])
        problem = f"{table.where(i)} names a missing image '{table.paths[i]}' ({len(missing)} missing)"
        return {"root": str(where), "status": "missing", "problem": problem}
    expected = {split: tuple(value) for split, value in info.expected_counts({}).items()}
    counts = table.counts(total="all" in expected)
    if "all" in expected:
        counts = {"all": counts["all"]}
    return {
        "root": str(where),
        "status": "found",
        "counts": {split: {"images": n, "classes": c} for split, (n, c) in counts.items()},
        "official": (counts == expected) if expected else None,
    }


def describe(info: Any, data_root: str | Path | None = None) -> dict[str, Any]:
    """One dataset of ``datasets list --json``."""
    entry: dict[str, Any] = {
        "name": info.name,
        "title": info.title,
        "protocol": info.protocol,
        "citation": info.citation,
        "licence": info.licence,
        "homepage": info.homepage,
        "layout": info.layout,
        "variant_option": info.variant_option,
        "expected": {
            variant: {split: {"images": n, "classes": c} for split, (n, c) in counts.items()}
            for variant, counts in info.expected.items()
        },
        "downloads": [
            {"url": d.url, "filename": d.filename, "md5": d.md5, "sha256": d.sha256, "size": d.size}
            for d in info.downloads
        ],
        "manual": info.manual,
    }
    if data_root is not None:
        entry["found"] = found_under(info, data_root)
    return entry


def run_list(args: argparse.Namespace) -> int:
    """``dmlkit datasets list``."""
    import dmlkit.data  # noqa: F401
    from dmlkit.data.catalog import CATALOG

    if args.data_root is not None and not Path(args.data_root).expanduser().is_dir():
        raise DataError(f"--data-root: folder not found: '{args.data_root}'")
    entries = [describe(CATALOG.get(name), args.data_root) for name in CATALOG.names()]
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0
    for entry in entries:
        print(f"{entry['name']}: {entry['title']}")
        print(f"    protocol: {entry['protocol']}")
        for variant, counts in entry["expected"].items():
            which = f" ({entry['variant_option']}={variant})" if variant else ""
            shown = {split: (c["images"], c["classes"]) for split, c in counts.items()}
            print(f"    official{which}: {_counts_text(shown)}")
        if entry["downloads"]:
            files = len(entry["downloads"])
            print(f"    download: dmlkit datasets download {entry['name']} --root DIR ({files} file(s))")
        elif entry["manual"]:
            print(f"    download: by hand (dmlkit datasets download {entry['name']} says how)")
        found = entry.get("found")
        if found is None or found["status"] == "not files":
            continue
        if found["status"] == "found":
            shown = {split: (c["images"], c["classes"]) for split, c in found["counts"].items()}
            note = {True: " (the official counts)", False: " (not the official counts: run datasets check)"}
            print(f"    found in {found['root']}: {_counts_text(shown)}{note.get(found['official'], '')}")
        else:
            print(f"    missing in {found['root']}: {found['problem']}")
    return 0


# ------------------------------------------------------------------------------------------- download
def run_download(args: argparse.Namespace) -> int:
    """``dmlkit datasets download``: exit status 0 when every file is ready, 1 for a dataset without a
    public URL (the manual steps are printed) or a failed download (the error names the URL)."""
    from dmlkit.data.download import ManualDownloadRequired, download

    info = catalogued(args.name)
    root = Path(args.root).expanduser()
    try:
        files = download(
            info,
            root,
            force=args.force,
            progress=not args.no_progress,
            timeout=args.timeout,
            echo=lambda line: print(line, flush=True),
        )
    except ManualDownloadRequired as exc:
        print(exc)
        return 1
    print(f"{info.name}: {len(files)} file(s) ready in {root}")
    if info.table is not None:
        print(f"check it with: dmlkit datasets check {info.name} --root {root}")
    return 0


# ------------------------------------------------------------------------------------------- check
def _threads(full: bool) -> int:
    cores = os.cpu_count() or 1
    return max(4, cores) if full else min(32, max(8, 2 * cores))


def unreadable_files(
    paths: Sequence[str], full: bool, channels: int, max_pixels: int | None, progress: bool = False
) -> dict[int, str]:
    """Index → why, for the files of ``paths`` that fail :func:`~dmlkit.data.images.check_image` (header
    and ``Image.verify``; ``full``: a decode), checked in threads."""
    from tqdm.auto import tqdm

    from dmlkit.data.images import check_image

    def one(path: str) -> str | None:
        return check_image(path, full, channels, max_pixels)[0]

    with ThreadPoolExecutor(max_workers=_threads(full)) as pool:
        results = list(
            tqdm(pool.map(one, paths), total=len(paths), desc="checking images", disable=not progress)
        )
    return {i: problem for i, problem in enumerate(results) if problem is not None}


def check_table(
    table: Any,
    expected: Mapping[str, Sequence[int]],
    *,
    full: bool = False,
    channels: int = 3,
    max_pixels: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """The report of ``datasets check`` on an item table: per split the images and classes found and
    expected, the missing and unreadable files; ``problems`` (one line each, naming the list file and
    line of a file); ``ok`` when there are none."""
    # official counts of the whole file ("all": GLDv2, whose test split is a hold-out of ours) are
    # compared with the whole table, and its splits are shown without official counts
    whole = "all" in expected
    counts = table.counts(total=whole)
    splits = [s for s in ("train", "validation", "test", "all") if s in counts or s in expected]
    missing = table.missing_files()
    present = np.setdiff1d(np.arange(len(table)), missing)
    bad = unreadable_files([str(table.paths[i]) for i in present], full, channels, max_pixels, progress)
    unreadable = {int(present[i]): why for i, why in bad.items()}
    problems: list[str] = []
    rows: dict[str, dict[str, Any]] = {}
    for split in splits:
        images, classes = counts.get(split, (0, 0))
        want = expected.get(split)
        in_split = np.ones(len(table), dtype=bool) if split == "all" else table.splits == split
        row = {
            "images": images,
            "expected_images": None if want is None else int(want[0]),
            "classes": classes,
            "expected_classes": None if want is None else int(want[1]),
            "missing": int(in_split[missing].sum()),
            "unreadable": int(sum(1 for i in unreadable if in_split[i])),
        }
        if expected and want is None and not whole:
            problems.append(
                f"split '{split}': {images:,} images listed; the official protocol has no such split"
            )
        elif want is not None and (images, classes) != (want[0], want[1]):
            problems.append(
                f"split '{split}': {images:,} images of {classes:,} classes, the official counts are "
                f"{want[0]:,} images of {want[1]:,} classes"
            )
        row["ok"] = (
            row["missing"] == 0
            and row["unreadable"] == 0
            and (want is None or (images, classes) == (want[0], want[1]))
            and not (expected and want is None and not whole)
        )
        rows[split] = row
    try:
        table.check_queries()
    except DataError as exc:
        problems.append(str(exc))
    for i in sorted({int(i) for i in missing} | set(unreadable)):
        if i in unreadable:
            problems.append(f"{table.where(i)}: unreadable image '{table.paths[i]}': {unreadable[i]}")
        else:
            problems.append(f"{table.where(i)} names a missing image '{table.paths[i]}'")
    return {
        "source": table.source,
        "images": len(table),
        "splits": rows,
        "problems": problems,
        "ok": not problems,
    }


def _cell(found: int, want: int | None) -> str:
    return f"{found:,}" if want is None else f"{found:,} / {want:,}"


def run_check(args: argparse.Namespace) -> int:
    """``dmlkit datasets check``: exit status 0 when everything matches, 1 otherwise."""
    from dmlkit.data.catalog import file_dataset_options

    info = catalogued(args.name)
    table_options, shared = dataset_options(info, args.dataset_args, "check")
    _, file_options = file_dataset_options(**shared)
    root = str(Path(args.root).expanduser())
    table = info.table(root, **table_options)
    report = check_table(
        table,
        info.expected_counts(table_options),
        full=args.full,
        channels=file_options.channels,
        max_pixels=file_options.max_image_pixels,
        progress=not args.no_progress and not args.json,
    )
    report = {"dataset": info.name, "root": root, "full": bool(args.full), **report}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0 if report["ok"] else 1
    how = "decoded" if args.full else "headers checked"
    print(f"{info.name} in {root}: {report['images']:,} images listed by {report['source']} ({how})")
    header = ("split", "images", "classes", "missing", "unreadable", "ok")
    lines = [header] + [
        (
            split,
            _cell(row["images"], row["expected_images"]),
            _cell(row["classes"], row["expected_classes"]),
            f"{row['missing']:,}",
            f"{row['unreadable']:,}",
            "yes" if row["ok"] else "NO",
        )
        for split, row in report["splits"].items()
    ]
    widths = [max(len(line[k]) for line in lines) for k in range(len(header))]
    for line in lines:
        print("  ".join(cell.ljust(w) if k == 0 else cell.rjust(w) for k, (cell, w) in
                        enumerate(zip(line, widths, strict=True))).rstrip())  # fmt: skip
    if any(row["expected_images"] is not None for row in report["splits"].values()):
        print("(images and classes: found / official)")
    problems = report["problems"]
    if not problems:
        print("everything matches")
        return 0
    first = f", the first {MAX_PROBLEMS}" if len(problems) > MAX_PROBLEMS else ""
    print(f"{len(problems):,} problem(s){first}:")
    for problem in problems[:MAX_PROBLEMS]:
        print(f"  {problem}")
    return 1


# ------------------------------------------------------------------------------------------- convert
def _number(value: float) -> str:
    if np.isnan(value):
        return ""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _csv_path(path: str, folder: Path) -> str:
    absolute = Path(os.path.abspath(path))
    if absolute.is_relative_to(folder):
        return absolute.relative_to(folder).as_posix()
    return absolute.as_posix()


def oml_rows(table: Any, folder: Path, integer_labels: bool = False) -> tuple[list[str], list[list[str]]]:
    """The header and rows of the OML-compatible CSV of an item table, whose file will be in ``folder``
    (see ``dmlkit datasets convert --help`` for the rules)."""
    folder = Path(os.path.abspath(folder))
    has_validation = bool((table.splits == "validation").any())
    columns = list(OML_COLUMNS)
    if table.boxes is not None:
        columns += OML_BOX_COLUMNS
    if table.categories is not None:
        columns.append("category")
    if table.sequences is not None:
        columns.append("sequence")
    labels = [str(label) for label in table.labels]
    names: list[str] | None = None
    if integer_labels and not all(re.fullmatch(r"-?\d+", label) for label in labels):
        names = labels
        codes = {name: str(code) for code, name in enumerate(sorted(set(labels)))}
        labels = [codes[name] for name in names]
        columns.append("label_name")
    rows = []
    for i in range(len(table)):
        split = str(table.splits[i])
        evaluation = split != "train"
        if evaluation and not has_validation and split == "test":
            split = "validation"
        if not evaluation:
            query = gallery = ""
        elif table.is_query is not None:
            query, gallery = str(bool(table.is_query[i])), str(bool(table.is_gallery[i]))
        else:
            query = gallery = "True"  # leave-one-out: every item a query and a gallery item
        row = [labels[i], _csv_path(str(table.paths[i]), folder), split, query, gallery]
        if table.boxes is not None:
            x1, y1, x2, y2 = table.boxes[i]
            row += [_number(x1), _number(x2), _number(y1), _number(y2)]
        if table.categories is not None:
            row.append(str(table.categories[i]))
        if table.sequences is not None:
            row.append(str(table.sequences[i]))
        if names is not None:
            row.append(names[i])
        rows.append(row)
    return columns, rows


def write_oml_csv(table: Any, out: str | Path, integer_labels: bool = False) -> dict[str, int]:
    """Write :func:`oml_rows` to ``out`` (through a temporary file and ``os.replace``); returns the rows
    per written split."""
    out = Path(out).expanduser()
    if out.is_dir():
        raise ConfigError(f"--out must be a file, '{out}' is a folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create the folder of '{out}': {exc}") from exc
    columns, rows = oml_rows(table, out.parent, integer_labels)

    def write_rows(file: IO[str]) -> None:
        writer = csv.writer(file)
        writer.writerow(columns)
        writer.writerows(rows)

    try:
        write_text_atomic(out, write_rows, newline="")
    except OSError as exc:
        raise DataError(f"cannot write '{out}': {exc}") from exc
    written: dict[str, int] = {}
    for row in rows:
        written[row[2]] = written.get(row[2], 0) + 1
    return written


def run_convert(args: argparse.Namespace) -> int:
    """``dmlkit datasets convert``."""
    from dmlkit.data.images import IMAGE_EXTENSIONS

    info = catalogued(args.name)
    table_options, _ = dataset_options(info, args.dataset_args, "convert")
    table = info.table(str(Path(args.root).expanduser()), **table_options)
    written = write_oml_csv(table, args.out, args.integer_labels)
    protocol = (
        "query/gallery" if table.is_query is not None else "leave-one-out (is_query = is_gallery = True)"
    )
    parts = ", ".join(f"{split} {count:,}" for split, count in written.items())
    print(f"wrote {len(table):,} rows to {args.out}: {parts}; evaluation rows {protocol}")
    odd = sum(1 for path in table.paths if Path(str(path)).suffix.lower() not in IMAGE_EXTENSIONS)
    if odd:
        print(
            f"note: {odd:,} paths end in no image extension the csv dataset knows; read the CSV with "
            "--dataset-args '{extension: \"\"}'",
            file=sys.stderr,
        )
    return 0
