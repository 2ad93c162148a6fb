"""Early stopping and the plateau schedule, driven by scripted validation values: when they stop or drop,
what the run directory says, and exact resume (also of a run that stopped early, with a larger patience)."""

from __future__ import annotations

import json
import logging
import os
import signal

import pytest
import torch

from dmlkit.errors import ConfigError
from dmlkit.train import checkpoint as ckpt
from dmlkit.train.loop import Trainer

#: Validation map@r by epoch: best at epoch 2, then no improvement (a tie is none) until epoch 6.
SCRIPT = {1: 0.5, 2: 0.6, 3: 0.55, 4: 0.6, 5: 0.58, 6: 0.7, 7: 0.65, 8: 0.66}


class Scripted(Trainer):
    """Validation returns :data:`SCRIPT` for its epoch; the test split is evaluated for real."""

    def evaluate(self, dataset, description: str) -> dict[str, float]:
        if description.startswith("val (epoch "):
            value = SCRIPT[int(description.removeprefix("val (epoch ").rstrip(")"))]
            return {"recall@1": value, "map@r": value}
        return super().evaluate(dataset, description)


def history(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]


def results(run_dir) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def weights(run_dir, name: str = "last.pt") -> dict[str, torch.Tensor]:
    return ckpt.load(run_dir / name)["model"]


def test_stops_after_patience_validations_without_improvement(tiny_config, caplog) -> None:
    logger = logging.getLogger("dmlkit")
    logger.addHandler(caplog.handler)
    try:
        result = Scripted(tiny_config(name="stop", epochs=8, early_stop_patience=2)).run()
    finally:
        logger.removeHandler(caplog.handler)
    expected = {"epoch": 4, "patience": 2, "best_epoch": 2, "metric": "map@r"}
    assert result.early_stop == expected and results(result.run_dir)["early_stop"] == expected
    assert [row["epoch"] for row in history(result.run_dir)] == [1, 2, 3, 4]
    assert ckpt.load(result.run_dir / "last.pt")["epoch"] == 4
    assert result.selection["epoch"] == 2 and result.best_epoch == 2  # the test ran on best.pt, epoch 2
    assert any("early stop after epoch 4 of 8" in record.getMessage() for record in caplog.records)


def test_without_patience_every_epoch_trains(tiny_config) -> None:
    result = Scripted(tiny_config(name="all", epochs=5)).run()
    assert result.early_stop is None and results(result.run_dir)["early_stop"] is None
    assert len(history(result.run_dir)) == 5


def test_a_stopped_run_stays_stopped_and_a_larger_patience_continues_it_exactly(tiny_config) -> None:
    config = tiny_config(name="resume", epochs=8, early_stop_patience=2)
    stopped = Scripted(config).run()
    before = weights(stopped.run_dir)
    again = Scripted(config, stopped.run_dir, resume=True).run()
    assert again.early_stop == stopped.early_stop and len(history(stopped.run_dir)) == 4
    assert all(torch.equal(before[k], v) for k, v in weights(stopped.run_dir).items())

    patient = tiny_config(name="resume", epochs=8, early_stop_patience=4)
    continued = Scripted(patient, stopped.run_dir, resume=True).run()
    straight = Scripted(tiny_config(name="straight", epochs=8, early_stop_patience=4)).run()
    assert continued.early_stop is None and straight.early_stop is None  # epoch 6 improved in time
    assert len(history(stopped.run_dir)) == 8
    for key, tensor in weights(straight.run_dir).items():
        assert torch.equal(tensor, weights(stopped.run_dir)[key]), key
    assert continued.best_epoch == straight.best_epoch == 6


def interrupt_at(epoch: int, batches: int):
    def hook(trainer: Trainer, global_step: int) -> None:
        if (trainer.epoch, trainer.batches_done) == (epoch, batches):
            os.kill(os.getpid(), signal.SIGINT)

    return hook


def test_the_count_of_validations_without_improvement_survives_an_interruption(tiny_config) -> None:
    config = tiny_config(name="count", epochs=8, early_stop_patience=2)
    first = Scripted(config, step_hooks=[interrupt_at(3, 1)]).run()  # epoch 4, after 1 such validation
    assert first.interrupted and ckpt.load(first.run_dir / "last.pt")["validations_since_best"] == 1
    resumed = Scripted(config, first.run_dir, resume=True).run()
    assert resumed.early_stop == {"epoch": 4, "patience": 2, "best_epoch": 2, "metric": "map@r"}


def test_early_stopping_needs_validation() -> None:
    from dmlkit.config import make_config

    with pytest.raises(ConfigError, match="early_stop_patience 3 needs validation, but val_fraction is 0"):
        make_config({"early_stop_patience": 3, "val_fraction": 0})
    with pytest.raises(ConfigError, match="early_stop_patience"):
        make_config({"early_stop_patience": 0})


PLATEAU = {
    "scheduler": "plateau",
    "scheduler_args": {"patience": 1},
    "warmup_epochs": 0,
    "gamma": 0.5,
    "lr": 0.01,
    "epochs": 6,
}


def test_plateau_drops_the_lr_after_patience_validations(tiny_config) -> None:
    result = Scripted(tiny_config(name="plateau", **PLATEAU)).run()
    # epochs 3 and 4 do not improve on epoch 2 (patience 1: the second one drops); 5 does not either, then
    # 6 improves. The lr logged with an epoch is the one the next epoch starts with.
    assert [row["lr"] for row in history(result.run_dir)] == pytest.approx(
        [0.01, 0.01, 0.01, 0.005, 0.005, 0.005]
    )


def test_plateau_resumes_exactly(tiny_config) -> None:
    straight = Scripted(tiny_config(name="p-straight", **PLATEAU)).run()
    config = tiny_config(name="p-stopped", **PLATEAU)
    first = Scripted(config, step_hooks=[interrupt_at(4, 1)]).run()  # after the drop
    assert first.interrupted
    Scripted(config, first.run_dir, resume=True).run()
    a, b = ckpt.load(straight.run_dir / "last.pt"), ckpt.load(first.run_dir / "last.pt")
    assert a["scheduler"] == b["scheduler"]
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    assert [r["lr"] for r in history(straight.run_dir)] == [r["lr"] for r in history(first.run_dir)]
