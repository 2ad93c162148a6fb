"""Interrupting a deterministic CPU run mid-epoch and resuming it gives the same weights as a straight run."""

from __future__ import annotations

import json
import os
import signal

import torch

from dmlkit.train import checkpoint as ckpt
from dmlkit.train.loop import Trainer


def interrupt_at(step: int):
    def hook(trainer: Trainer, global_step: int) -> None:
        if global_step == step:
            os.kill(os.getpid(), signal.SIGINT)  # the real signal path, delivered to this process

    return hook


def history(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]


def test_interrupted_run_resumes_to_identical_weights(tiny_config) -> None:
    straight = Trainer(tiny_config(name="straight")).run()
    assert not straight.interrupted

    config = tiny_config(name="interrupted")
    first = Trainer(config, step_hooks=[interrupt_at(4)]).run()  # epoch 2 of 3, batch 1 of 3
    assert first.interrupted
    state = ckpt.load(first.run_dir / "last.pt")
    assert (state["epoch"], state["batches_done"], state["global_step"]) == (1, 1, 4)
    assert len(history(first.run_dir)) == 1

    resumed = Trainer(config, first.run_dir, resume=True).run()
    assert not resumed.interrupted

    final_a = ckpt.load(straight.run_dir / "last.pt")
    final_b = ckpt.load(resumed.run_dir / "last.pt")
    assert final_a["global_step"] == final_b["global_step"] == 9
    for key, tensor in final_a["model"].items():
        assert torch.equal(tensor, final_b["model"][key]), key
    for key in ("optimizer", "scheduler"):
        assert str(final_a[key]["state"] if key == "optimizer" else final_a[key]) == str(
            final_b[key]["state"] if key == "optimizer" else final_b[key]
        )
    assert resumed.after == straight.after and resumed.before == straight.before
    assert resumed.best_epoch == straight.best_epoch

    rows_a, rows_b = history(straight.run_dir), history(resumed.run_dir)
    assert [r["epoch"] for r in rows_b] == [1, 2, 3]
    for row_a, row_b in zip(rows_a, rows_b, strict=True):
        assert row_a["train_loss"] == row_b["train_loss"]
        assert row_a["val/map@r"] == row_b["val/map@r"]


def test_interrupt_at_epoch_end_resumes_cleanly(tiny_config) -> None:
    config = tiny_config(name="edge", epochs=2)
    first = Trainer(config, step_hooks=[interrupt_at(3)]).run()  # the last batch of epoch 1
    assert first.interrupted
    resumed = Trainer(config, first.run_dir, resume=True).run()
    straight = Trainer(tiny_config(name="edge-straight", epochs=2)).run()
    for key, tensor in ckpt.load(straight.run_dir / "last.pt")["model"].items():
        assert torch.equal(tensor, ckpt.load(resumed.run_dir / "last.pt")["model"][key]), key


def test_checkpoints_load_with_weights_only_and_rebuild_the_model(tiny_config) -> None:
    result = Trainer(tiny_config(epochs=1)).run()
    for name in ("last.pt", "best.pt"):
        raw = torch.load(result.run_dir / name, weights_only=True)
        assert {"model", "model_config", "data_spec", "config", "optimizer", "sampler", "rng"} <= set(raw)
    leftovers = [p.name for p in result.run_dir.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []
