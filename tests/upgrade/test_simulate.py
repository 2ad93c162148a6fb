"""``dmlkit.upgrade.simulate``: the backfill simulator's summary values against hand-computed cases, its
end points against plain evaluations, its order, its errors and its report (JSON, table, plot)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dmlkit import metrics
from dmlkit.errors import ConfigError, DataError, UnknownNameError
from dmlkit.upgrade import simulate as sim
from dmlkit.upgrade.simulate import (
    BackfillInputs,
    BackfillMethod,
    Side,
    auc,
    backfill_order,
    negative_flip_rate,
    relative_gain,
    simulate,
    summarize,
)

METRICS = ("recall@1", "map@r")


def clustered(n: int, d: int, labels: torch.Tensor, noise: float, gen: torch.Generator) -> torch.Tensor:
    centres = torch.randn(int(labels.max()) + 1, d, generator=gen)
    return centres[labels] + noise * torch.randn(n, d, generator=gen)


def make_inputs(leave_one_out: bool, seed: int = 0, d_new: int = 8) -> BackfillInputs:
    gen = torch.Generator().manual_seed(seed)
    n_gallery, n_query = 60, (60 if leave_one_out else 25)
    gl = torch.randint(0, 6, (n_gallery,), generator=gen)
    ql = gl if leave_one_out else torch.randint(0, 6, (n_query,), generator=gen)
    both = torch.cat([ql, gl]) if not leave_one_out else gl

    def side(d: int, noise: float) -> Side:
        x = clustered(len(both), d, both, noise, gen)
        return Side(x[:n_query], x[-n_gallery:]) if not leave_one_out else Side(x, x)

    old, new, bct, comp = side(8, 1.5), side(d_new, 0.5), side(8, 0.7), side(d_new, 0.6)
    return BackfillInputs(
        old=old,
        query_labels=ql,
        gallery_labels=gl,
        leave_one_out=leave_one_out,
        new=new,
        transform_query=torch.randn(n_query, 8, generator=gen),
        bct=bct,
        compatible=comp,
        compatible_query_to_old=torch.randn(n_query, 8, generator=gen),
    )


def evaluate(inputs: BackfillInputs, query: torch.Tensor, gallery: torch.Tensor) -> dict[str, float]:
    """The metrics of ``query`` against the whole ``gallery`` by the plain evaluation (query i is gallery
    item i in leave-one-out: excluded by ids)."""
    if inputs.leave_one_out:
        ids = torch.arange(len(query))
        found = metrics.evaluate(
            query,
            inputs.query_labels,
            gallery,
            inputs.query_labels,
            metrics=METRICS,
            query_ids=ids,
            gallery_ids=ids,
        )
    else:
        found = metrics.evaluate(query, inputs.query_labels, gallery, inputs.gallery_labels, metrics=METRICS)
    return found.metrics


def test_auc_relative_gain_negative_flips_by_hand():
    # trapezoids: 0.5·(0 + 1)/2 + 0.5·(1 + 1)/2 = 0.75
    assert auc([0.0, 0.5, 1.0], [0.0, 1.0, 1.0]) == pytest.approx(0.75)
    assert auc([0.0, 0.25, 0.5, 0.75, 1.0], [0.2, 0.4, 0.4, 0.6, 1.0]) == pytest.approx(
        0.25 * (0.3 + 0.4 + 0.5 + 0.8)
    )
    assert relative_gain(0.75, 0.5, 1.0) == pytest.approx(0.5)
    assert relative_gain(0.4, 0.5, 1.0) == pytest.approx(-0.2)
    assert math.isnan(relative_gain(0.6, 0.5, 0.5))
    reference = torch.tensor([True, True, False, True, True, False])
    current = torch.tensor([False, True, True, False, False, False])
    has_relevant = torch.tensor([True, True, True, False, True, True])
    # flips among queries with R > 0: 0 and 4 (3 has R = 0) → 2 of 5
    assert negative_flip_rate(reference, current, has_relevant) == pytest.approx(2 / 5)
    assert math.isnan(negative_flip_rate(reference, current, torch.zeros(6, dtype=torch.bool)))


def test_summarize_on_constructed_curves():
    fractions = [0.0, 0.25, 0.5, 0.75, 1.0]
    kwargs = dict(negative_flip_rates=[0.0, 0.1, 0.3, 0.2, 0.0], search_seconds=[1.0, 2.0, 3.0, 2.0, 2.0])
    dipping = summarize(fractions, [0.5, 0.6, 0.45, 0.45, 0.9], old=0.5, new=0.9, forward_passes=2, **kwargs)
    assert not dipping.monotone and not dipping.never_below_old
    assert dipping.worst == 0.45 and dipping.worst_fraction == 0.5  # the first of two equal minima
    assert dipping.auc == pytest.approx(0.25 * (0.55 + 0.525 + 0.45 + 0.675))
    assert dipping.relative_gain == pytest.approx((dipping.auc - 0.5) / 0.4)
    assert dipping.worst_negative_flip_rate == pytest.approx(0.3)
    assert dipping.mean_search_seconds == pytest.approx(2.0) and dipping.forward_passes == 2
    # a flat step, and a decrease within rounding, are still monotone; a value 1e-12 under old is not below
    rising = summarize(
        fractions, [0.5, 0.5, 0.6 - 1e-12, 0.6, 0.9], old=0.5 + 1e-12, new=0.9, forward_passes=1, **kwargs
    )
    assert rising.monotone and rising.never_below_old
    assert rising.worst_fraction == 0.0
    falling = summarize(
        fractions, [0.5, 0.5, 0.6, 0.6 - 1e-6, 0.9], old=0.5, new=0.9, forward_passes=1, **kwargs
    )
    assert not falling.monotone and falling.never_below_old


@pytest.mark.parametrize("leave_one_out", [True, False])
def test_end_points_and_grid_equal_plain_evaluations(leave_one_out):
    inputs = make_inputs(leave_one_out)
    report = simulate(inputs, sim.available(), steps=2, metrics=METRICS, seed=1)
    old, new = inputs.old, inputs.new
    assert report.fractions == [0.0, 0.5, 1.0]
    assert report.grid["old/old"] == pytest.approx(evaluate(inputs, old.query, old.gallery))
    assert report.grid["new/old"] == pytest.approx(evaluate(inputs, new.query, old.gallery))
    assert report.grid["new/new"] == pytest.approx(evaluate(inputs, new.query, new.gallery))
    # (query at t = 0 searching the old gallery, query at t = 1 and the gallery it reaches at t = 1)
    ends = {
        "old": ((old.query, old.gallery), (old.query, old.gallery)),
        "rank-merge": ((old.query, old.gallery), (new.query, new.gallery)),
        "rank-merge+transform": ((inputs.transform_query, old.gallery), (new.query, new.gallery)),
        "compatible": (
            (inputs.compatible_query_to_old, old.gallery),
            (inputs.compatible.query, inputs.compatible.gallery),
        ),
        "new-naive": ((new.query, old.gallery), (new.query, new.gallery)),
        "bct": ((inputs.bct.query, old.gallery), (inputs.bct.query, inputs.bct.gallery)),
    }
    for name, (start, end) in ends.items():
        curve = report.curves[name]
        at_start = {m: curve.values[m][0] for m in METRICS}
        at_end = {m: curve.values[m][-1] for m in METRICS}
        assert at_start == pytest.approx(evaluate(inputs, *start)), name
        assert at_end == pytest.approx(evaluate(inputs, *end)), name
    assert report.curves["rank-merge"].values["recall@1"][0] == pytest.approx(
        report.grid["old/old"]["recall@1"]
    )
    assert report.curves["rank-merge"].values["recall@1"][-1] == pytest.approx(
        report.grid["new/new"]["recall@1"]
    )
    # never upgrading: constant, no flips; merging starts as the old system, so no flips at t = 0
    assert report.curves["old"].negative_flip_rate == [0.0, 0.0, 0.0]
    assert report.curves["rank-merge"].negative_flip_rate[0] == 0.0
    assert report.summary["old"].relative_gain == pytest.approx(0.0, abs=1e-12)
    assert (
        report.summary["rank-merge"].forward_passes == 2 and report.summary["compatible"].forward_passes == 1
    )


def test_negative_flips_at_full_backfill_by_brute_force():
    inputs = make_inputs(False, seed=3)
    report = simulate(inputs, ["rank-merge"], steps=1, metrics=METRICS)

    def top1_correct(query: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
        sims = torch.nn.functional.normalize(query, dim=1) @ torch.nn.functional.normalize(gallery, dim=1).T
        return inputs.gallery_labels[sims.argmax(dim=1)] == inputs.query_labels

    before = top1_correct(inputs.old.query, inputs.old.gallery)
    after = top1_correct(inputs.new.query, inputs.new.gallery)
    has_relevant = (inputs.query_labels[:, None] == inputs.gallery_labels[None, :]).any(dim=1)
    expected = float((before & ~after & has_relevant).sum()) / float(has_relevant.sum())
    assert report.curves["rank-merge"].negative_flip_rate[-1] == pytest.approx(expected)


class Recorder(BackfillMethod):
    """Records the backfilled mask of every step (and searches as the old system)."""

    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []

    def results(self, inputs, backfilled, k, options):
        self.seen.append(backfilled.clone())
        return sim.build("old").results(inputs, backfilled, k, options)


def test_steps_backfill_the_first_items_of_the_order():
    inputs = make_inputs(True)
    recorder = Recorder()
    report = simulate(inputs, [recorder], steps=4, metrics=METRICS, order="random", seed=5)
    assert "Recorder" in report.curves
    order = backfill_order(inputs.old.gallery, "random", 5)
    # round(t · 60) at t = 0, 1/4, 1/2, 3/4, 1
    assert [int(mask.sum()) for mask in recorder.seen] == [0, 15, 30, 45, 60]
    for mask, count in zip(recorder.seen, [0, 15, 30, 45, 60], strict=True):
        assert set(mask.nonzero().squeeze(1).tolist()) == set(order[:count].tolist())
    # halves round up: 10 items in 4 steps → 0, 3 (2.5), 5, 8 (7.5), 10
    small = BackfillInputs(
        old=Side(inputs.old.query[:10], inputs.old.gallery[:10]),
        query_labels=inputs.query_labels[:10],
        gallery_labels=inputs.gallery_labels[:10],
        leave_one_out=True,
    )
    recorder = Recorder()
    simulate(small, [recorder], steps=4, metrics=("recall@1",))
    assert [int(mask.sum()) for mask in recorder.seen] == [0, 3, 5, 8, 10]


def test_random_order_is_a_seeded_permutation():
    gallery = torch.randn(50, 4)
    first = backfill_order(gallery, "random", 7)
    assert sorted(first.tolist()) == list(range(50))
    assert torch.equal(first, backfill_order(gallery, "random", 7))
    assert not torch.equal(first, backfill_order(gallery, "random", 8))
    with pytest.raises(UnknownNameError, match="uncertainty"):
        backfill_order(gallery, "uncertain", 0)


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_uncertainty_order_puts_an_isolated_item_first(distance):
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(40) % 4
    gallery = clustered(40, 6, labels, 0.05, gen)
    planted = 17
    # isolated in both senses: every other row lies in the first 5 dimensions, the planted one along the
    # 6th (cosine similarity 0 to all) and far away (distance ≥ 50)
    gallery[:, 5] = 0.0
    gallery[planted] = 0.0
    gallery[planted, 5] = 50.0
    order = backfill_order(gallery, "uncertainty", 0, k=5, distance=distance)
    assert sorted(order.tolist()) == list(range(40))
    assert int(order[0]) == planted
    # equal confidence everywhere: ties by index
    assert backfill_order(torch.ones(6, 3), "uncertainty", 0, k=2, distance=distance).tolist() == list(
        range(6)
    )


def test_missing_inputs_raise_naming_method_and_input():
    inputs = make_inputs(False)
    bare = BackfillInputs(
        old=inputs.old,
        query_labels=inputs.query_labels,
        gallery_labels=inputs.gallery_labels,
        leave_one_out=False,
    )
    with pytest.raises(ConfigError, match=r"'rank-merge' needs new\b"):
        simulate(bare, ["old", "rank-merge"], metrics=METRICS)
    partial = BackfillInputs(
        old=inputs.old,
        query_labels=inputs.query_labels,
        gallery_labels=inputs.gallery_labels,
        leave_one_out=False,
        new=inputs.new,
        compatible=inputs.compatible,
    )
    with pytest.raises(ConfigError, match=r"'rank-merge\+transform' needs transform_query"):
        simulate(partial, ["rank-merge+transform"], metrics=METRICS)
    with pytest.raises(ConfigError, match=r"'compatible' needs compatible_query_to_old"):
        simulate(partial, ["compatible"], metrics=METRICS)
    with pytest.raises(ConfigError, match=r"'bct' needs bct"):
        simulate(partial, ["bct"], metrics=METRICS)
    with pytest.raises(UnknownNameError, match="rank-merge"):
        simulate(partial, ["rank-merg"], metrics=METRICS)
    with pytest.raises(ConfigError, match="retrieval metrics only"):
        simulate(partial, ["old"], metrics=("recall@1", "nmi"))


def test_different_dimensions_give_nan_new_old_and_refuse_a_mixed_gallery():
    inputs = make_inputs(False, d_new=5)
    report = simulate(inputs, ["rank-merge", "compatible"], steps=2, metrics=METRICS)
    assert all(math.isnan(v) for v in report.grid["new/old"].values())
    assert any("new/old" in note for note in report.notes)
    with pytest.raises(ConfigError, match="gallery_old has 8, gallery_new 5"):
        simulate(inputs, ["new-naive"], steps=2, metrics=METRICS)


def test_report_json_table_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    inputs = make_inputs(True)
    bare = BackfillInputs(
        old=inputs.old,
        query_labels=inputs.query_labels,
        gallery_labels=inputs.gallery_labels,
        leave_one_out=True,
    )
    full = simulate(inputs, sim.available(), steps=4, metrics=METRICS, order="uncertainty")
    without_new = simulate(bare, ["old"], steps=3, metrics=METRICS)
    for report in (full, without_new):
        text = report.to_json()
        decoded = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
        assert decoded["metrics"] == list(METRICS) and set(decoded["curves"]) == set(report.curves)
    assert json.loads(without_new.to_json())["grid"]["new/new"]["recall@1"] is None  # NaN → null
    table = full.table()
    for name in sim.available():
        assert f"| {name} |" in table
    assert "t=0.25" in table and "t=0.75" in table
    odd = without_new.table()  # 3 steps: 0.25 is not a step; the nearest is shown with its real fraction
    assert "t=0.33" in odd and "t=0.25" not in odd
    path = full.plot(tmp_path / "backfill.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rows_that_do_not_fit_raise_naming_the_field():
    inputs = make_inputs(False)
    inputs.transform_query = inputs.transform_query[:-1]
    with pytest.raises(DataError, match=r"transform_query has 24 rows, but there are 25 queries"):
        simulate(inputs, ["old"], metrics=METRICS)
    inputs = make_inputs(False)
    inputs.bct = Side(inputs.bct.query, inputs.bct.gallery[:50])
    with pytest.raises(DataError, match=r"bct.gallery has 50 rows, but there are 60 gallery items"):
        simulate(inputs, ["old"], metrics=METRICS)
