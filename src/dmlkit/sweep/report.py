"""``dmlkit sweep report STUDY``: every run in ``trials.csv``, mean ± std over seeds per configuration as a
markdown and a LaTeX table, and one influence plot per factor (the validation and test metric against the
factor's levels, with the spread over runs), in the style of Berton et al.'s influence maps.

Standard deviations are sample ones (n − 1 in the denominator; 0 for a single seed). A configuration run by
several trials (queued again after an interruption, or drawn twice by a random sampler) counts each seed once.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dmlkit.sweep import runner
from dmlkit.sweep.spec import SweepSpec


@dataclass
class Report:
    """What :func:`write_report` produced: the files, and the rows of the failed trials."""

    files: list[Path]
    runs: list[dict[str, Any]]
    failed: list[dict[str, Any]]


def run_rows(study: Any, spec: SweepSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(one row per finished run — trial, configuration, factor labels, seed, metrics —, one row per failed
    trial with its error), deduplicated by (configuration, seed)."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    failed = []
    for trial in sorted(runner.done_trials(study), key=lambda t: t.number):
        labels = trial.user_attrs.get("labels", {})
        cid = trial.user_attrs.get("config_id", "")
        for seed, run in trial.user_attrs.get("runs", {}).items():
            row: dict[str, Any] = {"trial": trial.number, "config": cid, **labels, "seed": int(seed)}
            row |= {f"val {k}": v for k, v in run.get("val", {}).items()}
            row |= {f"test {k}": v for k, v in run.get("test", {}).items()}
            row |= {
                "images_per_s": run.get("images_per_s"),
                "wall_s": run.get("wall_s"),
                "run": run["run_dir"],
            }
            rows.setdefault((cid, seed), row)
        if trial.state.name == "FAIL":
            failed.append(
                {"trial": trial.number, "config": cid, **labels, "error": trial.user_attrs.get("error")}
            )
    return list(rows.values()), failed


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    clean = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not clean:
        return math.nan, math.nan
    return statistics.fmean(clean), statistics.stdev(clean) if len(clean) > 1 else 0.0


def summary(rows: list[dict[str, Any]], spec: SweepSpec) -> tuple[list[str], list[list[Any]]]:
    """Per configuration: its factor labels, the number of seeds and mean ± std of every metric column;
    best objective first."""
    factors = list(spec.factors)
    metric_columns = sorted({k for r in rows for k in r if k.startswith(("val ", "test "))})
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["config"], []).append(row)
    table = []
    for members in groups.values():
        cells: list[Any] = [members[0].get(f, "") for f in factors] + [len(members)]
        cells += [mean_std([m.get(c) for m in members]) for c in metric_columns]
        table.append(cells)
    key = f"{spec.objective.split} {spec.objective.metric}"
    if key in metric_columns:
        position = len(factors) + 1 + metric_columns.index(key)
        sign = -1.0 if spec.objective.direction == "maximize" else 1.0
        table.sort(
            key=lambda cells: sign * cells[position][0] if not math.isnan(cells[position][0]) else math.inf
        )
    return [*factors, "seeds", *metric_columns], table


def _cell(value: Any, latex: bool = False) -> str:
    if isinstance(value, tuple):
        mean, std = value
        return (
            "–"
            if math.isnan(mean)
            else (f"{mean:.4f} $\\pm$ {std:.4f}" if latex else f"{mean:.4f} ± {std:.4f}")
        )
    text = str(value)
    return text.replace("_", "\\_").replace("&", "\\&").replace("%", "\\%") if latex else text


def markdown(header: list[str], table: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in table]
    return "\n".join(lines) + "\n"


def latex(header: list[str], table: list[list[Any]]) -> str:
    lines = [
        "\\begin{tabular}{" + "l" * len(header) + "}",
        "\\toprule",
        " & ".join(_cell(h, True) for h in header) + " \\\\",
        "\\midrule",
    ]
    lines += [" & ".join(_cell(c, True) for c in row) + " \\\\" for row in table]
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"


def influence_plot(rows: list[dict[str, Any]], spec: SweepSpec, factor: str, path: Path) -> list[str]:
    """The validation and test objective metric against the levels of ``factor`` (mean ± std over every run
    with that level, and each run as a dot). In a one-at-a-time study only the runs with every other factor
    at its base level count: the first level's mean would otherwise average in the other factors' levels.
    A split without values (no validation split, ``objective: {split: test}``) draws no series and no
    legend entry. Returns the series drawn, e.g. ``["val map@r", "test map@r"]``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = spec.objective.metric
    if spec.sampler == "one_at_a_time":
        rows = [r for r in rows if spec.is_varied_alone(r, factor)]
    levels = list(dict.fromkeys(str(r.get(factor, "")) for r in rows))
    if spec.factors[factor].levels is not None:  # the spec's order
        levels = [level for level in spec.factors[factor].levels if level in levels]
    # long level names ("fine-tuned (last 2 stages)") are slanted, and widen the figure
    slanted = len(levels) > 4 or max((len(level) for level in levels), default=0) > 14
    width = 2 + sum(max(1.2, 0.075 * len(level)) if not slanted else 0.8 for level in levels)
    figure, axis = plt.subplots(figsize=(max(5.0, width), 4.2 if slanted else 3.6))
    drawn: list[str] = []
    for offset, (split, colour) in enumerate((("val", "tab:blue"), ("test", "tab:orange"))):
        column = f"{split} {metric}"
        xs, means, stds = [], [], []
        for i, level in enumerate(levels):
            values = [
                r[column] for r in rows if str(r.get(factor, "")) == level and r.get(column) is not None
            ]
            if not values:
                continue
            mean, std = mean_std(values)
            x = i + (offset - 0.5) * 0.15
            axis.scatter([x] * len(values), values, s=10, color=colour, alpha=0.4)
            xs.append(x), means.append(mean), stds.append(std)
        if xs:
            axis.errorbar(xs, means, yerr=stds, fmt="o-", color=colour, capsize=4, label=column)
            drawn.append(column)
    axis.set_xticks(
        range(len(levels)), levels, rotation=20 if slanted else 0, ha="right" if slanted else "center"
    )
    axis.set_xlabel(factor)
    axis.set_ylabel(metric)
    # two lines: a long study or factor name stays within the figure
    axis.set_title(f"{spec.name}: influence of {factor}\n(mean ± std over runs)", fontsize=10)
    axis.grid(alpha=0.3)
    if drawn:
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return drawn


def write_report(study_dir: Path, out: Path | None = None, plots: bool = True) -> Report:
    """Write ``trials.csv``, ``summary.md``, ``summary.tex`` and ``influence_<factor>.png`` for the study in
    ``study_dir`` (into ``out``, default ``study_dir/report``)."""
    import yaml

    spec = SweepSpec(**yaml.safe_load((study_dir / runner.SPEC).read_text()))
    study = runner.optuna_module().load_study(
        study_name=spec.name, storage=runner.storage_of(study_dir, spec.storage)
    )
    rows, failed = run_rows(study, spec)
    out = out or study_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    files = []
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with (out / "trials.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns or ["trial"])
        writer.writeheader()
        writer.writerows(rows)
    files.append(out / "trials.csv")
    header, table = summary(rows, spec)
    objective = f"{spec.objective.split} {spec.objective.metric}"
    text = f"# {spec.name}: mean ± std over seeds (objective: {objective})\n\n"
    text += markdown(header, table)
    if failed:
        shown = [", ".join(f"{k}={f[k]}" for k in spec.factors if k in f) for f in failed]
        text += "\nFailed trials:\n\n" + "".join(
            f"- trial {f['trial']} ({what}): {f['error']}\n" for f, what in zip(failed, shown, strict=True)
        )
    (out / "summary.md").write_text(text)
    (out / "summary.tex").write_text(latex(header, table))
    files += [out / "summary.md", out / "summary.tex"]
    if plots and rows:
        for factor in spec.factors:
            path = out / f"influence_{factor.replace('.', '_')}.png"
            influence_plot(rows, spec, factor, path)
            files.append(path)
    return Report(files, rows, failed)


__all__ = ["Report", "influence_plot", "latex", "markdown", "mean_std", "run_rows", "summary", "write_report"]
