"""The report as one self-contained HTML page: inline CSS, images as ``data:`` URIs, no script, no link to
anything outside the file.

Every string that comes from the run (configuration values, class names, image ids, log lines, metric
names) goes through :func:`esc` (``html.escape`` with quotes), so a value such as ``<script>`` is shown, not
run. Every number a table shows also sits, unrounded, in its cell's ``data-value`` attribute (``repr`` of
the float; empty for a missing value), for tools and tests that read the page.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dmlkit import __version__
from dmlkit.errors import ConfigError
from dmlkit.report.figures import Curve, slug
from dmlkit.report.run import RunRecord
from dmlkit.report.test_split import GridRow, TestSplitView, Thumbnail

_GROUPS = (
    ("training", "Training"),
    ("validation", "Validation (per epoch)"),
    ("other", "Other per-epoch statistics"),
)

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem auto; max-width: 1200px; padding: 0 1rem;
       color: #1b1b1b; line-height: 1.4; }
h1 { font-size: 1.5rem; margin-bottom: 0.2rem; }
h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #ccc; padding-bottom: 0.2rem; }
h3 { font-size: 1rem; margin-top: 1.2rem; }
.meta { color: #555; font-size: 0.9rem; margin-top: 0; }
.notes { background: #fff6dd; border: 1px solid #e8cf7a; padding: 0.6rem 1rem 0.6rem 2rem; }
table { border-collapse: collapse; font-size: 0.9rem; margin: 0.4rem 0; }
th, td { border: 1px solid #ddd; padding: 0.2rem 0.5rem; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.better { color: #17692c; } td.worse { color: #a31515; }
.figures, .configs { display: flex; flex-wrap: wrap; gap: 1rem; align-items: flex-start; }
figure { margin: 0; }
figure img { display: block; max-width: 100%; }
figcaption { font-size: 0.8rem; color: #333; }
details { margin: 0.3rem 0; }
pre { background: #f7f7f7; padding: 0.6rem; overflow-x: auto; font-size: 0.8rem; }
table.grid td { border: none; padding: 0.15rem; text-align: center; font-size: 0.75rem; }
img.thumb { display: block; margin: auto; border: 4px solid #999; }
img.query { border-color: #2858dc; }
img.hit { border-color: #1ea03c; }
img.miss { border-color: #d22828; }
.legend span { display: inline-block; padding: 0 0.4rem; margin-right: 0.4rem; color: #fff; }
"""


@dataclass(frozen=True)
class PerClass:
    """Per-class values to show (metric → class name → value) and where they come from."""

    values: dict[str, dict[str, float]]
    source: str


def esc(value: Any) -> str:
    """Any value as escaped HTML text (quotes included: safe inside attributes too)."""
    return html.escape(str(value), quote=True)


def render(
    run: RunRecord,
    figures: Sequence[tuple[Curve, bytes]],
    *,
    view: TestSplitView | None,
    per_class: PerClass | None,
    notes: Sequence[str],
    max_classes: int,
    generated: str,
) -> str:
    """The whole page (see the module docstring)."""
    sections = [
        _summary(run),
        _test_table(run),
        _curves(figures, run.best_epoch),
        _per_class(run, per_class, max_classes),
        _grid(view),
        _config(run),
        _log(run),
    ]
    notes_html = (
        '<ul class="notes" id="notes">' + "".join(f"<li>{esc(note)}</li>" for note in notes) + "</ul>"
        if notes
        else ""
    )
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>dmlkit report: {esc(run.name)}</title>",
            f"<style>{_STYLE}</style>",
            "</head>",
            "<body>",
            f"<h1>dmlkit run report: {esc(run.name)}</h1>",
            f'<p class="meta">{esc(run.path)} · written {esc(generated)} by dmlkit {esc(__version__)}</p>',
            notes_html,
            *sections,
            "</body>",
            "</html>",
            "",
        ]
    )


# ------------------------------------------------------------------------------------------------ cells
def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _value_cell(value: Any, digits: int = 4, extra: str = "") -> str:
    """A numeric cell: rounded text, the exact value in ``data-value`` (empty when missing)."""
    number = _number(value)
    classes = f"num {extra}".strip()
    if number is None:
        return f'<td class="{classes}" data-value="">n/a</td>'
    text = f"{number:.{digits}f}" if isinstance(value, float) else str(value)
    return f'<td class="{classes}" data-value="{esc(repr(number))}">{esc(text)}</td>'


def _row(*cells: str) -> str:
    return "<tr>" + "".join(cells) + "</tr>"


def _th(*names: Any) -> str:
    return "<tr>" + "".join(f"<th>{esc(name)}</th>" for name in names) + "</tr>"


def _plain(value: Any) -> str:
    """A configuration value as YAML shows it (``null``, ``true``, lists and mappings as JSON)."""
    if value is None or isinstance(value, bool | list | dict):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)


# ------------------------------------------------------------------------------------------------ sections
def _summary(run: RunRecord) -> str:
    results = run.results or {}
    epochs = run.setting("optim", "epochs")
    done = len(run.history)
    if run.results is not None:
        status = "finished"
        stop = results.get("early_stop")
        if isinstance(stop, dict):
            status += f" (early stop after epoch {stop.get('epoch')}, patience {stop.get('patience')})"
    elif done:
        status = f"not finished: {done} epoch(s) recorded (still running, interrupted or failed)"
    else:
        status = "not finished: no epoch recorded"
    dataset = run.setting("data", "dataset")
    loss = run.setting("objective", "loss")
    protocol = results.get("protocol")
    wall_time = _number(results.get("wall_time_s"))
    rows = [
        ("status", status),
        ("epochs", f"{done} of {epochs}" if epochs is not None else str(done)),
        ("dataset", dataset.get("name") if isinstance(dataset, dict) else dataset),
        ("backbone", run.setting("model", "backbone")),
        ("loss", loss.get("name") if isinstance(loss, dict) else loss),
        ("selection", _selection(results.get("selection"))),
        ("test protocol", protocol.get("test") if isinstance(protocol, dict) else None),
        ("wall time", f"{wall_time:.1f} s" if wall_time is not None else None),
        ("checkpoints", ", ".join(path.name for path in run.checkpoints.values()) or "none"),
    ]
    body = "".join(
        _row(f"<th>{esc(name)}</th>", f"<td>{esc(value)}</td>") for name, value in rows if value is not None
    )
    return f'<h2 id="summary-title">Run</h2><table id="summary">{body}</table>'


def _selection(selection: Any) -> str | None:
    if not isinstance(selection, dict):
        return None
    if selection.get("method") == "validation":
        value = _number(selection.get("value"))
        shown = f" = {value:.4f}" if value is not None else ""
        return f"epoch {selection.get('epoch')}, best validation {selection.get('metric')}{shown}"
    return ", ".join(f"{key} {value}" for key, value in selection.items())


def _test_table(run: RunRecord) -> str:
    results = run.results or {}
    before, after = results.get("test_before"), results.get("test_after")
    title = '<h2 id="test-title">Test split: before training and with best.pt</h2>'
    if not isinstance(before, dict) and not isinstance(after, dict):
        return f'{title}<p class="missing">No test results: see the notes above.</p>'
    before, after = before if isinstance(before, dict) else {}, after if isinstance(after, dict) else {}
    body = [_th("metric", "before", "after", "change")]
    for metric in dict.fromkeys([*before, *after]):
        old, new = _number(before.get(metric)), _number(after.get(metric))
        change = None if old is None or new is None else new - old
        direction = ""
        if change:
            better = (change > 0) == _higher_is_better(metric)
            direction = "better" if better else "worse"
        body.append(
            _row(
                f"<th>{esc(metric)}</th>",
                _value_cell(before.get(metric)),
                _value_cell(after.get(metric)),
                _value_cell(change, extra=direction),
            )
        )
    return f'{title}<table id="test-table">{"".join(body)}</table>'


def _higher_is_better(metric: str) -> bool:
    """The metric's direction; a name this dmlkit does not know (an old run's) counts as higher-better."""
    from dmlkit.metrics import higher_is_better

    try:
        return higher_is_better(metric)
    except ConfigError:
        return True


def _curves(figures: Sequence[tuple[Curve, bytes]], best_epoch: int | None) -> str:
    parts = ['<h2 id="curves-title">Training curves</h2>']
    if not figures:
        parts.append('<p class="missing">No curves: no epoch has finished yet.</p>')
    used: set[str] = set()
    for group, heading in _GROUPS:
        chosen = [(curve, png) for curve, png in figures if curve.group == group]
        if not chosen:
            continue
        if group == "validation" and best_epoch is not None:
            heading += f" — dashed: the selected epoch {best_epoch}"
        parts.append(f"<h3>{esc(heading)}</h3>")
        parts.append(f'<div class="figures" id="curves-{group}">')
        for curve, png in chosen:
            parts.append(_figure(curve, png, used))
        parts.append("</div>")
    return "".join(parts)


def _figure(curve: Curve, png: bytes, used: set[str]) -> str:
    """A curve's image, and its numbers in a folded table below it."""
    ident = _unique(f"curve-{curve.slug}", used)
    columns = list(curve.series)
    epochs = sorted({epoch for points in curve.series.values() for epoch, _ in points})
    lookup = {key: dict(points) for key, points in curve.series.items()}
    table = [_th("epoch", *columns)]
    table += [
        _row(f"<td>{epoch}</td>", *(_value_cell(lookup[key].get(epoch), 6) for key in columns))
        for epoch in epochs
    ]
    src = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    return (
        f'<figure id="{esc(ident)}" data-series="{esc(" ".join(columns))}">'
        f'<img src="{src}" alt="{esc(curve.title)}">'
        f"<figcaption><details><summary>{esc(curve.title)}: values</summary>"
        f'<table class="values">{"".join(table)}</table></details></figcaption></figure>'
    )


def _per_class(run: RunRecord, per_class: PerClass | None, max_classes: int) -> str:
    title = '<h2 id="per-class-title">Per-class metrics on the test split, worst first</h2>'
    if per_class is None or not per_class.values:
        return f'{title}<p class="missing">No per-class metrics: see the notes above.</p>'
    metrics = list(per_class.values)
    select = run.setting("eval", "select_metric")
    key = select if select in per_class.values else metrics[0]
    classes = sorted({name for values in per_class.values.values() for name in values})
    values = np.array([per_class.values[key].get(name, math.nan) for name in classes], dtype=np.float64)
    signed = values if _higher_is_better(key) else -values
    order = np.argsort(np.where(np.isnan(signed), np.inf, signed), kind="stable")  # undefined values last
    shown = order[:max_classes]
    body = [_th("class", *metrics)]
    for index in shown.tolist():
        name = classes[index]
        cells = [_value_cell(per_class.values[m].get(name)) for m in metrics]
        body.append(_row(f"<th>{esc(name)}</th>", *cells))
    more = len(classes) - len(shown)
    footer = f"<p>{more} better classes not shown (--max-classes {max_classes}).</p>" if more > 0 else ""
    direction = "ascending" if _higher_is_better(key) else "descending"
    return (
        f"{title}<p>{esc(per_class.source)}; {len(classes)} classes, sorted by {esc(key)} ({direction}).</p>"
        f'<table id="per-class" data-sort-metric="{esc(key)}">{"".join(body)}</table>{footer}'
    )


def _grid(view: TestSplitView | None) -> str:
    title = '<h2 id="worst-title">Worst queries of the test split</h2>'
    if view is None:
        return f'{title}<p class="missing">No retrieval grid: see the notes above.</p>'
    if not view.worst:
        return f'{title}<p class="missing">No query of the test split has a relevant item to show.</p>'
    closer = "similarity, higher is closer" if view.similarity else "distance, lower is closer"
    explanation = (
        f"{esc(view.checkpoint.name)} on the test split of {esc(view.dataset)} ({esc(view.protocol)}, "
        f"{view.num_queries} queries): the {len(view.worst)} queries with the fewest relevant items among "
        f"their top {view.top} results (ties: the later first relevant result). Captions: rank, class and "
        f"{esc(view.distance)} {closer}; hover for the image id."
    )
    legend = (
        '<p class="legend"><span style="background:#2858dc">query</span>'
        '<span style="background:#1ea03c">same class</span>'
        '<span style="background:#d22828">another class</span></p>'
    )
    rows = "".join(_grid_row(row) for row in view.worst)
    return f'{title}<p>{explanation}</p>{legend}<table class="grid" id="worst-queries">{rows}</table>'


def _grid_row(row: GridRow) -> str:
    cells = [_thumbnail(row.query, "query")]
    for item in row.results:
        cells.append("<td></td>" if item is None else _thumbnail(item, "hit" if item.relevant else "miss"))
    return f'<tr data-hits="{row.hits}">{"".join(cells)}</tr>'


def _thumbnail(item: Thumbnail, kind: str) -> str:
    return (
        f'<td><img class="thumb {kind}" src="{esc(item.src)}" alt="{esc(item.caption)}" '
        f'title="{esc(item.title)}"><div class="caption">{esc(item.caption)}</div></td>'
    )


def _config(run: RunRecord) -> str:
    """One table per section (nested keys dotted); top-level keys outside any section (a flat file of an
    old dmlkit) in one table of their own."""
    tables = {str(name): values for name, values in run.config.items() if isinstance(values, dict)}
    loose = {str(name): values for name, values in run.config.items() if not isinstance(values, dict)}
    if loose:
        tables["top level"] = loose
    parts = ['<h2 id="config-title">Resolved configuration (config.yaml)</h2><div class="configs">']
    used: set[str] = set()
    for section, values in tables.items():
        rows = "".join(
            _row(f'<th class="key">{esc(key)}</th>', f"<td>{esc(_plain(value))}</td>")
            for key, value in _flatten(values)
        )
        ident = _unique(f"config-{slug(section)}", used)
        parts.append(
            f'<div><h3>{esc(section)}</h3><table class="config" id="{esc(ident)}">{rows}</table></div>'
        )
    parts.append("</div>")
    parts.append(
        f"<details><summary>config.yaml as written</summary><pre>{esc(run.config_text)}</pre></details>"
    )
    return "".join(parts)


def _unique(ident: str, used: set[str]) -> str:
    """``ident``, suffixed until no other element of the page has it (two names may slug alike)."""
    found, number = ident, 1
    while found in used:
        number += 1
        found = f"{ident}-{number}"
    used.add(found)
    return found


def _flatten(values: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested mappings as dotted keys (``dataset.args.image_size``); an empty mapping stays one value."""
    found: list[tuple[str, Any]] = []
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            found += _flatten(value, f"{name}.")
        else:
            found.append((name, value))
    return found


def _log(run: RunRecord) -> str:
    if not run.log_tail:
        return ""
    text = esc("\n".join(run.log_tail))
    return (
        f'<h2 id="log-title">train.log</h2><details><summary>the last {len(run.log_tail)} lines</summary>'
        f"<pre>{text}</pre></details>"
    )
