"""The training step is a replaceable unit: a custom step plugs in without touching the loop."""

from __future__ import annotations

import copy
import json
import os
import signal

import torch

from dmlkit.train import checkpoint as ckpt
from dmlkit.train.loop import Trainer
from dmlkit.train.step import Batch, EmbeddingStep, TrainingStep


class TeacherStep(EmbeddingStep):
    """Loss + a distance to a frozen copy of the starting model, through a trainable scale of its own."""

    def __init__(self, model, objective, device, amp):
        super().__init__(model, objective, device, amp)
        self.teacher = copy.deepcopy(model).eval().requires_grad_(False)
        self.scale = torch.nn.Parameter(torch.tensor(0.5))
        self.calls = 0

    def loss(self, embeddings, labels, indices, batch: Batch):
        self.calls += 1
        value, stats = super().loss(embeddings, labels, indices, batch)
        with torch.no_grad():
            target = self.teacher(batch.images)
        gap = (embeddings.float() - target).pow(2).sum(dim=1).mean()
        return value + self.scale * gap, {**stats, "teacher_gap": float(gap.detach())}


def test_a_custom_step_is_trained_logged_saved_and_resumed(tiny_config) -> None:
    steps: list[TeacherStep] = []

    def factory(model, objective, device, amp) -> TeacherStep:
        steps.append(TeacherStep(model, objective, device, amp))
        return steps[-1]

    assert isinstance(EmbeddingStep(torch.nn.Linear(2, 2), None, torch.device("cpu"), "none"), TrainingStep)
    result = Trainer(tiny_config(name="teacher"), step=factory).run()
    step = steps[0]
    assert step.calls == 9  # 3 epochs × 3 batches, every one through the custom loss
    rows = [json.loads(line) for line in (result.run_dir / "history.jsonl").read_text().splitlines()]
    assert all(row["teacher_gap"] >= 0 for row in rows) and rows[-1]["teacher_gap"] > 0
    assert float(step.scale) != 0.5  # the step's own parameter was in the optimizer
    state = ckpt.load(result.run_dir / "last.pt")
    assert torch.equal(state["step"]["scale"], step.scale.detach())
    assert set(state["step"]) >= {f"teacher.{k}" for k in step.teacher.state_dict()}

    # Interrupted mid-epoch and resumed, the step's own state (its parameter, its frozen model) continues
    # exactly: the weights equal the uninterrupted run's bit for bit.
    def interrupt(trainer: Trainer, global_step: int) -> None:
        if global_step == 4:
            os.kill(os.getpid(), signal.SIGINT)

    config = tiny_config(name="resumed")
    assert Trainer(config, step=factory, step_hooks=[interrupt]).run().interrupted
    Trainer(config, result.run_dir.parent / "resumed", resume=True, step=factory).run()
    assert steps[1].calls + steps[2].calls == 9 and torch.equal(steps[2].scale, step.scale)
    resumed = ckpt.load(result.run_dir.parent / "resumed" / "last.pt")
    assert all(torch.equal(resumed["model"][k], state["model"][k]) for k in state["model"])
