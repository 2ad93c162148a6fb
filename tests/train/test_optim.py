"""Schedules against their closed forms, computed independently here; loss parameters get their own group."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from dmlkit.config import make_config
from dmlkit.errors import ConfigError
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


# ------------------------------------------------------------------ optimizers against their libraries


def _two_layer() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))


def _one_step(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    torch.manual_seed(1)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(5, 4)).pow(2).sum().backward()
        optimizer.step()


@pytest.mark.parametrize(
    ("name", "args", "reference"),
    [
        ("rmsprop", {"alpha": 0.9, "momentum": 0.5, "centered": True},
         lambda p: torch.optim.RMSprop(p, lr=0.01, weight_decay=0.1, alpha=0.9, momentum=0.5, centered=True)),
        ("lamb", {"betas": [0.8, 0.99], "max_grad_norm": None},
         lambda p: __import__("timm.optim").optim.Lamb(p, lr=0.01, weight_decay=0.1, betas=(0.8, 0.99),
                                                       max_grad_norm=None)),
        ("lion", {"betas": [0.95, 0.98]},
         lambda p: __import__("timm.optim").optim.Lion(p, lr=0.01, weight_decay=0.1, betas=(0.95, 0.98))),
        ("adam", {"betas": [0.5, 0.9], "eps": 1e-6, "amsgrad": True},
         lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.1, betas=(0.5, 0.9), eps=1e-6, amsgrad=True)),
        ("sgd", {"nesterov": True},
         lambda p: torch.optim.SGD(p, lr=0.01, weight_decay=0.1, momentum=0.9, nesterov=True)),
    ],
)  # fmt: skip
def test_optimizers_take_their_arguments_and_match_the_library(name, args, reference) -> None:
    config = make_config({"optimizer": name, "optimizer_args": args, "lr": 0.01, "weight_decay": 0.1})
    ours_model, theirs_model = _two_layer(), _two_layer()
    ours = build_optimizer(config.optim, ours_model, nn.Module())
    theirs = reference(theirs_model.parameters())
    assert type(ours) is type(theirs)
    _one_step(ours, ours_model)
    _one_step(theirs, theirs_model)
    for a, b in zip(ours_model.parameters(), theirs_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_optimizer_args_are_checked_when_the_config_is_made() -> None:
    from dmlkit.errors import ConfigError, UnknownNameError

    with pytest.raises(UnknownNameError, match="argument of optimizer 'lion' 'eps'; did you mean 'betas'"):
        make_config({"optimizer": "lion", "optimizer_args": {"eps": 1e-8}})
    with pytest.raises(ConfigError, match="optimizer 'rmsprop': argument alpha must be a number"):
        make_config({"optimizer": "rmsprop", "optimizer_args": {"alpha": "high"}})
    with pytest.raises(UnknownNameError, match="argument of optimizer 'adam' 'section'"):
        make_config({"optimizer": "adam", "optimizer_args": {"section": 1}})  # positional-only: not an option
    with pytest.raises(ConfigError, match="is not a finite number"):
        make_config({"optimizer_args": {"eps": float("nan")}})


def test_every_optimizer_and_schedule_lists_its_own_options_in_the_help() -> None:
    from dmlkit.config.sections import OptimSection

    help_text = OptimSection.model_fields["optimizer_args"].description
    assert "rmsprop: alpha, eps, momentum, centered" in help_text and "lion: betas" in help_text
    assert "plateau: patience" in OptimSection.model_fields["scheduler_args"].description


# ------------------------------------------------------------------ parameter groups: head_lr


class _Embedder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.pool = nn.Module()
        self.pool.p = nn.Parameter(torch.tensor(3.0))  # a GeM-like learnable pooling parameter
        self.head = nn.Linear(4, 2)


def test_head_lr_gives_pooling_and_head_their_own_group() -> None:
    config = make_config({"lr": 0.01, "head_lr": 0.1, "loss_lr": 0.5})
    model = _Embedder()
    objective = nn.Module()
    objective.proxies = nn.Parameter(torch.randn(3, 2))
    groups = {g["name"]: g for g in build_optimizer(config.optim, model, objective).param_groups}
    assert list(groups) == ["backbone", "head", "loss"]
    assert [groups[n]["lr"] for n in groups] == [0.01, 0.1, 0.5]
    assert {id(p) for p in groups["backbone"]["params"]} == {id(p) for p in model.backbone.parameters()}
    assert {id(p) for p in groups["head"]["params"]} == {id(model.pool.p), *map(id, model.head.parameters())}


def test_without_head_lr_the_model_is_one_group_and_frozen_parameters_are_left_out() -> None:
    model = _Embedder()
    model.backbone[1].requires_grad_(False)  # e.g. frozen BatchNorm
    optimizer = build_optimizer(make_config({}).optim, model, nn.Module())
    assert [g["name"] for g in optimizer.param_groups] == ["model"]
    assert len(optimizer.param_groups[0]["params"]) == len(list(model.parameters())) - 2


def test_head_lr_needs_a_head_with_parameters() -> None:
    from dmlkit import models
    from dmlkit.errors import ConfigError

    headless = models.build_model(embedding_size=0, pooling="avg")
    with pytest.raises(ConfigError, match=r"head_lr 0\.1: the model's pooling and head have no trainable"):
        build_optimizer(make_config({"head_lr": 0.1}).optim, headless, nn.Module())
    with pytest.raises(ConfigError, match="head_lr must be positive"):
        make_config({"head_lr": 0})


def test_split_of_an_embedding_model() -> None:
    from dmlkit import models
    from dmlkit.train.optim import split_model_parameters

    model = models.build_model(embedding_size=8, pooling="gem")
    backbone, head = split_model_parameters(model)
    assert {id(p) for p in backbone} == {id(p) for p in model.backbone.parameters()}
    assert {id(p) for p in head} == {id(p) for p in [*model.pool.parameters(), *model.head.parameters()]}


# ------------------------------------------------------------------ plateau and onecycle against torch


def _optimizer(lrs: tuple[float, ...] = (0.1,)) -> torch.optim.Optimizer:
    return torch.optim.SGD([{"params": [nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs])


VALUES = [0.1, 0.2, 0.2, 0.19, 0.21, 0.2, 0.2, 0.2, float("nan"), 0.3, 0.3, 0.3]


@pytest.mark.parametrize("higher_is_better", [True, False])
@pytest.mark.parametrize(
    "args", [{}, {"patience": 1, "cooldown": 1}, {"threshold": 0.1, "threshold_mode": "abs"}]
)
def test_plateau_matches_reduce_lr_on_plateau(higher_is_better: bool, args: dict) -> None:
    config = make_config(
        {
            "scheduler": "plateau",
            "scheduler_args": args,
            "warmup_epochs": 0,
            "gamma": 0.5,
            "min_lr_factor": 0.1,
        }
    )
    ours_opt, theirs_opt = _optimizer((0.1, 0.4)), _optimizer((0.1, 0.4))
    ours = build_scheduler(config.optim, ours_opt, 5, higher_is_better)
    theirs = torch.optim.lr_scheduler.ReduceLROnPlateau(
        theirs_opt,
        mode="max" if higher_is_better else "min",
        factor=0.5,
        min_lr=[0.01, 0.04],
        **{"patience": 2, **args},
    )
    for value in VALUES:
        for _ in range(5):
            ours_opt.step()
            ours.step()  # per update: nothing changes after warm-up
        ours.on_validation(value)
        theirs.step(value)
        for a, b in zip(ours_opt.param_groups, theirs_opt.param_groups, strict=True):
            assert a["lr"] == pytest.approx(b["lr"], rel=1e-12)
    assert ours_opt.param_groups[0]["lr"] < 0.1  # the sequence did drop


def test_plateau_warm_up_then_drops_multiply_it() -> None:
    config = make_config(
        {
            "scheduler": "plateau",
            "scheduler_args": {"patience": 0},
            "warmup_epochs": 1,
            "warmup_start_factor": 0.2,
        }
    )
    optimizer = _optimizer((1.0,))
    schedule = build_scheduler(config.optim, optimizer, 4)
    seen = []
    for update in range(4):
        seen.append(optimizer.param_groups[0]["lr"])
        if update == 1:
            schedule.on_validation(0.5)  # the first value is the best so far: no drop
            schedule.on_validation(0.4)  # patience 0: a drop, even during warm-up
        optimizer.step()
        schedule.step()
    assert seen == pytest.approx([0.2, 0.4, 0.06, 0.08])
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)  # warm-up over: 1 × the plateau factor


def test_plateau_state_round_trip() -> None:
    config = make_config({"scheduler": "plateau", "scheduler_args": {"patience": 1}, "warmup_epochs": 0})
    first_opt = _optimizer()
    first = build_scheduler(config.optim, first_opt, 3)
    for value in (0.5, 0.4, 0.3, 0.2):  # a drop at 0.3, then one validation without improvement
        first.on_validation(value)
    state = first.state_dict()
    resumed_opt = _optimizer()
    resumed = build_scheduler(config.optim, resumed_opt, 3)
    resumed.load_state_dict(state)
    assert resumed_opt.param_groups[0]["lr"] == first_opt.param_groups[0]["lr"] == pytest.approx(0.01)
    for schedule in (first, resumed):
        schedule.on_validation(0.1)  # the second validation without improvement since the drop: counted
    assert resumed_opt.param_groups[0]["lr"] == first_opt.param_groups[0]["lr"] == pytest.approx(0.001)


@pytest.mark.parametrize("args", [{}, {"pct_start": 0.5, "anneal_strategy": "linear", "three_phase": True}])
def test_onecycle_matches_torch(args: dict) -> None:
    config = make_config({"scheduler": "onecycle", "scheduler_args": args, "epochs": 3, "lr": 0.5})
    ours_opt, theirs_opt = _optimizer((0.5, 0.05)), _optimizer((0.5, 0.05))
    ours = build_scheduler(config.optim, ours_opt, 4)
    theirs = torch.optim.lr_scheduler.OneCycleLR(
        theirs_opt, max_lr=[0.5, 0.05], total_steps=12, cycle_momentum=False, **args
    )
    for update in range(12):
        assert [g["lr"] for g in ours_opt.param_groups] == [g["lr"] for g in theirs_opt.param_groups], update
        ours_opt.step(), theirs_opt.step()
        ours.step()
        if update < 11:
            theirs.step()
    ours.step()  # past the cycle (e.g. a longer resumed run): the last lr stays


def test_onecycle_resumed_with_more_epochs_follows_the_longer_cycle() -> None:
    short = make_config({"scheduler": "onecycle", "epochs": 2})
    first_opt = _optimizer()
    first = build_scheduler(short.optim, first_opt, 5)
    for _ in range(4):
        first_opt.step()
        first.step()
    longer = make_config({"scheduler": "onecycle", "epochs": 4})
    resumed_opt = _optimizer()
    resumed = build_scheduler(longer.optim, resumed_opt, 5)
    resumed_opt.load_state_dict(first_opt.state_dict())
    resumed.load_state_dict(first.state_dict())
    reference_opt = _optimizer()
    reference = torch.optim.lr_scheduler.OneCycleLR(
        reference_opt, max_lr=0.1, total_steps=20, cycle_momentum=False
    )
    for _ in range(4):
        reference_opt.step()
        reference.step()
    assert resumed_opt.param_groups[0]["lr"] == pytest.approx(reference_opt.param_groups[0]["lr"], rel=1e-12)
    assert resumed_opt.param_groups[0]["lr"] != pytest.approx(first_opt.param_groups[0]["lr"])


def test_onecycle_can_cycle_momentum() -> None:
    config = make_config(
        {"scheduler": "onecycle", "scheduler_args": {"cycle_momentum": True}, "optimizer": "sgd", "epochs": 1}
    )
    optimizer = build_optimizer(config.optim, nn.Linear(2, 2), nn.Module())
    build_scheduler(config.optim, optimizer, 10)
    assert optimizer.param_groups[0]["momentum"] == pytest.approx(0.95)  # max_momentum at the start


def test_scheduler_args_and_validation_schedules_are_checked() -> None:
    from dmlkit.errors import ConfigError, UnknownNameError
    from dmlkit.train.optim import lr_factor_fn

    with pytest.raises(UnknownNameError, match="argument of scheduler 'plateau' 'patients'"):
        make_config({"scheduler": "plateau", "scheduler_args": {"patients": 3}})
    with pytest.raises(UnknownNameError, match="argument of scheduler 'warmup_cosine' 'patience'"):
        make_config({"scheduler_args": {"patience": 3}})
    with pytest.raises(ConfigError, match="threshold_mode must be one of 'rel', 'abs'"):
        make_config({"scheduler": "plateau", "scheduler_args": {"threshold_mode": "relative"}})
    with pytest.raises(ConfigError, match="scheduler 'plateau' steps on validation, but val_fraction is 0"):
        make_config({"scheduler": "plateau", "val_fraction": 0})
    with pytest.raises(ConfigError, match="not a function of the update alone"):
        lr_factor_fn(make_config({"scheduler": "onecycle"}).optim, 10)


NEVER_DROPS = r"step_size=10 epochs, but the run has epochs=4: it would never drop"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"epochs": 4, "scheduler": "step"}, NEVER_DROPS),
        ({"epochs": 4, "scheduler": "step", "step_size": 4}, "would never drop"),
        ({"epochs": 5, "scheduler": "multistep", "milestones": [2, 5, 7]}, r"milestones \[5, 7\] are not"),
    ],
)
def test_a_drop_the_run_never_reaches_is_refused(options, message) -> None:
    with pytest.raises(ConfigError, match=message):
        make_config(options)
    reached = {"epochs": 11} if options["scheduler"] == "step" else {"milestones": [2]}
    make_config({**options, **reached})
