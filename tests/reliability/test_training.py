"""Fault injection for training: divergence, run directories, resume, model selection.

Each case runs ``dmlkit train`` (in-process unless signals are involved) on one bad input or fault and
checks the exit code, that the first stderr line names the culprit, that no traceback is printed, and that
no earlier artifact changed (docs/reliability.md, "Training").
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
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

#: A synthetic dataset of 6 training classes: --val-fraction 0.2 holds out a single class.
SIX_CLASSES = {"num_classes": 12, "samples_per_class": 8, "image_size": 16, "test_fraction": 0.5}


def train(runs: Path, *extra: str, name: str = "run", epochs: int = 1):
    return run_cli(["train", *tiny_argv(runs, name, epochs), *extra])


def history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished one-epoch tiny run (copied by each test that changes it)."""
    runs = tmp_path_factory.mktemp("finished")
    outcome = train(runs)
    assert outcome.code == 0, outcome
    return runs / "run"


@pytest.fixture
def run_copy(finished_run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "runs" / "run"
    shutil.copytree(finished_run, copy)
    return copy


# ----------------------------------------------------------------------------------------- divergence
@pytest.mark.parametrize("loss", ["multisimilarity", "supcon", "circle"])
def test_divergence_with_a_loss_that_masks_nan_aborts_and_says_no_checkpoint_exists(
    tmp_path: Path, loss: str
) -> None:
    # These losses return 0.0 on all-NaN embeddings: the embeddings themselves must be checked.
    outcome = train(tmp_path / "runs", "--loss", loss, "--optimizer", "sgd", "--lr", "1e30", epochs=2)
    assert_named_error(
        outcome, 1, "training diverged", "non-finite embeddings", "No checkpoint was saved yet"
    )
    run_dir = tmp_path / "runs" / "run"
    assert not (run_dir / "last.pt").exists() and not (run_dir / "best.pt").exists()
    assert "query has" not in outcome.stderr  # not the old crash in validation


@pytest.mark.parametrize(
    ("flags", "key", "value"),
    [
        (["--lr", "inf"], "optim.lr", "inf"),
        (["--grad-clip", "nan"], "optim.grad_clip", "nan"),
        (["--weight-decay", "inf"], "optim.weight_decay", "inf"),
        (["--warmup-epochs=-inf"], "optim.warmup_epochs", "-inf"),
        (["--xbm-weight", "nan"], "memory.xbm_weight", "nan"),
        (["--loss-args", "{alpha: .inf}"], "objective.loss.args", "alpha=inf"),
        (
            ["--miner", "multisimilarity", "--miner-args", "{epsilon: .nan}"],
            "objective.miner.args",
            "epsilon=nan",
        ),
        (["--dataset-args", "{num_classes: 16, noise: .nan}"], "data.dataset.args", "noise=nan"),
        (
            ["--miner", "multisimilarity", "--miner-schedule", "linear:start=inf,end=0.1"],
            "miner schedule",
            "start must be a finite number, got inf",
        ),
    ],
)
def test_non_finite_config_values_are_refused_before_any_work(
    tmp_path: Path, flags: list[str], key: str, value: str
) -> None:
    outcome = train(tmp_path / "runs", *flags)
    assert_named_error(outcome, 2, key, value)
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------------------- resume
def test_resume_refuses_a_changed_model_option_and_leaves_the_run_intact(run_copy: Path) -> None:
    before = snapshot(run_copy)
    outcome = run_cli(["train", "--resume", run_copy, "--embedding-size", "32"])
    assert_named_error(outcome, 2, "--embedding-size", "16", "32", "cannot change when resuming")
    assert_unchanged(before, run_copy)
    assert sorted(p.name for p in run_copy.iterdir()) == sorted(Path(p).name for p in before)

    # ... and a plain resume (with an option that may change) still works afterwards
    resumed = run_cli(["train", "--resume", run_copy, "--epochs", "2"])
    assert resumed.code == 0, resumed
    assert [row["epoch"] for row in history(run_copy)] == [1, 2]


def test_resume_ignores_a_stale_config_yaml_and_says_so(run_copy: Path) -> None:
    # An older dmlkit rewrote config.yaml before refusing `--resume RUN --embedding-size 32`.
    config_file = run_copy / "config.yaml"
    stale = yaml.safe_load(config_file.read_text())
    stale["model"]["embedding_size"] = 32
    config_file.write_text(yaml.safe_dump(stale, sort_keys=False))
    outcome = run_cli(["train", "--resume", run_copy, "--epochs", "2"])
    assert outcome.code == 0, outcome
    assert "model.embedding_size: 16 → 32" in outcome.stdout + outcome.stderr
    assert yaml.safe_load(config_file.read_text())["model"]["embedding_size"] == 16  # rewritten from last.pt


def test_resume_of_a_folder_without_a_run_is_refused(tmp_path: Path) -> None:
    not_a_run = tmp_path / "file.txt"
    not_a_run.write_text("x")
    assert_named_error(run_cli(["train", "--resume", not_a_run]), 2, str(not_a_run), "not a folder")
    assert_named_error(run_cli(["train", "--resume", tmp_path]), 2, str(tmp_path), "last.pt")


# ----------------------------------------------------------------------------------------- run directories
def test_a_run_directory_with_artifacts_is_refused_unless_overwrite(run_copy: Path) -> None:
    (run_copy / "last.pt").unlink()  # what let a new run overwrite best.pt and append to history.jsonl
    before = snapshot(run_copy)
    outcome = train(run_copy.parent, epochs=2)
    assert_named_error(outcome, 2, str(run_copy), "--overwrite", "best.pt")
    assert_unchanged(before, run_copy)

    replaced = train(run_copy.parent, "--overwrite", epochs=2)
    assert replaced.code == 0, replaced
    assert [row["epoch"] for row in history(run_copy)] == [1, 2]  # not appended to the old history
    assert "--overwrite" not in (run_copy / "config.yaml").read_text()  # a flag, not a config field
    assert (run_copy / "train.log").read_text().count("run directory:") == 1


def test_overwrite_keeps_the_old_run_when_the_new_one_fails_to_start(run_copy: Path, tmp_path: Path) -> None:
    before = snapshot(run_copy)
    missing = tmp_path / "no-such-data"
    outcome = train(
        run_copy.parent,
        "--overwrite",
        "--dataset",
        "folder",
        "--dataset-args",
        "{}",
        "--data-root",
        str(missing),
    )
    assert_named_error(outcome, 1, str(missing))
    assert_unchanged(before, run_copy)
    assert sorted(p.name for p in run_copy.iterdir()) == sorted(Path(p).name for p in before)


@pytest.mark.parametrize(
    ("flags", "code", "culprit"),
    [
        (["--dataset", "folder", "--dataset-args", "{}", "--data-root", "{tmp}/no-data"], 1, "{tmp}/no-data"),
        (["--pretrained-weights", "{tmp}/missing.pt"], 1, "missing.pt"),
        (["--loss", "contrastive", "--xbm-size", "1000000000000"], 2, "xbm_size 1000000000000"),
    ],
)
def test_a_run_that_fails_during_setup_leaves_no_directory(
    tmp_path: Path, flags: list[str], code: int, culprit: str
) -> None:
    outcome = train(tmp_path / "runs", *[flag.replace("{tmp}", str(tmp_path)) for flag in flags])
    assert_named_error(outcome, code, culprit.replace("{tmp}", str(tmp_path)))
    assert not (tmp_path / "runs").exists()


def test_huge_memory_is_refused_with_the_memory_it_would_take(tmp_path: Path) -> None:
    outcome = train(tmp_path / "runs", "--loss", "contrastive", "--xbm-size", "1000000000000")
    assert_named_error(outcome, 2, "xbm_size 1000000000000", "GiB", "available on cpu")


def test_output_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    a_file = tmp_path / "results.txt"
    a_file.write_text("keep me")
    before = snapshot(a_file)
    assert_named_error(train(a_file), 2, "--output-dir", str(a_file), "is a file")
    assert_named_error(train(a_file / "sub"), 2, str(a_file / "sub"), f"inside {a_file}")
    assert_unchanged(before, a_file)


def _write_folder_dataset(root: Path, classes: int = 8, images: int = 4) -> None:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(images):
            pixels = rng.integers(0, 255, (12, 12, 3), dtype=np.uint8) // (c + 1)
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.png")


def test_relative_data_root_is_stored_absolute_and_eval_works_elsewhere(tmp_path: Path, monkeypatch) -> None:
    _write_folder_dataset(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--name", "folder", "--output-dir", "runs", "--dataset", "folder", "--data-root", "data",
            "--dataset-args", "{image_size: 16}", "--val-fraction", "0.25", "--embedding-size", "8",
            "--batch-size", "4", "--samples-per-class", "2", "--epochs", "1", "--no-progress",
            "--metrics", "recall@1", "--select-metric", "recall@1"]  # fmt: skip
    outcome = run_cli(argv)
    assert outcome.code == 0, outcome
    run_dir = tmp_path / "runs" / "folder"
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["data_root"] == str(
        tmp_path / "data"
    )

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    evaluated = run_cli(["eval", "--checkpoint", run_dir / "best.pt", "--no-progress", "--json"])
    assert evaluated.code == 0, evaluated


# ----------------------------------------------------------------------------------------- signals
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_the_test_before_training_exits_130_and_saves_nothing(
    tmp_path: Path, sig: signal.Signals
) -> None:
    runs = tmp_path / "runs"
    # A test split large enough that the evaluation before training takes seconds.
    big = {"num_classes": 100, "samples_per_class": 40, "image_size": 48, "test_fraction": 0.5}
    argv = ["train", *tiny_argv(runs, "sig", 1), "--dataset-args", json.dumps(big), "--eval-batch-size", "16"]
    process = subprocess.Popen(
        process_command(argv),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**quiet_env(), "PYTHONUNBUFFERED": "1"},
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    while line and not line.startswith("data:"):  # logged after the data, just before model and test
        line = process.stdout.readline()
    assert line, "the run ended before its data were loaded"
    time.sleep(0.5)
    process.send_signal(sig)
    stdout, stderr = process.communicate(timeout=120)
    assert "test before training" not in stdout, "the signal arrived after the evaluation before training"
    from faults import Outcome

    outcome = Outcome(process.returncode, stdout, stderr)
    assert_named_error(outcome, 130, "interrupted before training started", "nothing was saved")
    assert not (runs / "sig").exists()


# ----------------------------------------------------------------------------------------- selection
def test_select_metric_in_another_case_selects_and_checkpoints(tmp_path: Path) -> None:
    outcome = train(tmp_path / "runs", "--select-metric", "MAP@R", epochs=2)
    assert outcome.code == 0, outcome
    run_dir = tmp_path / "runs" / "run"
    assert (run_dir / "last.pt").exists()
    results = json.loads((run_dir / "results.json").read_text())
    assert results["selection"]["method"] == "validation" and results["selection"]["metric"] == "map@r"
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["eval"]["select_metric"] == "map@r"


def test_a_single_validation_class_selects_the_last_epoch_and_says_so(tmp_path: Path) -> None:
    outcome = train(
        tmp_path / "runs", "--dataset-args", json.dumps(SIX_CLASSES), "--val-fraction", "0.2", epochs=2
    )
    assert outcome.code == 0, outcome
    assert "validation split holds 1 class" in outcome.stdout
    assert "selected on validation" not in outcome.stdout
    results = json.loads((tmp_path / "runs" / "run" / "results.json").read_text())
    assert results["best_epoch"] == 2
    assert results["selection"]["method"] == "last_epoch"
    assert "1 class" in results["selection"]["reason"]
    assert all("val/map@r" not in row for row in history(tmp_path / "runs" / "run"))
