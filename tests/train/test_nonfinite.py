"""Non-finite losses: skipped with a warning; too many in a row abort, leaving the last good checkpoint."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from dmlkit.errors import NonFiniteLossError
from dmlkit.train import checkpoint as ckpt
from dmlkit.train import loop
from dmlkit.train.loop import Trainer


def poison_objective(monkeypatch, nan_calls: set[int]) -> None:
    """Make the objective return NaN on the given (0-based) training calls."""
    real_build = loop.build_objective

    def build(*args, **kwargs):
        objective = real_build(*args, **kwargs)
        real_forward = objective.forward
        calls = {"n": 0}

        def forward(embeddings, labels, indices=None):
            value, stats = real_forward(embeddings, labels, indices)
            call = calls["n"]
            calls["n"] += 1
            if call in nan_calls:
                value = value * torch.tensor(float("nan"))
            return value, stats

        objective.forward = forward
        return objective

    monkeypatch.setattr(loop, "build_objective", build)


def test_isolated_nan_is_skipped_and_counted(tiny_config, monkeypatch, caplog) -> None:
    poison_objective(monkeypatch, {1, 4})
    logger = logging.getLogger("dmlkit")  # does not propagate to the root logger caplog listens on
    logger.addHandler(caplog.handler)
    try:
        result = Trainer(tiny_config(name="nan-skip")).run()
    finally:
        logger.removeHandler(caplog.handler)
    assert not result.interrupted and result.after
    rows = [json.loads(line) for line in (result.run_dir / "history.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in rows] == [1, 1, 0]
    assert sum("non-finite loss" in rec.getMessage() for rec in caplog.records) == 2
    state = ckpt.load(result.run_dir / "last.pt")
    assert state["global_step"] == 9 - 2  # skipped steps do not count as optimizer steps
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


def test_nan_streak_aborts_with_clear_message_and_keeps_last_good_checkpoint(
    tiny_config, monkeypatch
) -> None:
    poison_objective(monkeypatch, set(range(3, 100)))  # from the first batch of epoch 2 on
    trainer = Trainer(tiny_config(name="nan-abort", max_nonfinite_steps=2))
    with pytest.raises(NonFiniteLossError) as err:
        trainer.run()
    message = str(err.value)
    assert "2 non-finite losses in a row" in message and "last.pt" in message
    state = ckpt.load(trainer.run_dir / "last.pt")
    assert state["epoch"] == 1 and state["global_step"] == 3  # the checkpoint of the end of epoch 1
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


def test_nan_abort_exit_code_from_cli(tmp_path, monkeypatch, capsys) -> None:
    from dmlkit.cli import main
    from tests_support import tiny_argv

    poison_objective(monkeypatch, set(range(100)))
    code = main(["train", *tiny_argv(tmp_path), "--max-nonfinite-steps", "2"])
    assert code == 1
    assert "non-finite losses in a row" in capsys.readouterr().err
