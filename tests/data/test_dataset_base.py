from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from dmlkit import data
from dmlkit.errors import ConfigError, DataError


def _dataset(num_classes: int = 5, per_class: int = 4) -> data.ArrayImageDataset:
    rng = np.random.default_rng(0)
    n = num_classes * per_class
    images = rng.integers(0, 256, (n, 8, 8), dtype=np.uint8)
    labels = np.repeat(np.arange(num_classes), per_class)
    return data.ArrayImageDataset(
        images, labels, [f"c{i}" for i in range(num_classes)], [f"id{i}" for i in range(n)]
    )


def _add_noise(x: torch.Tensor) -> torch.Tensor:
    # draws from torch's global RNG like every torchvision random transform
    return x + torch.rand_like(x)


def _noise_transform() -> v2.Compose:
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Lambda(_add_noise)])


def test_items_are_float_images_with_label_and_index() -> None:
    dataset = _dataset()
    image, label, index = dataset[5]
    assert image.dtype == torch.float32 and image.shape == (1, 8, 8)
    torch.testing.assert_close(image, dataset.images[5].float() / 255)
    assert (label, index) == (1, 5) and isinstance(label, int)
    assert dataset[-1][2] == len(dataset) - 1
    with pytest.raises(IndexError):
        dataset[len(dataset)]


def test_layouts_of_in_memory_images() -> None:
    hwc = np.zeros((2, 6, 7, 3), dtype=np.uint8)
    dataset = data.ArrayImageDataset(hwc, [0, 1], ["a", "b"], ["x", "y"])
    assert dataset.images.shape == (2, 3, 6, 7) and dataset.channels == 3
    with pytest.raises(DataError, match="uint8"):
        data.ArrayImageDataset(hwc.astype(np.float32), [0, 1], ["a", "b"], ["x", "y"])
    with pytest.raises(DataError, match="labels"):
        data.ArrayImageDataset(hwc, [0, 2], ["a", "b"], ["x", "y"])


def test_subset_remaps_labels_and_keeps_ids_and_transform() -> None:
    dataset = _dataset()
    dataset.transform = _noise_transform()
    dataset.augment_seed, dataset.epoch = 3, 2
    part = dataset.subset([19, 8, 9, 18])
    assert part.class_names == ["c2", "c4"]
    np.testing.assert_array_equal(part.labels, [1, 0, 0, 1])
    assert part.ids == ["id19", "id8", "id9", "id18"]
    assert part.transform is dataset.transform and (part.augment_seed, part.epoch) == (3, 2)
    torch.testing.assert_close(part.images[0], dataset.images[19])


def test_augmentation_is_a_pure_function_of_seed_epoch_and_index() -> None:
    a, b = _dataset(), _dataset()
    for dataset in (a, b):
        dataset.transform = _noise_transform()
        dataset.augment_seed = 7
    first = a[3][0]
    torch.manual_seed(123)  # the global RNG state must not matter
    b[0], b[5]  # nor what was drawn before
    torch.testing.assert_close(b[3][0], first)
    torch.testing.assert_close(a[3][0], first)
    assert not torch.equal(a[4][0], first)
    a.set_epoch(1)
    assert not torch.equal(a[3][0], first)
    a.augment_seed = 8
    a.set_epoch(0)
    assert not torch.equal(a[3][0], first)


def test_augmentation_does_not_touch_the_global_rng() -> None:
    dataset = _dataset()
    dataset.transform = _noise_transform()
    dataset.augment_seed = 0
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    dataset[0]
    torch.testing.assert_close(torch.rand(3), expected)


def test_augmentation_is_independent_of_dataloader_workers() -> None:
    dataset = _dataset()
    dataset.transform = _noise_transform()
    dataset.augment_seed = 11
    dataset.set_epoch(4)
    serial = torch.cat([x for x, _, _ in DataLoader(dataset, batch_size=4)])
    parallel = torch.cat([x for x, _, _ in DataLoader(dataset, batch_size=4, num_workers=2)])
    torch.testing.assert_close(serial, parallel)


def test_item_seed_is_stable_and_spread() -> None:
    seeds = {data.item_seed(0, epoch, index) for epoch in range(3) for index in range(100)}
    assert len(seeds) == 300
    assert data.item_seed(1, 2, 3) == data.item_seed(1, 2, 3) < 2**63


def test_class_disjoint_split() -> None:
    dataset = _dataset(num_classes=10, per_class=3)
    train, val = data.class_disjoint_split(dataset, 0.3, seed=0)
    assert (train.num_classes, val.num_classes) == (7, 3)
    assert not set(train.class_names) & set(val.class_names)
    assert sorted(train.ids + val.ids) == sorted(dataset.ids)
    np.testing.assert_array_equal(np.unique(val.labels), np.arange(3))
    again, _ = data.class_disjoint_split(dataset, 0.3, seed=0)
    assert again.ids == train.ids
    other, _ = data.class_disjoint_split(dataset, 0.3, seed=1)
    assert other.class_names != train.class_names
    # labels of each part still match their class names
    for part in (train, val):
        names = [part.class_names[code] for code in part.labels]
        assert names == [f"c{int(item[2:]) // 3}" for item in part.ids]


def test_class_disjoint_split_edge_cases() -> None:
    dataset = _dataset(num_classes=2)
    train, val = data.class_disjoint_split(dataset, 0.01, seed=0)
    assert (train.num_classes, val.num_classes) == (1, 1)
    train, val = data.class_disjoint_split(dataset, 0.0, seed=0)
    assert (len(train), len(val)) == (len(dataset), 0)
    with pytest.raises(ConfigError, match="fraction"):
        data.class_disjoint_split(dataset, 1.0, seed=0)
