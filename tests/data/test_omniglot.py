from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dmlkit import data
from dmlkit.errors import DataError

REAL = Path(__file__).resolve().parents[3] / "shared" / "data" / "omniglot" / "omniglot28.npz"


def _fake_npz(path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = []
    for split, alphabets in (("background", ["Latin", "Greek"]), ("evaluation", ["Runic"])):
        for alphabet in alphabets:
            for character in ("character01", "character02"):
                rows += [(split, alphabet, character, f"{k}.png") for k in range(3)]
    n = len(rows)
    label_of = {key: i for i, key in enumerate(dict.fromkeys((r[1], r[2]) for r in rows))}
    np.savez(
        path,
        images=rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
        label=np.array([label_of[(r[1], r[2])] + 10 for r in rows], dtype=np.int64),
        alphabet=np.array([r[1] for r in rows]),
        character=np.array([r[2] for r in rows]),
        filename=np.array([r[3] for r in rows]),
        split=np.array([r[0] for r in rows]),
    )


def test_background_trains_and_evaluation_tests(tmp_path: Path) -> None:
    _fake_npz(tmp_path / "omniglot28.npz")
    raw = np.load(tmp_path / "omniglot28.npz")
    splits = data.build("omniglot", str(tmp_path))
    assert splits.train.class_names == [
        "Latin/character01",
        "Latin/character02",
        "Greek/character01",
        "Greek/character02",
    ]
    assert splits.test.class_names == ["Runic/character01", "Runic/character02"]
    assert (len(splits.train), len(splits.test), splits.channels, splits.image_size) == (12, 6, 1, 28)
    np.testing.assert_array_equal(splits.test.labels, [0, 0, 0, 1, 1, 1])
    assert splits.test.ids[0] == "Runic/character01/0.png"
    # strokes made bright: stored images are inverted
    np.testing.assert_array_equal(splits.train.images[0, 0].numpy(), 255 - raw["images"][0])
    plain = data.build("omniglot", str(tmp_path / "omniglot28.npz"), invert=False, image_size=32)
    np.testing.assert_array_equal(plain.train.images[0, 0].numpy(), raw["images"][0])
    assert plain.train[0][0].shape == (1, 32, 32)


def test_missing_or_malformed_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"omniglot28\.npz"):
        data.build("omniglot", str(tmp_path))
    np.savez(tmp_path / "bad.npz", images=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(DataError, match=r"bad\.npz.*label"):
        data.build("omniglot", str(tmp_path / "bad.npz"))


@pytest.mark.skipif(not REAL.is_file(), reason="shared omniglot data not present")
def test_real_omniglot() -> None:
    splits = data.build("omniglot", str(REAL))
    assert (splits.train.num_classes, splits.test.num_classes) == (964, 659)
    assert (len(splits.train), len(splits.test)) == (19280, 13180)
    assert splits.train.images.float().mean() < 40  # inverted: mostly dark background


@pytest.mark.parametrize("compressed", [False, True])
def test_truncated_or_corrupt_file_is_a_data_error_naming_it(tmp_path: Path, compressed: bool) -> None:
    """Cut at every 1/40 of its length or with 3 bytes zeroed at every 1/80 (zip directory, .npy headers, zlib
    streams), the file either still loads or raises ``DataError`` naming it, never a raw exception."""
    _fake_npz(tmp_path / "good.npz")
    if compressed:
        np.savez_compressed(tmp_path / "good.npz", **dict(np.load(tmp_path / "good.npz")))
    raw = (tmp_path / "good.npz").read_bytes()
    broken = tmp_path / "broken.npz"
    variants = [raw[:cut] for cut in range(0, len(raw), len(raw) // 40)]
    variants += [raw[:pos] + bytes(3) + raw[pos + 3 :] for pos in range(0, len(raw), len(raw) // 80)]
    failures = 0
    for variant in variants:
        broken.write_bytes(variant)
        try:
            data.build("omniglot", str(broken))
        except DataError as exc:
            assert "broken.npz" in str(exc)
            failures += 1
    assert failures > len(variants) // 2
    broken.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=r"cannot read omniglot file '.*broken\.npz' \(BadZipFile"):
        data.build("omniglot", str(broken))


def test_arrays_of_the_wrong_shape_or_type_name_the_file_and_array(tmp_path: Path) -> None:
    """What a corrupt ``.npy`` header that still parses gives: a scalar, another length, strings as labels."""
    _fake_npz(tmp_path / "good.npz")
    arrays = dict(np.load(tmp_path / "good.npz"))
    for key, value, match in (
        ("label", np.array(5), r"'label' must hold one value per image \(18\), got \(\)"),
        ("split", arrays["split"][:-1], r"'split' must hold one value per image \(18\), got \(17,\)"),
        ("label", arrays["alphabet"], r"'label' must be integers"),
        ("images", arrays["images"][:, :, :, None], r"images must be N×H×W uint8"),
    ):
        np.savez(tmp_path / "odd.npz", **{**arrays, key: value})
        with pytest.raises(DataError, match=rf"odd\.npz.*{match}"):
            data.build("omniglot", str(tmp_path / "odd.npz"))
