"""The run's test split seen through one of its checkpoints: re-embedded and evaluated by the code of
``dmlkit eval`` (:func:`dmlkit.inference.evaluate_embeddings`, the run's metrics, distance and backend), for
the report's per-class table and its grid of the worst queries.

The worst queries are those with a relevant item in the split whose top ``top`` results hold the fewest
relevant ones; among equals, the one whose first relevant result comes later (or never) is worse, then
the lower query index comes first. It is an order for showing failures, read off the same search the
metrics used, not a metric of its own.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from dmlkit import data as data_lib
from dmlkit import metrics as metrics_lib
from dmlkit.config import config_from_checkpoint
from dmlkit.errors import DataError
from dmlkit.inference import compute_embeddings, evaluate_embeddings, load_model, query_gallery_positions
from dmlkit.metrics.visualize import as_rgb_image
from dmlkit.train.data import build_data

#: Longest side of a grid thumbnail, in pixels (small glyphs are enlarged to it, photos reduced).
THUMBNAIL_SIZE = 96


@dataclass(frozen=True)
class Thumbnail:
    """One grid image: ``src`` a ``data:`` URI; ``relevant`` ``None`` for the query itself."""

    src: str
    caption: str
    title: str
    relevant: bool | None


@dataclass(frozen=True)
class GridRow:
    """A query and its top results (``None``: an empty slot, fewer retrievable items than ``top``)."""

    query: Thumbnail
    results: list[Thumbnail | None]
    hits: int


@dataclass(frozen=True)
class TestSplitView:
    """What the report shows of the test split: overall metrics of the re-embedding (equal to
    ``results.json``'s ``test_after`` for ``best.pt``), per-class values (metric → class name → value)
    and the worst queries."""

    checkpoint: Path
    dataset: str
    protocol: str
    distance: str
    similarity: bool
    num_queries: int
    num_queries_without_relevant: int
    metrics: dict[str, float]
    per_class: dict[str, dict[str, float]]
    worst: list[GridRow]
    top: int


def evaluate_test_split(
    checkpoint_file: Path,
    *,
    worst: int,
    top: int,
    device: torch.device,
    batch_size: int = 256,
    num_workers: int = 0,
    progress: bool = False,
) -> TestSplitView:
    """Re-embed the run's test split with ``checkpoint_file`` and evaluate it as ``dmlkit eval`` does;
    keep the ``worst`` worst queries with their ``top`` results as thumbnails."""
    # The checkpoint loader of the eval/embed/search commands: one place checks a checkpoint's entries.

    model, checkpoint = load_model(checkpoint_file, device)
    trained = config_from_checkpoint(checkpoint["config"], str(checkpoint_file))
    try:
        splits = build_data(trained.data, trained.run.seed, spec=checkpoint["data_spec"])
    except DataError as exc:
        raise DataError(
            f"{exc} (the report re-embeds the run's test split; --no-examples writes it without the "
            "per-class table and the worst queries)"
        ) from exc
    dataset = splits.split("test")
    dataset.transform = data_lib.transforms.build("eval", **checkpoint["data_spec"])
    embeddings, labels = compute_embeddings(
        model, dataset, batch_size=batch_size, device=device, num_workers=num_workers, progress=progress,
        description="report: test",
    )  # fmt: skip
    metric_names = list(trained.eval.metrics)
    queries, gallery = query_gallery_positions(dataset)
    retrievable = len(dataset) - 1 if gallery is None else len(gallery)
    top = max(1, min(top, retrievable))
    gallery_labels = None if gallery is None else labels[torch.from_numpy(gallery)]
    needed = metrics_lib.choose_k(metric_names, labels[torch.from_numpy(queries)], gallery_labels)
    # One search serves the metrics and the grid: it keeps as many neighbours as either needs.
    results = evaluate_embeddings(
        embeddings, labels, dataset.annotations, metric_names, k=max(needed, top), seed=trained.run.seed,
        distance=trained.eval.eval_distance, backend=trained.eval.eval_backend,
    )  # fmt: skip
    names = dataset.class_names
    per_class = {
        metric: {names[int(label)]: float(value) for label, value in by_class.items()}
        for metric, by_class in results.per_class.items()
    }
    return TestSplitView(
        checkpoint=checkpoint_file,
        dataset=trained.data.dataset.name,
        protocol=dataset.annotations.protocol,
        distance=str(results.distance),
        similarity=results.distance.is_similarity,
        num_queries=results.num_queries,
        num_queries_without_relevant=results.num_queries_without_relevant,
        metrics={name: float(results.metrics[name]) for name in metric_names},
        per_class=per_class,
        worst=_worst_rows(results, dataset, worst, top),
        top=top,
    )


def worst_queries(results: metrics_lib.RetrievalResults, n: int, top: int) -> torch.Tensor:
    """Indices of the ``n`` worst queries (see the module docstring), worst first."""
    relevant = metrics_lib.relevance(results)[:, :top]
    hits = relevant.sum(dim=1)
    # The rank (0-based) of the first relevant result within the top; ``top`` when there is none.
    first = torch.where(relevant.any(dim=1), relevant.to(torch.int64).argmax(dim=1), top)
    badness_order = hits * (top + 1) + (top - first)  # fewer hits first, then a later first hit
    assert results.num_relevant is not None
    candidates = torch.nonzero(results.num_relevant > 0).squeeze(1)
    order = torch.sort(badness_order[candidates], stable=True).indices
    return candidates[order][:n]


def _worst_rows(
    results: metrics_lib.RetrievalResults, dataset: data_lib.ImageDataset, n: int, top: int
) -> list[GridRow]:
    """Thumbnails of the worst queries and their results (``query_ids``/``gallery_ids`` are positions in
    the split, as :func:`~dmlkit.inference.evaluate_embeddings` sets them)."""
    assert results.query_labels is not None and results.gallery_labels is not None
    relevant = metrics_lib.relevance(results)
    names = dataset.class_names
    rows = []
    for q in worst_queries(results, n, top).tolist():  # at most n rows of images to encode
        position = int(results.query_ids[q])
        query = Thumbnail(
            src=data_uri(dataset.load(position)),
            caption=f"query · {names[int(results.query_labels[q])]}",
            title=dataset.ids[position],
            relevant=None,
        )
        shown: list[Thumbnail | None] = []
        for rank in range(top):
            g = int(results.topk_indices[q, rank])
            if g < 0:
                shown.append(None)
                continue
            item = int(results.gallery_ids[g])
            value = float(results.topk_distances[q, rank])
            shown.append(
                Thumbnail(
                    src=data_uri(dataset.load(item)),
                    caption=f"{rank + 1}. {names[int(results.gallery_labels[g])]} · {value:.3g}",
                    title=dataset.ids[item],
                    relevant=bool(relevant[q, rank]),
                )
            )
        rows.append(GridRow(query, shown, int(relevant[q, :top].sum())))
    return rows


def data_uri(image: Any, size: int = THUMBNAIL_SIZE) -> str:
    """A stored image (PIL, or a uint8/float ``C × H × W`` / ``H × W`` tensor or array as datasets hold
    them) as a ``data:`` URI of a thumbnail whose longest side is ``size``: PNG for enlarged small images
    (sharp pixels), JPEG for reduced photos (a tenth of the bytes)."""
    picture = as_rgb_image(image, "of the test split")
    scale = size / max(picture.width, picture.height)
    target = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
    enlarged = scale >= 1
    resample = Image.Resampling.NEAREST if enlarged else Image.Resampling.LANCZOS
    picture = picture.resize(target, resample)
    buffer = io.BytesIO()
    kind = "png" if enlarged else "jpeg"
    picture.save(buffer, format=kind.upper(), **({} if enlarged else {"quality": 85}))
    return f"data:image/{kind};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"
