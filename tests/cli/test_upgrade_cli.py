"""``dmlkit upgrade`` end to end on the tiny synthetic data: train-bct, train-transform, train-compatible
(joint and after), simulate; every option checked before a model loads, errors naming the culprit."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dmlkit.cli import main
from dmlkit.inference import load_model
from dmlkit.upgrade import compatible, transform
from tests_support import checkpoint_test_embeddings, tiny_argv


def _train(out: Path, name: str, *extra: str, command: tuple[str, ...] = ("train",)) -> Path:
    argv = [*command, *tiny_argv(out, name=name, epochs=1), "--val-fraction", "0", *extra]
    assert main(argv) == 0, argv
    return out / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Old (narrow, 16-d) and new (wide, 16-d) models, then a BCT and a joint compatible model on the old."""
    out = tmp_path_factory.mktemp("upgrade")
    old = _train(out, "old", "--backbone-args", "{widths: [4, 8]}")
    new = _train(out, "new", "--backbone-args", "{widths: [8, 16]}", "--seed", "1")
    bct = _train(out, "bct", "--bct-weight", "2", command=("upgrade", "train-bct", "--old", str(old)))
    joint = _train(out, "joint", "--hidden", "32", command=("upgrade", "train-compatible", "--old", str(old)))
    return {"out": out, "old": old, "new": new, "bct": bct, "joint": joint}


def test_train_bct_adds_the_influence_term(runs: dict[str, Path]) -> None:
    rows = [json.loads(line) for line in (runs["bct"] / "history.jsonl").read_text().splitlines()]
    assert "train_influence" in rows[0] or any("influence" in key for key in rows[0]), rows[0]
    state = torch.load(runs["bct"] / "last.pt", weights_only=True)
    classifier = state["step"]["classifier"]
    # the prototypes are the normalised class means of the OLD model's training-split embeddings
    old_x, _, _ = checkpoint_test_embeddings(runs["old"] / "best.pt")
    assert classifier.shape[1] == old_x.shape[1] == 16
    assert json.loads((runs["bct"] / "upgrade.json").read_text())["method"] == "bct"


def test_train_compatible_joint_saves_its_heads(runs: dict[str, Path]) -> None:
    heads, meta = compatible.load_heads(runs["joint"] / "compatible_heads.pt")
    state = torch.load(runs["joint"] / "last.pt", weights_only=True)["step"]
    assert set(state) and all(key.startswith("heads.") for key in state)
    saved = {f"heads.{k}": v for k, v in heads.state_dict().items()}
    assert all(torch.equal(saved[key], state[key]) for key in state)
    assert meta["old"] == str(runs["old"])


def test_train_transform_and_compatible_after(
    runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out = runs["out"] / "rho.pt"
    argv = [
        "upgrade",
        "train-transform",
        "--old",
        str(runs["old"]),
        "--new",
        str(runs["new"]),
        "--out",
        str(out),
        "--epochs",
        "3",
        "--hidden",
        "32",
        "--no-progress",
        "--device",
        "cpu",
    ]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "mean cos" in text and "new→old recall@1" in text
    rho, meta = transform.load_transform(out)
    assert rho.config()["in_dim"] == 16 and rho.config()["out_dim"] == 16 and len(meta["history"]) == 3
    heads_file = runs["out"] / "heads.pt"
    argv = [
        "upgrade",
        "train-compatible",
        "--mode",
        "after",
        "--old",
        str(runs["old"]),
        "--new",
        str(runs["new"]),
        "--out",
        str(heads_file),
        "--feature-epochs",
        "2",
        "--hidden",
        "32",
        "--seed",
        "3",  # a training flag: parsed as text, used as an integer
    ]
    assert main(argv) == 0
    heads, _ = compatible.load_heads(heads_file)
    assert heads.config()["new_dim"] == 16


def test_simulate_every_method(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rho = runs["out"] / "rho_sim.pt"
    assert (
        main(
            [
                "upgrade",
                "train-transform",
                "--old",
                str(runs["old"]),
                "--new",
                str(runs["new"]),
                "--out",
                str(rho),
                "--epochs",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    report, plot = tmp_path / "report.json", tmp_path / "backfill.png"
    argv = [
        "upgrade",
        "simulate",
        "--old",
        str(runs["old"]),
        "--new",
        str(runs["new"]),
        "--transform",
        str(rho),
        "--bct",
        str(runs["bct"]),
        "--compatible",
        str(runs["joint"]),
        "--steps",
        "4",
        "--metrics",
        "map@r,recall@1",
        "--json",
        str(report),
        "--plot",
        str(plot),
        "--no-progress",
    ]
    assert main(argv) == 0
    text = capsys.readouterr().out
    data = json.loads(report.read_text())
    methods = ["old", "new-naive", "bct", "rank-merge", "rank-merge+transform", "compatible"]
    assert sorted(data["curves"]) == sorted(methods) and all(m in text for m in methods)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # old/old and new/new equal an independent evaluation of each checkpoint on the test split
    from dmlkit import metrics

    for side, name in (("old/old", "old"), ("new/new", "new")):
        x, y, _ = checkpoint_test_embeddings(runs[name] / "best.pt")
        expected = metrics.evaluate(x, y, metrics=("map@r", "recall@1"))
        assert math.isclose(data["grid"][side]["map@r"], expected["map@r"], abs_tol=1e-6)
    # rank merge: t = 0 is old/old, t = 1 is new/new
    curve = data["curves"]["rank-merge"]["values"]["map@r"]
    assert math.isclose(curve[0], data["grid"]["old/old"]["map@r"], abs_tol=1e-9)
    assert math.isclose(curve[-1], data["grid"]["new/new"]["map@r"], abs_tol=1e-9)


def test_simulate_query_gallery_split(runs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "upgrade",
        "simulate",
        "--old",
        str(runs["old"]),
        "--new",
        str(runs["new"]),
        "--steps",
        "2",
        "--metrics",
        "recall@1",
        "--query-fraction",
        "0.25",
        "--order",
        "uncertainty",
        "--no-progress",
    ]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "rank-merge" in text and "compatible" not in text  # only the methods the given models allow


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--methods", "bct"], "method 'bct' needs --bct"),
        (["--methods", "rank-merj"], "rank-merge"),
        (["--metrics", "recal@1"], "recall@1"),
        (["--compatible-heads", "x.pt"], "--compatible-heads needs --compatible"),
        (["--transform", "missing.pt"], "missing.pt"),
    ],
)
def test_simulate_checks_options_before_loading(
    runs: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    extra: list[str],
    message: str,
) -> None:
    import dmlkit.cli.upgrade as cli_upgrade

    def no_loading(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr(cli_upgrade, "load_model", no_loading)
    argv = ["upgrade", "simulate", "--old", str(runs["old"]), "--new", str(runs["new"]), *extra]
    code = main(argv)
    err = capsys.readouterr().err
    assert code in (1, 2) and message in err.splitlines()[0], err


def test_simulate_refuses_checkpoints_of_different_datasets(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other"
    assert (
        main(
            [
                "train",
                *tiny_argv(tmp_path, name="other", epochs=1),
                "--dataset-args",
                "{num_classes: 12, samples_per_class: 8, image_size: 16}",
                "--val-fraction",
                "0",
            ]
        )
        == 0
    )
    code = main(["upgrade", "simulate", "--old", str(runs["old"]), "--new", str(other), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "pass --dataset" in err, err


def test_bct_refuses_a_new_model_of_another_size(runs: dict[str, Path], tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    argv = [
        "upgrade",
        "train-bct",
        "--old",
        str(runs["old"]),
        *tiny_argv(tmp_path, name="b", epochs=1),
        "--embedding-size",
        "8",
    ]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and "16" in err and "8" in err and "BCT" in err, err
    assert not (tmp_path / "b").exists()


def test_compatible_after_needs_new_and_out(
    runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["upgrade", "train-compatible", "--mode", "after", "--old", str(runs["old"])])
    assert code == 2 and "--mode after needs --new" in capsys.readouterr().err


def test_unknown_option_of_an_upgrade_command_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["upgrade", "simulate", "--old", "a", "--new", "b", "--stepz", "3"])
    assert exited.value.code == 2
    assert "--steps" in capsys.readouterr().err.splitlines()[0]


def test_models_load_for_the_simulation(runs: dict[str, Path]) -> None:
    model, _ = load_model(runs["joint"], torch.device("cpu"))
    assert model.embedding_size == 16
