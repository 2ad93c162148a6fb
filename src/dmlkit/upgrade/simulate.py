"""The backfill simulator: how retrieval quality evolves while a gallery is re-embedded by a new model.

Pure tensors in, a :class:`BackfillReport` out. Given the old and new models' embeddings of the queries
and the gallery (and, optionally, those of compatibility-trained models), :func:`simulate` backfills the
gallery in ``steps`` rounds in a given order and, at every fraction ``t_j = j / steps``, searches with
every method (:data:`REGISTRY`: ``old``, ``new-naive``, ``bct``, ``rank-merge``, ``rank-merge+transform``,
``compatible``) and records its metrics, its negative-flip rate against the old system and its search time.

The summary of a method follows the backfilling literature (Shen et al., "Towards Backward-Compatible
Representation Learning", CVPR 2020 — BCT; Jang et al., "FastFill: Efficient Compatible Model Update",
ICLR 2023; Seo et al., "Online Backfilling with No Regret for Large-Scale Image Retrieval", CVPR 2023):

- AUC: the area under metric-vs-fraction-backfilled, by the trapezoid rule over ``t_0 … t_steps``;
- relative gain ``(AUC − old/old) / (new/new − old/old)``: 0 = no better than never upgrading, 1 = as
  good as an instant, free upgrade;
- the worst step (the "no regret" question: does quality ever drop below the old system's?);
- the negative-flip rate (Yan et al., "Positive-Congruent Training", CVPR 2021): the share of queries
  the old system answered right at rank 1 and the method answers wrong.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from dmlkit import metrics as metrics_lib
from dmlkit import search
from dmlkit.distances import DistanceLike
from dmlkit.errors import ConfigError, DataError, UnknownNameError, unknown_name_message
from dmlkit.metrics.retrieval import is_retrieval
from dmlkit.registry import Registered, Registry
from dmlkit.search.results import RetrievalResults, strict_json
from dmlkit.upgrade.rank_merge import merged_search, mixed_gallery

__all__ = [
    "DEFAULT_METRICS",
    "ORDERS",
    "REGISTRY",
    "BackfillInputs",
    "BackfillMethod",
    "BackfillReport",
    "MethodCurve",
    "MethodSummary",
    "SearchOptions",
    "Side",
    "auc",
    "available",
    "backfill_order",
    "build",
    "negative_flip_rate",
    "relative_gain",
    "simulate",
    "summarize",
    "top1_correct",
]

#: Metrics of :func:`simulate` by default; the first is the one the summary and the plot are about.
DEFAULT_METRICS: tuple[str, ...] = ("map@1000", "recall@1", "map@r")
#: Backfill orders of :func:`backfill_order`.
ORDERS: tuple[str, ...] = ("random", "uncertainty")
#: Tolerance of the ``monotone`` and ``never_below_old`` checks (metric values are float means).
TOLERANCE = 1e-9


# ---------------------------------------------------------------------------------------------------------
# Inputs


@dataclass
class Side:
    """One model's embeddings of the queries (``[n_query, d]``) and of the gallery (``[n_gallery, d]``)."""

    query: torch.Tensor
    gallery: torch.Tensor


@dataclass
class BackfillInputs:
    """Everything a simulation searches: the old model's embeddings, the labels, and what each method needs.

    - ``old``: the deployed model φ_old.
    - ``query_labels`` / ``gallery_labels``; ``leave_one_out``: the queries are the gallery items (query
      ``i`` = gallery item ``i``, never retrieved by itself; ``gallery_labels`` then equal the query labels).
    - ``new``: the new model trained alone (φ_new); ``transform_query``: ρ(φ_new(q)), the new model's
      queries mapped into the old space by a learned transform.
    - ``bct``: a new model trained backward-compatible with the old one (its queries can search old items).
    - ``compatible``: a metric-compatible new model ψ(φ_new(·)) and ``compatible_query_to_old``: its
      ρ(φ_new(q)) into the old space.
    """

    old: Side
    query_labels: torch.Tensor
    gallery_labels: torch.Tensor
    leave_one_out: bool
    new: Side | None = None
    transform_query: torch.Tensor | None = None
    bct: Side | None = None
    compatible: Side | None = None
    compatible_query_to_old: torch.Tensor | None = None

    @property
    def num_queries(self) -> int:
        return len(self.old.query)

    @property
    def num_gallery(self) -> int:
        return len(self.old.gallery)

    def check(self) -> None:
        """Raise ``DataError`` naming the field whose number of rows does not fit."""
        n_query, n_gallery = self.num_queries, self.num_gallery
        if self.leave_one_out and n_query != n_gallery:
            raise DataError(
                f"leave-one-out needs one query per gallery item: old.query has {n_query} rows, "
                f"old.gallery {n_gallery}"
            )
        queries, items = (n_query, "queries (old.query)"), (n_gallery, "gallery items (old.gallery)")
        sizes = {"query_labels": (self.query_labels, queries), "gallery_labels": (self.gallery_labels, items)}
        for name in ("new", "bct", "compatible"):
            side = getattr(self, name)
            if side is not None:
                sizes[f"{name}.query"] = (side.query, queries)
                sizes[f"{name}.gallery"] = (side.gallery, items)
        for name in ("transform_query", "compatible_query_to_old"):
            if getattr(self, name) is not None:
                sizes[name] = (getattr(self, name), queries)
        for name, (values, (expected, what)) in sizes.items():
            if len(values) != expected:
                raise DataError(f"{name} has {len(values)} rows, but there are {expected} {what}")


@dataclass(frozen=True)
class SearchOptions:
    """How every search of a simulation runs (see :func:`dmlkit.search.search`)."""

    distance: DistanceLike = "cosine"
    backend: str = "torch"
    backend_options: Mapping[str, Any] | None = None


def _search(
    inputs: BackfillInputs,
    query_old: torch.Tensor | None,
    query_new: torch.Tensor | None,
    gallery_old: torch.Tensor | None,
    gallery_new: torch.Tensor | None,
    backfilled: torch.Tensor,
    k: int,
    options: SearchOptions,
) -> RetrievalResults:
    """:func:`merged_search` with the inputs' labels and mode and the simulation's search options."""
    return merged_search(
        query_old,
        query_new,
        gallery_old,
        gallery_new,
        backfilled,
        k=k,
        distance=options.distance,
        query_labels=inputs.query_labels,
        gallery_labels=None if inputs.leave_one_out else inputs.gallery_labels,
        leave_one_out=inputs.leave_one_out,
        backend=options.backend,
        backend_options=options.backend_options,
    )


def _single(
    inputs: BackfillInputs, query: torch.Tensor, gallery: torch.Tensor, k: int, options: SearchOptions
) -> RetrievalResults:
    """``query`` against the whole ``gallery`` (one space, no merge)."""
    none = torch.zeros(len(gallery), dtype=torch.bool)
    return _search(inputs, query, None, gallery, None, none, k, options)


# ---------------------------------------------------------------------------------------------------------
# Methods


class BackfillMethod(Registered):
    """How queries are answered while the gallery is being backfilled.

    ``needs``: the :class:`BackfillInputs` fields it searches; ``forward_passes``: model forward passes per
    query (``extra``: what runs besides, e.g. a small MLP); :meth:`results`: the top-k of every query with
    the items ``backfilled`` (bool ``[n_gallery]``) in the new space.
    """

    needs: ClassVar[tuple[str, ...]] = ()
    forward_passes: ClassVar[int] = 1
    extra: ClassVar[str] = ""

    @property
    def name(self) -> str:
        return self.who

    def check(self, inputs: BackfillInputs) -> None:
        """Raise ``ConfigError`` naming this method and the inputs it needs that ``inputs`` lacks."""
        missing = [need for need in self.needs if getattr(inputs, need) is None]
        if missing:
            raise ConfigError(
                f"backfill method '{self.name}' needs {', '.join(missing)}, which the inputs lack"
            )

    def results(
        self, inputs: BackfillInputs, backfilled: torch.Tensor, k: int, options: SearchOptions
    ) -> RetrievalResults:
        raise NotImplementedError


REGISTRY: Registry[BackfillMethod] = Registry("backfill method")


def build(name: str, /) -> BackfillMethod:
    """The backfill method ``name`` (unknown names raise with the closest valid one)."""
    return REGISTRY.build(name)


def available() -> list[str]:
    """Registered backfill method names."""
    return REGISTRY.available()


@REGISTRY.register("old")
class OldOnly(BackfillMethod):
    """Never upgrade: old queries against the old gallery, whatever has been backfilled (the floor)."""

    def results(
        self, inputs: BackfillInputs, backfilled: torch.Tensor, k: int, options: SearchOptions
    ) -> RetrievalResults:
        return _single(inputs, inputs.old.query, inputs.old.gallery, k, options)


@REGISTRY.register("new-naive")
class NewNaive(BackfillMethod):
    """New queries against the mixed gallery (new rows where backfilled, old rows elsewhere), one search:
    what happens when incompatible spaces are compared (needs equal dimensions)."""

    needs = ("new",)

    def results(
        self, inputs: BackfillInputs, backfilled: torch.Tensor, k: int, options: SearchOptions
    ) -> RetrievalResults:
        assert inputs.new is not None
        return _mixed(inputs, inputs.new, backfilled, k, options)


@REGISTRY.register("bct")
class BackwardCompatible(BackfillMethod):
    """A backward-compatible new model (BCT, Shen et al. 2020): its queries search the mixed gallery."""

    needs = ("bct",)

    def results(
        self, inputs: BackfillInputs, backfilled: torch.Tensor, k: int, options: SearchOptions
    ) -> RetrievalResults:
        assert inputs.bct is not None
        return _mixed(inputs, inputs.bct, backfilled, k, options)


def _mixed(
    inputs: BackfillInputs, side: Side, backfilled: torch.Tensor, k: int, options: SearchOptions
) -> RetrievalResults:
    """``side.query`` against the gallery as stored mid-backfill (one search, no merge)."""
    gallery = mixed_gallery(inputs.old.gallery, side.gallery, backfilled)
    everything = torch.ones(len(gallery), dtype=torch.bool)
    return _search(inputs, None, side.query, None, gallery, everything, k, options)


@REGISTRY.register("rank-merge")
class RankMerge(BackfillMethod):
    """Both models embed every query; old items are searched with φ_old(q), backfilled ones with φ_new(q),
    rankings merged by distance (two forward passes per query)."""

    needs = ("new",)
    forward_passes = 2

    def results(
        self, inputs: BackfillInputs, backfilled: torch.Tensor, k: int, options: SearchOptions
    ) -> RetrievalResults:
        new = inputs.new
        assert new is not None
        return _search(
            inputs, inputs.old.query, new.query, inputs.old.gallery, new.gallery, backfilled, k, options
        )


@REGISTRY.register("rank-merge+transform")
class RankMergeTransform(BackfillMethod):
    """Rank merge with one forward pass: the old-space query is ρ(φ_new(q)), a small MLP's image of the new
    query (Seo et al. 2023, reverse query transform)."""

    needs = ("new", "transform_query")
    extra = "MLP ρ"

    def results(
        self, inputs: BackfillInputs, backfilled: torch.Tensor, k: int, options: SearchOptions
    ) -> RetrievalResults:
        new, to_old = inputs.new, inputs.transform_query
        assert new is not None and to_old is not None
        return _search(inputs, to_old, new.query, inputs.old.gallery, new.gallery, backfilled, k, options)


@REGISTRY.register("compatible")
class Compatible(BackfillMethod):
    """Rank merge of a metric-compatible new model ψ(φ_new(·)) with its ρ(φ_new(q)) into the old space
    (Seo et al. 2023): distances of both parts are on one scale, so the merge ranks them fairly."""

    needs = ("compatible", "compatible_query_to_old")
    extra = "MLP ρ"

    def results(
        self, inputs: BackfillInputs, backfilled: torch.Tensor, k: int, options: SearchOptions
    ) -> RetrievalResults:
        side, to_old = inputs.compatible, inputs.compatible_query_to_old
        assert side is not None and to_old is not None
        return _search(inputs, to_old, side.query, inputs.old.gallery, side.gallery, backfilled, k, options)


# ---------------------------------------------------------------------------------------------------------
# Backfill order


def backfill_order(
    gallery_old: torch.Tensor,
    order: str,
    seed: int,
    *,
    k: int = 10,
    distance: DistanceLike = "cosine",
    backend: str = "torch",
) -> torch.Tensor:
    """The order in which gallery items are re-embedded: a permutation of ``0 … n_gallery − 1`` (int64).

    - ``random``: ``torch.randperm`` with a generator seeded by ``seed``.
    - ``uncertainty``: the items whose old-space neighbourhood is least confident first. FastFill (Jang et
      al. 2023) backfills first the items the old model is least sure of, an uncertainty it *learns*;
      deployment has no gallery labels, so here the cheap label-free proxy is the density of the old
      neighbourhood: confidence(g) = mean similarity of φ_old(g) to its ``k`` nearest old gallery
      neighbours (itself excluded; for a distance, minus the mean distance). An isolated item (far from
      everything, poorly represented by the old model) has the lowest confidence and is backfilled first.
      Ties by gallery index (stable sort); ``seed`` is unused.
    """
    if order not in ORDERS:
        raise UnknownNameError(unknown_name_message("backfill order", order, ORDERS))
    n = len(gallery_old)
    if order == "random":
        return torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    if not isinstance(k, int) or k < 1:
        raise ConfigError(f"k must be a positive integer, got {k!r}")
    if n <= 1:
        return torch.arange(n)
    found, _ = search.knn(
        gallery_old, gallery_old, min(k, n - 1), distance, exclude_self_ids=True, backend=backend
    )
    mean = found.double().mean(dim=1).cpu()
    confidence = mean if search.check_searchable(distance).is_similarity else -mean
    return confidence.argsort(stable=True)


def _first_count(j: int, steps: int, n: int) -> int:
    """round(j / steps · n), halves up, in integers (no float rounding at the fractions)."""
    return (2 * j * n + steps) // (2 * steps)


# ---------------------------------------------------------------------------------------------------------
# Summary values


def auc(fractions: Sequence[float] | torch.Tensor, values: Sequence[float] | torch.Tensor) -> float:
    """Area under ``values`` over ``fractions`` by the trapezoid rule:
    Σ_j (t_{j+1} − t_j) · (v_j + v_{j+1}) / 2 (over [0, 1], the mean quality during the backfill)."""
    t = torch.as_tensor(fractions, dtype=torch.float64)
    v = torch.as_tensor(values, dtype=torch.float64)
    if t.shape != v.shape or t.ndim != 1:
        raise DataError(
            f"fractions and values must be 1-D of one length, got {tuple(t.shape)}, {tuple(v.shape)}"
        )
    return float(torch.trapezoid(v, t)) if len(t) > 1 else 0.0


def relative_gain(auc_value: float, old: float, new: float) -> float:
    """``(AUC − old) / (new − old)``: 0 = the old system throughout, 1 = the new one throughout (NaN when
    ``new == old``, where no gain can be measured)."""
    denominator = new - old
    if denominator == 0 or math.isnan(denominator):
        return float("nan")
    return (auc_value - old) / denominator


def top1_correct(results: RetrievalResults) -> torch.Tensor:
    """Bool ``[n_query]``: whether the first retrieved item shares the query's label (False when empty)."""
    if results.query_labels is None or results.gallery_labels is None:
        raise ConfigError("top-1 correctness needs labels")
    first = (
        results.topk_indices[:, 0]
        if results.topk_indices.shape[1]
        else torch.full((results.num_queries,), -1)
    )
    return (first >= 0) & (results.gallery_labels[first.clamp_min(0)] == results.query_labels)


def negative_flip_rate(
    reference_top1_correct: torch.Tensor, top1_correct: torch.Tensor, has_relevant: torch.Tensor
) -> float:
    """Share of the queries with R > 0 that the reference (old/old) answers right at rank 1 and the method
    answers wrong: |{q : R_q > 0, ref_q ∧ ¬new_q}| / |{q : R_q > 0}| (Yan et al. 2021; NaN without such
    queries). Queries with R = 0 can be right under neither, so they are left out of both counts."""
    scored = int(has_relevant.sum())
    if scored == 0:
        return float("nan")
    flips = reference_top1_correct & ~top1_correct & has_relevant
    return int(flips.sum()) / scored


@dataclass
class MethodSummary:
    """One method's backfill in numbers (first metric): see :func:`summarize`."""

    auc: float
    worst: float
    worst_fraction: float
    relative_gain: float
    worst_negative_flip_rate: float
    forward_passes: int
    mean_search_seconds: float
    monotone: bool
    never_below_old: bool


def summarize(
    fractions: Sequence[float],
    values: Sequence[float],
    *,
    old: float,
    new: float,
    negative_flip_rates: Sequence[float],
    search_seconds: Sequence[float],
    forward_passes: int,
) -> MethodSummary:
    """Summary of one curve ``values`` (first metric at ``fractions``): AUC (:func:`auc`), the worst step
    and its fraction (the first, if several), :func:`relative_gain` against ``old`` (old/old) and ``new``
    (new/new), the worst negative-flip rate, the mean search time per step; ``monotone``: no step
    decreases by more than :data:`TOLERANCE`; ``never_below_old``: min ≥ old − :data:`TOLERANCE`."""
    v = np.asarray(values, dtype=np.float64)
    area = auc(list(fractions), v.tolist())
    worst_step = int(np.nanargmin(v)) if len(v) and not np.isnan(v).all() else 0
    flips = np.asarray(negative_flip_rates, dtype=np.float64)
    return MethodSummary(
        auc=area,
        worst=float(v[worst_step]) if len(v) else float("nan"),
        worst_fraction=float(fractions[worst_step]) if len(v) else float("nan"),
        relative_gain=relative_gain(area, old, new),
        worst_negative_flip_rate=float(np.nanmax(flips))
        if len(flips) and not np.isnan(flips).all()
        else float("nan"),
        forward_passes=forward_passes,
        mean_search_seconds=float(np.mean(search_seconds)) if len(search_seconds) else float("nan"),
        monotone=bool(np.all(np.diff(v) >= -TOLERANCE)),
        never_below_old=bool(len(v) and v.min() >= old - TOLERANCE),
    )


# ---------------------------------------------------------------------------------------------------------
# Report


@dataclass
class MethodCurve:
    """One method's values at every step: ``values`` metric → per-step values; negative-flip rates
    against old/old; search seconds per step (the search alone, not the metrics)."""

    method: str
    forward_passes: int
    extra: str
    values: dict[str, list[float]]
    negative_flip_rate: list[float] = field(default_factory=list)
    search_seconds: list[float] = field(default_factory=list)


@dataclass
class BackfillReport:
    """What :func:`simulate` found: per method a curve (:class:`MethodCurve`) and a summary
    (:class:`MethodSummary`, of the first metric); the ``grid`` of whole-gallery searches ``old/old``,
    ``new/old`` (new queries, old gallery), ``new/new`` (metric → value, NaN where not computable, with a
    line in ``notes``)."""

    fractions: list[float]
    metrics: list[str]
    k: int
    order: str
    seed: int
    distance: str
    backend: str
    leave_one_out: bool
    num_queries: int
    num_gallery: int
    grid: dict[str, dict[str, float]]
    curves: dict[str, MethodCurve]
    summary: dict[str, MethodSummary]
    notes: list[str] = field(default_factory=list)

    @property
    def primary(self) -> str:
        """The metric the summary, the table and the plot are about (the first asked)."""
        return self.metrics[0]

    def to_dict(self) -> dict[str, Any]:
        """The whole report as plain Python values."""
        return dataclasses.asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        """:meth:`to_dict` as strict JSON (NaN becomes null)."""
        return strict_json(self.to_dict(), indent)

    def _steps_shown(self) -> list[int]:
        """Steps at t ∈ {0, .25, .5, .75, 1}: exact when steps is divisible by 4, else the nearest step."""
        steps = len(self.fractions) - 1
        chosen = [round(t * steps) for t in (0.0, 0.25, 0.5, 0.75, 1.0)]
        return sorted(set(chosen))

    def table(self, digits: int = 4) -> str:
        """Markdown: the grid, one row per method (first metric at t ≈ 0, .25, .5, .75, 1 labelled with the
        real fraction, AUC, relative gain, worst step, worst negative-flip rate, cost), and the first metric
        at every step."""
        m = self.primary

        def f(x: float) -> str:
            return "nan" if math.isnan(x) else f"{x:.{digits}f}"

        lines = [
            f"Backfill simulation: {m} (k={self.k}, {self.distance}, {self.backend}, order {self.order})",
            "",
        ]
        lines += ["| search | " + " | ".join(self.metrics) + " |", "|---|" + "---:|" * len(self.metrics)]
        lines += [
            f"| {name} | " + " | ".join(f(row[x]) for x in self.metrics) + " |"
            for name, row in self.grid.items()
        ]
        shown = self._steps_shown()
        old, new = self.grid["old/old"][m], self.grid["new/new"][m]
        head = ["method", "passes/query", "old/old", "new/new"]
        head += [f"t={self.fractions[j]:.2f}" for j in shown]
        head += ["AUC", "rel. gain", "worst (t)", "worst NFR", "monotone", "≥ old/old", "search s/step"]
        lines += ["", "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
        for name, curve in self.curves.items():
            s = self.summary[name]
            passes = f"{curve.forward_passes}" + (f" + {curve.extra}" if curve.extra else "")
            row = [name, passes, f(old), f(new)]
            row += [f(curve.values[m][j]) for j in shown]
            row += [f(s.auc), f(s.relative_gain), f"{f(s.worst)} ({s.worst_fraction:.2f})"]
            row += [f(s.worst_negative_flip_rate), "yes" if s.monotone else "no"]
            row += ["yes" if s.never_below_old else "no", f"{s.mean_search_seconds:.4f}"]
            lines.append("| " + " | ".join(row) + " |")
        head = ["method"] + [f"t={t:.2f}" for t in self.fractions]
        lines += [
            "",
            f"{m} at every step:",
            "",
            "| " + " | ".join(head) + " |",
            "|---|" + "---:|" * len(self.fractions),
        ]
        lines += [f"| {name} | " + " | ".join(map(f, c.values[m])) + " |" for name, c in self.curves.items()]
        if self.notes:
            lines += [""] + [f"- {note}" for note in self.notes]
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """Save a PNG of the first metric against the fraction backfilled, one line per method, old/old and
        new/new as dashed horizontal lines (matplotlib's Agg canvas: no display, no global backend change).
        Needs the ``plot`` extra."""
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError as exc:
            raise ConfigError(f"plotting needs matplotlib: pip install 'dmlkit[plot]' ({exc})") from None
        m = self.primary
        figure = Figure(figsize=(7, 4.5))
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        for name, curve in self.curves.items():
            axes.plot(self.fractions, curve.values[m], marker="o", markersize=3, label=name)
        for name, style in (("old/old", "tab:gray"), ("new/new", "black")):
            value = self.grid[name][m]
            if not math.isnan(value):
                axes.axhline(value, linestyle="--", color=style, linewidth=1, label=name)
        axes.set_xlabel("fraction of the gallery backfilled")
        axes.set_ylabel(m)
        axes.set_title(f"Backfill ({self.order} order)")
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
        target = Path(path)
        figure.savefig(target, format="png", dpi=100, bbox_inches="tight")
        return target


# ---------------------------------------------------------------------------------------------------------
# Simulation


def simulate(
    inputs: BackfillInputs,
    methods: Sequence[str | BackfillMethod],
    *,
    steps: int = 10,
    order: str = "random",
    seed: int = 0,
    metrics: Sequence[str] = DEFAULT_METRICS,
    k: int | None = None,
    distance: DistanceLike = "cosine",
    backend: str = "torch",
    backend_options: Mapping[str, Any] | None = None,
) -> BackfillReport:
    """Backfill the gallery in ``steps`` rounds and measure every method at every round.

    At ``t_j = j / steps`` (j = 0 … steps) the first round(t_j · n_gallery) items of
    :func:`backfill_order` (``order``, ``seed``) are in the new space. Per method and step: ``metrics``
    (retrieval metrics, :func:`dmlkit.metrics.compute`), the :func:`negative_flip_rate` against old/old,
    the search time (``time.perf_counter`` around the search alone). ``k`` None: the depth ``metrics`` need
    (:func:`dmlkit.metrics.choose_k`, leave-one-out aware). The summary (:func:`summarize`) is of the first
    metric; the grid holds old/old, new/old and new/new of every metric (NaN with a note where the inputs
    have no ``new`` side or new/old dimensions differ).
    """
    inputs.check()
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ConfigError(f"steps must be a positive integer, got {steps!r}")
    built = [build(m) if isinstance(m, str) else m for m in methods]
    if not built:
        raise ConfigError(f"no backfill method given; choose from {', '.join(available())}")
    names = [m.name for m in built]
    if len(set(names)) != len(names):
        raise ConfigError(f"a backfill method is given twice: {names}")
    for method in built:
        method.check(inputs)
    metric_names = metrics_lib.check_options(list(metrics), distance, backend)
    if not metric_names:
        raise ConfigError("no metric given")
    # A merged search has no single query space for clustering or embedding-space metrics.
    other = [name for name in metric_names if not is_retrieval(metrics_lib.parse_metric(name)[0])]
    if other:
        raise ConfigError(f"the backfill simulator scores retrieval metrics only, got {other}")
    gallery_labels = None if inputs.leave_one_out else inputs.gallery_labels
    k = metrics_lib.choose_k(metric_names, inputs.query_labels, gallery_labels, k=k)
    options = SearchOptions(distance, backend, backend_options)
    permutation = backfill_order(inputs.old.gallery, order, seed, distance=distance, backend=backend)

    notes: list[str] = []
    reference = _single(inputs, inputs.old.query, inputs.old.gallery, k, options)
    grid = {"old/old": _scores(reference, metric_names)}
    grid |= _new_grid(inputs, k, options, metric_names, notes)
    reference_correct = top1_correct(reference)
    assert reference.num_relevant is not None
    has_relevant = reference.num_relevant > 0

    n = inputs.num_gallery
    fractions = [j / steps for j in range(steps + 1)]
    curves = {
        m.name: MethodCurve(m.name, m.forward_passes, m.extra, {x: [] for x in metric_names}) for m in built
    }
    for j in range(steps + 1):
        backfilled = torch.zeros(n, dtype=torch.bool)
        backfilled[permutation[: _first_count(j, steps, n)]] = True
        for method in built:
            start = time.perf_counter()
            found = method.results(inputs, backfilled, k, options)
            seconds = time.perf_counter() - start
            curve = curves[method.name]
            for name, value in _scores(found, metric_names).items():
                curve.values[name].append(value)
            curve.negative_flip_rate.append(
                negative_flip_rate(reference_correct, top1_correct(found), has_relevant)
            )
            curve.search_seconds.append(seconds)

    primary = metric_names[0]
    summary = {
        name: summarize(
            fractions,
            curve.values[primary],
            old=grid["old/old"][primary],
            new=grid["new/new"][primary],
            negative_flip_rates=curve.negative_flip_rate,
            search_seconds=curve.search_seconds,
            forward_passes=curve.forward_passes,
        )
        for name, curve in curves.items()
    }
    return BackfillReport(
        fractions=fractions,
        metrics=metric_names,
        k=k,
        order=order,
        seed=seed,
        distance=str(search.check_searchable(distance)),
        backend=backend,
        leave_one_out=inputs.leave_one_out,
        num_queries=inputs.num_queries,
        num_gallery=n,
        grid=grid,
        curves=curves,
        summary=summary,
        notes=notes,
    )


def _scores(results: RetrievalResults, names: list[str]) -> dict[str, float]:
    return dict(metrics_lib.compute(results, names).metrics)


def _new_grid(
    inputs: BackfillInputs, k: int, options: SearchOptions, names: list[str], notes: list[str]
) -> dict[str, dict[str, float]]:
    """new/old and new/new of every metric; NaN (and a note) where they cannot be searched."""
    missing = dict.fromkeys(names, float("nan"))
    new = inputs.new
    if new is None:
        notes.append("no new model in the inputs: new/old and new/new are NaN (relative gains too)")
        return {"new/old": dict(missing), "new/new": dict(missing)}
    grid: dict[str, dict[str, float]] = {}
    if new.query.shape[1] != inputs.old.gallery.shape[1]:
        notes.append(
            f"new/old is NaN: new queries ({new.query.shape[1]}-d) cannot search the old gallery "
            f"({inputs.old.gallery.shape[1]}-d)"
        )
        grid["new/old"] = dict(missing)
    else:
        grid["new/old"] = _scores(_single(inputs, new.query, inputs.old.gallery, k, options), names)
    grid["new/new"] = _scores(_single(inputs, new.query, new.gallery, k, options), names)
    return grid
