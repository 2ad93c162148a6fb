"""Optimizers (a separate parameter group for the loss's own parameters) and per-iteration lr schedules.

Both are registries (``OPTIMIZERS``, ``SCHEDULERS``): an entry takes the ``optim`` section of the config
(:class:`dmlkit.config.OptimSection`) and reads the fields it uses. A new optimizer or schedule is one
registered function here; the config validates ``optim.optimizer`` / ``optim.scheduler`` against these.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dmlkit.registry import Registry

if TYPE_CHECKING:
    from dmlkit.config import OptimSection

ParamGroups = list[dict[str, Any]]
LrFactor = Callable[[int], float]

#: ``(parameter groups, optim section) → optimizer``.
OPTIMIZERS: Registry[torch.optim.Optimizer] = Registry("optimizer")
#: ``(optim section, steps per epoch) → lr factor of the iteration``.
SCHEDULERS: Registry[LrFactor] = Registry("scheduler")


@OPTIMIZERS.register("adam")
def adam(groups: ParamGroups, section: OptimSection) -> torch.optim.Optimizer:
    """Adam with L2 weight decay (``weight_decay``)."""
    return torch.optim.Adam(groups, lr=section.lr, weight_decay=section.weight_decay)


@OPTIMIZERS.register("adamw")
def adamw(groups: ParamGroups, section: OptimSection) -> torch.optim.Optimizer:
    """AdamW (decoupled ``weight_decay``)."""
    return torch.optim.AdamW(groups, lr=section.lr, weight_decay=section.weight_decay)


@OPTIMIZERS.register("sgd")
def sgd(groups: ParamGroups, section: OptimSection) -> torch.optim.Optimizer:
    """SGD with ``momentum`` and ``weight_decay``."""
    return torch.optim.SGD(
        groups, lr=section.lr, momentum=section.momentum, weight_decay=section.weight_decay
    )


@SCHEDULERS.register("warmup_cosine")
def warmup_cosine(section: OptimSection, steps_per_epoch: int) -> LrFactor:
    """Linear from ``warmup_start_factor`` to 1 over ``warmup_epochs``, then cosine annealing to
    ``min_lr_factor`` at the last iteration."""
    total = max(1, section.epochs * steps_per_epoch)
    warmup = min(total, round(section.warmup_epochs * steps_per_epoch))
    start, floor = section.warmup_start_factor, section.min_lr_factor

    def factor(step: int) -> float:
        if step < warmup:
            return start + (1.0 - start) * step / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


@SCHEDULERS.register("step")
def step(section: OptimSection, steps_per_epoch: int) -> LrFactor:
    """×``gamma`` every ``step_size`` epochs."""
    return lambda it: section.gamma ** ((it // steps_per_epoch) // section.step_size)


@SCHEDULERS.register("multistep")
def multistep(section: OptimSection, steps_per_epoch: int) -> LrFactor:
    """×``gamma`` at each of the ``milestones`` epochs."""
    milestones = sorted(section.milestones)
    return lambda it: section.gamma ** sum(it // steps_per_epoch >= m for m in milestones)


@SCHEDULERS.register("constant")
def constant(section: OptimSection, steps_per_epoch: int) -> LrFactor:
    """The base learning rate throughout."""
    return lambda it: 1.0


def build_optimizer(
    section: OptimSection, model: nn.Module, objective: nn.Module, extra: Iterable[nn.Parameter] = ()
) -> torch.optim.Optimizer:
    """Model parameters at ``lr``; the objective's own (proxies, class weights) at ``loss_lr``; ``extra``
    (parameters a training step owns, e.g. a transformation head) at ``lr``."""
    groups: ParamGroups = [
        {"params": [p for p in model.parameters() if p.requires_grad], "lr": section.lr, "name": "model"}
    ]
    loss_params = [p for p in objective.parameters() if p.requires_grad]
    if loss_params:
        groups.append({"params": loss_params, "lr": section.loss_lr or section.lr, "name": "loss"})
    step_params = [p for p in extra if p.requires_grad]
    if step_params:
        groups.append({"params": step_params, "lr": section.lr, "name": "step"})
    return OPTIMIZERS.get(section.optimizer)(groups, section)


def lr_factor_fn(section: OptimSection, steps_per_epoch: int) -> LrFactor:
    """Multiplier of the base lr as a function of the iteration (0-based), for ``section.scheduler``."""
    return SCHEDULERS.get(section.scheduler)(section, steps_per_epoch)


def build_scheduler(
    section: OptimSection, optimizer: torch.optim.Optimizer, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` stepped once per iteration; its state is just the iteration counter."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor_fn(section, steps_per_epoch))
