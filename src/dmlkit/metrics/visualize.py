"""Pictures of retrievals from a :class:`~dmlkit.metrics.RetrievalResults`: each chosen query, then its
top retrieved gallery images framed green (same label) or red (another label).

    results = evaluate(embeddings, labels, metrics=("recall@1",), k=10)
    queries = pick_queries(results, 6, mode="failures")     # queries whose top-1 is wrong
    retrieval_grid(results, dataset, queries=queries, top=5).save("failures.png")

Images come from any *image source*: a dmlkit :class:`~dmlkit.data.base.ImageDataset` (its stored images,
before any transform), a sequence of PIL images, ``C × H × W`` / ``H × W`` tensors or arrays (uint8, or
floats in [0, 1]) or file paths, or a callable ``index -> image`` of those kinds. Only the drawn images are
read. PIL is the only drawing dependency (it comes with torchvision).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from dmlkit.data.images import load_image, to_channels
from dmlkit.errors import ConfigError, DataError
from dmlkit.metrics.label_relevance import relevant_topk
from dmlkit.search.results import RetrievalResults


@runtime_checkable
class StoredImages(Protocol):
    """A dataset whose stored images (before any transform) are read by index, as a dmlkit
    :class:`~dmlkit.data.base.ImageDataset`."""

    def load(self, index: int) -> Any: ...


ImageSource = StoredImages | Sequence[Any] | Callable[[int], Any]
PickMode = Literal["failures", "random", "first"]

QUERY_COLOUR = (40, 90, 220)
RELEVANT_COLOUR = (30, 160, 60)
IRRELEVANT_COLOUR = (210, 40, 40)
BACKGROUND = (255, 255, 255)
TEXT_COLOUR = (0, 0, 0)


def relevance(results: RetrievalResults) -> torch.Tensor:
    """Boolean ``n_query × k``: the i-th retrieved item exists (index ≥ 0) and has the query's label (or,
    for the results of ``evaluate(..., label_comparison=fn)``, passes ``fn``)."""
    return relevant_topk(results)


def pick_queries(results: RetrievalResults, n: int, mode: PickMode = "failures", seed: int = 0) -> list[int]:
    """Up to ``n`` query indices to draw, among queries with at least one relevant gallery item.

    ``failures``: queries whose top-1 is not relevant (a random choice of them, seeded), then, if there are
    fewer than ``n``, the rest at random; ``random``: a seeded random choice; ``first``: the lowest indices.
    The result is sorted.
    """
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"n must be a positive integer, got {n!r}")
    if mode not in ("failures", "random", "first"):
        raise ConfigError(f"mode must be 'failures', 'random' or 'first', got {mode!r}")
    has_relevant = (
        results.num_relevant > 0
        if results.num_relevant is not None
        else torch.ones(results.num_queries, dtype=torch.bool)
    )
    candidates = has_relevant.nonzero().squeeze(1)
    if mode == "first":
        return candidates[:n].tolist()
    gen = torch.Generator().manual_seed(seed)
    shuffled = candidates[torch.randperm(len(candidates), generator=gen)]
    if mode == "failures" and results.topk_indices.shape[1] > 0:
        wrong = ~relevance(results)[shuffled, 0]
        shuffled = torch.cat([shuffled[wrong], shuffled[~wrong]])
    return sorted(shuffled[:n].tolist())


def as_rgb_image(image: Any, where: str = "") -> Image.Image:
    """One stored image as an RGB PIL image: a path (decoded as the datasets decode), a PIL image, or a
    uint8 / float-in-[0, 1] ``C × H × W``, ``H × W × C`` or ``H × W`` tensor or array (``where`` names it
    in errors)."""
    if isinstance(image, str | Path):
        try:  # the datasets' decoder: EXIF orientation, 16-bit grayscale, transparency, size limit
            return load_image(image, 3)
        except DataError as exc:
            raise DataError(f"{exc} ({where})") from exc
    if isinstance(image, Image.Image):
        return to_channels(image, 3)
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        array = image
        if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
            array = np.moveaxis(array, 0, -1)  # C × H × W → H × W × C
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim not in (2, 3):
            raise DataError(f"image {where} has shape {image.shape}; expected H × W, C × H × W or H × W × C")
        if array.dtype != np.uint8:
            array = (np.clip(array.astype(np.float64), 0.0, 1.0) * 255.0).round().astype(np.uint8)
        return Image.fromarray(array).convert("RGB")
    raise DataError(f"image {where} is a {type(image).__name__}; expected a PIL image, tensor, array or path")


def _loader(source: ImageSource, what: str) -> Callable[[int], Image.Image]:
    """``index -> RGB PIL image`` for an image source."""
    if isinstance(source, StoredImages):
        return lambda i: as_rgb_image(source.load(i), f"{i} of the {what}")
    if callable(source):
        return lambda i: as_rgb_image(source(i), f"{i} of the {what}")
    if isinstance(source, Sequence):
        return lambda i: as_rgb_image(source[i], f"{i} of the {what}")
    raise ConfigError(
        f"{what} images must be a dataset, a sequence of images or a callable index -> image, "
        f"got {type(source).__name__}"
    )


def _tile(image: Image.Image, size: int, colour: tuple[int, int, int], border: int) -> Image.Image:
    """``image`` fitted into a ``size × size`` square (aspect kept) inside a ``border``-pixel frame."""
    inner = size - 2 * border
    fitted = image.copy()
    fitted.thumbnail((inner, inner), Image.Resampling.LANCZOS)
    if fitted.width < inner and fitted.height < inner:  # small images (28 × 28 glyphs) are enlarged
        scale = inner / max(fitted.width, fitted.height)
        target = (max(1, round(fitted.width * scale)), max(1, round(fitted.height * scale)))
        fitted = fitted.resize(target, Image.Resampling.NEAREST)
    tile = Image.new("RGB", (size, size), colour)
    canvas = Image.new("RGB", (inner, inner), BACKGROUND)
    canvas.paste(fitted, ((inner - fitted.width) // 2, (inner - fitted.height) // 2))
    tile.paste(canvas, (border, border))
    return tile


def retrieval_grid(
    results: RetrievalResults,
    query_images: ImageSource,
    gallery_images: ImageSource | None = None,
    *,
    queries: Sequence[int] | None = None,
    top: int = 5,
    tile_size: int = 96,
    border: int = 4,
    captions: bool = True,
    label_text: Callable[[Any], str] = str,
) -> Image.Image:
    """One row per query: the query (blue frame), then its ``top`` retrieved gallery images, framed green
    when relevant (same label) and red otherwise; empty slots (fewer retrievable items) stay blank.

    ``gallery_images`` defaults to ``query_images`` in leave-one-out results (and is required otherwise).
    ``queries``: query indices (default: :func:`pick_queries` ``(results, 8, "failures")``). With
    ``captions`` each tile is labelled: the query with its label, a result with its rank, label and
    distance (in ``results.distance`` units); ``label_text`` turns a label (as given to ``evaluate``) into
    its caption text, e.g. a class-name lookup.
    """
    if not isinstance(top, int) or top < 1:
        raise ConfigError(f"top must be a positive integer, got {top!r}")
    if top > results.topk_indices.shape[1]:
        raise ConfigError(
            f"top={top} exceeds the {results.topk_indices.shape[1]} neighbours kept in these results "
            "(evaluate with a larger k)"
        )
    if not isinstance(tile_size, int) or not isinstance(border, int) or tile_size < 2 * border + 8:
        raise ConfigError(f"tile_size ({tile_size}) must be an integer ≥ 2·border + 8 (border {border})")
    if gallery_images is None:
        if not results.leave_one_out:
            raise ConfigError("gallery_images is needed: these results have a separate gallery")
        gallery_images = query_images
    chosen = list(pick_queries(results, 8) if queries is None else queries)
    if not chosen:
        raise ConfigError("no queries to draw")
    for q in chosen:
        if not isinstance(q, int | np.integer) or not 0 <= int(q) < results.num_queries:
            raise ConfigError(f"query index {q!r} is outside [0, {results.num_queries})")
    load_query, load_gallery = _loader(query_images, "query"), _loader(gallery_images, "gallery")
    relevant = relevance(results)
    font = ImageFont.load_default()
    caption_height = 14 if captions else 0
    gap = 6  # between the query column and the results
    width = tile_size * (top + 1) + gap
    height = (tile_size + caption_height) * len(chosen)
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for row, q in enumerate(int(q) for q in chosen):
        y = row * (tile_size + caption_height)
        sheet.paste(_tile(load_query(q), tile_size, QUERY_COLOUR, border), (0, y))
        if captions:
            text = f"q{q} {label_text(results.label_of(int(results.query_labels[q])))}"
            draw.text((2, y + tile_size + 1), text, fill=TEXT_COLOUR, font=font)
        for rank in range(top):
            g = int(results.topk_indices[q, rank])
            if g < 0:
                continue
            colour = RELEVANT_COLOUR if bool(relevant[q, rank]) else IRRELEVANT_COLOUR
            x = gap + tile_size * (rank + 1)
            sheet.paste(_tile(load_gallery(g), tile_size, colour, border), (x, y))
            if captions:
                label = label_text(results.label_of(int(results.gallery_labels[g])))
                distance = float(results.topk_distances[q, rank])
                text = f"{rank + 1}: {label} {distance:.3g}"
                draw.text((x + 2, y + tile_size + 1), text, fill=colour, font=font)
    return sheet
