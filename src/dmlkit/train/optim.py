"""Optimizers with a separate parameter group for the loss's own parameters, and per-iteration schedules."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from dmlkit.config import TrainConfig


def build_optimizer(config: TrainConfig, model: nn.Module, objective: nn.Module) -> torch.optim.Optimizer:
    """Model parameters at ``lr``; the objective's own (proxies, class weights) at ``loss_lr``."""
    groups = [
        {"params": [p for p in model.parameters() if p.requires_grad], "lr": config.lr, "name": "model"}
    ]
    loss_params = [p for p in objective.parameters() if p.requires_grad]
    if loss_params:
        groups.append({"params": loss_params, "lr": config.loss_lr or config.lr, "name": "loss"})
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def lr_factor_fn(config: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Multiplier of the base lr as a function of the iteration (0-based), for every schedule.

    - ``warmup_cosine``: linear from ``warmup_start_factor`` to 1 over ``warmup_epochs``, then
      cosine annealing to ``min_lr_factor`` at the last iteration.
    - ``step``: ×``gamma`` every ``step_size`` epochs; ``multistep``: ×``gamma`` at each milestone epoch.
    - ``constant``: 1.
    """
    total = max(1, config.epochs * steps_per_epoch)
    warmup = min(total, round(config.warmup_epochs * steps_per_epoch))
    start, floor = config.warmup_start_factor, config.min_lr_factor
    milestones = sorted(config.milestones)

    def warmup_cosine(step: int) -> float:
        if step < warmup:
            return start + (1.0 - start) * step / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def step_schedule(step: int) -> float:
        return config.gamma ** ((step // steps_per_epoch) // config.step_size)

    def multistep(step: int) -> float:
        epoch = step // steps_per_epoch
        return config.gamma ** sum(epoch >= m for m in milestones)

    return {
        "warmup_cosine": warmup_cosine,
        "step": step_schedule,
        "multistep": multistep,
        "constant": lambda step: 1.0,
    }[config.scheduler]


def build_scheduler(
    config: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` stepped once per iteration; its state is just the iteration counter."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor_fn(config, steps_per_epoch))
