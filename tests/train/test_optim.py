"""Schedules against their closed forms, computed independently here; loss parameters get their own group."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from dmlkit.config import make_config
from dmlkit.train.optim import build_optimizer, build_scheduler


def lrs(config_kwargs: dict, steps_per_epoch: int) -> list[float]:
    config = make_config(config_kwargs)
    model = nn.Linear(2, 2)
    optimizer = build_optimizer(config.optim, model, nn.Module())
    scheduler = build_scheduler(config.optim, optimizer, steps_per_epoch)
    out = []
    for _ in range(config.optim.epochs * steps_per_epoch):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_warmup_then_cosine() -> None:
    got = lrs({"epochs": 4, "lr": 0.1, "warmup_epochs": 1, "warmup_start_factor": 0.1}, steps_per_epoch=10)
    assert got[0] == pytest.approx(0.01)
    assert got[5] == pytest.approx(0.1 * (0.1 + 0.9 * 5 / 10))
    assert got[10] == pytest.approx(0.1)  # peak right after warm-up
    # cosine over the remaining 30 iterations, reaching min_lr_factor (0) at the end
    for step in (15, 25, 39):
        expected = 0.1 * 0.5 * (1 + math.cos(math.pi * (step - 10) / 30))
        assert got[step] == pytest.approx(expected)
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(got[10:]))


def test_step_and_multistep_and_constant() -> None:
    step = lrs({"epochs": 6, "lr": 1.0, "scheduler": "step", "step_size": 2, "gamma": 0.5}, steps_per_epoch=3)
    assert step[0:6] == [1.0] * 6 and step[6:12] == [0.5] * 6 and step[12:] == [0.25] * 6
    multi = lrs(
        {"epochs": 5, "lr": 1.0, "scheduler": "multistep", "milestones": [1, 3], "gamma": 0.1},
        steps_per_epoch=2,
    )
    assert multi == pytest.approx([1, 1, 0.1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 0.01])
    assert lrs({"epochs": 2, "lr": 0.3, "scheduler": "constant"}, steps_per_epoch=4) == [0.3] * 8


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_loss_parameters_get_their_own_learning_rate(name: str) -> None:
    config = make_config({"optimizer": name, "lr": 0.01, "loss_lr": 0.5})
    model = nn.Linear(3, 2)
    objective = nn.Module()
    objective.proxies = nn.Parameter(torch.randn(5, 2))
    optimizer = build_optimizer(config.optim, model, objective)
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert groups["model"]["lr"] == 0.01 and groups["loss"]["lr"] == 0.5
    assert groups["loss"]["params"][0] is objective.proxies
