"""``dmlkit sweep``: spec validation, a 2-factor × 2-seed study on ``synthetic`` with 2 local workers that is
killed mid-way and continued, a failing configuration reported while the others complete, and the report's
mean ± std checked against ``trials.csv``."""

from __future__ import annotations

import csv
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dmlkit.cli import main
from dmlkit.errors import ConfigError
from dmlkit.sweep import load_spec

pytest.importorskip("optuna")

BASE = {
    "data": {
        "dataset": {"name": "synthetic",
                    "args": {"num_classes": 12, "samples_per_class": 8, "image_size": 16}},
        "batch_size": 16, "samples_per_class": 4, "val_fraction": 0.25, "num_workers": 0,
    },
    "model": {"backbone": "small_cnn", "embedding_size": 8},
    "optim": {"epochs": 1},
    "eval": {"metrics": ["recall@1", "map@r"]},
    "run": {"device": "cpu"},
}  # fmt: skip


def _spec(tmp_path: Path, **changes: object) -> Path:
    spec = {
        "name": "tiny",
        "base": BASE,
        # batch_size 64 needs 16 classes per batch: more than the training split has, so its runs fail
        "factors": {"loss": ["contrastive", "multisimilarity"], "batch_size": [16, 64]},
        "seeds": [0, 1],
        "objective": {"metric": "map@r", "split": "val"},
        **changes,
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_every_configuration_is_validated_before_anything_runs(tmp_path: Path) -> None:
    spec = load_spec(_spec(tmp_path))
    assert spec.sampler == "grid" and spec.max_trials == 4 and spec.validate_all() == 4
    with pytest.raises(ConfigError, match=r"configuration loss=contrastiv.*unknown loss 'contrastiv'"):
        load_spec(_spec(tmp_path, factors={"loss": ["contrastiv"]})).validate_all()
    with pytest.raises(ConfigError, match=r"lr=-1"):
        load_spec(_spec(tmp_path, factors={"lr": [1e-3, -1]})).validate_all()
    with pytest.raises(ConfigError, match="unknown"):
        load_spec(_spec(tmp_path, factors={"learning_rate": [1e-3]})).validate_all()
    with pytest.raises(ConfigError, match="max_trials is needed"):
        load_spec(_spec(tmp_path, factors={"lr": {"log_uniform": [1e-4, 1e-2]}}))
    with pytest.raises(ConfigError, match="grid sampler needs every factor as a list"):
        load_spec(
            _spec(tmp_path, factors={"lr": {"log_uniform": [1e-4, 1e-2]}}, sampler="grid", max_trials=2)
        )
    ranged = load_spec(_spec(tmp_path, factors={"lr": {"log_uniform": [1e-4, 1e-2]}}, max_trials=3))
    assert ranged.sampler == "tpe" and ranged.validate_all() == 2  # the range's two ends


def test_one_at_a_time_runs_the_base_and_each_factor_varied_alone(tmp_path: Path, monkeypatch) -> None:
    """1 + Σ (levels − 1) configurations, queued once (a continued sweep adds none), each factor's
    influence drawn from the runs where only it varies."""
    from dmlkit.sweep import report, runner

    factors = {
        "loss": ["contrastive", "multisimilarity", "circle"],
        "lr": [1e-3, 3e-4],
        "batch_size": [16, 8],
    }
    spec = load_spec(_spec(tmp_path, factors=factors, sampler="one_at_a_time"))
    points = [tuple(p.values()) for p in spec.points()]
    assert points == [
        ("contrastive", "0.001", "16"),
        ("multisimilarity", "0.001", "16"),
        ("circle", "0.001", "16"),
        ("contrastive", "0.0003", "16"),
        ("contrastive", "0.001", "8"),
    ]
    assert spec.max_trials == 5 and spec.validate_all() == 5  # the grid would be 12
    trained: list[tuple[str, int]] = []

    def fake_run(spec, study_dir, values, seed):  # every run's test map@r encodes its configuration
        trained.append((runner.config_id(values), seed))
        score = {"contrastive": 0.1, "multisimilarity": 0.2, "circle": 0.3}[values["loss"]] + values["lr"]
        return {"run_dir": "x", "val": {"map@r": score}, "test": {"map@r": score + seed}, "wall_s": 1.0}

    monkeypatch.setattr(runner, "run_one", fake_run)
    study = tmp_path / "study"
    runner.run_sweep(spec, study, workers=1)
    assert len(trained) == 10 and len(set(trained)) == 10  # 5 configurations × 2 seeds, each once
    runner.run_sweep(spec, study, workers=1)
    assert len(trained) == 10  # continued: nothing left to run
    rows, _ = report.run_rows(runner.open_study(spec, study), spec)
    kept = [r for r in rows if spec.is_varied_alone(r, "loss")]
    assert sorted({r["loss"] for r in kept}) == ["circle", "contrastive", "multisimilarity"]
    assert all(r["lr"] == "0.001" and r["batch_size"] == "16" for r in kept)  # the lr / batch points left out
    with pytest.raises(ConfigError, match="one_at_a_time sampler needs every factor as a list"):
        load_spec(_spec(tmp_path, factors={"lr": {"log_uniform": [1e-4, 1e-2]}}, sampler="one_at_a_time"))


def test_a_grid_given_another_level_runs_only_the_new_configurations(tmp_path: Path, monkeypatch) -> None:
    """A finished grid study whose spec gains a level (or a seed's worth of workers) runs the new
    configurations alone; none twice, with 2 workers too; ``max_trials`` below the grid draws a subset."""
    from dmlkit.sweep import runner

    trained: list[tuple[str, int]] = []

    def fake_run(spec, study_dir, values, seed):
        trained.append((runner.config_id(values), seed))
        score = {"contrastive": 0.1, "multisimilarity": 0.2, "circle": 0.3}[values["loss"]]
        return {"run_dir": "x", "val": {"map@r": score}, "test": {"map@r": score}, "wall_s": 1.0}

    monkeypatch.setattr(runner, "run_one", fake_run)
    study = tmp_path / "study"
    two = load_spec(_spec(tmp_path, factors={"loss": ["contrastive", "multisimilarity"], "lr": [1e-3]}))
    runner.run_sweep(two, study, workers=2)
    assert len(trained) == 4 and len(set(trained)) == 4  # 2 configurations × 2 seeds
    three = load_spec(
        _spec(tmp_path, factors={"loss": ["contrastive", "multisimilarity", "circle"], "lr": [1e-3]})
    )
    done = runner.run_sweep(three, study, workers=2)
    assert len(trained) == 6 and len(set(trained)) == 6  # only circle's 2 seeds were trained
    assert {t.user_attrs["labels"]["loss"] for t in runner.done_trials(done)} == {
        "contrastive",
        "multisimilarity",
        "circle",
    }
    assert len(runner.done_configurations(done)) == 3
    runner.run_sweep(three, study, workers=2)
    assert len(trained) == 6  # nothing left
    subset = load_spec(
        _spec(tmp_path, factors={"loss": ["contrastive", "multisimilarity", "circle"]}, max_trials=2)
    )
    assert subset.design() == subset.design() and len(subset.design() or []) == 2
    runner.run_sweep(subset, tmp_path / "subset", workers=1)
    assert len(trained) == 10 and len(set(trained[6:])) == 4


def _finished_runs(study: Path) -> list[Path]:
    return sorted(study.glob("runs/*/seed*/results.json"))


def test_a_killed_sweep_continues_reports_failures_and_means(tmp_path: Path) -> None:
    spec, study = _spec(tmp_path), tmp_path / "study"
    command = [sys.executable, "-m", "dmlkit", "sweep", str(spec), "--out", str(study), "--workers", "2"]
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 240
    while not _finished_runs(study) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.5)
    os.killpg(process.pid, signal.SIGKILL)  # the sweep and the runs it started
    process.wait()
    before = {path: path.stat().st_mtime_ns for path in _finished_runs(study)}
    assert before, "no run finished before the sweep was killed"

    assert main(["sweep", str(spec), "--out", str(study), "--workers", "2"]) == 0
    after = _finished_runs(study)
    assert len(after) == 4  # 2 losses × 2 seeds at batch_size 16; batch_size 64 fails
    for path, mtime in before.items():
        assert path.stat().st_mtime_ns == mtime  # a finished run is never trained again

    assert main(["sweep", "report", str(study)]) == 0
    report = study / "report"
    expected_files = {
        "trials.csv",
        "summary.md",
        "summary.tex",
        "influence_loss.png",
        "influence_batch_size.png",
    }
    assert {p.name for p in report.iterdir()} >= expected_files
    text = (report / "summary.md").read_text()
    assert text.count("Failed trials") == 1 and "batch_size=64" in text and "exit 2" in text
    with (report / "trials.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 and {r["batch_size"] for r in rows} == {"16"}
    for loss in ("contrastive", "multisimilarity"):
        values = [float(r["test map@r"]) for r in rows if r["loss"] == loss]
        expected = f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"
        line = next(line for line in text.splitlines() if line.startswith(f"| {loss} | 16 |"))
        assert expected in line, (line, expected)
    assert "\\pm" in (report / "summary.tex").read_text()


def test_runs_go_through_submitit_where_asked(tmp_path: Path) -> None:
    """``executor: submitit``: the AutoExecutor (a local job here, where Slurm is absent) runs the trial."""
    pytest.importorskip("submitit")
    spec = _spec(tmp_path, factors={"loss": ["contrastive"]}, seeds=[0], executor="submitit")
    assert main(["sweep", str(spec), "--out", str(tmp_path / "study")]) == 0
    assert len(_finished_runs(tmp_path / "study")) == 1
    assert list((tmp_path / "study" / "runs").glob("*/submitit/*_submitted.pkl"))  # submitit's own files


def test_an_influence_plot_draws_only_the_splits_that_have_values(tmp_path: Path) -> None:
    """A study without a validation split (``objective: {split: test}``, study 5) plots test alone, with no
    empty "val" series in its legend; long level names fit (the file is written)."""
    pytest.importorskip("matplotlib")
    from dmlkit.sweep import report

    levels = {"frozen": 0, "fine-tuned (last 2 stages)": 2}
    spec = load_spec(
        _spec(
            tmp_path,
            factors={"model.trainable_blocks": {"levels": levels}},
            objective={"metric": "map@r", "split": "test"},
        )
    )
    rows = [
        {"model.trainable_blocks": label, "seed": seed, "test map@r": 0.4 + 0.01 * seed}
        for label in levels
        for seed in (0, 1)
    ]
    path = tmp_path / "influence.png"
    assert report.influence_plot(rows, spec, "model.trainable_blocks", path) == ["test map@r"]
    assert path.stat().st_size > 0
    with_val = [{**row, "val map@r": 0.6} for row in rows]
    drawn = report.influence_plot(with_val, spec, "model.trainable_blocks", path)
    assert drawn == ["val map@r", "test map@r"]
