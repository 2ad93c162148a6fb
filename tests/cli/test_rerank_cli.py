"""`dmlkit eval --rerank` (proposed wiring): a split evaluation and the revisited fixture, checked against
dmlkit.search.rerank on embeddings computed here independently of the command."""

from __future__ import annotations

from pathlib import Path

import pytest

# The trained checkpoint and the revisited fixture of the landmark CLI tests (fixtures imported by name).
from test_landmarks_cli import BBX, GND, N_GALLERY, _embed, _eval, _open, revisited, trained_run  # noqa: F401

from dmlkit.cli import main
from dmlkit.metrics import revisited_map
from dmlkit.search import rerank
from tests_support import checkpoint_test_embeddings


def test_eval_rerank_matches_the_python_pipeline(trained_run: Path, capsys) -> None:  # noqa: F811
    steps = ["dba:k=2", "aqe:alpha=3,k=2", "k_reciprocal:k1=6,k2=2,candidates=20"]
    argv = ["--checkpoint", str(trained_run), "--metrics", "recall@1,map@r"]
    plain = _eval(capsys, *argv)
    report = _eval(capsys, *argv, *[a for s in steps for a in ("--rerank", s)])
    x, y, _ = checkpoint_test_embeddings(trained_run)
    expected = rerank.evaluate(x, y, steps=steps, metrics=["recall@1", "map@r"], distance="euclidean")
    assert report["metrics"] == pytest.approx(expected.metrics, abs=1e-9)
    specs = [rerank.parse_spec(s) for s in steps]
    assert report["rerank"] == [rerank.build(name, **options).spec() for name, options in specs]
    assert plain["rerank"] == [] and plain["metrics"] != report["metrics"]
    # pcaw without state= is fitted on the training split
    assert _eval(capsys, *argv, "--rerank", "pcaw:dim=8")["rerank"] == ["pcaw:dim=8,power=1.0,normalize=True"]


def test_eval_rerank_errors(trained_run: Path, revisited, capsys) -> None:  # noqa: F811
    for bad, culprit in (("aqe:alpah=3", "did you mean 'alpha'"), ("aqx", "aqe"), ("aqe:k=-1", "k must be")):
        with pytest.raises(SystemExit):  # argparse: argument --rerank: ...
            main(["eval", "--checkpoint", str(trained_run), "--rerank", bad, "--no-progress"])
        assert "argument --rerank" in (err := capsys.readouterr().err) and culprit in err, err
    gnd = str(revisited["root"] / "gnd_tiny.json")
    images = str(revisited["images"])
    argv = ["--revisited", gnd, "--images", images, "--image-ext", "png", "--rerank", "pcaw", "--no-progress"]
    code = main(["eval", "--checkpoint", str(trained_run), *argv])
    assert code == 2 and "needs state=FILE" in capsys.readouterr().err


def test_revisited_rerank(trained_run: Path, revisited, capsys) -> None:  # noqa: F811
    images = revisited["images"]
    gallery = _embed(trained_run, [_open(images / f"{n}.png") for n in revisited["imlist"]])
    query = _embed(trained_run, [_open(images / f"{n}.png", BBX) for n in revisited["qimlist"]])
    gnd = str(revisited["root"] / "gnd_tiny.json")
    base = [
        "--checkpoint",
        str(trained_run),
        "--revisited",
        gnd,
        "--images",
        str(images),
        "--image-ext",
        "png",
    ]
    for steps in (["aqe:k=1"], ["dba:k=2", "aqe:k=2"], ["k_reciprocal:k1=4,k2=2"]):
        report = _eval(capsys, *base, *[a for s in steps for a in ("--rerank", s)])
        ranked = rerank.search(query, gallery, steps=steps, k=N_GALLERY, distance="euclidean")
        assert report["metrics"] == pytest.approx(revisited_map(GND, ranked).metrics, abs=1e-9)
