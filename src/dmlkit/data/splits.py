"""Class-level splits: zero-shot retrieval trains and evaluates on disjoint sets of classes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dmlkit.data.base import ImageDataset
from dmlkit.errors import ConfigError


def class_disjoint_split(
    dataset: ImageDataset, fraction: float, seed: int
) -> tuple[ImageDataset, ImageDataset]:
    """Split ``dataset`` by classes (not items) into ``(train_part, val_part)``.

    ``val_part`` gets ``round(fraction × C)`` randomly chosen classes (seeded by ``seed``), at least one when
    ``fraction > 0`` and ``C ≥ 2`` and at most ``C - 1``; ``train_part`` gets the others. Items keep their
    order and ids; both parts have contiguous labels. ``fraction == 0`` gives an empty ``val_part``.
    """
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"class_disjoint_split fraction must be in [0, 1), got {fraction}")
    num_classes = dataset.num_classes
    num_val = round(fraction * num_classes)
    if fraction > 0 and num_classes >= 2:
        num_val = min(max(num_val, 1), num_classes - 1)
    rng = np.random.default_rng(seed)
    val_classes = np.zeros(num_classes, dtype=bool)
    val_classes[rng.permutation(num_classes)[:num_val]] = True
    in_val = val_classes[dataset.labels]
    return dataset.subset(np.flatnonzero(~in_val)), dataset.subset(np.flatnonzero(in_val))


def split_class_names(
    class_names: Sequence[str],
    test_classes: float | Sequence[str],
    seed: int | None = None,
    source: str = "dataset",
) -> tuple[list[str], list[str]]:
    """Choose the test (zero-shot) classes of a dataset: ``(train_names, test_names)``.

    ``test_classes`` is either a fraction in (0, 1) — the last ``round(fraction × C)`` classes in sorted order
    (the CUB-200 / Cars-196 convention: first half train, second half test), or a random choice when
    ``seed`` is given — or an explicit list of class names (unknown names raise ``ConfigError``).
    """
    names = sorted(class_names)
    if isinstance(test_classes, str):
        raise ConfigError(f"test_classes must be a fraction or a list of class names, got '{test_classes}'")
    if isinstance(test_classes, int | float):
        if not 0.0 < float(test_classes) < 1.0:
            raise ConfigError(f"test_classes fraction must be in (0, 1), got {test_classes}")
        num_test = round(float(test_classes) * len(names))
        num_test = min(max(num_test, 1), max(len(names) - 1, 1))
        if seed is None:
            test = set(names[len(names) - num_test :])
        else:
            test = {names[i] for i in np.random.default_rng(seed).permutation(len(names))[:num_test]}
    else:
        test = {str(name) for name in test_classes}
        unknown = sorted(test - set(names))
        if unknown:
            shown = ", ".join(names[:20]) + (" ..." if len(names) > 20 else "")
            raise ConfigError(
                f"test_classes names {unknown} are not classes of '{source}' (classes: {shown})"
            )
    return [n for n in names if n not in test], [n for n in names if n in test]


__all__ = ["class_disjoint_split", "split_class_names"]
