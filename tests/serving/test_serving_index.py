"""`dmlkit index build` and `dmlkit search --index`: the index holds the checkpoint's embeddings and ids, a
build interrupted after a chunk resumes without embedding it again, new images are added alone, the kind
follows the size, and an index is never searched with another checkpoint's embeddings."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dmlkit.cli import index as index_cli
from dmlkit.cli import main
from dmlkit.cli.common import list_images
from dmlkit.errors import ConfigError, DataError
from dmlkit.metrics.clustering import faiss_available
from dmlkit.serving import index as serving_index
from dmlkit.serving.index import IndexOptions, build_index, choose_kind, fingerprint, open_index
from dmlkit.train import checkpoint as ckpt

pytestmark = pytest.mark.skipif(not faiss_available(), reason="faiss is not installed")


def build_argv(checkpoint: Path, images: Path, out: Path, *extra: str) -> list[str]:
    return ["index", "build", "--checkpoint", str(checkpoint), "--images", str(images), "--out", str(out),
            "--no-progress", *extra]  # fmt: skip


@pytest.fixture
def embedded(monkeypatch) -> list[list[str]]:
    """The file names of every embedding call of the command (one list per chunk)."""
    calls: list[list[str]] = []
    original = index_cli.compute_embeddings

    def counting(model, dataset, **kwargs):
        calls.append([p.name for p in dataset.paths])
        return original(model, dataset, **kwargs)

    monkeypatch.setattr(index_cli, "compute_embeddings", counting)
    return calls


def manifest(folder: Path) -> dict:
    return json.loads((folder / serving_index.MANIFEST).read_text())


def test_build_and_search(trained: Path, images: Path, tmp_path: Path, capsys, reference_embeddings) -> None:
    out = tmp_path / "index"
    assert main(build_argv(trained, images, out, "--chunk-size", "8")) == 0
    assert (
        "20 images (20 embedded now, 0 from earlier runs), flat index, cosine, built"
        in capsys.readouterr().out
    )
    paths, ids = list_images(images)
    recorded = manifest(out)
    assert recorded["fingerprint"] == fingerprint(ckpt.load(trained))
    assert recorded["checkpoint"] == str(trained.resolve())
    assert [c["count"] for c in recorded["chunks"]] == [8, 8, 4]
    assert recorded["index"]["kind"] == "flat" and recorded["index"]["count"] == 20

    gallery = open_index(out)
    assert gallery.ids == ids and "sub/img_00.png" in ids
    expected = reference_embeddings(trained, paths)
    stored = np.concatenate([np.load(out / c["file"])["embeddings"] for c in recorded["chunks"]])
    np.testing.assert_allclose(stored, expected, atol=1e-6)

    query = images / "img_05.png"
    assert main(["search", "--index", str(out), "--query", str(query), "-k", "4", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert (found["distance"], found["k"]) == ("cosine", 4)
    neighbours = found["results"][0]["neighbours"]
    # an independent ranking: cosine similarities of the reference embeddings
    own = expected[ids.index("img_05.png")]
    order = np.argsort(-(expected @ own), kind="stable")[:4]
    assert [n["id"] for n in neighbours] == [ids[i] for i in order]
    np.testing.assert_allclose([n["score"] for n in neighbours], (expected @ own)[order], atol=1e-5)

    # with the checkpoint named explicitly (here its run folder): the same table
    assert main(["search", "--index", str(out), "--checkpoint", str(trained.parent), "--query", str(query),
                 "-k", "2"]) == 0  # fmt: skip
    table = capsys.readouterr().out
    assert "query: img_05.png  (cosine)" in table and "img_05.png" in table.splitlines()[2]


def test_interrupted_build_resumes_without_reembedding(
    trained: Path, images: Path, tmp_path: Path, monkeypatch, capsys, embedded
) -> None:
    """Ctrl-C while the second chunk is embedded: the first chunk is kept, the index is not searchable yet;
    the rerun embeds only the rest and ends with the same index as an uninterrupted build."""
    out = tmp_path / "index"
    counting = index_cli.compute_embeddings

    def interrupted(model, dataset, **kwargs):
        if len(embedded) == 1:
            embedded.append([p.name for p in dataset.paths])
            raise KeyboardInterrupt
        return counting(model, dataset, **kwargs)

    monkeypatch.setattr(index_cli, "compute_embeddings", interrupted)
    assert main(build_argv(trained, images, out, "--chunk-size", "6")) == 130
    first, second = embedded
    assert len(first) == 6 and len(second) == 6
    recorded = manifest(out)
    assert [c["count"] for c in recorded["chunks"]] == [6] and recorded["index"] is None
    with pytest.raises(DataError, match="has not finished"):
        open_index(out)
    assert main(["search", "--index", str(out), "--query", str(images / "img_01.png")]) == 1
    assert "has not finished" in capsys.readouterr().err
    # what a crash in the middle of a write leaves: a temporary file and a chunk the manifest does not list
    (out / "chunks" / ".000001.npz.abc.tmp").write_bytes(b"partial")
    (out / "chunks" / "000001.npz").write_bytes(b"written but never listed")

    monkeypatch.setattr(index_cli, "compute_embeddings", counting)
    embedded.clear()
    assert main(build_argv(trained, images, out, "--chunk-size", "6")) == 0
    assert "20 images (14 embedded now, 6 from earlier runs)" in capsys.readouterr().out
    again = [name for chunk in embedded for name in chunk]
    assert sorted(again + first) == sorted(p.name for p in list_images(images)[0])  # each image once
    assert not set(again) & set(first)
    assert not list(out.glob("**/*.tmp"))

    fresh = tmp_path / "fresh"
    assert main(build_argv(trained, images, fresh, "--chunk-size", "6")) == 0
    resumed, uninterrupted = open_index(out), open_index(fresh)
    assert resumed.ids == uninterrupted.ids
    queries = torch.randn(5, 16)
    for a, b in zip(resumed.search(queries, 5), uninterrupted.search(queries, 5), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_incremental_build_embeds_only_new_images(
    trained: Path, images: Path, tmp_path: Path, capsys, embedded, write_pngs
) -> None:
    out = tmp_path / "index"
    assert main(build_argv(trained, images, out)) == 0
    first_generation = manifest(out)["index"]["file"]
    embedded.clear()
    new = write_pngs(images, ["new_a.png", "sub/new_b.png", "zz_new_c.png"], seed=7)
    (images / "img_03.png").unlink()  # gone from the folder: kept in the index, reported
    capsys.readouterr()
    assert main(build_argv(trained, images, out)) == 0
    report = capsys.readouterr().out
    assert "23 images (3 embedded now, 19 from earlier runs), flat index, cosine, extended" in report
    assert "1 indexed images are not in" in report and "img_03.png" in report
    assert embedded == [["new_a.png", "new_b.png", "zz_new_c.png"]]
    recorded = manifest(out)
    assert recorded["index"]["generation"] == 2 and recorded["index"]["count"] == 23
    assert not (out / first_generation).exists()  # the old generation is removed once replaced
    gallery = open_index(out)
    assert gallery.ids[-3:] == ["new_a.png", "sub/new_b.png", "zz_new_c.png"] and "img_03.png" in gallery.ids

    assert main(["search", "--index", str(out), "--query", str(new[1]), "-k", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["neighbours"][0]["id"] == "sub/new_b.png"

    embedded.clear()
    assert main(build_argv(trained, images, out)) == 0
    assert embedded == [] and "up to date" in capsys.readouterr().out
    # another kind: the index is rebuilt from the stored embeddings, nothing is embedded
    assert main(build_argv(trained, images, out, "--kind", "hnsw")) == 0
    report = capsys.readouterr().out
    assert embedded == [] and "0 embedded now" in report
    assert "hnsw index (hnsw_m=32, ef_construction=80, ef_search=128), cosine, rebuilt" in report
    assert type(open_index(out).index).__name__ == "IndexHNSWFlat"


def random_embed(d: int = 16, seed: int = 0):
    """A stand-in model: a fixed random vector per file name (clustered around 8 centres)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(8, d))

    def embed(paths):
        rows = []
        for path in paths:
            number = int(Path(path).stem.split("_")[-1])
            noise = np.random.default_rng(number).normal(scale=0.3, size=d)
            rows.append(centres[number % 8] + noise)
        return np.asarray(rows, dtype=np.float32)

    return embed


def fake_gallery(n: int) -> tuple[list[Path], list[str]]:
    paths = [Path(f"/nowhere/item_{i}.png") for i in range(n)]
    return paths, [p.name for p in paths]


@pytest.mark.parametrize(
    ("kind", "options", "faiss_class", "min_overlap"),
    [
        ("flat", {}, "IndexFlatL2", 1.0),
        ("hnsw", {}, "IndexHNSWFlat", 0.9),
        ("ivfpq", {}, "IndexIVFPQ", 0.4),  # 600 items: 3-bit codes (39 training points per centroid)
        ("ivfpq", {"pq_m": 8, "pq_bits": 6, "nprobe": 4}, "IndexIVFPQ", 0.8),
    ],
)
def test_every_kind_searches_like_the_exact_one(
    tmp_path: Path, kind: str, options: dict, faiss_class: str, min_overlap: float
) -> None:
    paths, ids = fake_gallery(600)
    embed = random_embed()
    report = build_index(tmp_path / kind, paths, ids, embed, fingerprint_hex="f" * 64, checkpoint_name="c.pt",
                         distance="euclidean", options=IndexOptions(kind=kind, **options),
                         chunk_size=256)  # fmt: skip
    assert (report.kind, report.total, report.embedded, report.state) == (kind, 600, 600, "built")
    assert report.params.items() >= options.items()
    gallery = open_index(tmp_path / kind)
    assert type(gallery.index).__name__ == faiss_class
    x = embed(paths)
    queries = torch.from_numpy(x[:50] + 0.01)
    scores, rows = gallery.search(queries, 10)
    exact = torch.cdist(queries, torch.from_numpy(x)).topk(10, largest=False)
    overlap = np.mean([len(set(r) & set(e)) / 10 for r, e in zip(rows, exact.indices.numpy(), strict=True)])
    if kind == "flat":
        np.testing.assert_array_equal(rows, exact.indices.numpy())
        np.testing.assert_allclose(scores, exact.values.numpy(), rtol=1e-4, atol=1e-4)
    assert overlap >= min_overlap
    assert (rows[:, 0] == np.arange(50)).mean() > 0.9  # each query finds its own item first


def test_kind_by_size_and_options() -> None:
    assert [choose_kind(n) for n in (1, 49_999, 50_000, 999_999, 1_000_000)] == [
        "flat", "flat", "hnsw", "hnsw", "ivfpq"
    ]  # fmt: skip
    kind, params = IndexOptions().resolve(4_000_000, 512)
    assert kind == "ivfpq"
    assert params == {"nlist": 8000, "nprobe": 500, "pq_m": 64, "pq_bits": 8, "seed": 0}
    assert IndexOptions().resolve(200_000, 128) == (
        "hnsw",
        {"hnsw_m": 32, "ef_construction": 80, "ef_search": 128},
    )
    assert IndexOptions(kind="ivfpq", nlist=10, pq_m=8).resolve(1000, 128)[1]["pq_m"] == 8
    with pytest.raises(ConfigError, match="pq_m=5 must divide the embedding size 128"):
        IndexOptions(kind="ivfpq", pq_m=5).resolve(1000, 128)
    with pytest.raises(ConfigError, match="nlist does not apply to a hnsw index"):
        IndexOptions(kind="hnsw", nlist=4)
    with pytest.raises(ConfigError, match="did you mean 'hnsw'"):
        IndexOptions(kind="hsnw")
    with pytest.raises(ConfigError, match="nlist=50 needs at least 50 images"):
        IndexOptions(kind="ivfpq", nlist=50).resolve(20, 16)


def test_another_checkpoint_is_refused(
    trained: Path, other_checkpoint: Path, images: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "index"
    assert main(build_argv(trained, images, out)) == 0
    query = str(images / "img_01.png")
    capsys.readouterr()
    assert main(["search", "--index", str(out), "--checkpoint", str(other_checkpoint), "--query", query]) == 2
    err = capsys.readouterr().err
    assert str(trained.resolve()) in err and str(other_checkpoint.resolve()) in err
    assert (
        fingerprint(ckpt.load(trained))[:16] in err and fingerprint(ckpt.load(other_checkpoint))[:16] in err
    )
    with pytest.raises(ConfigError, match="was built by checkpoint"):
        open_index(out).check_checkpoint(fingerprint(ckpt.load(other_checkpoint)), str(other_checkpoint))

    # building into it with another checkpoint: refused before anything is embedded
    assert main(build_argv(other_checkpoint, images, out)) == 2
    err = capsys.readouterr().err
    assert str(trained.resolve()) in err and str(other_checkpoint) in err

    # the checkpoint the index records, overwritten by another training: refused as well
    copy = tmp_path / "copy.pt"
    copy.write_bytes(trained.read_bytes())
    copied = tmp_path / "copied"
    assert main(build_argv(copy, images, copied)) == 0
    copy.write_bytes(other_checkpoint.read_bytes())
    assert main(["search", "--index", str(copied), "--query", query]) == 2
    assert "was built by checkpoint" in capsys.readouterr().err


def test_fingerprint(trained: Path) -> None:
    checkpoint = ckpt.load(trained)
    reference = fingerprint(checkpoint)
    assert len(reference) == 64 and fingerprint(ckpt.load(trained)) == reference
    assert fingerprint({**checkpoint, "optimizer": {}, "epoch": 99}) == reference  # training state: ignored
    changed = {**checkpoint, "model": dict(checkpoint["model"])}
    name = next(iter(changed["model"]))
    changed["model"][name] = changed["model"][name].clone()
    changed["model"][name].view(-1)[0] += 1e-6
    assert fingerprint(changed) != reference
    unnormalised = {**checkpoint, "model_config": {**checkpoint["model_config"], "normalize": False}}
    assert fingerprint(unnormalised) != reference
    other_mean = {**checkpoint, "data_spec": {**checkpoint["data_spec"], "mean": [0.5]}}
    assert fingerprint(other_mean) != reference
    no_weights_file = {
        **checkpoint,
        "model_config": {**checkpoint["model_config"], "pretrained_weights": "x"},
    }
    assert fingerprint(no_weights_file) == reference


def test_errors_name_the_culprit(trained: Path, images: Path, tmp_path: Path, capsys) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert main(build_argv(trained, images, busy)) == 2
    assert f"--out {busy} is a folder that holds no dmlkit index" in capsys.readouterr().err
    assert (busy / "notes.txt").read_text() == "mine"

    assert main(["search", "--index", str(tmp_path / "none"), "--query", str(images / "img_01.png")]) == 1
    assert "no dmlkit index in" in capsys.readouterr().err
    assert main(["search", "--gallery", "g.npy", "--query", str(images / "img_01.png")]) == 2
    assert "--checkpoint is required with --gallery" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["search", "--gallery", "g.npy", "--index", "x", "--query", "q.png"])
    assert "not allowed with argument" in capsys.readouterr().err
    assert main(build_argv(trained, images, tmp_path / "x", "--kind", "flat", "--nlist", "4")) == 2
    assert "nlist does not apply to a flat index" in capsys.readouterr().err

    out = tmp_path / "index"
    assert main(build_argv(trained, images, out)) == 0
    assert main(["search", "--index", str(out), "--distance", "euclidean", "--query",
                 str(images / "img_01.png")]) == 2  # fmt: skip
    assert "ranks by cosine" in capsys.readouterr().err
    # a different distance for the build: the index is rebuilt, nothing embedded
    assert main(build_argv(trained, images, out, "--distance", "euclidean")) == 0
    assert "0 embedded now" in capsys.readouterr().out and open_index(out).distance.name == "euclidean"


def test_missing_faiss_is_a_clear_error(monkeypatch, images: Path, tmp_path: Path, capsys) -> None:
    monkeypatch.setitem(sys.modules, "faiss", None)
    assert main(build_argv(tmp_path / "absent.pt", images, tmp_path / "index")) == 2
    err = capsys.readouterr().err
    assert "needs the optional package faiss" in err and "pip install 'dmlkit[faiss]'" in err


def test_write_atomic_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")

    def failing(handle):
        handle.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        serving_index.write_atomic(target, failing)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["file.bin"]
    serving_index.write_atomic(target, lambda handle: handle.write(b"new"))
    assert target.read_bytes() == b"new"
    umask = os.umask(0o022)
    try:
        serving_index.write_atomic(target, lambda handle: handle.write(b"shared"))
    finally:
        os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o644  # not mkstemp's private 0600


def test_duplicate_ids_and_bad_embeddings_are_refused(tmp_path: Path) -> None:
    paths, ids = fake_gallery(4)
    with pytest.raises(DataError, match=r"'item_1\.png' is listed twice"):
        build_index(tmp_path / "a", paths, [*ids[:3], ids[1]], random_embed(), fingerprint_hex="f",
                    checkpoint_name="c")  # fmt: skip

    def nan_embed(chunk):
        rows = np.ones((len(chunk), 4), dtype=np.float32)
        rows[-1, 0] = np.nan
        return rows

    with pytest.raises(DataError, match=r"NaN or infinite embeddings for /nowhere/item_3.png"):
        build_index(tmp_path / "b", paths, ids, nan_embed, fingerprint_hex="f", checkpoint_name="c")
