from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.neighbors import NearestNeighbors

from dmlkit import data
from dmlkit.errors import ConfigError, UnknownNameError


@pytest.fixture(scope="module")
def default_splits() -> data.DatasetSplits:
    return data.build("synthetic")


def test_render_is_deterministic_and_seeded() -> None:
    a_images, a_labels = data.render_glyphs(num_classes=5, samples_per_class=4, seed=3)
    b_images, _ = data.render_glyphs(num_classes=5, samples_per_class=4, seed=3)
    c_images, _ = data.render_glyphs(num_classes=5, samples_per_class=4, seed=4)
    assert a_images.dtype == np.uint8 and a_images.shape == (20, 32, 32)
    np.testing.assert_array_equal(a_images, b_images)
    np.testing.assert_array_equal(a_labels, np.repeat(np.arange(5), 4))
    assert not np.array_equal(a_images, c_images)


def test_a_class_does_not_depend_on_how_many_classes_are_drawn(default_splits: data.DatasetSplits) -> None:
    few, _ = data.render_glyphs(num_classes=3, samples_per_class=30)
    np.testing.assert_array_equal(few[:, None], default_splits.train.images[:90].numpy())


def test_default_splits_are_class_disjoint(default_splits: data.DatasetSplits) -> None:
    train, test = default_splits.train, default_splits.test
    assert (default_splits.image_size, default_splits.channels, default_splits.name) == (32, 1, "synthetic")
    assert (len(train), train.num_classes, len(test), test.num_classes) == (3000, 100, 3000, 100)
    assert not set(train.class_names) & set(test.class_names)
    assert train.class_names[0] == "glyph_0000" and test.class_names[0] == "glyph_0100"
    for part in (train, test):
        assert part.labels.dtype == np.int64
        np.testing.assert_array_equal(np.unique(part.labels), np.arange(100))
    assert len(set(train.ids) | set(test.ids)) == 6000
    image, label, index = test[7]
    assert image.shape == (1, 32, 32) and label == 0 and index == 7


def test_images_show_strokes_on_a_dark_background(default_splits: data.DatasetSplits) -> None:
    pixels = default_splits.train.images.float() / 255
    assert 0.05 < pixels.mean() < 0.25  # mostly background
    assert (pixels.amax(dim=(1, 2, 3)) > 0.9).all()  # every glyph has ink


def test_difficulty_raw_pixel_recall_at_1(default_splits: data.DatasetSplits) -> None:
    # neither trivial nor hopeless for raw pixels (cosine leave-one-out 1-NN with scikit-learn)
    test = default_splits.test
    x = test.images.reshape(len(test), -1).numpy().astype(np.float64)
    _, neighbours = NearestNeighbors(n_neighbors=2, metric="cosine").fit(x).kneighbors(x)
    recall = float(np.mean(test.labels[neighbours[:, 1]] == test.labels))
    assert 0.2 <= recall <= 0.6


def test_eval_transform_normalises_to_roughly_zero_mean(default_splits: data.DatasetSplits) -> None:
    stack = np.stack([default_splits.train[i][0].numpy() for i in range(0, 3000, 10)])
    assert abs(stack.mean()) < 0.3  # train items carry a random affine, so only roughly
    test_stack = np.stack([default_splits.test[i][0].numpy() for i in range(0, 3000, 10)])
    assert abs(test_stack.mean()) < 0.3 and 0.7 < test_stack.std() < 1.3


def test_data_spec_rebuilds_the_pipelines(default_splits: data.DatasetSplits) -> None:
    spec = data.data_spec(default_splits)
    assert json.loads(json.dumps(spec)) == spec  # plain data, storable in a checkpoint
    assert spec["image_size"] == 32 and spec["channels"] == 1 and spec["recipe"] == "glyph"
    pixels = default_splits.train.images.double() / 255
    assert spec["mean"][0] == pytest.approx(pixels.mean().item(), rel=1e-5)
    rebuilt = data.transforms.build("eval", **spec)
    image = default_splits.test.images[3]
    torch.testing.assert_close(rebuilt(image), default_splits.test.transform(image))
    torch.testing.assert_close(default_splits.transform("eval")(image), default_splits.test[3][0])


def test_arguments_and_errors() -> None:
    splits = data.build("synthetic", num_classes=10, samples_per_class=3, image_size=28, num_test_classes=4)
    assert (splits.train.num_classes, splits.test.num_classes, len(splits.train)) == (6, 4, 18)
    assert splits.train.images.shape[-2:] == (28, 28)
    with pytest.raises(UnknownNameError, match="num_classes"):
        data.build("synthetic", num_clases=10)
    with pytest.raises(UnknownNameError, match="synthetic"):
        data.build("synthetik")
    with pytest.raises(ConfigError, match="test"):
        data.build("synthetic", num_classes=10, num_test_classes=1)
