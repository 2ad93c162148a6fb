"""The training curves of a run: which figures its history makes (:func:`curves`, pure), and each drawn as
a PNG by matplotlib (:func:`render_png`; the ``plot`` extra).

One figure per family: the training loss; the learning rates (every parameter group in one figure); the
throughput (images/s); each validation metric on its own; then each other per-epoch statistic the loss or
the loop logged (pair counts, epoch time, skipped steps). Epochs where a value is missing (validation every
few epochs) or was not finite (written as ``null``) are left out of that curve, not drawn as zero.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from dmlkit.errors import ConfigError

#: The extra that brings matplotlib, named in the error when it is missing.
EXTRA = "plot"

Group = Literal["training", "validation", "other"]

#: History columns that are the x axis or not a per-epoch quantity.
_NOT_CURVES = ("epoch", "step")


@dataclass(frozen=True)
class Curve:
    """One figure: ``series`` maps a history column to its ``(epoch, value)`` points, epochs ascending."""

    slug: str
    title: str
    ylabel: str
    group: Group
    series: dict[str, list[tuple[int, float]]]


def require_matplotlib() -> None:
    """``ConfigError`` naming the extra when matplotlib is not installed (checked before any work)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            f"dmlkit report draws its curves with matplotlib, which is not installed: "
            f"pip install 'dmlkit[{EXTRA}]' ({exc})"
        ) from None


def curves(history: Sequence[dict[str, Any]]) -> list[Curve]:
    """The figures of a history (rows of ``history.jsonl``), in the order of the report."""
    columns = [
        key
        for key in dict.fromkeys(key for row in history for key in row)
        if key not in _NOT_CURVES and any(_number(row.get(key)) is not None for row in history)
    ]
    points = {key: _points(history, key) for key in columns}
    found: list[Curve] = []
    if "train_loss" in points:
        found.append(Curve("loss", "training loss", "loss", "training", {"train_loss": points["train_loss"]}))
    rates = [key for key in columns if key == "lr" or key.endswith("_lr")]
    if rates:
        found.append(
            Curve("lr", "learning rate", "learning rate", "training", {key: points[key] for key in rates})
        )
    if "images_per_s" in points:
        found.append(
            Curve(
                "images-per-s", "throughput", "images/s", "training", {"images_per_s": points["images_per_s"]}
            )
        )
    taken = {"train_loss", "images_per_s", *rates}
    for key in columns:
        if key.startswith("val/"):
            metric = key.removeprefix("val/")
            found.append(Curve(slug(key), f"validation {metric}", metric, "validation", {key: points[key]}))
            taken.add(key)
    for key in columns:
        if key not in taken:
            found.append(Curve(slug(key), key, key, "other", {key: points[key]}))
    return found


def slug(text: str) -> str:
    """An HTML id for a history column: ``val/recall@1`` → ``val-recall-1``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "curve"


def _number(value: Any) -> float | None:
    """A plottable value: a finite int or float (booleans such as ``backbone_frozen`` are flags, not
    curves; ``None`` stands for a non-finite value)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _points(history: Sequence[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    """``(epoch, value)`` of the rows holding a number for ``key`` (a row without ``epoch``: its 1-based
    position, as the loop numbers epochs)."""
    found = []
    for position, row in enumerate(history, start=1):
        value = _number(row.get(key))
        if value is not None:
            epoch = row.get("epoch")
            found.append((epoch if isinstance(epoch, int) else position, value))
    return found


def render_png(curve: Curve, best_epoch: int | None = None, dpi: int = 100) -> bytes:
    """``curve`` drawn as a PNG (matplotlib's Agg canvas: no display, no global backend or pyplot state);
    ``best_epoch``: the selected epoch, marked on validation curves."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(3.8, 2.7), dpi=dpi)  # three to a row of the page
    FigureCanvasAgg(figure)
    axis = figure.add_subplot()
    for label, series in curve.series.items():
        epochs, values = zip(*series, strict=True) if series else ((), ())
        axis.plot(epochs, values, "o-", markersize=3, linewidth=1.4, label=label)
    if best_epoch is not None and curve.group == "validation":
        axis.axvline(
            best_epoch, color="tab:green", linestyle="--", linewidth=1, label=f"best epoch {best_epoch}"
        )
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_xlabel("epoch")
    axis.set_ylabel(curve.ylabel)
    axis.set_title(curve.title)
    axis.grid(alpha=0.3)
    if len(curve.series) > 1 or (best_epoch is not None and curve.group == "validation"):
        axis.legend(fontsize="small")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
