"""Model selection: best.pt is chosen on validation only when validation can rank models, in the metric's
own direction, never on a non-finite value; results.json and the log say how it was chosen."""

from __future__ import annotations

import json
import math

import pytest

from dmlkit.train.loop import Trainer


def scripted_validation(monkeypatch, metric: str, values: list[float]) -> None:
    """Validation returns ``values[epoch - 1]`` for ``metric`` (the test split is evaluated for real)."""
    real = Trainer.evaluate

    def evaluate(self, dataset, description):
        results = real(self, dataset, description)
        if description.startswith("val (epoch "):
            epoch = int(description.removeprefix("val (epoch ").rstrip(")"))
            results[metric] = values[epoch - 1]
        return results

    monkeypatch.setattr(Trainer, "evaluate", evaluate)


def results(run_dir) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def test_a_nan_epoch_cannot_be_selected(tiny_config, monkeypatch, capsys) -> None:
    scripted_validation(monkeypatch, "map@r", [0.2, math.nan, 0.1])
    result = Trainer(tiny_config(name="nan-epoch")).run()
    out = capsys.readouterr().out
    assert "epoch 2: validation map@r is nan, so this epoch cannot be selected" in out
    assert result.best_epoch == 1
    assert results(result.run_dir)["selection"] == {
        "method": "validation",
        "metric": "map@r",
        "epoch": 1,
        "value": 0.2,
        "unselectable_epochs": [2],
    }
    assert "epoch 1, selected on validation map@r = 0.2000" in out


def test_no_finite_validation_value_falls_back_to_the_last_epoch(tiny_config, monkeypatch, capsys) -> None:
    scripted_validation(monkeypatch, "map@r", [math.nan] * 3)
    result = Trainer(tiny_config(name="all-nan")).run()
    selection = results(result.run_dir)["selection"]
    assert selection["method"] == "last_epoch" and selection["epoch"] == 3 == result.best_epoch
    assert selection["reason"] == "validation map@r was not finite in any validated epoch"
    assert selection["unselectable_epochs"] == [1, 2, 3]
    assert "selected on validation" not in capsys.readouterr().out


def test_a_lower_is_better_metric_selects_its_minimum(tiny_config, monkeypatch) -> None:
    scripted_validation(monkeypatch, "dists@intra", [0.5, 0.3, 0.4])
    config = tiny_config(
        name="lower",
        metrics=["recall@1", "dists@intra"],
        select_metric="dists@intra",
        eval_distance="euclidean",
    )
    result = Trainer(config).run()
    assert result.best_epoch == 2
    assert results(result.run_dir)["selection"]["value"] == pytest.approx(0.3)


def test_without_a_validation_split_the_last_epoch_is_the_model(tiny_config, capsys) -> None:
    result = Trainer(tiny_config(name="no-val", val_fraction=0.0, epochs=2)).run()
    selection = results(result.run_dir)["selection"]
    assert selection == {
        "method": "last_epoch",
        "epoch": 2,
        "reason": "there is no validation split (val_fraction 0)",
    }
    assert "selected on validation" not in capsys.readouterr().out


def test_unselectable_epochs_survive_a_resume(tiny_config, monkeypatch) -> None:
    import os
    import signal

    scripted_validation(monkeypatch, "map@r", [math.nan, 0.3, 0.2])

    def interrupt(trainer: Trainer, step: int) -> None:
        if step == 4:
            os.kill(os.getpid(), signal.SIGINT)

    config = tiny_config(name="resume-nan")
    first = Trainer(config, step_hooks=[interrupt]).run()
    assert first.interrupted
    resumed = Trainer(config, first.run_dir, resume=True).run()
    assert resumed.selection["unselectable_epochs"] == [1] and resumed.best_epoch == 2
