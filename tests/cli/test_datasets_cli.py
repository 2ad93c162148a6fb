"""dmlkit datasets list|download|check|convert on fixture trees: a test-only dataset with official counts,
query/gallery flags, categories, sequences and crop boxes (registered for each test, then removed),
``folder``, and a local HTTP server for the download."""

from __future__ import annotations

import csv
import functools
import hashlib
import http.server
import io
import json
import os
import socket
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from dmlkit import data
from dmlkit.cli import main
from dmlkit.data.base import REGISTRY, dataset_root
from dmlkit.data.catalog import CATALOG, DatasetInfo, Download, register_file_dataset
from dmlkit.data.table import ItemTable
from dmlkit.errors import ConfigError, DataError

NAME = "dmlkit_test_lines"
HOMEPAGE = "https://example.org/lines"
MANUAL = "register at https://example.org/lines/register, then unpack lines.zip into the root"
HEADER = "path label split flags category sequence box"
#: Class → category; train classes have 4 images, test classes 3 (flags q, qg, g: query only, both,
#: gallery only).
TRAIN = {"a": "cat1", "b": "cat1", "c": "cat2", "d": "cat2"}
TEST = {"e": "cat1", "f": "cat2", "g": "cat2"}
FLAGS = ("q", "qg", "g")
EXPECTED = {
    "full": {"train": (16, 4), "test": (9, 3)},
    "half": {"train": (16, 4), "test": (6, 2)},
}


def lines_table(root: str | None = None, size: str = "full") -> ItemTable:
    """``root/list_<size>.txt``: a header, then ``path label split flags category sequence box`` rows
    (``-`` for no sequence or box; a box is ``x1,y1,x2,y2``)."""
    base = dataset_root(root, NAME, "the folder holding list_full.txt")
    if size not in EXPECTED:
        raise ConfigError(f"size must be one of {', '.join(EXPECTED)}, got '{size}'")
    source = base / f"list_{size}.txt"
    if not source.is_file():
        raise DataError(f"list file not found: '{source}'")
    text = source.read_text().splitlines()
    if text[0] != HEADER:
        raise DataError(f"'{source}' line 1: header '{text[0]}', expected '{HEADER}'")
    rows = [(n, line.split()) for n, line in enumerate(text[1:], start=2)]
    table = ItemTable(
        str(source),
        [str(base / r[0]) for _, r in rows],
        [r[1] for _, r in rows],
        [r[2] for _, r in rows],
        [r[0] for _, r in rows],
        lines=[n for n, _ in rows],
        is_query=["q" in r[3] for _, r in rows],
        is_gallery=["g" in r[3] for _, r in rows],
        categories=[r[4] for _, r in rows],
        sequences=["" if r[5] == "-" else r[5] for _, r in rows],
        boxes=[[np.nan] * 4 if r[6] == "-" else [float(v) for v in r[6].split(",")] for _, r in rows],
    )
    return table


@pytest.fixture
def lines_dataset(monkeypatch) -> DatasetInfo:
    """The test dataset, catalogued and registered for one test (copies of the global tables)."""
    monkeypatch.setattr(CATALOG, "_entries", dict(CATALOG._entries))
    monkeypatch.setattr(REGISTRY, "_entries", dict(REGISTRY._entries))
    monkeypatch.setattr(REGISTRY, "_types", dict(REGISTRY._types))
    info = DatasetInfo(
        name=NAME,
        title="Test lines",
        protocol="list_<size>.txt; query/gallery",
        homepage=HOMEPAGE,
        manual=MANUAL,
        expected=EXPECTED,
        variant_option="size",
        table=lines_table,
    )
    register_file_dataset(info)
    return info


def save_image(path: Path, shade: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((10, 12, 3), shade % 256, dtype=np.uint8)
    pixels[:, :6, 0] = (shade * 37) % 256
    Image.fromarray(pixels).save(path)


def write_lines_tree(root: Path) -> list[list[str]]:
    """The fixture tree; returns the rows of list_full.txt (row i is on line i + 2)."""
    rows = []
    for label, category in TRAIN.items():
        for k in range(4):
            sequence = f"s{label}" if k < 2 else "-"
            rows.append([f"images/{label}/{k}.png", label, "train", "qg", category, sequence,
                         "1,1,9,8" if k == 0 else "-"])  # fmt: skip
    for label, category in TEST.items():
        for k in range(3):
            rows.append([f"images/{label}/{k}.png", label, "test", FLAGS[k], category, "-",
                         "2,1,10,9" if k == 1 else "-"])  # fmt: skip
    for i, row in enumerate(rows):
        save_image(root / row[0], 20 * i + 5)
    (root / "list_full.txt").write_text("\n".join([HEADER] + [" ".join(r) for r in rows]) + "\n")
    half = [r for r in rows if r[1] != "g"]
    (root / "list_half.txt").write_text("\n".join([HEADER] + [" ".join(r) for r in half]) + "\n")
    return rows


def write_folder_tree(root: Path) -> None:
    for c, label in enumerate("pqrs"):
        for k in range(3):
            save_image(root / label / f"{k}.png", 31 * c + k)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["datasets", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ------------------------------------------------------------------------------------------- list
def test_list_shows_every_dataset_with_its_protocol_and_counts(lines_dataset, capsys) -> None:
    code, out, _ = run(capsys, "list")
    assert code == 0
    assert "folder: An image folder tree" in out and "csv: A CSV list of images" in out
    block = out[out.index(f"{NAME}: Test lines") :].split("\n")
    assert block[1] == "    protocol: list_<size>.txt; query/gallery"
    assert block[2] == "    official (size=full): train 16 images / 4 classes · test 9 images / 3 classes"
    assert block[3] == "    official (size=half): train 16 images / 4 classes · test 6 images / 2 classes"
    assert block[4] == f"    download: by hand (dmlkit datasets download {NAME} says how)"

    code, out, _ = run(capsys, "list", "--json")
    entry = next(e for e in json.loads(out) if e["name"] == NAME)
    assert entry["expected"]["half"]["test"] == {"images": 6, "classes": 2}
    assert entry["homepage"] == HOMEPAGE and entry["downloads"] == [] and entry["manual"] == MANUAL
    assert "found" not in entry


def test_list_with_a_data_root_says_what_is_found_and_what_is_missing(
    lines_dataset, tmp_path, capsys
) -> None:
    root = tmp_path / "data"
    write_lines_tree(root / NAME)
    write_folder_tree(root / "folder")
    code, out, _ = run(capsys, "list", "--data-root", str(root))
    assert code == 0
    counts = "train 16 images / 4 classes · test 9 images / 3 classes"
    assert f"    found in {root / NAME}: {counts} (the official counts)" in out
    assert f"    found in {root / 'folder'}: train 6 images / 2 classes · test 6 images / 2 classes\n" in out
    assert f"    missing in {root / 'csv'}: '{root / 'csv'}' does not exist" in out

    code, out, _ = run(capsys, "list", "--data-root", str(root), "--json")
    found = {e["name"]: e["found"] for e in json.loads(out)}
    assert found[NAME] == {
        "root": str(root / NAME),
        "status": "found",
        "counts": {"train": {"images": 16, "classes": 4}, "test": {"images": 9, "classes": 3}},
        "official": True,
    }
    assert found["folder"]["official"] is None and found["csv"]["status"] == "missing"

    # a benchmark may sit in the data root itself; a bring-your-own dataset only in DIR/<name>
    flat = tmp_path / "flat"
    write_lines_tree(flat)
    (flat / "list_full.txt").write_text((flat / "list_full.txt").read_text().rsplit("\n", 2)[0] + "\n")
    code, out, _ = run(capsys, "list", "--data-root", str(flat), "--json")
    found = {e["name"]: e["found"] for e in json.loads(out)}
    assert found[NAME]["root"] == str(flat) and found[NAME]["status"] == "found"
    assert found[NAME]["counts"]["test"] == {"images": 8, "classes": 3} and found[NAME]["official"] is False
    assert found["folder"] == {"root": str(flat / "folder"), "status": "missing",
                               "problem": f"'{flat / 'folder'}' does not exist"}  # fmt: skip
    code, out, _ = run(capsys, "list", "--data-root", str(flat))
    assert (
        f"found in {flat}: train 16 images / 4 classes · test 8 images / 3 classes (not the official" in out
    )

    # what is missing: the first line of the error
    (root / NAME / "list_full.txt").unlink()
    (root / NAME / "images" / "a" / "2.png").unlink()
    code, out, _ = run(capsys, "list", "--data-root", str(root))
    assert f"    missing in {root / NAME}: list file not found: '{root / NAME / 'list_full.txt'}'" in out


def test_list_needs_an_existing_data_root(tmp_path, capsys) -> None:
    code, _, err = run(capsys, "list", "--data-root", str(tmp_path / "nowhere"))
    assert code == 1 and f"folder not found: '{tmp_path / 'nowhere'}'" in err


# ------------------------------------------------------------------------------------------- check
def table_lines(out: str) -> dict[str, list[str]]:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("split "))
    return {
        line.split()[0]: line.split() for line in lines[start + 1 :] if line.split()[0] in ("train", "test")
    }


def test_check_a_complete_tree(lines_dataset, tmp_path, capsys) -> None:
    write_lines_tree(tmp_path)
    code, out, _ = run(capsys, "check", NAME, "--root", str(tmp_path), "--no-progress")
    assert code == 0
    assert f"{NAME} in {tmp_path}: 25 images listed by {tmp_path / 'list_full.txt'} (headers checked)" in out
    rows = table_lines(out)
    assert rows["train"] == ["train", "16", "/", "16", "4", "/", "4", "0", "0", "yes"]
    assert rows["test"] == ["test", "9", "/", "9", "3", "/", "3", "0", "0", "yes"]
    assert out.rstrip().endswith("everything matches")

    code, out, _ = run(
        capsys, "check", NAME, "--root", str(tmp_path), "--dataset-args", "{size: half}", "--full"
    )
    assert code == 0 and "(decoded)" in out
    assert table_lines(out)["test"] == ["test", "6", "/", "6", "2", "/", "2", "0", "0", "yes"]

    code, out, _ = run(capsys, "check", NAME, "--root", str(tmp_path), "--json")
    report = json.loads(out)
    assert report["ok"] is True and report["problems"] == [] and report["images"] == 25
    assert report["splits"]["test"] == {
        "images": 9, "expected_images": 9, "classes": 3, "expected_classes": 3, "missing": 0, "unreadable": 0,
        "ok": True,
    }  # fmt: skip


def test_check_names_the_line_of_each_missing_and_unreadable_image(lines_dataset, tmp_path, capsys) -> None:
    rows = write_lines_tree(tmp_path)
    source = tmp_path / "list_full.txt"
    (tmp_path / rows[5][0]).unlink()  # line 7, train
    (tmp_path / rows[17][0]).write_bytes(b"\x89PNG\r\n\x1a\n not really")  # line 19, test
    source.write_text("\n".join(source.read_text().splitlines()[:-1]) + "\n")  # drop the last test row
    code, out, _ = run(capsys, "check", NAME, "--root", str(tmp_path), "--no-progress")
    assert code == 1
    table = table_lines(out)
    assert table["train"] == ["train", "16", "/", "16", "4", "/", "4", "1", "0", "NO"]
    assert table["test"] == ["test", "8", "/", "9", "3", "/", "3", "0", "1", "NO"]
    problems = out[out.index("4 problem(s):") :].splitlines()[1:]
    counts = "8 images of 3 classes, the official counts are 9 images of 3 classes"
    assert problems[0] == f"  split 'test': {counts}"
    # without the dropped gallery row, the query of line 25 has no gallery item of its class left
    assert problems[1].startswith(f"  '{source}' line 25: query 'images/g/1.png' of class 'g' has no gallery")
    assert problems[2] == f"  '{source}' line 7 names a missing image '{tmp_path / rows[5][0]}'"
    assert problems[3].startswith(f"  '{source}' line 19: unreadable image '{tmp_path / rows[17][0]}': ")

    code, out, _ = run(capsys, "check", NAME, "--root", str(tmp_path), "--json")
    report = json.loads(out)
    assert code == 1 and report["ok"] is False and len(report["problems"]) == 4
    assert report["splits"]["train"]["missing"] == 1 and report["splits"]["test"]["unreadable"] == 1


def test_check_prints_the_first_20_problems(lines_dataset, tmp_path, capsys) -> None:
    rows = write_lines_tree(tmp_path)
    for row in rows:
        (tmp_path / row[0]).unlink()
    code, out, _ = run(capsys, "check", NAME, "--root", str(tmp_path), "--no-progress")
    assert code == 1
    assert "25 problem(s), the first 20:" in out
    listed = [line for line in out.splitlines() if "names a missing image" in line]
    assert len(listed) == 20 and "line 2 names" in listed[0] and "line 21 names" in listed[-1]
    code, out, _ = run(capsys, "check", NAME, "--root", str(tmp_path), "--json")
    assert len(json.loads(out)["problems"]) == 25


def test_check_reports_a_query_without_gallery(lines_dataset, tmp_path, capsys) -> None:
    write_lines_tree(tmp_path)
    source = tmp_path / "list_full.txt"
    source.write_text(source.read_text().replace("images/e/1.png e test qg", "images/e/1.png e test q")
                      .replace("images/e/2.png e test g", "images/e/2.png e test q"))  # fmt: skip
    code, out, _ = run(capsys, "check", NAME, "--root", str(tmp_path), "--no-progress")
    assert code == 1
    assert f"'{source}' line 18: query 'images/e/0.png' of class 'e' has no gallery item" in out


def test_check_a_dataset_without_official_counts(tmp_path, capsys) -> None:
    write_folder_tree(tmp_path)
    code, out, _ = run(capsys, "check", "folder", "--root", str(tmp_path), "--no-progress")
    assert code == 0
    assert table_lines(out)["train"] == ["train", "6", "2", "0", "0", "yes"]
    assert "found / official" not in out


def test_check_refuses_bad_options_before_reading_files(lines_dataset, tmp_path, capsys) -> None:
    nowhere = str(tmp_path / "nowhere")
    code, _, err = run(capsys, "check", "dmlkit_test_line", "--root", nowhere)
    assert code == 2 and f"did you mean '{NAME}'" in err
    code, _, err = run(capsys, "check", NAME, "--root", nowhere, "--dataset-args", "{sise: half}")
    assert code == 2 and "did you mean 'size'" in err
    code, _, err = run(capsys, "check", NAME, "--root", nowhere, "--dataset-args", "{size: 3}")
    assert code == 2 and "size must be" in err
    code, _, err = run(capsys, "check", NAME, "--root", nowhere, "--dataset-args", "{root: x}")
    assert code == 2 and "--root" in err
    code, _, err = run(capsys, "check", NAME, "--root", nowhere, "--dataset-args", "{channels: 2}")
    assert code == 2 and "channels must be 1 or 3" in err
    code, _, err = run(capsys, "check", NAME, "--root", nowhere)
    assert code == 1 and f"list file not found: '{tmp_path / 'nowhere' / 'list_full.txt'}'" in err


# ------------------------------------------------------------------------------------------- convert
def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def by_path(split: Any) -> dict[str, Any]:
    """A split's items keyed by real path: class name, flags, category, box, sequence group."""
    notes = split.annotations
    sequences: dict[int, list[str]] = {}
    paths = [os.path.realpath(p) for p in split.paths]
    if notes.sequences is not None:
        for path, code in zip(paths, notes.sequences.tolist(), strict=True):
            sequences.setdefault(code, []).append(path)
    found = {}
    for i, path in enumerate(paths):
        found[path] = (
            split.class_names[split.labels[i]],
            None if notes.is_query is None else (bool(notes.is_query[i]), bool(notes.is_gallery[i])),
            None if notes.categories is None else notes.category_names[notes.categories[i]],
            None
            if notes.boxes is None
            else tuple(None if np.isnan(v) else round(v, 6) for v in notes.boxes[i]),
            None if notes.sequences is None else tuple(sorted(sequences[int(notes.sequences[i])])),
        )
    return found


def test_convert_round_trip_keeps_items_labels_splits_flags_and_extras(
    lines_dataset, tmp_path, capsys
) -> None:
    root = tmp_path / "lines"
    rows = write_lines_tree(root)
    out = root / "lines.csv"
    code, printed, _ = run(capsys, "convert", NAME, "--root", str(root), "--out", str(out))
    assert code == 0
    assert printed.strip() == f"wrote 25 rows to {out}: train 16, validation 9; evaluation rows query/gallery"
    written = read_csv(out)
    boxes = ["x_1", "x_2", "y_1", "y_2"]
    assert list(written[0]) == [
        "label",
        "path",
        "split",
        "is_query",
        "is_gallery",
        *boxes,
        "category",
        "sequence",
    ]
    for row, given in zip(written, rows, strict=True):
        assert row["path"] == given[0]  # relative to the CSV, which is in the root
        assert row["label"] == given[1] and row["category"] == given[4]
        assert row["split"] == {"train": "train", "test": "validation"}[given[2]]
        assert row["sequence"] == ("" if given[5] == "-" else given[5])
        box = given[6].split(",") if given[6] != "-" else ["", "", "", ""]
        assert [row["x_1"], row["y_1"], row["x_2"], row["y_2"]] == box
        if given[2] == "train":
            assert row["is_query"] == row["is_gallery"] == ""
        else:
            assert (row["is_query"], row["is_gallery"]) == (str("q" in given[3]), str("g" in given[3]))

    original = data.build(NAME, str(root), image_size=16)
    again = data.build("csv", str(out), image_size=16)
    assert by_path(again.test) == by_path(original.test)
    assert {p: v[0] for p, v in by_path(again.train).items()} == {
        p: v[0] for p, v in by_path(original.train).items()
    }
    assert again.test.annotations.is_query is not None  # the query/gallery protocol survived

    # outside the dataset's folder the paths are absolute
    outside = tmp_path / "elsewhere" / "lines.csv"
    assert main(["datasets", "convert", NAME, "--root", str(root), "--out", str(outside),
                 "--dataset-args", "{size: half}"]) == 0  # fmt: skip
    written = read_csv(outside)
    assert len(written) == 22 and written[0]["path"] == str(root / rows[0][0])
    assert by_path(data.build("csv", str(outside), image_size=16).test) == by_path(
        data.build(NAME, str(root), size="half", image_size=16).test
    )


def test_convert_a_leave_one_out_dataset(tmp_path, capsys) -> None:
    write_folder_tree(tmp_path / "tree")
    out = tmp_path / "tree.csv"
    code, printed, _ = run(capsys, "convert", "folder", "--root", str(tmp_path / "tree"), "--out", str(out))
    assert code == 0 and "leave-one-out (is_query = is_gallery = True)" in printed
    written = read_csv(out)
    assert list(written[0]) == ["label", "path", "split", "is_query", "is_gallery"]
    assert {(r["split"], r["is_query"], r["is_gallery"]) for r in written} == {
        ("train", "", ""),
        ("validation", "True", "True"),
    }
    assert {r["path"] for r in written} == {f"tree/{c}/{k}.png" for c in "pqrs" for k in range(3)}
    original = data.build("folder", str(tmp_path / "tree"), image_size=16)
    again = data.build("csv", str(out), image_size=16)
    for split in ("train", "test"):
        assert by_path(getattr(again, split)) == by_path(getattr(original, split))
    assert again.test.annotations.is_query is None  # leave-one-out, as the original


def test_convert_with_integer_labels(lines_dataset, tmp_path, capsys) -> None:
    write_lines_tree(tmp_path)
    out = tmp_path / "int.csv"
    assert (
        main(["datasets", "convert", NAME, "--root", str(tmp_path), "--out", str(out), "--integer-labels"])
        == 0
    )
    written = read_csv(out)
    assert list(written[0])[-1] == "label_name"
    codes = {r["label_name"]: r["label"] for r in written}
    assert codes == {name: str(i) for i, name in enumerate("abcdefg")}
    named = data.build("csv", str(out), label_column="label_name", image_size=16)
    assert by_path(named.test) == by_path(data.build(NAME, str(tmp_path), image_size=16).test)


def test_convert_refuses_a_folder_as_out(lines_dataset, tmp_path, capsys) -> None:
    write_lines_tree(tmp_path)
    code, _, err = run(capsys, "convert", NAME, "--root", str(tmp_path), "--out", str(tmp_path))
    assert code == 2 and "--out must be a file" in err


# ------------------------------------------------------------------------------------------- download
@pytest.fixture
def file_server(tmp_path) -> Iterator[tuple[str, Path]]:
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None  # type: ignore[attr-defined]
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", served
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def test_download_through_the_cli(lines_dataset, file_server, tmp_path, monkeypatch, capsys) -> None:
    url, served = file_server
    tree = tmp_path / "tree"
    write_lines_tree(tree)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for path in sorted(tree.rglob("*")):
            archive.add(path, arcname=path.relative_to(tree).as_posix(), recursive=False)
    (served / "lines.tar.gz").write_bytes(buffer.getvalue())
    info = DatasetInfo(
        name="dmlkit_test_served",
        title="Served lines",
        protocol="as dmlkit_test_lines",
        expected=EXPECTED,
        variant_option="size",
        downloads=(
            Download(f"{url}/lines.tar.gz", "lines.tar.gz", md5=hashlib.md5(buffer.getvalue()).hexdigest()),
        ),
        manual=MANUAL,
        table=lines_table,
    )
    register_file_dataset(info)  # the catalogue and registry are copies for this test (lines_dataset)
    root = tmp_path / "root"
    code, out, _ = run(capsys, "download", info.name, "--root", str(root), "--no-progress")
    assert code == 0
    assert f"lines.tar.gz: downloading {url}/lines.tar.gz" in out
    assert "lines.tar.gz: downloaded (md5 checked)" in out
    assert f"{info.name}: 1 file(s) ready in {root}" in out
    assert f"dmlkit datasets check {info.name} --root {root}" in out
    assert (root / "list_full.txt").read_text() == (tree / "list_full.txt").read_text()
    code, out, _ = run(capsys, "check", info.name, "--root", str(root), "--no-progress")
    assert code == 0 and "everything matches" in out
    code, out, _ = run(capsys, "download", info.name, "--root", str(root), "--no-progress")
    assert code == 0 and "lines.tar.gz: already downloaded" in out


def test_download_of_a_licence_gated_dataset_prints_where_to_register(
    lines_dataset, tmp_path, capsys
) -> None:
    code, out, _ = run(capsys, "download", NAME, "--root", str(tmp_path / "root"))
    assert code == 1
    assert f"dataset '{NAME}' has no public download URL" in out
    assert MANUAL in out and HOMEPAGE in out
    assert not (tmp_path / "root").exists()


def test_download_offline_names_the_url_and_the_manual_steps(lines_dataset, tmp_path, capsys) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/lines.tar.gz"
    info = DatasetInfo(name="dmlkit_test_offline", title="Offline", protocol="-", manual=MANUAL,
                       homepage=HOMEPAGE, downloads=(Download(url, "lines.tar.gz"),))  # fmt: skip
    CATALOG.add(info)
    code, _, err = run(
        capsys, "download", info.name, "--root", str(tmp_path), "--no-progress", "--timeout", "5"
    )
    assert code == 1
    assert err.startswith(f"dmlkit datasets: error: cannot download '{url}' (dataset 'dmlkit_test_offline'):")
    assert MANUAL in err and HOMEPAGE in err


def test_datasets_needs_a_subcommand_and_a_known_name(capsys) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["datasets"])
    assert caught.value.code == 2
    code, _, err = run(capsys, "download", "cub201", "--root", "x")
    assert code == 2 and "unknown dataset 'cub201'" in err
