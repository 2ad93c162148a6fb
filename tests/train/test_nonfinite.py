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
from dmlkit.train.step import EmbeddingStep


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
    assert "2 non-finite steps in a row" in message and "last.pt" in message
    state = ckpt.load(trainer.run_dir / "last.pt")
    assert state["epoch"] == 1 and state["global_step"] == 3  # the checkpoint of the end of epoch 1
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


def test_nan_abort_exit_code_from_cli(tmp_path, monkeypatch, capsys) -> None:
    from dmlkit.cli import main
    from tests_support import tiny_argv

    poison_objective(monkeypatch, set(range(100)))
    code = main(["train", *tiny_argv(tmp_path), "--max-nonfinite-steps", "2"])
    assert code == 1
    assert "non-finite steps in a row" in capsys.readouterr().err


class PoisonedStep(EmbeddingStep):
    """The default step with faults injected on chosen (0-based) calls: NaN embeddings, NaN input images
    (which also poison the BatchNorm running statistics) or a NaN gradient behind a finite loss."""

    def __init__(self, *args, nan_embeddings=(), nan_images=(), nan_gradient=()) -> None:
        super().__init__(*args)
        self.faults = {
            "embeddings": set(nan_embeddings),
            "images": set(nan_images),
            "gradient": set(nan_gradient),
        }
        self.calls = 0

    def forward(self, batch):
        call, self.calls = self.calls, self.calls + 1
        if call in self.faults["images"]:
            batch = type(batch)(batch.images * float("nan"), batch.labels, batch.indices)
        out = super().forward(batch)
        if call in self.faults["gradient"]:
            # sqrt'(0) = inf: the loss stays finite, its gradient is 0 · inf = NaN
            embeddings = self.embed(batch)
            out.loss = out.loss + 0.0 * torch.sqrt((embeddings - embeddings.detach()).pow(2).sum())
        return out

    def embed(self, batch):
        embeddings = super().embed(batch)
        if self.calls - 1 in self.faults["embeddings"]:
            embeddings = embeddings * float("nan")
        return embeddings


def poisoned(**faults):
    return lambda *args: PoisonedStep(*args, **faults)


def history(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("loss", ["multisimilarity", "supcon", "circle", "contrastive"])
def test_nan_embeddings_are_skipped_even_when_the_loss_hides_them(tiny_config, loss, capsys) -> None:
    result = Trainer(tiny_config(name=f"emb-{loss}", loss=loss), step=poisoned(nan_embeddings={1, 4})).run()
    assert [r["skipped_steps"] for r in history(result.run_dir)] == [1, 1, 0]
    assert capsys.readouterr().out.count("non-finite embeddings (16 of 16)") == 2
    state = ckpt.load(result.run_dir / "last.pt")
    assert state["global_step"] == 9 - 2
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


@pytest.mark.parametrize("grad_clip", [None, 1.0])
def test_a_nan_gradient_behind_a_finite_loss_is_skipped(tiny_config, grad_clip, capsys) -> None:
    config = tiny_config(name="grad", grad_clip=grad_clip)
    result = Trainer(config, step=poisoned(nan_gradient={2})).run()
    assert [r["skipped_steps"] for r in history(result.run_dir)] == [1, 0, 0]
    assert "non-finite gradient norm (nan)" in capsys.readouterr().out
    state = ckpt.load(result.run_dir / "last.pt")
    assert state["global_step"] == 8
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


def test_poisoned_batchnorm_statistics_abort_at_once_saying_no_checkpoint_exists(tiny_config) -> None:
    trainer = Trainer(tiny_config(name="bn", max_nonfinite_steps=100), step=poisoned(nan_images={1}))
    with pytest.raises(NonFiniteLossError) as err:
        trainer.run()
    message = str(err.value)
    assert "running_mean" in message or "running_var" in message
    assert "step 1 (epoch 1, batch 2)" in message and "No checkpoint was saved yet" in message
    assert not (trainer.run_dir / "last.pt").exists()


def test_non_finite_weights_at_the_end_of_an_epoch_are_never_saved(tiny_config) -> None:
    def break_weights(trainer: Trainer, global_step: int) -> None:
        if global_step == 6:  # the last step of epoch 2
            next(trainer.model.parameters()).data.fill_(float("nan"))

    trainer = Trainer(tiny_config(name="weights"), step_hooks=[break_weights])
    with pytest.raises(NonFiniteLossError) as err:
        trainer.run()
    assert "after epoch 2, model parameter" in str(err.value)
    assert f"{trainer.run_dir / 'last.pt'} (after epoch 1)" in str(err.value)
    state = ckpt.load(trainer.run_dir / "last.pt")
    assert state["epoch"] == 1 and len(history(trainer.run_dir)) == 1


def test_a_streak_from_the_first_step_says_no_checkpoint_exists(tiny_config, monkeypatch) -> None:
    poison_objective(monkeypatch, set(range(100)))
    trainer = Trainer(tiny_config(name="streak", max_nonfinite_steps=2))
    with pytest.raises(NonFiniteLossError, match="No checkpoint was saved yet"):
        trainer.run()
    assert not (trainer.run_dir / "last.pt").exists()
