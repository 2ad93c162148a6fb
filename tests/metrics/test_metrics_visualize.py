"""Retrieval pictures: which queries are picked, which images land in which tile, and the frame colours."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dmlkit.data.base import ArrayImageDataset
from dmlkit.errors import ConfigError, DataError
from dmlkit.metrics import evaluate, pick_queries, relevance, retrieval_grid
from dmlkit.metrics.visualize import IRRELEVANT_COLOUR, QUERY_COLOUR, RELEVANT_COLOUR

TILE, BORDER, GAP, CAPTION = 40, 4, 6, 14


def line_data() -> tuple[torch.Tensor, torch.Tensor]:
    """Points on a line, so every neighbour list is known: labels 0 0 1 0 1 1 2."""
    x = torch.tensor([[0.0], [1.0], [2.1], [3.3], [4.6], [6.0], [7.5]])
    y = torch.tensor([0, 0, 1, 0, 1, 1, 2])
    return x, y


def grey_images(n: int) -> list[torch.Tensor]:
    """Item i is a uniform 1 × 20 × 20 uint8 image of grey level 20·(i + 1), so a tile shows whose it is."""
    return [torch.full((1, 20, 20), 20 * (i + 1), dtype=torch.uint8) for i in range(n)]


def tile_origin(row: int, column: int) -> tuple[int, int]:
    x = 0 if column == 0 else GAP + TILE * column
    return x, row * (TILE + CAPTION)


def test_relevance_marks_existing_same_label_neighbours() -> None:
    x, y = line_data()
    results = evaluate(x, y, metrics=("recall@1",), k=6, distance="euclidean")
    expected = torch.zeros_like(results.topk_indices, dtype=torch.bool)
    for q in range(len(y)):
        for rank, g in enumerate(results.topk_indices[q].tolist()):
            expected[q, rank] = g >= 0 and int(y[g]) == int(y[q])
    assert torch.equal(relevance(results), expected)


def test_pick_queries_modes() -> None:
    x, y = line_data()
    results = evaluate(x, y, metrics=("recall@1",), distance="euclidean")
    has_relevant = {q for q in range(len(y)) if int((y == y[q]).sum()) > 1}  # item 6 is alone in class 2
    top1_wrong = {q for q in has_relevant if int(y[results.topk_indices[q, 0]]) != int(y[q])}
    assert top1_wrong == {2, 3, 4}

    failures = pick_queries(results, len(top1_wrong), "failures")
    assert set(failures) == top1_wrong
    more = pick_queries(results, len(top1_wrong) + 1, "failures")
    assert top1_wrong < set(more) <= has_relevant
    assert pick_queries(results, 3, "first") == sorted(has_relevant)[:3]
    everything = pick_queries(results, 100, "random")
    assert everything == sorted(has_relevant)  # never a query without a relevant item
    assert pick_queries(results, 3, "random", seed=1) == pick_queries(results, 3, "random", seed=1)
    with pytest.raises(ConfigError, match="mode"):
        pick_queries(results, 2, "worst")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="positive"):
        pick_queries(results, 0)


@pytest.mark.parametrize("source", ["tensors", "arrays", "pil", "paths", "callable", "dataset"])
def test_grid_places_each_neighbour_with_its_frame(source: str, tmp_path) -> None:
    x, y = line_data()
    results = evaluate(x, y, metrics=("recall@1",), k=3, distance="euclidean")
    images = grey_images(len(y))
    if source == "tensors":
        images_source = images
    elif source == "arrays":
        images_source = [im.numpy().astype(np.float32) / 255.0 for im in images]  # floats in [0, 1]
    elif source == "pil":
        images_source = [Image.fromarray(im[0].numpy()) for im in images]
    elif source == "paths":
        images_source = []
        for i, im in enumerate(images):
            Image.fromarray(im[0].numpy()).save(tmp_path / f"{i}.png")
            images_source.append(tmp_path / f"{i}.png")
    elif source == "callable":
        images_source = lambda i: images[i]  # noqa: E731
    else:
        images_source = ArrayImageDataset(torch.stack(images), y.numpy(), ["a", "b", "c"], list("0123456"))
    queries = [0, 2, 4]
    sheet = retrieval_grid(results, images_source, queries=queries, top=3, tile_size=TILE, border=BORDER)
    assert sheet.size == (GAP + TILE * 4, (TILE + CAPTION) * len(queries))
    rel = relevance(results)
    for row, q in enumerate(queries):
        qx, qy = tile_origin(row, 0)
        assert sheet.getpixel((qx + 1, qy + 1)) == QUERY_COLOUR
        assert sheet.getpixel((qx + TILE // 2, qy + TILE // 2)) == (20 * (q + 1),) * 3
        for rank in range(3):
            gx, gy = tile_origin(row, rank + 1)
            g = int(results.topk_indices[q, rank])
            assert sheet.getpixel((gx + TILE // 2, gy + TILE // 2)) == (20 * (g + 1),) * 3
            frame = RELEVANT_COLOUR if bool(rel[q, rank]) else IRRELEVANT_COLOUR
            assert sheet.getpixel((gx + 1, gy + 1)) == frame


def test_grid_with_separate_gallery_and_empty_slots() -> None:
    gallery = torch.tensor([[0.0], [5.0]])
    query = torch.tensor([[0.2], [4.0]])
    results = evaluate(
        query, [0, 1], gallery, [0, 0], metrics=("recall@1",), k=2, distance="euclidean",
        ignore=([7, 8], [7, 9]),  # the first query may not retrieve gallery item 0
    )  # fmt: skip
    assert results.topk_indices.tolist() == [[1, -1], [1, 0]]
    with pytest.raises(ConfigError, match="gallery_images"):
        retrieval_grid(results, grey_images(2), top=1)
    sheet = retrieval_grid(
        results, grey_images(2), grey_images(2)[::-1], queries=[0, 1], top=2, tile_size=TILE, border=BORDER,
        captions=False,
    )  # fmt: skip
    assert sheet.size == (GAP + TILE * 3, TILE * 2)
    # query 0 (label 0): gallery 1 (label 0, drawn with the second gallery image = grey 20), then nothing
    assert sheet.getpixel((GAP + TILE + 1, 1)) == RELEVANT_COLOUR
    assert sheet.getpixel((GAP + TILE + TILE // 2, TILE // 2)) == (20,) * 3
    assert sheet.getpixel((GAP + 2 * TILE + 1, 1)) == (255, 255, 255)  # empty slot stays blank
    # query 1 has label 1: both gallery items are irrelevant
    assert sheet.getpixel((GAP + TILE + 1, TILE + 1)) == IRRELEVANT_COLOUR


def test_grid_errors_name_the_culprit() -> None:
    x, y = line_data()
    results = evaluate(x, y, metrics=("recall@1",), k=2, distance="euclidean")
    images = grey_images(len(y))
    with pytest.raises(ConfigError, match="top=3 exceeds the 2 neighbours"):
        retrieval_grid(results, images, top=3)
    with pytest.raises(ConfigError, match="query index 9"):
        retrieval_grid(results, images, queries=[9], top=1)
    with pytest.raises(ConfigError, match="got int"):
        retrieval_grid(results, 5, queries=[0], top=1)
    with pytest.raises(DataError, match="cannot read image"):
        retrieval_grid(results, ["/nonexistent/a.png"] * len(y), queries=[0], top=1)
    with pytest.raises(DataError, match="shape"):
        retrieval_grid(results, [torch.zeros(2, 2, 2, 2)] * len(y), queries=[0], top=1)
