"""`dmlkit eval --revisited / --gldv2` on tiny synthetic benchmarks written in the official file layouts,
checked against embeddings and brute-force metrics computed here independently of the command."""

from __future__ import annotations

import csv
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dmlkit.cli import main
from dmlkit.data import transforms
from dmlkit.inference import compute_embeddings, load_model
from dmlkit.metrics import gldv2_map, revisited_map
from tests_support import tiny_argv

N_GALLERY = 12
#: Query i shows gallery image REGION_OF[i] inside its box; PIL rounds the box to (4, 3, 20, 19): 16 × 16.
BBX = [4.4, 2.6, 20.4, 18.6]
REGION_OF = [0, 4, 8]
GND = [
    {"easy": [0, 1, 5], "hard": [7], "junk": [2]},
    {"easy": [], "hard": [4, 9], "junk": [10, 3]},  # no easy positive: left out of the easy protocol
    {"easy": [8, 6], "hard": [], "junk": [11]},  # no hard positive: left out of the hard protocol
]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("landmarks")
    argv = [*tiny_argv(out / "runs", name="lm", epochs=1), "--eval-distance", "euclidean"]
    assert main(["train", *argv]) == 0
    return out / "runs" / "lm" / "best.pt"


def _pixels(rng: np.random.Generator, size: int) -> np.ndarray:
    return rng.integers(0, 256, (size, size), dtype=np.uint8)


@pytest.fixture(scope="module")
def revisited(tmp_path_factory) -> dict:
    """revisitop's layout: jpg folder (PNG files here, lossless), gnd as .pkl and .json."""
    root = tmp_path_factory.mktemp("roxford")
    images = root / "jpg"
    images.mkdir()
    rng = np.random.default_rng(0)
    gallery = [_pixels(rng, 16) for _ in range(N_GALLERY)]
    imlist = [f"gallery_{i:02d}" for i in range(N_GALLERY)]
    for name, pixels in zip(imlist, gallery, strict=True):
        Image.fromarray(pixels).save(images / f"{name}.png")
    qimlist = [f"query_{i}" for i in range(len(GND))]
    for name, region in zip(qimlist, REGION_OF, strict=True):
        pixels = _pixels(rng, 24)
        pixels[3:19, 4:20] = gallery[region]
        Image.fromarray(pixels).save(images / f"{name}.png")
    gnd = [{"bbx": list(BBX), **entry} for entry in GND]
    data = {"imlist": imlist, "qimlist": qimlist, "gnd": gnd}
    (root / "gnd_tiny.json").write_text(json.dumps(data))
    # revisitop's pickles hold numpy arrays in places: one list here is an int64 array.
    pickled = {**data, "gnd": [dict(e) for e in gnd]}
    pickled["gnd"][0]["easy"] = np.array(pickled["gnd"][0]["easy"], dtype=np.int64)
    with (root / "gnd_tiny.pkl").open("wb") as handle:
        pickle.dump(pickled, handle)
    return {"root": root, "images": images, "imlist": imlist, "qimlist": qimlist, "data": data}


class _PilImages(torch.utils.data.Dataset):
    def __init__(self, images: list[Image.Image], transform) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.transform(self.images[index]), -1, index


def _embed(checkpoint_path: Path, images: list[Image.Image]) -> torch.Tensor:
    model, checkpoint = load_model(checkpoint_path, torch.device("cpu"))
    transform = transforms.build("eval", **checkpoint["data_spec"])
    return compute_embeddings(model, _PilImages(images, transform))[0]


def _open(path: Path, box: list[float] | None = None) -> Image.Image:
    with Image.open(path) as image:
        image = image.convert("L")  # the tiny model is grayscale
    return image.crop(box) if box is not None else image


def _ranks(query: torch.Tensor, gallery: torch.Tensor) -> np.ndarray:
    """revisitop's ranks (db × nq), from Euclidean distances (the checkpoint's eval_distance)."""
    d = ((query.double()[:, None, :] - gallery.double()[None]) ** 2).sum(-1).numpy()
    return np.argsort(d, axis=1, kind="stable").T


def _revisitop_compute_ap(ranks: np.ndarray, nres: int) -> float:
    """revisitop's ``compute_ap``: trapezoids of the precision-recall curve."""
    ap = 0.0
    recall_step = 1.0 / nres
    for j, rank in enumerate(ranks):
        precision_0 = 1.0 if rank == 0 else j / rank
        precision_1 = (j + 1) / (rank + 1)
        ap += (precision_0 + precision_1) * recall_step / 2.0
    return ap


def _revisitop_compute_map(ranks: np.ndarray, gnd: list[dict], kappas=(1, 5, 10)):
    """revisitop's ``compute_map`` (ranks: db × nq; gnd entries with 'ok' and 'junk'), loops kept."""
    aps, prs, nempty = [], [], 0
    for i, entry in enumerate(gnd):
        qgnd = np.array(entry["ok"])
        if qgnd.shape[0] == 0:
            nempty += 1
            continue
        qgndj = np.array(entry["junk"])
        pos = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgnd)]
        junk = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgndj)]
        k = ij = 0
        if len(junk):
            for ip in range(len(pos)):
                while ij < len(junk) and pos[ip] > junk[ij]:
                    k += 1
                    ij += 1
                pos[ip] = pos[ip] - k
        aps.append(_revisitop_compute_ap(pos, len(qgnd)))
        pos = pos + 1
        prs.append([(pos <= min(max(pos), kappa)).sum() / min(max(pos), kappa) for kappa in kappas])
    return float(np.mean(aps)), np.mean(prs, axis=0), nempty


def _protocol_gnd(protocol: str) -> list[dict]:
    ok, junk = {"easy": (("easy",), ("junk", "hard")), "medium": (("easy", "hard"), ("junk",)),
                "hard": (("hard",), ("junk", "easy"))}[protocol]  # fmt: skip
    return [{"ok": [i for k in ok for i in e[k]], "junk": [i for k in junk for i in e[k]]} for e in GND]


def _eval(capsys, *argv: str) -> dict:
    capsys.readouterr()
    assert main(["eval", *argv, "--json", "--no-progress"]) == 0
    return json.loads(capsys.readouterr().out)


# ---------------------------------------------------------------------------------------------------------
# Revisited Oxford / Paris
# ---------------------------------------------------------------------------------------------------------


def test_revisited_matches_independent_embeddings_and_revisitop(trained_run: Path, revisited, capsys) -> None:
    images = revisited["images"]
    gallery = _embed(trained_run, [_open(images / f"{n}.png") for n in revisited["imlist"]])
    cropped = _embed(trained_run, [_open(images / f"{n}.png", BBX) for n in revisited["qimlist"]])
    whole = _embed(trained_run, [_open(images / f"{n}.png") for n in revisited["qimlist"]])
    # The crop is what revisitop's protocol embeds: each cropped query is exactly its gallery image.
    torch.testing.assert_close(cropped, gallery[REGION_OF])
    assert not torch.allclose(whole, gallery[REGION_OF], atol=1e-3)

    expected = revisited_map(GND, query=cropped, gallery=gallery, distance="euclidean")
    argv = ["--checkpoint", str(trained_run), "--images", str(images)]
    for gnd_file in ("gnd_tiny.pkl", "gnd_tiny.json"):
        report = _eval(capsys, *argv, "--revisited", str(revisited["root"] / gnd_file), "--image-ext", "png")
        assert report["protocol"] == "revisited" and report["distance"] == "euclidean"  # the checkpoint's
        assert (report["num_queries"], report["num_gallery"], report["query_crop"]) == (3, N_GALLERY, True)
        assert report["metrics"] == pytest.approx(expected.metrics, abs=1e-9)
        assert report["num_queries_without_relevant"] == {"easy": 1, "medium": 0, "hard": 1}
        assert set(report["metrics"]) == {f"{p}/{m}" for p in ("easy", "medium", "hard")
                                          for m in ("map", "mp@1", "mp@5", "mp@10")}  # fmt: skip

    # An independent implementation of revisitop's compute_map on the same ranking.
    ranks = _ranks(cropped, gallery)
    for protocol in ("easy", "medium", "hard"):
        mean_ap, mean_pr, nempty = _revisitop_compute_map(ranks, _protocol_gnd(protocol))
        assert report["metrics"][f"{protocol}/map"] == pytest.approx(mean_ap, abs=1e-9)
        for kappa, value in zip((1, 5, 10), mean_pr, strict=True):
            assert report["metrics"][f"{protocol}/mp@{kappa}"] == pytest.approx(value, abs=1e-9)
        assert report["num_queries_without_relevant"][protocol] == nempty
    # Every query's first neighbour is the gallery image inside its box, a positive under medium.
    assert report["metrics"]["medium/mp@1"] == 1.0

    uncropped = _eval(capsys, *argv, "--revisited", str(revisited["root"] / "gnd_tiny.json"), "--image-ext",
                      ".png", "--no-query-crop")  # fmt: skip
    reference = revisited_map(GND, query=whole, gallery=gallery, distance="euclidean")
    assert uncropped["query_crop"] is False
    assert uncropped["metrics"] == pytest.approx(reference.metrics, abs=1e-9)
    assert uncropped["metrics"] != pytest.approx(report["metrics"], abs=1e-9)


def test_revisited_table_and_distance_option(trained_run: Path, revisited, capsys) -> None:
    capsys.readouterr()
    gnd = str(revisited["root"] / "gnd_tiny.pkl")
    assert main(["eval", "--checkpoint", str(trained_run), "--revisited", gnd, "--images",
                 str(revisited["images"]), "--image-ext", "png", "--distance", "dot",
                 "--no-progress"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "3 queries (cropped to bbx), 12 gallery images, dot" in out
    assert "medium/map" in out and "hard/mp@10" in out and "queries without positive (easy)" in out


def _write_gnd(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_revisited_errors_name_the_culprit(
    trained_run: Path, revisited, tmp_path: Path, capsys, monkeypatch
) -> None:
    import dmlkit.cli.common as cli_common

    def no_embedding(*args, **kwargs):
        raise AssertionError("embedding started before the inputs were checked")

    monkeypatch.setattr(cli_common, "compute_embeddings", no_embedding)
    data = revisited["data"]
    base = ["eval", "--checkpoint", str(trained_run), "--no-progress"]

    def run(gnd: Path, *extra: str) -> tuple[int, str]:
        capsys.readouterr()
        code = main([*base, "--revisited", str(gnd), "--images", str(revisited["images"]), "--image-ext",
                     "png", *extra])  # fmt: skip
        return code, capsys.readouterr().err

    # A missing image is named, before any embedding (default extension .jpg: none exists).
    capsys.readouterr()
    assert main([*base, "--revisited", str(revisited["root"] / "gnd_tiny.json"), "--images",
                 str(revisited["images"])]) == 1  # fmt: skip
    err = capsys.readouterr().err
    assert "12 of 12 gallery image files not found" in err and "gallery_00.jpg" in err
    folder = tmp_path / "jpg"
    folder.mkdir()
    for name in [*data["imlist"], *data["qimlist"]]:
        if name != "query_1":
            (folder / f"{name}.png").write_bytes((revisited["images"] / f"{name}.png").read_bytes())
    capsys.readouterr()
    assert main([*base, "--revisited", str(revisited["root"] / "gnd_tiny.pkl"), "--images", str(folder),
                 "--image-ext", "png"]) == 1  # fmt: skip
    err = capsys.readouterr().err
    assert "1 of 3 query image files not found" in err and str(folder / "query_1.png") in err

    # Gallery index out of range, named with the file, the query and the key.
    bad = {**data, "gnd": [dict(e) for e in data["gnd"]]}
    bad["gnd"][1]["junk"] = [3, 12]
    code, err = run(_write_gnd(tmp_path / "range.json", bad))
    assert code == 1
    assert "range.json" in err and "gnd[1] (query 'query_1')['junk']" in err and "index 12" in err

    # Missing keys: top level and per query.
    code, err = run(_write_gnd(tmp_path / "noq.json", {"imlist": data["imlist"], "gnd": data["gnd"]}))
    assert code == 1 and "noq.json" in err and "missing key 'qimlist'" in err
    bad = {**data, "gnd": [dict(e) for e in data["gnd"]]}
    del bad["gnd"][2]["hard"]
    code, err = run(_write_gnd(tmp_path / "nohard.json", bad))
    assert code == 1 and "nohard.json" in err and "gnd[2] (query 'query_2') has no key 'hard'" in err
    bad = {**data, "gnd": [dict(e) for e in data["gnd"]]}
    del bad["gnd"][0]["bbx"]
    code, err = run(_write_gnd(tmp_path / "nobbx.json", bad))
    assert code == 1 and "no 'bbx'" in err and "--no-query-crop" in err

    # len(gnd) != len(qimlist); an index in two lists; a broken pickle.
    code, err = run(_write_gnd(tmp_path / "short.json", {**data, "gnd": data["gnd"][:2]}))
    assert code == 1 and "'gnd' has 2 entries but 'qimlist' has 3 queries" in err
    bad = {**data, "gnd": [dict(e) for e in data["gnd"]]}
    bad["gnd"][0]["junk"] = [2, 7]
    code, err = run(_write_gnd(tmp_path / "twice.json", bad))
    assert code == 1 and "gallery index 7 is in both 'hard' and 'junk'" in err
    (tmp_path / "broken.pkl").write_bytes(b"not a pickle")
    code, err = run(tmp_path / "broken.pkl")
    assert code == 1 and "broken.pkl" in err


def test_landmark_options_conflicts(trained_run: Path, revisited, tmp_path: Path, capsys) -> None:
    gnd = str(revisited["root"] / "gnd_tiny.json")
    base = ["eval", "--checkpoint", str(trained_run), "--no-progress"]
    for extra, culprit in (
        (["--metrics", "recall@1"], "--metrics"),
        (["--dataset", "synthetic"], "--dataset"),
        (["--split", "val"], "--split"),
        (["--backend", "faiss-flat"], "--backend faiss-flat"),
        (["--usage", "public"], "--usage"),
    ):
        capsys.readouterr()
        assert main([*base, "--revisited", gnd, "--images", str(revisited["images"]), *extra]) == 2
        assert culprit in capsys.readouterr().err
    capsys.readouterr()
    assert main([*base, "--revisited", gnd]) == 2
    assert "--revisited needs --images" in capsys.readouterr().err
    assert main([*base, "--images", str(revisited["images"])]) == 2
    assert "--images only apply with --revisited or --gldv2" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main([*base, "--revisited", gnd, "--gldv2", str(tmp_path / "solution.csv")])
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
    capsys.readouterr()
    assert main([*base, "--gldv2", str(tmp_path / "s.csv"), "--query-images", str(tmp_path)]) == 2
    assert "--gldv2 needs --index-images" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# Google Landmarks v2
# ---------------------------------------------------------------------------------------------------------

INDEX_IDS = [f"{i:x}{(7 * i) % 16:x}{(3 * i) % 16:x}0d{i:011x}" for i in range(1, 15)]
#: query id → (images column, Usage)
SOLUTION = {
    "a1b2c3d4e5f60001": (f"{INDEX_IDS[0]} {INDEX_IDS[3]}", "Public"),
    "a1b2c3d4e5f60002": (INDEX_IDS[5], "Public"),
    "b2c3d4e5f6a70003": (f"{INDEX_IDS[1]} {INDEX_IDS[2]} {INDEX_IDS[7]}", "Private"),
    "b2c3d4e5f6a70004": ("None", "Private"),
    "c3d4e5f6a7b80005": (f"{INDEX_IDS[9]} {INDEX_IDS[13]}", "Private"),
    "c3d4e5f6a7b80006": ("None", "Ignored"),  # no image on disk: never read
}


def _gldv2_path(root: Path, image_id: str) -> Path:
    return root / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg"


@pytest.fixture(scope="module")
def gldv2(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("gldv2")
    rng = np.random.default_rng(1)
    for folder, ids in (("index", INDEX_IDS), ("test", [q for q in SOLUTION if q != "c3d4e5f6a7b80006"])):
        for image_id in ids:
            path = _gldv2_path(root / folder, image_id)
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(_pixels(rng, 16)).save(path)
    solution = root / "retrieval_solution_v2.1.csv"
    with solution.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "images", "Usage"])
        writer.writerows([query, images, usage] for query, (images, usage) in SOLUTION.items())
    return {"root": root, "solution": solution, "index": root / "index", "test": root / "test"}


def _brute_force_map100(query: torch.Tensor, gallery: torch.Tensor, relevant: list[list[int]]) -> tuple:
    d = ((query.double()[:, None, :] - gallery.double()[None]) ** 2).sum(-1).numpy()
    aps, without = [], 0
    for row, rel in zip(d, relevant, strict=True):
        if not rel:
            without += 1
            continue
        order = np.argsort(row, kind="stable")[:100]
        hits, total = 0, 0.0
        for k, index in enumerate(order, start=1):
            if index in rel:
                hits += 1
                total += hits / k
        aps.append(total / min(len(rel), 100))
    return float(np.mean(aps)), without


def test_gldv2_map100_and_usage(trained_run: Path, gldv2, capsys) -> None:
    index = _embed(trained_run, [_open(_gldv2_path(gldv2["index"], i)) for i in INDEX_IDS])
    position = {image_id: i for i, image_id in enumerate(INDEX_IDS)}
    argv = ["--checkpoint", str(trained_run), "--gldv2", str(gldv2["solution"]), "--query-images",
            str(gldv2["test"]), "--index-images", str(gldv2["index"])]  # fmt: skip
    for usage, wanted in (("private", {"Private"}), ("public", {"Public"}), ("all", {"Public", "Private"})):
        report = _eval(capsys, *argv, *([] if usage == "private" else ["--usage", usage]))
        queries = [q for q, (_, u) in SOLUTION.items() if u in wanted]
        query = _embed(trained_run, [_open(_gldv2_path(gldv2["test"], q)) for q in queries])
        relevant = [[position[i] for i in SOLUTION[q][0].split()] if SOLUTION[q][0] != "None" else []
                    for q in queries]  # fmt: skip
        expected, without = _brute_force_map100(query, index, relevant)
        assert report["protocol"] == "gldv2" and report["usage"] == usage
        assert (report["num_queries"], report["num_gallery"]) == (len(queries), len(INDEX_IDS))
        assert (report["distance"], report["backend"]) == ("euclidean", "torch")
        assert report["metrics"]["map@100"] == pytest.approx(expected, abs=1e-9)
        assert report["num_queries_without_relevant"] == {"map@100": without}
        reference = gldv2_map(relevant, query=query, gallery=index, distance="euclidean")
        assert report["metrics"]["map@100"] == pytest.approx(reference["map@100"], abs=1e-9)
    assert without == 1  # the Private "None" query, counted and left out


def test_gldv2_errors_name_the_culprit(trained_run: Path, gldv2, tmp_path: Path, capsys) -> None:
    absent = "f0f0f0f0f0f0f0f0"
    solution = tmp_path / "solution.csv"
    solution.write_text(
        gldv2["solution"].read_text().replace(f"{INDEX_IDS[9]} {INDEX_IDS[13]}", f"{INDEX_IDS[9]} {absent}")
    )
    base = ["eval", "--checkpoint", str(trained_run), "--no-progress", "--query-images", str(gldv2["test"])]
    capsys.readouterr()
    assert main([*base, "--gldv2", str(solution), "--index-images", str(gldv2["index"])]) == 1
    err = capsys.readouterr().err
    assert f"'{absent}'" in err and "c3d4e5f6a7b80005" in err and "solution.csv" in err
    # The same file scores fine on the public queries, which do not list the absent image.
    assert main([*base, "--gldv2", str(solution), "--index-images", str(gldv2["index"]), "--usage",
                 "public"]) == 0  # fmt: skip
    # The parent of the index folder is not in the GLDv2 layout.
    capsys.readouterr()
    assert main([*base, "--gldv2", str(gldv2["solution"]), "--index-images", str(gldv2["root"])]) == 1
    assert "not in the GLDv2 layout" in capsys.readouterr().err
    # Unknown Usage, named with its line.
    solution.write_text("id,images,Usage\nabc123,None,Secret\n")
    assert main([*base, "--gldv2", str(solution), "--index-images", str(gldv2["index"])]) == 1
    assert "line 2" in capsys.readouterr().err
    # --no-query-crop belongs to --revisited.
    assert main([*base, "--gldv2", str(gldv2["solution"]), "--index-images", str(gldv2["index"]),
                 "--no-query-crop"]) == 2  # fmt: skip
    assert "--no-query-crop only apply with --revisited" in capsys.readouterr().err
