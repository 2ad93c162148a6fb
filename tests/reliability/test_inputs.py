"""Bad values, checkpoints and galleries: every one a named error, before any work is lost.

Each case runs ``dmlkit`` on one bad input (:mod:`faults`) and asserts the exit code (2: a bad option or
configuration value, 1: bad data or file, 130: interrupted), that the first stderr line names the culprit
(flag, key, value, file), that no traceback is printed and that the earlier artifacts (the trained run,
the gallery, the input files) are unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from faults import (
    assert_named_error,
    assert_unchanged,
    process_command,
    quiet_env,
    run_cli,
    snapshot,
    tiny_argv,
)
from PIL import Image

#: The tiny run's --config file and loss arguments, in the notation YAML 1.1 reads as strings.
CONFIG_TEXT = "optim:\n  lr: 1e-3\n  weight_decay: 1E-5\n"
LOSS_ARGS = "{alpha: 2e0, beta: 5e1, base: 5e-1}"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A trained tiny run (config file and --loss-args with exponent-only numbers)."""
    root = tmp_path_factory.mktemp("inputs")
    config = root / "config.yaml"
    config.write_text(CONFIG_TEXT)
    argv = [*tiny_argv(root / "runs", name="run", epochs=1), "--config", config, "--loss-args", LOSS_ARGS]
    outcome = run_cli(["train", *argv])
    assert outcome.code == 0, outcome
    return root / "runs" / "run"


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """A folder of four 16×16 PNG images."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(folder / f"img_{i}.png")
    return folder


@pytest.fixture
def gallery(tmp_path: Path) -> Path:
    """A well-formed gallery: 3 embeddings of the tiny run's size (16) and their ids."""
    path = tmp_path / "gallery.npy"
    np.save(path, np.eye(3, 16, dtype=np.float32))
    (tmp_path / "gallery.ids.json").write_text(json.dumps({"ids": ["a", "b", "c"], "distance": "cosine"}))
    return path


# ------------------------------------------------------------------------------ values of flags and files


def test_yaml_numbers_follow_yaml_1_2(run_dir: Path) -> None:
    """``1e-3`` in a config file and ``5e-1`` in --loss-args are floats (YAML 1.1 reads them as strings)."""
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["optim"]["lr"] == 1e-3 and saved["optim"]["weight_decay"] == 1e-5
    assert saved["objective"]["loss"]["args"] == {"alpha": 2.0, "beta": 50.0, "base": 0.5}


@pytest.mark.parametrize(
    ("argv", "culprits"),
    [
        (["--metrics", "[recall@1, map@r"], ["--metrics", "[recall@1, map@r"]),
        (["--milestones", "[1,2"], ["--milestones", "[1,2"]),
        (["--loss-args", "{a: 1"], ["--loss-args", "{a: 1"]),
        (["--dataset-args", "num_classes=[3"], ["--dataset-args", "[3"]),
        (["--miner-args", "[1, 2]"], ["--miner-args", "[1, 2]", "not a mapping"]),
    ],
)
def test_malformed_list_or_mapping_flag(tmp_path: Path, argv: list[str], culprits: list[str]) -> None:
    outcome = run_cli(["train", *tiny_argv(tmp_path / "runs"), *argv])
    assert_named_error(outcome, 2, "dmlkit train: error:", *culprits)
    assert not (tmp_path / "runs").exists()


def test_malformed_yaml_config_names_file_and_line(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("optim:\n  lr: 0.1\neval:\n  metrics: [recall@1, map@r\n")
    before = snapshot(config)
    outcome = run_cli(["train", "--config", config, "--output-dir", tmp_path / "runs"])
    assert_named_error(outcome, 2, str(config), "not valid YAML", "line 5")
    assert_unchanged(before, config)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("text", "culprits"),
    [
        ("optim:\n  milestones: '[1,2'\n", ["optim.milestones", "[1,2"]),
        ("objective:\n  loss: {name: contrastive, args: '{a: 1'}\n", ["objective.loss.args", "{a: 1"]),
        ("objective:\n  loss: {name: contrastive, args: {pos_margin: abc}}\n", ["pos_margin", "'abc'"]),
    ],
)
def test_bad_value_in_a_config_file(tmp_path: Path, text: str, culprits: list[str]) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    outcome = run_cli(["train", "--config", config, "--output-dir", tmp_path / "runs"])
    assert_named_error(outcome, 2, *culprits)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("argv", "culprits"),
    [
        (
            ["--loss", "contrastive", "--loss-args", "{pos_margin: abc}"],
            ["contrastive", "pos_margin", "'abc'"],
        ),
        (["--loss", "contrastive", "--loss-args", "{neg_margin: '1.0'}"], ["neg_margin", "'1.0'", "string"]),
        (["--miner", "batch_hard", "--miner-args", "{allowed_pos_range: [0, x]}"], ["allowed_pos_range"]),
        (["--dataset-args", "{num_classes: many}"], ["dataset 'synthetic'", "num_classes", "'many'"]),
    ],
)
def test_registry_argument_of_the_wrong_type_fails_before_data_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, argv: list[str], culprits: list[str]
) -> None:
    import dmlkit.train.loop

    def no_data(*args: object, **kwargs: object) -> None:
        raise AssertionError("data was loaded before the arguments were checked")

    # Building the dataset would refuse its own arguments too, but only after the set-up began.
    monkeypatch.setattr(dmlkit.train.loop, "run_data", no_data)
    outcome = run_cli(["train", *tiny_argv(tmp_path / "runs"), *argv])
    assert_named_error(outcome, 2, "must be", *culprits)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("command", "argv", "culprits"),
    [
        ("eval", ["--batch-size", "0"], ["--batch-size", "positive", "0"]),
        ("eval", ["--num-workers", "-1"], ["--num-workers", "-1"]),
        ("eval", ["--num-examples", "0", "--examples", "x.png"], ["--num-examples", "0"]),
        ("eval", ["--examples-top", "-2", "--examples", "x.png"], ["--examples-top", "-2"]),
        ("embed", ["--batch-size", "0", "--images", ".", "--out", "x.npy"], ["--batch-size", "0"]),
        ("embed", ["--num-workers", "two", "--images", ".", "--out", "x.npy"], ["--num-workers", "'two'"]),
        ("search", ["-k", "0", "--gallery", "g.npy", "--query", "."], ["-k", "0"]),
    ],
)
def test_counts_are_checked_while_parsing(
    tmp_path: Path, command: str, argv: list[str], culprits: list[str]
) -> None:
    """Before any model is loaded: the checkpoint does not even exist (loading it would exit 1)."""
    outcome = run_cli([command, "--checkpoint", tmp_path / "absent.pt", *argv])
    assert_named_error(outcome, 2, f"dmlkit {command}: error: argument", *culprits)


@pytest.mark.parametrize(
    ("argv", "culprits"),
    [
        (["eval"], ["dmlkit eval: error:", "--checkpoint"]),
        (["train", "--embeding-size", "8"], ["dmlkit train: error:", "--embeding-size", "--embedding-size"]),
        (["train", "--lr"], ["dmlkit train: error:", "--lr", "expected one argument"]),
        (["search", "--checkpoint", "x", "--gallery", "g", "--query", "q", "--distance", "cosin"], ["cosin"]),
    ],
)
def test_argparse_errors_name_the_culprit_first(argv: list[str], culprits: list[str]) -> None:
    outcome = run_cli(argv)
    assert_named_error(outcome, 2, *culprits)
    second = outcome.stderr.splitlines()[1]
    assert second.startswith("usage:") or "--help" in second, outcome


def test_interrupt_is_one_line_and_exit_130(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dmlkit.cli.embed

    def interrupted(args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(dmlkit.cli.embed, "run", interrupted)
    outcome = run_cli(["embed", "--checkpoint", "x.pt", "--images", ".", "--out", tmp_path / "x.npy"])
    assert_named_error(outcome, 130, "dmlkit embed: interrupted")
    assert len(outcome.stderr.strip().splitlines()) == 1


def test_real_sigint_during_a_command(run_dir: Path, tmp_path: Path) -> None:
    """A real Ctrl-C (SIGINT) to ``dmlkit eval`` embedding a large synthetic split: exit 130, one line."""
    before = snapshot(run_dir)
    argv = ["eval", "--checkpoint", run_dir, "--no-progress", "--dataset-args",
            "{num_classes: 600, samples_per_class: 40, image_size: 64}"]  # fmt: skip
    # A job started in the background inherits SIGINT ignored (and Python then keeps it so): restore it.
    process = subprocess.Popen(
        process_command(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=quiet_env(),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    time.sleep(3.0)  # past the imports (also covered by main), inside the command's work
    assert process.poll() is None, process.communicate()
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, (out, err)
    assert "Traceback" not in err and err.strip().splitlines() == ["dmlkit eval: interrupted"], err
    assert_unchanged(before, run_dir)


# ----------------------------------------------------------------------------------------------- checkpoints


def _namespace_checkpoint(path: Path, marker: Path) -> None:
    """A file torch.save wrote with Python objects in it, one of which would create ``marker`` if it
    were unpickled (what ``weights_only=False`` would do)."""

    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.makedirs, (str(marker),))

    torch.save({"model": {}, "model_config": {}, "payload": Payload()}, path)


@pytest.mark.parametrize("command", ["eval", "embed"])
def test_checkpoint_with_python_objects_is_refused_not_executed(
    tmp_path: Path, images: Path, command: str
) -> None:
    bad, marker = tmp_path / "evil.pt", tmp_path / "executed"
    _namespace_checkpoint(bad, marker)
    extra = ["--images", images, "--out", tmp_path / "out.npy"] if command == "embed" else []
    outcome = run_cli([command, "--checkpoint", bad, *extra])
    assert_named_error(outcome, 1, str(bad), "objects other than tensors", "makedirs", "will not load")
    assert "weights_only" not in outcome.stderr
    assert not marker.exists()


def test_pretrained_weights_with_python_objects_are_refused(tmp_path: Path) -> None:
    bad, marker = tmp_path / "weights.pt", tmp_path / "executed"
    _namespace_checkpoint(bad, marker)
    outcome = run_cli(["train", *tiny_argv(tmp_path / "runs"), "--pretrained-weights", bad])
    assert_named_error(outcome, 1, str(bad), "objects other than tensors", "makedirs")
    assert "weights_only" not in outcome.stderr and not marker.exists()


def _save_npy(path: Path, array: np.ndarray) -> None:
    with path.open("wb") as handle:  # np.save(path) would append .npy to the name
        np.save(handle, array)


def _truncated(run_dir: Path, path: Path) -> None:
    data = (run_dir / "best.pt").read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    ("make", "culprits"),
    [
        (lambda run, p: p.write_bytes(b"not a checkpoint"), ["not a PyTorch file"]),
        (lambda run, p: p.write_bytes(b""), ["empty file"]),
        (_truncated, ["truncated or corrupted"]),
        (lambda run, p: torch.save(torch.zeros(3), p), ["not a dmlkit checkpoint", "Tensor"]),
        (lambda run, p: torch.save({"weights": torch.zeros(3)}, p), ["not a dmlkit checkpoint", "'model'"]),
        (lambda run, p: _save_npy(p, np.zeros(3)), ["not a PyTorch file"]),
    ],
    ids=["junk", "empty", "truncated", "tensor", "other-dict", "npy"],
)
def test_unusable_checkpoint_file(run_dir: Path, tmp_path: Path, make: object, culprits: list[str]) -> None:
    bad = tmp_path / "model.pt"
    make(run_dir, bad)  # type: ignore[operator]
    before = snapshot(bad)
    outcome = run_cli(["eval", "--checkpoint", bad, "--no-progress"])
    assert_named_error(outcome, 1, str(bad), *culprits)
    assert_unchanged(before, bad)


def test_checkpoint_without_inference_entries(run_dir: Path, tmp_path: Path, images: Path) -> None:
    state = torch.load(run_dir / "best.pt", weights_only=True)
    del state["data_spec"]
    bad = tmp_path / "partial.pt"
    torch.save(state, bad)
    outcome = run_cli(["embed", "--checkpoint", bad, "--images", images, "--out", tmp_path / "o.npy"])
    assert_named_error(outcome, 1, str(bad), "'data_spec'")


def test_run_folder_means_its_best_checkpoint(run_dir: Path, tmp_path: Path) -> None:
    """``--checkpoint RUN_DIR`` is RUN_DIR/best.pt: a broken last.pt beside it does not matter."""
    folder = tmp_path / "copy"
    shutil.copytree(run_dir, folder)
    (folder / "last.pt").write_bytes(b"broken")
    outcome = run_cli(["eval", "--checkpoint", folder, "--json", "--no-progress"])
    assert outcome.code == 0, outcome
    expected = json.loads((run_dir / "results.json").read_text())["test_after"]
    assert json.loads(outcome.stdout)["metrics"] == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("command", ["eval", "embed", "search"])
def test_run_folder_without_best_checkpoint(
    run_dir: Path, tmp_path: Path, images: Path, command: str
) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    shutil.copy(run_dir / "last.pt", folder / "last.pt")
    before = snapshot(folder)
    extra = {
        "eval": [],
        "embed": ["--images", images, "--out", tmp_path / "o.npy"],
        "search": ["--gallery", _gallery_for(tmp_path), "--query", images],
    }[command]
    outcome = run_cli([command, "--checkpoint", folder, *extra])
    assert_named_error(outcome, 1, f"run folder {folder} has no best.pt", str(folder / "last.pt"))
    assert_unchanged(before, folder)


def test_folder_without_checkpoints(tmp_path: Path) -> None:
    outcome = run_cli(["eval", "--checkpoint", tmp_path])
    assert_named_error(outcome, 1, str(tmp_path), "without a checkpoint", "best.pt", "last.pt")


# ----------------------------------------------------------------------------------------------- galleries


def _gallery_for(folder: Path) -> Path:
    path = folder / "g.npy"
    np.save(path, np.eye(3, 16, dtype=np.float32))
    (folder / "g.ids.json").write_text(json.dumps({"ids": ["a", "b", "c"]}))
    return path


def _search(run_dir: Path, gallery: Path, images: Path) -> object:
    return run_cli(["search", "--checkpoint", run_dir / "best.pt", "--gallery", gallery, "--query", images])


@pytest.mark.parametrize(
    ("content", "culprits"),
    [
        ("not json {", ["not valid JSON", "line 1"]),
        ("[1, 2, 3]", ["must be an object with an 'ids' list", "a list"]),
        ('{"names": ["a", "b", "c"]}', ["'ids'", "keys ['names']"]),
        ('{"ids": "abc"}', ["'ids' must be a list of strings", "str"]),
        ('{"ids": ["a", 2, "c"]}', ["ids[1] is 2, not a string"]),
        ('{"ids": ["a", "b"]}', ["lists 2 ids", "3 rows"]),
        ('{"ids": ["a", "b", "c"], "distance": "cosin"}', ["'cosin'", "did you mean 'cosine'"]),
    ],
    ids=["not-json", "not-object", "no-ids", "ids-not-list", "id-not-string", "count", "distance"],
)
def test_malformed_ids_json(
    run_dir: Path, gallery: Path, images: Path, content: str, culprits: list[str]
) -> None:
    ids = gallery.with_name("gallery.ids.json")
    ids.write_text(content)
    before = snapshot(gallery, ids, run_dir)
    outcome = _search(run_dir, gallery, images)
    assert_named_error(outcome, 1, str(ids), *culprits)
    assert_unchanged(before, gallery, ids, run_dir)


def _nan_rows(path: Path) -> None:
    values = np.eye(3, 16, dtype=np.float32)
    values[1, 4] = np.nan
    np.save(path, values)


def _pickled_objects(path: Path) -> None:
    marker = path.with_name("executed")

    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.makedirs, (str(marker),))

    np.save(path, np.array([Payload(), Payload(), Payload()], dtype=object), allow_pickle=True)


@pytest.mark.parametrize(
    ("make", "culprits"),
    [
        (lambda p: np.save(p, np.array([["a"] * 16] * 3)), ["dtype <U1", "shape (3, 16)"]),
        (_pickled_objects, ["dtype object", "shape (3,)"]),
        (lambda p: np.save(p, np.zeros(48, dtype=np.float32)), ["dtype float32", "shape (48,)"]),
        (lambda p: np.save(p, np.zeros((3, 4, 4), dtype=np.float32)), ["shape (3, 4, 4)"]),
        (_nan_rows, ["NaN or infinite", "rows 1"]),
        (lambda p: p.write_text("hello, I am text"), ["not a NumPy .npy file"]),
        (lambda p: np.savez(p, np.zeros((3, 16))), ["not a NumPy .npy file"]),
    ],
    ids=["strings", "objects", "1-d", "3-d", "nan-rows", "text", "npz"],
)
def test_bad_gallery_array(
    run_dir: Path, gallery: Path, images: Path, make: object, culprits: list[str]
) -> None:
    bad = gallery.with_name("bad.npy")
    make(bad)  # type: ignore[operator]
    if not bad.exists():  # np.savez appends .npz
        bad.with_suffix(".npy.npz").rename(bad)
    bad.with_name("bad.ids.json").write_text(json.dumps({"ids": ["a", "b", "c"]}))
    before = snapshot(bad, run_dir)
    outcome = _search(run_dir, bad, images)
    assert_named_error(outcome, 1, str(bad), *culprits)
    assert_unchanged(before, bad, run_dir)
    assert not bad.with_name("executed").exists()


def test_embed_out_is_a_folder(run_dir: Path, images: Path, tmp_path: Path) -> None:
    folder = tmp_path / "out.npy"
    folder.mkdir()
    outcome = run_cli(["embed", "--checkpoint", run_dir, "--images", images, "--out", folder])
    assert_named_error(outcome, 2, "--out", str(folder), "folder")
