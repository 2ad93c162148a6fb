"""Optimizers, their parameter groups, and learning-rate schedules.

Both are registries (``OPTIMIZERS``, ``SCHEDULERS``): an entry takes the ``optim`` section of the config
(:class:`dmlkit.config.OptimSection`), reads the fields it uses, and declares its own hyperparameters as
keyword-only parameters, which ``optimizer_args`` / ``scheduler_args`` set (checked against the entry's
signature when the config is made). A new optimizer or schedule is one registered function here; the
config validates ``optim.optimizer`` / ``optim.scheduler`` against these.

A schedule is a :class:`Schedule`: the loop calls :meth:`Schedule.step` after every optimizer update and
:meth:`Schedule.on_validation` after every validation, with the value of the selection metric; its state is
part of the checkpoint, and loading it sets the learning rate of the current update.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, OneCycleLR, ReduceLROnPlateau

from dmlkit.errors import ConfigError
from dmlkit.registry import Registry

if TYPE_CHECKING:
    from dmlkit.config import OptimSection

ParamGroups = list[dict[str, Any]]
LrFactor = Callable[[int], float]
Betas = tuple[float, float]


@runtime_checkable
class Schedule(Protocol):
    """A learning-rate schedule as the training loop drives it."""

    def step(self) -> None:
        """After every optimizer update (a skipped, non-finite step is not an update)."""

    def on_validation(self, value: float) -> None:
        """After every validation, with the selection metric's value (possibly NaN)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the saved position and set the learning rate of the current update *for this
        configuration* (``epochs`` may differ from the saved run's)."""


@dataclass(frozen=True)
class ScheduleContext:
    """What a schedule needs besides the ``optim`` section: optimizer updates per epoch (batches per epoch
    divided by ``accumulate``, rounded up) and the direction of the selection metric."""

    updates_per_epoch: int
    higher_is_better: bool = True

    @property
    def mode(self) -> Literal["max", "min"]:
        return "max" if self.higher_is_better else "min"


#: ``(parameter groups, optim section, /, *, own hyperparameters) → optimizer``.
OPTIMIZERS: Registry[torch.optim.Optimizer] = Registry("optimizer")
#: ``(optimizer, optim section, context, /, *, own hyperparameters) → schedule``.
SCHEDULERS: Registry[Schedule] = Registry("scheduler")


# ------------------------------------------------------------------------------------------------ optimizers
@OPTIMIZERS.register("adam")
def adam(
    groups: ParamGroups,
    section: OptimSection,
    /,
    *,
    betas: Betas = (0.9, 0.999),
    eps: float = 1e-8,
    amsgrad: bool = False,
) -> torch.optim.Optimizer:
    """Adam with L2 weight decay (``weight_decay`` added to the gradient)."""
    return torch.optim.Adam(
        groups, lr=section.lr, weight_decay=section.weight_decay, betas=tuple(betas), eps=eps, amsgrad=amsgrad
    )


@OPTIMIZERS.register("adamw")
def adamw(
    groups: ParamGroups,
    section: OptimSection,
    /,
    *,
    betas: Betas = (0.9, 0.999),
    eps: float = 1e-8,
    amsgrad: bool = False,
) -> torch.optim.Optimizer:
    """AdamW (decoupled ``weight_decay``; Loshchilov & Hutter, ICLR 2019)."""
    return torch.optim.AdamW(
        groups, lr=section.lr, weight_decay=section.weight_decay, betas=tuple(betas), eps=eps, amsgrad=amsgrad
    )


@OPTIMIZERS.register("sgd")
def sgd(
    groups: ParamGroups, section: OptimSection, /, *, nesterov: bool = False, dampening: float = 0.0
) -> torch.optim.Optimizer:
    """SGD with ``momentum`` (a field of the section) and L2 ``weight_decay``."""
    if nesterov and (section.momentum <= 0 or dampening != 0):
        raise ConfigError("optimizer_args nesterov=true needs a momentum > 0 and dampening 0 (sgd)")
    return torch.optim.SGD(
        groups,
        lr=section.lr,
        momentum=section.momentum,
        weight_decay=section.weight_decay,
        nesterov=nesterov,
        dampening=dampening,
    )


@OPTIMIZERS.register("rmsprop")
def rmsprop(
    groups: ParamGroups,
    section: OptimSection,
    /,
    *,
    alpha: float = 0.99,
    eps: float = 1e-8,
    momentum: float = 0.0,
    centered: bool = False,
) -> torch.optim.Optimizer:
    """``torch.optim.RMSprop`` with its own defaults (Berton et al., CVPR 2022, compare it with Adam); L2
    ``weight_decay``. Its momentum is an ``optimizer_args`` key (default 0), not the section's ``momentum``,
    which is SGD's (default 0.9)."""
    return torch.optim.RMSprop(
        groups,
        lr=section.lr,
        weight_decay=section.weight_decay,
        alpha=alpha,
        eps=eps,
        momentum=momentum,
        centered=centered,
    )


@OPTIMIZERS.register("lamb")
def lamb(
    groups: ParamGroups,
    section: OptimSection,
    /,
    *,
    betas: Betas = (0.9, 0.999),
    eps: float = 1e-6,
    max_grad_norm: float | None = 1.0,
    trust_clip: bool = False,
    always_adapt: bool = False,
) -> torch.optim.Optimizer:
    """``timm.optim.Lamb`` (You et al., ICLR 2020): Adam updates scaled per layer by a trust ratio; its
    defaults. ``max_grad_norm`` is Lamb's own global gradient clipping (none: off), applied after
    ``grad_clip``."""
    from timm.optim import Lamb  # timm is a dependency; imported here, as the model families import it

    return Lamb(
        groups,
        lr=section.lr,
        weight_decay=section.weight_decay,
        betas=tuple(betas),
        eps=eps,
        max_grad_norm=max_grad_norm,
        trust_clip=trust_clip,
        always_adapt=always_adapt,
    )


@OPTIMIZERS.register("lion")
def lion(
    groups: ParamGroups, section: OptimSection, /, *, betas: Betas = (0.9, 0.99)
) -> torch.optim.Optimizer:
    """``timm.optim.Lion`` (Chen et al., "Symbolic Discovery of Optimization Algorithms", NeurIPS 2023):
    sign updates with decoupled ``weight_decay``. Its authors use an lr 3-10× smaller than AdamW's and a
    weight decay 3-10× larger."""
    from timm.optim import Lion

    return Lion(groups, lr=section.lr, weight_decay=section.weight_decay, betas=tuple(betas))


def split_model_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """The model's ``(backbone, head)`` parameters, the head being pooling + head.

    An :class:`~dmlkit.models.EmbeddingModel` says which are which (``backbone_parameters`` /
    ``head_parameters``); any other model with a ``backbone`` submodule: its parameters vs the rest.
    """
    backbone_of = getattr(model, "backbone_parameters", None)
    head_of = getattr(model, "head_parameters", None)
    if callable(backbone_of) and callable(head_of):
        return list(backbone_of()), list(head_of())
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, nn.Module):
        raise ConfigError(
            f"head_lr / freeze_backbone_epochs need a model with a backbone; {type(model).__name__} has none"
        )
    inside = {id(p) for p in backbone.parameters()}
    return list(backbone.parameters()), [p for p in model.parameters() if id(p) not in inside]


def build_optimizer(
    section: OptimSection, model: nn.Module, objective: nn.Module, extra: Iterable[nn.Parameter] = ()
) -> torch.optim.Optimizer:
    """The configured optimizer over the trainable parameters, in named groups.

    Model parameters form one group ``model`` at ``lr``, or with ``head_lr`` two: ``backbone`` at ``lr`` and
    ``head`` (pooling + head) at ``head_lr``. The objective's own parameters (proxies, class weights) are
    ``loss`` at ``loss_lr`` (default ``lr``); ``extra`` (parameters a training step owns, e.g. a
    transformation head) are ``step`` at ``lr``. Parameters that do not require gradients now (frozen
    BatchNorm, layers left out by the model) are left out; empty groups are dropped.
    """
    if section.head_lr is None:
        groups: ParamGroups = [{"params": _trainable(model.parameters()), "lr": section.lr, "name": "model"}]
    else:
        backbone, head = split_model_parameters(model)
        groups = [{"params": _trainable(backbone), "lr": section.lr, "name": "backbone"}]
        if not _trainable(head):
            raise ConfigError(
                f"head_lr {section.head_lr}: the model's pooling and head have no trainable parameters (no "
                "linear head with embedding_size 0, and a pooling without parameters)"
            )
        groups.append({"params": _trainable(head), "lr": section.head_lr, "name": "head"})
    loss_lr = section.loss_lr or section.lr
    for name, params, lr in (("loss", objective.parameters(), loss_lr), ("step", extra, section.lr)):
        trainable = _trainable(params)
        if trainable:  # the first group (model or backbone) stays even when empty: it is the logged "lr"
            groups.append({"params": trainable, "lr": lr, "name": name})
    return OPTIMIZERS.get(section.optimizer)(groups, section, **section.optimizer_args)


def _trainable(parameters: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    return [p for p in parameters if p.requires_grad]


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The current learning rate of each named group, for the logs: ``lr`` for the first group (``model``
    or ``backbone``), ``<name>_lr`` for the others (``head_lr``, ``loss_lr``, ``step_lr``)."""
    out: dict[str, float] = {}
    for index, group in enumerate(optimizer.param_groups):
        out["lr" if index == 0 else f"{group.get('name', index)}_lr"] = float(group["lr"])
    return out


# ------------------------------------------------------------------------------------------------ schedules
class IterationSchedule:
    """``lr = base lr × factor(update)``, a ``LambdaLR`` stepped after every update; its state is the update
    counter (the ``LambdaLR`` state, as in checkpoints from before :class:`Schedule`)."""

    def __init__(self, optimizer: torch.optim.Optimizer, factor: LrFactor) -> None:
        self.factor = factor
        self.scheduler = LambdaLR(optimizer, factor)

    def step(self) -> None:
        self.scheduler.step()

    def on_validation(self, value: float) -> None:
        """Iteration schedules do not read validation."""

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state)
        # The saved optimizer restored the lr of the saved run's schedule, which differs when ``epochs``
        # changed on resume; this configuration's factor of the same update replaces it.
        groups = self.scheduler.optimizer.param_groups
        for group, base in zip(groups, self.scheduler.base_lrs, strict=True):
            group["lr"] = base * self.factor(self.scheduler.last_epoch)


class PlateauSchedule:
    """``lr = base lr × warm-up factor(update) × plateau factor``: the plateau factor starts at 1 and is
    multiplied by ``factor`` whenever validation has not improved for ``patience`` validations (torch's
    ``ReduceLROnPlateau``, never below ``min_factor``).

    The plateau factor is the lr of a one-parameter stand-in optimizer that ``ReduceLROnPlateau`` drives,
    so torch decides when to drop (threshold, cooldown) and the warm-up, applied per update, never fights it.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup: LrFactor,
        mode: Literal["max", "min"],
        factor: float,
        patience: int,
        threshold: float,
        threshold_mode: Literal["rel", "abs"],
        cooldown: int,
        min_factor: float,
    ) -> None:
        self.optimizer, self.warmup = optimizer, warmup
        self.base_lrs = [float(group["lr"]) for group in optimizer.param_groups]
        self._scale = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
        self.plateau = ReduceLROnPlateau(
            self._scale,
            mode=mode,
            factor=factor,
            patience=patience,
            threshold=threshold,
            threshold_mode=threshold_mode,
            cooldown=cooldown,
            min_lr=min_factor,
        )
        self.updates = 0
        self._apply()

    @property
    def factor(self) -> float:
        """The plateau factor now (1 until the first drop)."""
        return float(self._scale.param_groups[0]["lr"])

    def _apply(self) -> None:
        scale = self.warmup(self.updates) * self.factor
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * scale

    def step(self) -> None:
        self.updates += 1
        self._apply()

    def on_validation(self, value: float) -> None:
        self.plateau.step(value)  # NaN is never an improvement: it counts towards the patience
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        return {"last_epoch": self.updates, "plateau": self.plateau.state_dict(), "factor": self.factor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = int(state["last_epoch"])
        self.plateau.load_state_dict(state["plateau"])
        self._scale.param_groups[0]["lr"] = float(state["factor"])
        self._apply()


class OneCycleSchedule:
    """torch's ``OneCycleLR`` over the whole run (Smith & Topin, 2019), stepped after every update: from
    ``lr / div_factor`` up to each group's lr over ``pct_start`` of the updates, then annealed to
    ``lr / (div_factor × final_div_factor)``. Its state is the update counter: loading it rebuilds the
    cycle for this configuration's length (``epochs`` may change on resume) at that update."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_updates: int, **options: Any) -> None:
        self.optimizer, self.options = optimizer, options
        self.total = max(1, total_updates)
        self.max_lrs = [float(group["lr"]) for group in optimizer.param_groups]
        self.scheduler = self._build(0)

    def _build(self, updates: int) -> OneCycleLR:
        # last_epoch = updates - 1: the constructor's first step lands on ``updates`` (closed form, lr and
        # momentum); -1 also writes each group's initial/max/min lr, which resuming finds in the optimizer.
        return OneCycleLR(
            self.optimizer,
            max_lr=self.max_lrs,
            total_steps=self.total,
            last_epoch=updates - 1,
            **self.options,
        )

    def step(self) -> None:
        if self.scheduler.last_epoch < self.total:  # a longer run than the cycle keeps its last lr
            self.scheduler.step()

    def on_validation(self, value: float) -> None:
        """The cycle does not read validation."""

    def state_dict(self) -> dict[str, Any]:
        return {"last_epoch": int(self.scheduler.last_epoch)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scheduler = self._build(min(int(state["last_epoch"]), self.total))


def _warmup_cosine_factor(section: OptimSection, updates_per_epoch: int) -> LrFactor:
    total = max(1, section.epochs * updates_per_epoch)
    warmup = min(total, round(section.warmup_epochs * updates_per_epoch))
    start, floor = section.warmup_start_factor, section.min_lr_factor

    def factor(update: int) -> float:
        if update < warmup:
            return start + (1.0 - start) * update / warmup
        progress = min(1.0, (update - warmup) / max(1, total - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _warmup_factor(section: OptimSection, updates_per_epoch: int) -> LrFactor:
    warmup = round(section.warmup_epochs * updates_per_epoch)
    start = section.warmup_start_factor
    return lambda update: start + (1.0 - start) * update / warmup if update < warmup else 1.0


#: The schedules that are a factor of the update alone: ``(section, updates per epoch) → factor``.
FACTORS: dict[str, Callable[[OptimSection, int], LrFactor]] = {
    "warmup_cosine": _warmup_cosine_factor,
    "step": lambda s, n: lambda it: s.gamma ** ((it // n) // s.step_size),
    "multistep": lambda s, n: lambda it: s.gamma ** sum(it // n >= m for m in sorted(s.milestones)),
    "constant": lambda s, n: lambda it: 1.0,
}


@SCHEDULERS.register("warmup_cosine")
def warmup_cosine(
    optimizer: torch.optim.Optimizer, section: OptimSection, context: ScheduleContext, /
) -> Schedule:
    """Linear from ``warmup_start_factor`` to 1 over ``warmup_epochs``, then cosine annealing to
    ``min_lr_factor`` at the last update."""
    return IterationSchedule(optimizer, _warmup_cosine_factor(section, context.updates_per_epoch))


@SCHEDULERS.register("step")
def step(optimizer: torch.optim.Optimizer, section: OptimSection, context: ScheduleContext, /) -> Schedule:
    """×``gamma`` every ``step_size`` epochs."""
    return IterationSchedule(optimizer, FACTORS["step"](section, context.updates_per_epoch))


@SCHEDULERS.register("multistep")
def multistep(
    optimizer: torch.optim.Optimizer, section: OptimSection, context: ScheduleContext, /
) -> Schedule:
    """×``gamma`` at each of the ``milestones`` epochs."""
    return IterationSchedule(optimizer, FACTORS["multistep"](section, context.updates_per_epoch))


@SCHEDULERS.register("constant")
def constant(
    optimizer: torch.optim.Optimizer, section: OptimSection, context: ScheduleContext, /
) -> Schedule:
    """The base learning rate throughout."""
    return IterationSchedule(optimizer, FACTORS["constant"](section, context.updates_per_epoch))


@SCHEDULERS.register("plateau")
def plateau(
    optimizer: torch.optim.Optimizer,
    section: OptimSection,
    context: ScheduleContext,
    /,
    *,
    patience: int = 2,
    threshold: float = 1e-4,
    threshold_mode: Literal["rel", "abs"] = "rel",
    cooldown: int = 0,
) -> Schedule:
    """Linear warm-up over ``warmup_epochs`` (from ``warmup_start_factor``; 0: none), then ×``gamma`` each
    time the validation ``select_metric`` has not improved (by ``threshold``, in the metric's own
    direction) for ``patience`` validations, never below ``min_lr_factor``; after a drop, ``cooldown``
    validations pass before counting again. Stepped per validation (``ReduceLROnPlateau``)."""
    return PlateauSchedule(
        optimizer,
        _warmup_factor(section, context.updates_per_epoch),
        context.mode,
        section.gamma,
        patience,
        threshold,
        threshold_mode,
        cooldown,
        section.min_lr_factor,
    )


@SCHEDULERS.register("onecycle")
def onecycle(
    optimizer: torch.optim.Optimizer,
    section: OptimSection,
    context: ScheduleContext,
    /,
    *,
    pct_start: float = 0.3,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    anneal_strategy: Literal["cos", "linear"] = "cos",
    three_phase: bool = False,
    cycle_momentum: bool = False,
    base_momentum: float = 0.85,
    max_momentum: float = 0.95,
) -> Schedule:
    """``OneCycleLR`` over ``epochs`` (torch's defaults, except ``cycle_momentum``: off, so the optimizer's
    momentum / beta1 stay as configured; on, they cycle between ``max_momentum`` and ``base_momentum``)."""
    return OneCycleSchedule(
        optimizer,
        section.epochs * context.updates_per_epoch,
        pct_start=pct_start,
        div_factor=div_factor,
        final_div_factor=final_div_factor,
        anneal_strategy=anneal_strategy,
        three_phase=three_phase,
        cycle_momentum=cycle_momentum,
        base_momentum=base_momentum,
        max_momentum=max_momentum,
    )


#: Schedules that step on validation, so a run without validation cannot use them.
VALIDATION_SCHEDULES: frozenset[str] = frozenset({"plateau"})


def own_options(registry: Registry[Any]) -> str:
    """``"adam: betas, eps, amsgrad; ..."``: the own hyperparameters of each entry that has some (its
    keyword-only parameters, which ``optimizer_args`` / ``scheduler_args`` set), for help texts."""
    options = {name: ", ".join(registry.parameters(name)) for name in registry.available()}
    return "; ".join(f"{name}: {names}" for name, names in options.items() if names)


def lr_factor_fn(section: OptimSection, updates_per_epoch: int) -> LrFactor:
    """Multiplier of the base lr as a function of the update (0-based), for the schedules that are a
    function of the update alone (not ``plateau``, ``onecycle``)."""
    if section.scheduler not in FACTORS:
        raise ConfigError(f"scheduler '{section.scheduler}' is not a function of the update alone")
    return FACTORS[section.scheduler](section, updates_per_epoch)


def build_scheduler(
    section: OptimSection,
    optimizer: torch.optim.Optimizer,
    updates_per_epoch: int,
    higher_is_better: bool = True,
) -> Schedule:
    """The configured schedule over ``optimizer`` (``higher_is_better``: the selection metric's direction,
    for ``plateau``)."""
    context = ScheduleContext(updates_per_epoch, higher_is_better)
    return SCHEDULERS.get(section.scheduler)(optimizer, section, context, **section.scheduler_args)
