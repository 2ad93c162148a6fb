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


def tree_digest(root) -> dict[str, str]:
    """SHA-256 of every file under ``root``."""
    import hashlib

    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()
    }


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


def test_resume_refuses_options_that_cannot_change_before_writing_anything(tiny_config) -> None:
    import pytest

    from dmlkit.errors import ConfigError

    config = tiny_config(name="refused", epochs=1)
    run_dir = Trainer(config).run().run_dir
    before = tree_digest(run_dir)
    changed = tiny_config(name="refused", epochs=1, embedding_size=32, loss="contrastive", lr=0.5)
    with pytest.raises(ConfigError) as err:
        Trainer(changed, run_dir, resume=True)
    message = str(err.value)
    for part in ("--embedding-size (model.embedding_size) is 16 in the run, 32 was given", "--loss", "--lr"):
        assert part in message
    assert tree_digest(run_dir) == before


def test_resume_with_options_that_may_change_is_still_exact(tiny_config) -> None:
    straight = Trainer(tiny_config(name="plain")).run()
    config = tiny_config(name="changed")
    assert Trainer(config, step_hooks=[interrupt_at(4)]).run().interrupted
    changed = tiny_config(
        name="changed",
        num_workers=1,
        device="cpu",
        eval_batch_size=8,
        max_nonfinite_steps=3,
        wandb_project="x",
    )
    resumed = Trainer(changed, straight.run_dir.parent / "changed", resume=True).run()
    for key, tensor in ckpt.load(straight.run_dir / "last.pt")["model"].items():
        assert torch.equal(tensor, ckpt.load(resumed.run_dir / "last.pt")["model"][key]), key
    assert resumed.after == straight.after


def test_resume_with_more_epochs_follows_the_longer_schedule(tiny_config) -> None:
    from dmlkit.train.optim import lr_factor_fn

    first = Trainer(tiny_config(name="longer", epochs=2)).run()
    longer = tiny_config(name="longer", epochs=4)
    seen: list[float] = []

    class Recording(Trainer):
        def _step(self, batch):
            seen.append(self.optimizer.param_groups[0]["lr"])
            return super()._step(batch)

    Recording(longer, first.run_dir, resume=True).run()
    factor = lr_factor_fn(longer.optim, updates_per_epoch=3)
    assert seen[0] == longer.optim.lr * factor(6)  # the new schedule from the first resumed step on
    assert seen[0] != longer.optim.lr * lr_factor_fn(tiny_config(epochs=2).optim, 3)(6)
    assert [row["epoch"] for row in history(first.run_dir)] == [1, 2, 3, 4]


def test_resume_can_switch_mixed_precision(tiny_config) -> None:
    first = Trainer(tiny_config(name="amp", epochs=1)).run()
    resumed = Trainer(tiny_config(name="amp", epochs=2, amp="bf16"), first.run_dir, resume=True).run()
    assert not resumed.interrupted and [row["skipped_steps"] for row in history(first.run_dir)] == [0, 0]
    assert ckpt.load(first.run_dir / "last.pt")["config"]["optim"]["amp"] == "bf16"
