"""Helpers shared by several test modules: the tiny configuration's command line, independent reference
formulas (a distance matrix written out for autograd), and the docs tables of hyperparameters."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: The synthetic dataset of the tiny configuration (tests/conftest.py ``tiny_config``).
TINY_DATA = {"num_classes": 16, "samples_per_class": 8, "image_size": 16, "test_fraction": 0.5}


def tiny_argv(output_dir: Path, name: str = "tiny", epochs: int = 3) -> list[str]:
    return [
        "--name", name, "--output-dir", str(output_dir), "--dataset-args", json.dumps(TINY_DATA),
        "--val-fraction", "0.25", "--embedding-size", "16", "--batch-size", "16", "--samples-per-class", "4",
        "--epochs", str(epochs), "--deterministic", "--no-progress", "--metrics", "recall@1,map@r",
        "--select-metric", "map@r",
    ]  # fmt: skip


def checkpoint_test_embeddings(checkpoint_file: Path) -> tuple[Any, Any, dict[str, Any]]:
    """(embeddings, labels, checkpoint) of a checkpoint's test split, made here independently of the CLI."""
    import torch

    from dmlkit import data as data_lib
    from dmlkit.config import config_from_checkpoint
    from dmlkit.inference import compute_embeddings, load_model

    model, checkpoint = load_model(checkpoint_file, torch.device("cpu"))
    data = config_from_checkpoint(checkpoint["config"], str(checkpoint_file)).data
    test = data_lib.build(data.dataset.name, data.data_root, **data.dataset.args).test
    test.transform = data_lib.transforms.build("eval", **checkpoint["data_spec"])
    x, y = compute_embeddings(model, test)
    return x, y, checkpoint


def assert_match_pml_euclidean(metrics: dict[str, float], x: Any, y: Any) -> None:
    """``metrics`` (recall@1, map@r, r_precision) equal PML's AccuracyCalculator with an unnormalised
    Euclidean distance on ``x``, ``y`` (leave-one-out, k = every other item)."""
    import pytest
    import torch
    from pytorch_metric_learning.distances import LpDistance
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import CustomKNN

    pml = AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r", "r_precision"),
        k=None,
        device=torch.device("cpu"),
        knn_func=CustomKNN(LpDistance(normalize_embeddings=False)),
    ).get_accuracy(x, y)
    assert metrics["recall@1"] == pytest.approx(pml["precision_at_1"], rel=1e-6)
    assert metrics["map@r"] == pytest.approx(pml["mean_average_precision_at_r"], rel=1e-6)
    assert metrics["r_precision"] == pytest.approx(pml["r_precision"], rel=1e-6)


def plain_matrix(x: Any, y: Any, name: str, normalize: bool) -> Any:
    """The distance matrix written out for autograd (√ with a zero gradient at 0): an independent reference
    of :meth:`dmlkit.distances.Distance.matrix`."""
    import torch
    import torch.nn.functional as F

    if normalize or name == "cosine":
        x = F.normalize(x, p=2, dim=1)
        y = None if y is None else F.normalize(y, p=2, dim=1)
    y = x if y is None else y
    if name in ("cosine", "dot"):
        return x @ y.T
    squared = (x.pow(2).sum(1, keepdim=True) + y.pow(2).sum(1).unsqueeze(0) - 2.0 * (x @ y.T)).clamp_min(0.0)
    if name == "squared_euclidean":
        return squared
    zero = squared == 0
    return torch.sqrt(squared + zero.to(squared.dtype) * 1e-16) * (~zero).to(squared.dtype)


def documented_hyperparameters(rows: list[str], shared: tuple[str, ...]) -> dict[str, list[tuple[str, str]]]:
    """``name → [(keyword, default as written), ...]`` from the rows of a docs table whose first cell names
    the component and whose third cell lists ``keyword=default`` in order; shared options left out."""
    import re

    out: dict[str, list[tuple[str, str]]] = {}
    for row in rows:
        cells = row.split(" | ")
        name = re.search(r"`(\w+)`", cells[0]).group(1)  # type: ignore[union-attr]
        first: dict[str, str] = {}  # a keyword may be mentioned again in the explanations
        for key, value in re.findall(r"`(\w+)=([^`]*)`", cells[2]):
            first.setdefault(key, value)
        out[name] = [(key, value) for key, value in first.items() if key not in shared]
    return out


#: ``dmlkit train`` flags of a seconds-long run on a dataset fixture (small CNN, 16 px, one epoch).
FAST_TRAIN = ["--epochs", "1", "--backbone", "small_cnn", "--embedding-size", "8", "--batch-size", "8",
              "--samples-per-class", "2", "--image-size", "16", "--val-fraction", "0", "--no-progress",
              "--device", "cpu", "--metrics", "recall@1,map@r"]  # fmt: skip


def edit_line(path: Any, line: int, text: str | None) -> None:
    """Replace 1-based ``line`` of the text file ``path`` by ``text`` (``None``: delete it)."""
    lines = path.read_text().splitlines()
    if text is None:
        del lines[line - 1]
    else:
        lines[line - 1] = text
    path.write_text("\n".join(lines) + "\n")
