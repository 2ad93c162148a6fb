"""`dmlkit report RUN_DIR`: the page of a tiny real run holds the run's configuration, curves, test table,
per-class table and worst queries as the run's own files (and `dmlkit eval`, and an independent k-NN
search) give them; it is self-contained, escapes the run's strings, survives runs that stopped early, and
loads in headless Chromium without errors."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import shutil
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from dmlkit.cli import main
from dmlkit.data import build as build_dataset
from dmlkit.report import curves
from tests_support import TINY_DATA, checkpoint_test_embeddings, tiny_argv

WORST, TOP = 3, 4


# ------------------------------------------------------------------------------------------------ parsing
class Page(HTMLParser):
    """The parts of a report the tests read: tables by id (rows of ``(tag, attributes, text)`` cells, in
    order; a table inside a cell is a table of its own), images with the ids of the figure / table around
    them, and every element id."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tables: dict[str, list[list[tuple[str, dict[str, str], str]]]] = {}
        self.table_attrs: dict[str, dict[str, str]] = {}
        self.row_attrs: dict[str, list[dict[str, str]]] = {}
        self.table_figure: dict[str, str] = {}
        self.images: list[dict[str, str]] = []
        self.ids: list[str] = []
        self._tables: list[str] = []
        self._figure: str | None = None
        self._cell: list[Any] | None = None
        self._anonymous = 0
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = {key: value or "" for key, value in attrs}
        if "id" in found:
            self.ids.append(found["id"])
        if tag == "table":
            self._anonymous += 1
            name = found.get("id") or f"anonymous-{self._anonymous}"
            self._tables.append(name)
            self.tables[name], self.table_attrs[name], self.row_attrs[name] = [], found, []
            self.table_figure[name] = self._figure or ""
        elif tag == "tr" and self._tables:
            self.tables[self._tables[-1]].append([])
            self.row_attrs[self._tables[-1]].append(found)
        elif tag in ("td", "th") and self._tables:
            self._cell = [tag, found, ""]
        elif tag == "figure":
            self._figure = found.get("id")
        elif tag == "img":
            table = self._tables[-1] if self._tables else ""
            row = str(len(self.tables[table]) - 1) if table else ""
            self.images.append({**found, "_figure": self._figure or "", "_table": table, "_row": row})

    def handle_endtag(self, tag: str) -> None:
        if tag == "table" and self._tables:
            self._tables.pop()
        elif tag in ("td", "th") and self._cell is not None and self._tables:
            self.tables[self._tables[-1]][-1].append(tuple(self._cell))  # type: ignore[arg-type]
            self._cell = None
        elif tag == "figure":
            self._figure = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell[2] += data


def exact(cell: tuple[str, dict[str, str], str]) -> float | None:
    """A numeric cell's unrounded value (``data-value``), None when it shows a missing value."""
    text = cell[1]["data-value"]
    return float(text) if text else None


def decode(src: str) -> Image.Image:
    match = re.fullmatch(r"data:image/(png|jpeg);base64,([A-Za-z0-9+/=]+)", src)
    assert match, src[:60]
    image = Image.open(io.BytesIO(base64.b64decode(match.group(2), validate=True)))
    image.load()
    return image


def report(run: Path, *options: str, out: Path | None = None) -> tuple[str, Page]:
    argv = ["report", str(run), "--no-progress", *options, *(["--out", str(out)] if out else [])]
    assert main(argv) == 0
    text = (out or run / "report.html").read_text(encoding="utf-8")
    return text, Page(text)


def copy_run(run: Path, to: Path, files: tuple[str, ...]) -> Path:
    to.mkdir(parents=True)
    for name in files:
        shutil.copy2(run / name, to / name)
    return to


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report")
    assert main(["train", *tiny_argv(out / "runs", name="seen", epochs=2)]) == 0
    return out / "runs" / "seen"


@pytest.fixture(scope="module")
def page(run: Path) -> tuple[str, Page]:
    return report(run, "--worst", str(WORST), "--top", str(TOP))


TEXT_ONLY = ("config.yaml", "history.jsonl", "results.json", "train.log")


# ------------------------------------------------------------------------------------------------ the page
def test_the_page_is_written_next_to_the_run_and_self_contained(run: Path, page: tuple[str, Page]) -> None:
    text, parsed = page
    assert (run / "report.html").is_file()
    lowered = text.lower()
    for outside in ('src="http', "src='http", 'href="http', "<link", "<script", "url(", "@import", "<iframe"):
        assert outside not in lowered, outside
    assert 'src="' in text and parsed.images
    for image in parsed.images:
        picture = decode(image["src"])  # every image is inline and decodes
        assert picture.width > 10 and picture.height > 10
    assert len(parsed.ids) == len(set(parsed.ids)), "element ids repeat"


def test_the_resolved_config_is_shown_key_by_key(run: Path, page: tuple[str, Page]) -> None:
    config = yaml.safe_load((run / "config.yaml").read_text())
    _, parsed = page

    def leaves(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        found: dict[str, Any] = {}
        for key, value in values.items():
            if isinstance(value, dict) and value:
                found |= leaves(value, f"{prefix}{key}.")
            else:
                found[f"{prefix}{key}"] = value
        return found

    for section, values in config.items():
        rows = parsed.tables[f"config-{section}"]
        shown = {row[0][2]: row[1][2] for row in rows}
        expected = leaves(values)
        assert list(shown) == list(expected), section
        for key, value in expected.items():
            written = (
                json.dumps(value) if value is None or isinstance(value, bool | list | dict) else str(value)
            )
            assert shown[key] == written, (section, key)
    assert shown  # the last section had rows
    assert parsed.tables["config-data"] and "dataset.args.image_size" in {
        row[0][2] for row in parsed.tables["config-data"]
    }


def test_a_curve_per_family_and_per_validation_metric(run: Path, page: tuple[str, Page]) -> None:
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    _, parsed = page
    figures = {image["_figure"]: image for image in parsed.images if image["_figure"]}
    assert {"curve-loss", "curve-lr", "curve-images-per-s"} <= set(figures)
    metrics = yaml.safe_load((run / "config.yaml").read_text())["eval"]["metrics"]
    for metric in metrics:
        ident = "curve-" + re.sub(r"[^a-z0-9]+", "-", f"val/{metric}").strip("-")
        assert ident in figures, metric
        assert decode(figures[ident]["src"]).format == "PNG"
    # Each figure's value table holds the history's numbers, epoch by epoch.
    for ident, column in (("curve-loss", "train_loss"), ("curve-val-map-r", "val/map@r")):
        (table,) = [parsed.tables[name] for name, figure in parsed.table_figure.items() if figure == ident]
        assert [cell[2] for cell in table[0]] == ["epoch", column]
        assert [int(row[0][2]) for row in table[1:]] == [row["epoch"] for row in history]
        assert [exact(row[1]) for row in table[1:]] == [row[column] for row in history]


def test_the_test_table_is_results_json(run: Path, page: tuple[str, Page]) -> None:
    results = json.loads((run / "results.json").read_text())
    rows = page[1].tables["test-table"]
    assert [cell[2] for cell in rows[0]] == ["metric", "before", "after", "change"]
    shown = {row[0][2]: row[1:] for row in rows[1:]}
    assert list(shown) == list(results["test_before"])
    for metric, (before, after, change) in shown.items():
        assert exact(before) == results["test_before"][metric]
        assert exact(after) == results["test_after"][metric]
        assert exact(change) == pytest.approx(results["test_after"][metric] - results["test_before"][metric])
        assert before[2] == f"{results['test_before'][metric]:.4f}"


def test_per_class_metrics_are_dmlkit_evals_sorted_worst_first(
    run: Path, page: tuple[str, Page], capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run / "best.pt"), "--per-class", "--json", "--no-progress"]) == 0
    expected = json.loads(capsys.readouterr().out)["per_class"]
    _, parsed = page
    table = parsed.tables["per-class"]
    assert parsed.table_attrs["per-class"]["data-sort-metric"] == "map@r"  # the run's select_metric
    header = [cell[2] for cell in table[0]]
    assert header == ["class", *expected]
    shown = {
        row[0][2]: {m: exact(cell) for m, cell in zip(header[1:], row[1:], strict=True)} for row in table[1:]
    }
    assert set(shown) == set(expected["map@r"]) and len(shown) == 8
    for metric, by_class in expected.items():
        for name, value in by_class.items():
            assert shown[name][metric] == pytest.approx(value, abs=1e-12)
    order = [shown[row[0][2]]["map@r"] for row in table[1:]]
    assert order == sorted(order) and order[0] == min(expected["map@r"].values())


def test_the_grid_shows_the_worst_queries_with_their_top_results(run: Path, page: tuple[str, Page]) -> None:
    """Thumbnails: N × (1 + k). The queries and their results are those of an independent exact cosine
    search (scikit-learn) on the checkpoint's test embeddings, ranked worst first by hits in the top k."""
    from sklearn.neighbors import NearestNeighbors

    _, parsed = page
    thumbs = [image for image in parsed.images if image["_table"] == "worst-queries"]
    assert len(thumbs) == WORST * (1 + TOP)
    x, y, _ = checkpoint_test_embeddings(run / "best.pt")
    x, y = x.numpy().astype(np.float64), y.numpy()
    neighbours = (
        NearestNeighbors(n_neighbors=TOP + 1, metric="cosine").fit(x).kneighbors(x, return_distance=False)
    )
    neighbours = np.array([row[row != q][:TOP] for q, row in enumerate(neighbours)])  # leave-one-out
    relevant = y[neighbours] == y[:, None]
    hits = relevant.sum(axis=1)
    first = np.where(relevant.any(axis=1), relevant.argmax(axis=1), TOP)
    order = np.lexsort((np.arange(len(y)), TOP - first, hits))  # fewest hits, later first hit, lower index
    rows = parsed.tables["worst-queries"]
    assert len(rows) == WORST
    names = build_dataset("synthetic", **TINY_DATA).test.class_names
    for row, attrs, q in zip(rows, parsed.row_attrs["worst-queries"], order[:WORST], strict=True):
        assert int(attrs["data-hits"]) == hits[q]
        captions = [cell[2] for cell in row]
        assert captions[0] == f"query · {names[y[q]]}"
        shown_classes = [caption.split(" ")[1] for caption in captions[1:]]
        assert shown_classes == [names[y[g]] for g in neighbours[q]]
    kinds = [image["class"].split()[1] for image in thumbs]
    assert kinds[:: TOP + 1] == ["query"] * WORST
    result_kinds = [kind for i, kind in enumerate(kinds) if i % (TOP + 1)]
    assert result_kinds == ["hit" if r else "miss" for q in order[:WORST] for r in relevant[q]]


def test_curves_skip_missing_and_non_finite_values_and_flags() -> None:
    history = [
        {"epoch": 1, "step": 3, "lr": 0.1, "head_lr": 1.0, "train_loss": 2.0, "backbone_frozen": True},
        {"epoch": 2, "step": 6, "lr": 0.05, "head_lr": 0.5, "train_loss": None, "val/recall@1": 0.5},
        {"epoch": 3, "step": 9, "lr": 0.0, "head_lr": 0.0, "train_loss": 1.0},
        {"epoch": 4, "step": 12, "lr": 0.0, "head_lr": 0.0, "train_loss": 0.5, "val/recall@1": 0.75},
    ]
    found = {curve.slug: curve for curve in curves(history)}
    assert list(found) == ["loss", "lr", "val-recall-1"]  # no epoch/step curve, no flag curve
    assert found["loss"].series == {"train_loss": [(1, 2.0), (3, 1.0), (4, 0.5)]}
    assert list(found["lr"].series) == ["lr", "head_lr"]
    assert found["val-recall-1"].series == {"val/recall@1": [(2, 0.5), (4, 0.75)]}
    assert found["val-recall-1"].group == "validation"


def test_a_query_gallery_split(tmp_path: Path) -> None:
    """An OML CSV whose test split has queries, gallery items and items that are both: the grid shows
    queries against gallery items only, an item never retrieves itself, and an item that is both has one
    retrievable item fewer (an empty slot)."""
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    rows = []
    flags = [(True, False), (True, False), (False, True), (True, True)]
    for label, split in [*((c, "train") for c in range(6)), (6, "validation"), (7, "validation"),
                         *((c, "test") for c in (8, 9, 10))]:  # fmt: skip
        for j in range(4):
            path = f"images/{label}_{j}.png"
            pixels = rng.integers(0, 64, size=(16, 16, 3)) + 30 * (label % 6)
            Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / path)
            query, gallery = flags[j] if split != "train" else ("", "")
            rows.append(
                {"label": label, "path": path, "split": split, "is_query": query, "is_gallery": gallery}
            )
    with (tmp_path / "items.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    argv = ["train", "--dataset", "csv", "--data-root", str(tmp_path / "items.csv"), "--image-size", "16",
            "--epochs", "1", "--embedding-size", "8", "--batch-size", "8", "--samples-per-class", "4",
            "--no-progress", "--metrics", "recall@1,map@r", "--output-dir", str(tmp_path), "--name", "qg",
            "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    _, parsed = report(tmp_path / "qg", "--worst", "20", "--top", "6", "--device", "cpu")
    test_rows = [row for row in rows if row["split"] == "test"]
    queries = {row["path"] for row in test_rows if row["is_query"]}
    gallery = {row["path"] for row in test_rows if row["is_gallery"]}
    both = queries & gallery
    grid = parsed.tables["worst-queries"]
    assert len(grid) == len(queries) == 9  # every query has a relevant gallery item
    thumbs = [image for image in parsed.images if image["_table"] == "worst-queries"]
    assert len(thumbs) == 9 * (1 + 6) - len(both)
    for index in range(len(grid)):
        query, *shown = [image["title"] for image in thumbs if image["_row"] == str(index)]
        assert query in queries and set(shown) <= gallery and query not in shown
        assert len(shown) == 6 - (query in both)


# ------------------------------------------------------------------------------------------------ escaping
def test_strings_from_the_run_are_escaped(run: Path, tmp_path: Path) -> None:
    hostile = copy_run(run, tmp_path / "hostile", TEXT_ONLY)
    config = yaml.safe_load((hostile / "config.yaml").read_text())
    config["run"]["name"] = '<script>alert("name")</script>'
    config["data"]["dataset"]["args"]["note"] = '"><img src=x onerror=alert(1)>'
    (hostile / "config.yaml").write_text(yaml.safe_dump(config))
    rows = [json.loads(line) for line in (hostile / "history.jsonl").read_text().splitlines()]
    rows = [{**row, "<b>column</b>": 1.0} for row in rows]
    (hostile / "history.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    results = json.loads((hostile / "results.json").read_text())
    results["test_before"]["<i>metric</i>"] = 0.5
    results["per_class"] = {"map@r": {"<u>class</u>": 0.25}}
    (hostile / "results.json").write_text(json.dumps(results))
    (hostile / "train.log").write_text("<script>alert('log')</script>\n")

    text, parsed = report(hostile, "--no-examples")
    assert "<script" not in text and "<img src=x" not in text and "<b>column" not in text
    assert "<i>metric" not in text and "<u>class" not in text
    assert "&lt;script&gt;alert(&quot;name&quot;)&lt;/script&gt;" in text
    assert "&quot;&gt;&lt;img src=x onerror=alert(1)&gt;" in text
    assert parsed.tables["per-class"][1][0][2] == "<u>class</u>"  # shown as text
    assert all(image["src"].startswith("data:image/") for image in parsed.images)


# -------------------------------------------------------------------------------------------- degenerate runs
def test_a_run_killed_in_its_first_epoch(run: Path, tmp_path: Path) -> None:
    """Only config.yaml and the log: the page says what is missing; with last.pt (saved by an interrupt)
    the test split is re-embedded with it."""
    killed = copy_run(run, tmp_path / "killed", ("config.yaml", "train.log"))
    text, parsed = report(killed)
    notes = " ".join(row for row in re.findall(r"<li>(.*?)</li>", text))
    assert "no epoch has finished" in notes and "no results.json" in notes and "no checkpoint" in notes
    assert not parsed.images and "test-table" not in parsed.tables and "worst-queries" not in parsed.tables
    assert "not finished: no epoch recorded" in text

    shutil.copy2(run / "last.pt", killed / "last.pt")
    (killed / "history.jsonl").write_text("")
    text, parsed = report(killed, "--worst", "2", "--top", "3")
    assert "no best.pt yet" in text and "last.pt" in text
    assert len([i for i in parsed.images if i["_table"] == "worst-queries"]) == 2 * (1 + 3)
    assert "per-class" in parsed.tables and "curve-loss" not in parsed.ids


def test_a_run_without_validation(tmp_path: Path) -> None:
    assert main(["train", *tiny_argv(tmp_path, name="noval", epochs=1), "--val-fraction", "0"]) == 0
    text, parsed = report(tmp_path / "noval", "--no-examples")
    assert "no validation metrics in the history" in text
    assert "curve-loss" in parsed.ids and not [i for i in parsed.ids if i.startswith("curve-val")]
    assert "test-table" in parsed.tables


def test_a_run_without_results_or_test_results(run: Path, tmp_path: Path) -> None:
    unfinished = copy_run(run, tmp_path / "unfinished", ("config.yaml", "history.jsonl"))
    text, parsed = report(unfinished, "--no-examples")
    assert "no results.json" in text and "test-table" not in parsed.tables
    assert "not finished: 2 epoch(s) recorded" in text and "curve-loss" in parsed.ids
    assert "no per-class table" in text and "No retrieval grid" in text

    (unfinished / "results.json").write_text(json.dumps({"best_epoch": 2, "wall_time_s": 1.0}))
    text, parsed = report(unfinished, "--no-examples")
    assert "holds no test results" in text and "test-table" not in parsed.tables


def test_no_examples_takes_per_class_values_from_results_json(run: Path, tmp_path: Path) -> None:
    stored = copy_run(run, tmp_path / "stored", TEXT_ONLY)
    results = json.loads((stored / "results.json").read_text())
    results["per_class"] = {"map@r": {"a": 0.5, "b": 0.25, "c": float("nan")}, "recall@1": {"a": 1, "b": 0}}
    (stored / "results.json").write_text(json.dumps(results))
    _, parsed = report(stored, "--no-examples", "--max-classes", "2")
    rows = parsed.tables["per-class"][1:]
    assert [row[0][2] for row in rows] == ["b", "a"]  # worst first, the undefined value last (cut off)
    assert "worst-queries" not in parsed.tables

    results["per_class"] = {"map@r": {"a": "high"}}
    (stored / "results.json").write_text(json.dumps(results))
    assert main(["report", str(stored), "--no-examples"]) == 1


def test_history_lines(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An unterminated last line (a kill while writing it) is noted; a malformed line elsewhere is an error
    naming the file and line."""
    partial = copy_run(run, tmp_path / "partial", ("config.yaml", "history.jsonl"))
    history = partial / "history.jsonl"
    history.write_text(history.read_text() + '{"epoch": 3, "train_l')
    text, parsed = report(partial, "--no-examples")
    assert "last line is incomplete" in text and "curve-loss" in parsed.ids
    history.write_text('{"epoch": 1}\nnot json\n{"epoch": 2}\n')
    capsys.readouterr()
    assert main(["report", str(partial), "--no-examples"]) == 1
    assert f"{history}, line 2: not valid JSON" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ errors
def test_a_folder_that_is_no_run_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    for path, says in (
        (tmp_path / "empty", "no config.yaml there"),
        (tmp_path / "absent", "does not exist"),
    ):
        capsys.readouterr()
        assert main(["report", str(path)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("dmlkit report: error:") and str(path) in err and says in err


def test_bad_options_fail_before_anything_is_loaded(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import dmlkit.report.builder as builder

    def never(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the test split was re-embedded before the options were checked")

    monkeypatch.setattr(builder, "evaluate_test_split", never)
    no_last = copy_run(run, tmp_path / "no_last", ("config.yaml", "best.pt"))
    for options, says in ((["--worst", "0"], "--worst"), (["--checkpoint", "newest"], "--checkpoint")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as parsed:  # refused while the arguments are parsed
            main(["report", str(run), *options])
        assert parsed.value.code == 2 and says in capsys.readouterr().err
    device = "nonsense" if _cuda() else "cuda:7"
    for options, says in ((["--out", str(tmp_path)], "is a folder"), (["--device", device], "device")):
        capsys.readouterr()
        assert main(["report", str(run), *options]) == 2, options
        assert says in capsys.readouterr().err
    capsys.readouterr()
    assert main(["report", str(no_last), "--checkpoint", "last"]) == 1
    assert f"{no_last / 'last.pt'} does not exist" in capsys.readouterr().err


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_missing_matplotlib_names_the_extra(
    run: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert main(["report", str(run), "--no-examples"]) == 2
    assert "pip install 'dmlkit[plot]'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ browser
#: Read off the loaded page: every image decoded (complete, with a width), inline SVGs, and any resource
#: the page fetched from somewhere other than itself.
CHECK = """JSON.stringify({
  images: [...document.images].map(i => ({
    ok: i.complete && i.naturalWidth > 0, id: i.closest('figure, table')?.id,
  })),
  svgs: document.querySelectorAll('svg').length,
  fetched: performance.getEntriesByType('resource').map(e => e.name).filter(n => !n.startsWith('data:')),
  title: document.title,
})"""


def test_the_page_loads_in_headless_chromium(page: tuple[str, Page], run: Path) -> None:
    from headless_browser import file_url, find_browser, load

    browser = find_browser()
    if browser is None:
        pytest.skip(
            "no headless browser (chromium, chromium-browser, google-chrome) on PATH: install Debian's "
            "chromium package as root: apt-get install -y --no-install-recommends chromium"
        )
    loaded = load(browser, file_url(run / "report.html"), CHECK, timeout=90)
    assert loaded.errors == []
    images = loaded.value["images"]
    assert len(images) == len(page[1].images) and all(image["ok"] for image in images)
    assert sum(image["id"] == "worst-queries" for image in images) == WORST * (1 + TOP)
    assert loaded.value["fetched"] == [] and loaded.value["title"] == "dmlkit report: seen"
    assert loaded.value["svgs"] == 0  # curves are PNG images (counted above), not inline SVG


def test_the_browser_check_catches_a_broken_page(tmp_path: Path) -> None:
    """The Chromium check itself can fail: a missing image, a script error and a bad data URI are seen."""
    from headless_browser import file_url, find_browser, load

    browser = find_browser()
    if browser is None:
        pytest.skip("no headless browser on PATH (see test_the_page_loads_in_headless_chromium)")
    broken = tmp_path / "broken.html"
    broken.write_text(
        '<!DOCTYPE html><html><body><img src="missing.png"><img src="data:image/png;base64,AAAA">'
        "<script>undefinedFunction()</script></body></html>"
    )
    loaded = load(browser, file_url(broken), CHECK, timeout=90)
    assert any("ERR_FILE_NOT_FOUND" in error for error in loaded.errors)
    assert any("undefinedFunction" in error for error in loaded.errors)
    assert [image["ok"] for image in loaded.value["images"]] == [False, False]
