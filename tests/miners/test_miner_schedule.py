"""Progressive hard mining: MinerSchedule values against the closed forms, apply/knobs, parse errors."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from dmlkit import miners
from dmlkit.errors import ConfigError, UnknownNameError
from dmlkit.miners.schedule import MinerSchedule, check_schedule, float_hyperparameters

PROGRESS = [0.0, 0.05, 0.1, 0.2, 0.3337, 0.45, 0.5, 0.79, 0.8, 0.9, 1.0]


def closed_form(kind: str, start: float, end: float, lo: float, hi: float, p: float, steps: int = 1) -> float:
    if p <= lo:
        t = 0.0
    elif p >= hi:
        t = 1.0
    else:
        t = (p - lo) / (hi - lo)
    f = {"linear": t, "cosine": 0.5 - 0.5 * math.cos(math.pi * t), "step": math.floor(steps * t) / steps}[
        kind
    ]
    return start + (end - start) * f


@pytest.mark.parametrize(
    ("text", "kind", "start", "end", "lo", "hi", "steps"),
    [
        ("linear:start=0.0,end=1.0,from=0.1,until=0.8", "linear", 0.0, 1.0, 0.1, 0.8, 1),
        ("cosine:start=0.2,end=0.05,from=0.0,until=0.5", "cosine", 0.2, 0.05, 0.0, 0.5, 1),
        ("step:start=0,end=1,from=0.2,until=0.9,steps=4", "step", 0.0, 1.0, 0.2, 0.9, 4),
        ("step:start=1, end=3", "step", 1.0, 3.0, 0.0, 1.0, 1),
        (" linear : start = -0.5 , end = 0.5 ", "linear", -0.5, 0.5, 0.0, 1.0, 1),
    ],
)
def test_values_match_closed_forms(text, kind, start, end, lo, hi, steps) -> None:
    schedule = MinerSchedule.parse(text)
    assert (schedule.kind, schedule.start, schedule.end) == (kind, start, end)
    assert (schedule.from_fraction, schedule.until_fraction, schedule.steps) == (lo, hi, steps)
    for p in PROGRESS:
        assert schedule.value(p) == pytest.approx(closed_form(kind, start, end, lo, hi, p, steps), abs=1e-12)
    assert schedule.value(-1.0) == start and schedule.value(2.0) == end and schedule.value(hi) == end


def test_step_jumps_and_degenerate_window() -> None:
    step = MinerSchedule.parse("step:start=0,end=1,from=0.2,until=0.6,steps=4")
    assert [step.value(p) for p in (0.19, 0.2, 0.299, 0.3, 0.4, 0.5, 0.599, 0.6)] == [
        0.0,
        0.0,
        0.0,
        0.25,
        0.5,
        0.75,
        0.75,
        1.0,
    ]
    jump = MinerSchedule(kind="linear", start=2.0, end=5.0, from_fraction=0.5, until_fraction=0.5)
    assert [jump.value(p) for p in (0.0, 0.4999, 0.5, 1.0)] == [2.0, 2.0, 5.0, 5.0]
    with pytest.raises(ConfigError, match="progress is NaN"):
        jump.value(float("nan"))


def test_dict_form_round_trips_and_defaults() -> None:
    text = MinerSchedule.parse("step:start=0.1,end=0.9,from=0.25,until=0.75,steps=3,knob=margin")
    as_dict = {
        "kind": "step",
        "start": 0.1,
        "end": 0.9,
        "from": 0.25,
        "until": 0.75,
        "steps": 3,
        "knob": "margin",
    }
    assert MinerSchedule.parse(as_dict) == text == MinerSchedule.parse(text.to_text())
    assert MinerSchedule.parse(text.to_dict()) == text and MinerSchedule.parse(text) is text
    long_names = {"kind": "cosine", "start": 1, "end": 0, "from_fraction": 0.1, "until_fraction": 0.2}
    assert MinerSchedule.parse(long_names) == MinerSchedule("cosine", 1.0, 0.0, 0.1, 0.2)
    assert MinerSchedule.parse({"kind": "linear", "start": 0, "end": 1}) == MinerSchedule("linear", 0.0, 1.0)
    assert str(MinerSchedule("linear", 0.0, 1.0)) == "linear:start=0.0,end=1.0,from=0.0,until=1.0"
    assert isinstance(hash(text), int)  # frozen: usable as a key


@pytest.mark.parametrize(
    ("spec", "error", "match"),
    [
        ("linear:start=abc,end=1", ConfigError, r"'start=abc' is not a number"),
        ("linear:start=0,end=1,from=x", ConfigError, r"'from=x' is not a number"),
        ("lienar:start=0,end=1", UnknownNameError, r"kind 'lienar'; did you mean 'linear'"),
        ("linear:start=0,end=1,frm=0.1", UnknownNameError, r"schedule key 'frm'; did you mean 'from'"),
        ("linear:start=0", ConfigError, r"missing 'end'"),
        ("linear", ConfigError, r"expected '<kind>:key=value"),
        ("linear:start=0,,end=1", ConfigError, r"empty entry"),
        ("linear:start=0,end", ConfigError, r"'end' is not key=value"),
        ("linear:start=0,end=1,start=2", ConfigError, r"'start' is given twice"),
        ("linear:start=0,end=1,from=0.9,until=0.1", ConfigError, r"from <= until"),
        ("linear:start=0,end=1,until=1.5", ConfigError, r"0 <= from <= until <= 1"),
        ("linear:start=0,end=1,steps=3", ConfigError, r"steps is only used by kind 'step'"),
        ("step:start=0,end=1,steps=0", ConfigError, r"steps must be an integer >= 1"),
        ("step:start=0,end=1,steps=2.5", ConfigError, r"'steps=2.5' is not an integer"),
        ("linear:start=0,end=inf", ConfigError, r"end must be a finite number"),
        ("linear:start=0,end=1,knob=2x", ConfigError, r"knob must be an attribute name"),
        ({"kind": "linear", "start": "0", "end": 1}, ConfigError, r"'start' must be a number"),
        ({"kind": "linear", "start": 0, "end": 1, "from": 0.1, "from_fraction": 0.2}, ConfigError, "twice"),
        ({"kind": "linear", "start": True, "end": 1}, ConfigError, r"'start' must be a number"),
        (3.0, ConfigError, r"must be a string like"),
    ],
)
def test_parse_errors_name_the_bad_part(spec, error, match) -> None:
    with pytest.raises(error, match=match):
        MinerSchedule.parse(spec)


# ---------------------------------------------------------------------------------------------- knobs


def test_every_miner_declares_a_valid_knob() -> None:
    for name in miners.available():
        cls = miners.REGISTRY.get(name)
        assert "hardness_knob" in vars(cls), f"{name} does not declare hardness_knob itself"
        knob = cls.hardness_knob
        assert knob is None or knob in float_hyperparameters(cls), (name, knob)
        assert miners.hardness_knob(name) == knob
        for key, (low, high) in getattr(cls, "knob_ranges", {}).items():
            assert key in inspect.signature(cls).parameters and low < high
            default = inspect.signature(cls).parameters[key].default
            assert low <= default <= high


KNOBS = {
    "triplet_margin": "margin",
    "pair_margin": "neg_margin",
    "multisimilarity": "epsilon",
    "semihard": "hard_fraction",
    "angular": "angle",
    "hdc": "filter_percentage",
    "distance_weighted": "cutoff",
    "distance": "lower_cutoff",
    "rho_distance": "lower_cutoff",
}


@pytest.mark.parametrize(("name", "knob"), sorted(KNOBS.items()))
def test_apply_sets_the_knob(name: str, knob: str) -> None:
    miner = miners.build(name)
    start, end = (0.1, 0.3) if knob != "angle" else (10.0, 40.0)
    schedule = MinerSchedule("linear", start, end, 0.0, 0.5)
    assert check_schedule(name, schedule.to_text()) == schedule
    assert schedule.knob_for(miner) == knob == schedule.knob_for(type(miner))
    for p, expected in ((0.0, start), (0.25, (start + end) / 2), (0.9, end)):
        assert schedule.apply(miner, p) == pytest.approx(expected)
        assert getattr(miner, knob) == pytest.approx(expected)
    emb = torch.nn.functional.normalize(torch.randn(16, 6, generator=torch.Generator().manual_seed(0)), dim=1)
    miner(emb, torch.arange(4).repeat_interleave(4))  # the miner still runs with the scheduled value


def test_explicit_knob_and_errors() -> None:
    rho = miners.build("rho_distance")
    cp = MinerSchedule.parse("linear:start=0,end=0.5,knob=cp")
    assert cp.apply(rho, 1.0) == 0.5 and rho.cp == 0.5 and rho.lower_cutoff == 0.5
    # a miner without a knob: names it and the miners that have one
    with pytest.raises(
        ConfigError, match=r"miner 'batch_hard' has no hardness knob.*triplet_margin \(margin\)"
    ):
        check_schedule("batch_hard", "linear:start=0,end=1")
    with pytest.raises(ConfigError, match="miner 'lifted' has no hardness knob"):
        MinerSchedule.parse("linear:start=0,end=1").apply(miners.build("lifted"), 0.5)
    # ... unless a float hyperparameter is named
    assert check_schedule("random_distance", "linear:start=0.5,end=0.2,knob=lower_cutoff") is not None
    with pytest.raises(UnknownNameError, match=r"'margn'; did you mean 'margin'"):
        check_schedule("triplet_margin", "linear:start=0,end=1,knob=margn")
    with pytest.raises(UnknownNameError, match="type_of_triplets"):  # not a float hyperparameter
        check_schedule(miners.TripletMarginMiner, "linear:start=0,end=1,knob=type_of_triplets")
    with pytest.raises(
        ConfigError, match=r"end=1.5 is outside the range \[0.0, 1.0\] of 'semihard''s hard_fraction"
    ):
        check_schedule(miners.build("semihard"), {"kind": "linear", "start": 0, "end": 1.5})
    with pytest.raises(UnknownNameError, match="did you mean 'semihard'"):
        check_schedule("semihrd", "linear:start=0,end=1")
    assert check_schedule("semihard", None) is None


def test_hardness_is_a_declared_capability() -> None:
    miner = miners.build("triplet_margin", margin=0.3)
    assert isinstance(miner, miners.HardMiner) and isinstance(miner, miners.Miner)
    assert miner.hardness_knob == "margin" and miner.hardness == 0.3
    miner.set_hardness(0.1)
    assert miner.margin == miner.hardness == 0.1
    rho = miners.build("rho_distance")
    rho.set_hardness(0.4, knob="cp")
    assert rho.cp == 0.4 and rho.hardness == 0.5  # the default knob (lower_cutoff) is untouched
    lifted = miners.build("lifted")
    assert lifted.hardness is None
    with pytest.raises(ConfigError, match="miner 'lifted' has no hardness knob"):
        lifted.set_hardness(0.5)
    with pytest.raises(UnknownNameError, match=r"'margn'; did you mean 'margin'"):
        miner.set_hardness(0.5, knob="margn")

    class Foreign(torch.nn.Module):
        hardness_knob = "margin"

        def __init__(self, margin: float = 0.1) -> None:
            super().__init__()
            self.margin = margin

    assert not isinstance(Foreign(), miners.HardMiner)
    with pytest.raises(ConfigError, match="'Foreign' is not a dmlkit miner"):
        MinerSchedule.parse("linear:start=0,end=1").apply(Foreign(), 0.5)  # type: ignore[arg-type]


def test_progressive_hard_mining_makes_tuples_harder() -> None:
    g = torch.Generator().manual_seed(1)
    emb = torch.nn.functional.normalize(torch.randn(64, 8, generator=g), dim=1)
    labels = torch.arange(16).repeat_interleave(4)
    miner = miners.build("semihard", seed=0)
    schedule = MinerSchedule.parse("linear:start=0.0,end=1.0,from=0.1,until=0.8")
    fractions = []
    for step in range(0, 101, 20):
        value = schedule.apply(miner, step / 100)
        miner(emb, labels)
        fractions.append((value, miner.last_stats["frac_hard"]))
    assert fractions[0][0] == 0.0 and fractions[-1][0] == 1.0
    hard = [f for _, f in fractions]  # at progress 0, 0.2, 0.4, 0.6, 0.8, 1.0
    assert hard[0] < 0.2 < hard[2] < 0.8 < hard[4] and hard[5] > 0.9
