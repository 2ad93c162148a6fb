"""``class_random``: Roth et al.'s sampler — classes and images drawn uniformly with replacement."""

from __future__ import annotations

import numpy as np

from dmlkit import samplers


def test_classes_and_images_are_drawn_uniformly_with_replacement() -> None:
    labels = np.repeat(np.arange(5), [2, 3, 4, 5, 6])  # 20 items, unequal classes
    sampler = samplers.build("class_random", labels=labels, batch_size=8, samples_per_class=2, seed=0,
                             batches_per_epoch=4000)  # fmt: skip
    batches = np.asarray(sampler.batches(0))  # 4000 × 8
    assert batches.shape == (4000, 8)
    pairs = batches.reshape(4000, 4, 2)
    assert (labels[pairs[..., 0]] == labels[pairs[..., 1]]).all()  # K images of one class per draw
    drawn = labels[pairs[..., 0]].ravel()
    np.testing.assert_allclose(
        np.bincount(drawn, minlength=5) / len(drawn), 0.2, atol=0.01
    )  # classes uniform
    repeats = [len(set(labels[b[::2]])) < 4 for b in batches]
    assert np.mean(repeats) > 0.5  # with replacement: 1 − 5·4·3·2 / 5⁴ = 0.81 of batches repeat a class
    class4 = batches.ravel()[labels[batches.ravel()] == 4]
    np.testing.assert_allclose(np.bincount(class4 - 14, minlength=6) / len(class4), 1 / 6, atol=0.01)
    same = [b[0] == b[1] for b in pairs.reshape(-1, 2) if labels[b[0]] == 0]
    np.testing.assert_allclose(np.mean(same), 0.5, atol=0.03)  # a class of 2 images: 1/2 pairs repeat


def test_an_epoch_is_one_pass_and_reproducible() -> None:
    labels = np.repeat(np.arange(10), 6)
    first = samplers.build("class_random", labels=labels, batch_size=12, samples_per_class=3, seed=4)
    second = samplers.build("class_random", labels=labels, batch_size=12, samples_per_class=3, seed=4)
    assert len(first) == 60 // 12 and first.batches(1) == second.batches(1) != first.batches(2)
