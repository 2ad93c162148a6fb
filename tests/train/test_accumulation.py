"""Gradient accumulation: an update per ``accumulate`` batches with the mean of their gradients (checked
against an independent computation), non-finite batches left out of the mean, exact mid-window resume."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from dmlkit.train import checkpoint as ckpt
from dmlkit.train import loop
from dmlkit.train.loop import Trainer
from dmlkit.train.step import EmbeddingStep

SGD = {"optimizer": "sgd", "momentum": 0.0, "lr": 0.1, "scheduler": "constant"}


def history(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]


def expected_first_update(config, kept: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """The parameters after one SGD update with the mean gradient of the first window's ``kept`` batches,
    each batch's loss computed alone: built from the trainer's parts, without its loop."""
    trainer = Trainer(config)
    trainer._setup()
    trainer.train_set.set_epoch(0)
    trainer.sampler.set_epoch(0)
    model = trainer.model.train()
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for _, p in named]
    for index, (images, labels, indices) in zip(range(2), trainer.loader, strict=False):
        loss, _ = trainer.objective(model(images).float(), labels, indices)
        if index in kept:
            grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
            total = [t + (g if g is not None else 0) for t, g in zip(total, grads, strict=True)]
    return {name: (p - 0.1 * t / len(kept)).detach() for (name, p), t in zip(named, total, strict=True)}


def after_first_update(trainer: Trainer, seen: dict) -> None:
    if trainer.global_step == 1 and not seen:
        seen.update({name: p.detach().clone() for name, p in trainer.model.named_parameters()})


def poison_objective(monkeypatch, nan_calls: set[int]) -> None:
    real_build = loop.build_objective

    def build(*args, **kwargs):
        objective = real_build(*args, **kwargs)
        real_forward, calls = objective.forward, {"n": 0}

        def forward(embeddings, labels, indices=None):
            value, stats = real_forward(embeddings, labels, indices)
            calls["n"] += 1
            return (value * float("nan") if calls["n"] - 1 in nan_calls else value), stats

        objective.forward = forward
        return objective

    monkeypatch.setattr(loop, "build_objective", build)


@pytest.mark.parametrize(("nan_calls", "kept"), [(set(), (0, 1)), ({0}, (1,))])
def test_update_is_the_mean_gradient_of_the_window(tiny_config, monkeypatch, nan_calls, kept) -> None:
    config = tiny_config(name="acc", epochs=1, accumulate=2, **SGD)
    expected = expected_first_update(config, kept)
    poison_objective(monkeypatch, nan_calls)
    seen: dict = {}
    result = Trainer(config, step_hooks=[lambda t, s: after_first_update(t, seen)]).run()
    for name, value in expected.items():
        assert torch.allclose(seen[name], value, atol=1e-6), name
    # 3 batches per epoch: windows of 2 and 1, so 2 updates; a skipped batch does not lose its window's update
    assert ckpt.load(result.run_dir / "last.pt")["global_step"] == 2
    assert history(result.run_dir)[0]["skipped_steps"] == len(nan_calls)


def test_updates_and_schedule_count_windows(tiny_config) -> None:
    result = Trainer(tiny_config(name="count", accumulate=2)).run()
    rows = history(result.run_dir)
    assert [r["step"] for r in rows] == [2, 4, 6]  # ⌈3 / 2⌉ updates per epoch
    assert rows[-1]["lr"] == pytest.approx(0.0)  # the cosine reached its end at the last update


def test_a_window_of_non_finite_batches_makes_no_update(tiny_config, monkeypatch) -> None:
    poison_objective(monkeypatch, {0, 1})
    result = Trainer(tiny_config(name="empty-window", epochs=1, accumulate=2)).run()
    assert ckpt.load(result.run_dir / "last.pt")["global_step"] == 1
    assert history(result.run_dir)[0]["skipped_steps"] == 2


class NanGradientStep(EmbeddingStep):
    """A NaN gradient behind a finite loss on the second call (sqrt'(0) = inf, times 0)."""

    calls = 0

    def forward(self, batch):
        out = super().forward(batch)
        type(self).calls += 1
        if type(self).calls == 2:
            embeddings = self.embed(batch)
            out.loss = out.loss + 0.0 * torch.sqrt((embeddings - embeddings.detach()).pow(2).sum())
        return out


def test_a_non_finite_gradient_skips_the_whole_window(tiny_config, capsys) -> None:
    NanGradientStep.calls = 0
    result = Trainer(tiny_config(name="nan-grad", epochs=1, accumulate=2), step=NanGradientStep).run()
    assert ckpt.load(result.run_dir / "last.pt")["global_step"] == 1
    assert "non-finite gradient norm (nan) — update skipped" in capsys.readouterr().out


def interrupt_at(epoch: int, batches: int):
    def hook(trainer: Trainer, global_step: int) -> None:
        if (trainer.epoch, trainer.batches_done) == (epoch, batches):
            os.kill(os.getpid(), signal.SIGINT)

    return hook


@pytest.mark.parametrize(("epoch", "batches", "mid_window"), [(1, 1, True), (0, 2, False), (1, 3, False)])
def test_resume_mid_window_is_exact(tiny_config, epoch, batches, mid_window) -> None:
    straight = Trainer(tiny_config(name="straight", accumulate=2)).run()
    config = tiny_config(name="stopped", accumulate=2)
    first = Trainer(config, step_hooks=[interrupt_at(epoch, batches)]).run()
    assert first.interrupted
    state = ckpt.load(first.run_dir / "last.pt")
    assert bool(state["accumulation"]) == mid_window
    if mid_window:
        grads = [g for g in state["accumulation"]["grads"] if g is not None]
        assert grads and any(bool(g.abs().sum() > 0) for g in grads)
    resumed = Trainer(config, first.run_dir, resume=True).run()
    a, b = ckpt.load(straight.run_dir / "last.pt"), ckpt.load(resumed.run_dir / "last.pt")
    assert a["global_step"] == b["global_step"] == 6
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    assert str(a["optimizer"]["state"]) == str(b["optimizer"]["state"])
    assert [r["train_loss"] for r in history(straight.run_dir)] == [
        r["train_loss"] for r in history(first.run_dir)
    ]
