"""Fault injection: image files (decoding, checks before training, DataLoader workers).

Each case builds its bad files in ``tmp_path``: a JPEG cut in its pixel data (its header parses), a PNG whose
header claims 200 megapixels, 16-bit / EXIF-rotated / transparent images, a truncated ``.npz``, a CSV listing
one file under a train and a test label.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from faults import Outcome, assert_named_error, assert_unchanged, run_cli, run_process, snapshot, tiny_argv
from PIL import Image

from bad_images import png_header, truncated_jpeg


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """``photos/c00 .. c15``: 16 classes × 4 small RGB PNGs (8 train classes, 8 test classes)."""
    root = tmp_path / "photos"
    rng = np.random.default_rng(0)
    for c in range(16):
        (root / f"c{c:02d}").mkdir(parents=True)
        for j in range(4):
            pixels = np.full((20, 24, 3), c * 15, np.uint8) + rng.integers(0, 20, (20, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"c{c:02d}" / f"{j}.png")
    return root


def folder_argv(out: Path, root: Path, name: str, *extra: str) -> list[str]:
    """The tiny run of :func:`tiny_argv` (one epoch) on the ``folder`` dataset ``root`` at 16 px."""
    return ["train", *tiny_argv(out, name, epochs=1), "--dataset", "folder", "--data-root", str(root),
            "--dataset-args", "image_size=16", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def glyph_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``best.pt`` of the tiny synthetic run: a 16 px, one-channel ``glyph`` model."""
    out = tmp_path_factory.mktemp("glyph_runs")
    outcome = run_cli(["train", *tiny_argv(out, "glyphs", epochs=1)])
    assert outcome.code == 0, outcome
    return out / "glyphs" / "best.pt"


def embed(checkpoint: Path, images: Path, out: Path) -> tuple[Outcome, dict[str, np.ndarray]]:
    """``dmlkit embed`` of a folder: the outcome and the embedding of each file by name."""
    outcome = run_cli(
        ["embed", "--checkpoint", checkpoint, "--images", images, "--out", out, "--no-progress"]
    )
    if outcome.code != 0:
        return outcome, {}
    ids = json.loads(out.with_name(out.stem + ".ids.json").read_text())["ids"]
    return outcome, dict(zip(ids, np.load(out), strict=True))


def warned(caplog: pytest.LogCaptureFixture, recwarn: pytest.WarningsRecorder) -> str:
    """Every warning of an in-process command: ``main`` routes warnings to the log
    (``logging.captureWarnings``), except where an earlier in-process ``main`` already did and pytest's
    per-test recorder has replaced the route since."""
    return caplog.text + "\n".join(str(w.message) for w in recwarn)


# -- checks before training -------------------------------------------------------------------------------


def test_truncated_jpeg_is_caught_before_training(tmp_path: Path, photos: Path) -> None:
    """The header check alone passes it; the default ``auto`` check decodes small datasets in full."""
    out = tmp_path / "runs"
    assert run_cli(folder_argv(out, photos, "earlier")).code == 0  # an earlier run must stay as it was
    bad = truncated_jpeg(photos / "c03" / "cut.jpg")
    before = snapshot(photos, out)
    outcome = run_cli(folder_argv(out, photos, "again"))
    assert_named_error(outcome, 1, str(bad), "image file is truncated", "--skip-unreadable")
    assert_unchanged(before, photos, out)
    assert not (out / "again" / "best.pt").exists()


def test_full_check_names_the_bad_files(tmp_path: Path, photos: Path) -> None:
    bad = [truncated_jpeg(photos / f"c{c:02d}" / "cut.jpg", seed=c) for c in (1, 9)]
    outcome = run_cli(folder_argv(tmp_path / "runs", photos, "full", "--verify-images", "full"))
    assert_named_error(outcome, 1, "2 of 66 image(s)", "cannot be used", str(bad[0]), str(bad[1]))


def test_skip_unreadable_drops_files_failing_the_check(tmp_path: Path, photos: Path) -> None:
    truncated_jpeg(photos / "c12" / "cut.jpg")
    with pytest.warns(UserWarning, match=r"skipped 1 of 65 image.*c12/cut\.jpg': image file is truncated"):
        outcome = run_cli(folder_argv(tmp_path / "runs", photos, "skip", "--skip-unreadable"))
    assert outcome.code == 0, outcome
    assert "test 32 images / 8 classes" in outcome.stdout  # 33 in the test classes, the cut one dropped


# -- while training ---------------------------------------------------------------------------------------


def test_truncated_jpeg_in_a_dataloader_worker_is_one_named_line(tmp_path: Path, photos: Path) -> None:
    """Past a header-only check, the file fails in a worker process (a test class: the run embeds every test
    image first): one line naming it, as without workers, not torch's re-raised worker traceback."""
    bad = truncated_jpeg(photos / "c12" / "cut.jpg")
    argv = folder_argv(
        tmp_path / "runs", photos, "workers", "--verify-images", "header", "--num-workers", "2"
    )
    outcome = run_process(argv)
    assert_named_error(outcome, 1, str(bad), "image file is truncated")
    assert [line for line in outcome.stderr.splitlines() if line.strip()] == [outcome.first_line]


def test_skip_unreadable_replaces_a_file_failing_while_training(
    tmp_path: Path, photos: Path, caplog: pytest.LogCaptureFixture, recwarn: pytest.WarningsRecorder
) -> None:
    bad = truncated_jpeg(photos / "c12" / "cut.jpg")
    argv = folder_argv(
        tmp_path / "runs", photos, "replaced", "--verify-images", "header", "--skip-unreadable"
    )
    outcome = run_cli([*argv, "--epochs", "2"])
    assert outcome.code == 0, outcome
    text = warned(caplog, recwarn)
    assert f"cannot read image '{bad}': image file is truncated" in text, text
    assert "replaced by another image of class 'c12'" in text
    assert (tmp_path / "runs" / "replaced" / "best.pt").is_file()


# -- pixel limit ------------------------------------------------------------------------------------------


def test_decompression_bomb_names_pixels_and_limit(tmp_path: Path, photos: Path) -> None:
    huge = png_header(photos / "c05" / "huge.png", 20_000, 10_000)
    before = snapshot(photos)
    outcome = run_cli(folder_argv(tmp_path / "runs", photos, "bomb"))
    assert_named_error(
        outcome, 1, str(huge), "200,000,000 pixels", "limit of 178,956,970", "--max-image-pixels"
    )
    assert "missing or unreadable" not in outcome.first_line  # what it was reported as before
    assert_unchanged(before, photos)


def test_max_image_pixels_flag_sets_the_limit(tmp_path: Path, photos: Path) -> None:
    outcome = run_cli(folder_argv(tmp_path / "runs", photos, "small", "--max-image-pixels", "479"))
    assert_named_error(outcome, 1, "480 pixels (24×20)", "limit of 479", "photos/c00/0.png")
    assert run_cli(folder_argv(tmp_path / "runs", photos, "exact", "--max-image-pixels", "480")).code == 0


@pytest.mark.parametrize(
    ("extra", "culprits"),
    [
        (["--max-image-pixels", "0"], ["max_image_pixels"]),
        (["--max-image-pixels", "lots"], ["max_image_pixels", "lots"]),
        (["--verify-images", "fast"], ["--verify-images", "fast"]),
        (["--dataset", "synthetic", "--verify-images", "full"], ["verify_images", "synthetic"]),
        (["--dataset-args", "overlap_check=hash"], ["overlap_check", "hash"]),
    ],
)
def test_bad_image_options_are_named(
    tmp_path: Path, photos: Path, extra: list[str], culprits: list[str]
) -> None:
    outcome = run_cli(folder_argv(tmp_path / "runs", photos, "bad", *extra))
    assert_named_error(outcome, 2, *culprits)
    assert not (tmp_path / "runs").exists()


# -- what a decoded image looks like ----------------------------------------------------------------------


def test_unusual_files_embed_as_their_plain_equivalents(tmp_path: Path, glyph_checkpoint: Path) -> None:
    """16-bit gray, EXIF-rotated and transparent images give the embeddings of the 8-bit, upright and flat
    images they show (before: white, sideways, black)."""
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    Image.fromarray(gray.astype(np.uint16) * 257).save(folder / "deep.png")
    Image.fromarray(gray).save(folder / "plain.png")

    stored = np.zeros((16, 24), dtype=np.uint8)
    stored[4:12, 2:8] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90° clockwise
    Image.fromarray(stored).save(folder / "turned.jpg", exif=exif.tobytes(), quality=95)
    with Image.open(folder / "turned.jpg") as raw:  # the same JPEG pixels, rotated by hand, stored losslessly
        raw.transpose(Image.Transpose.ROTATE_270).save(folder / "upright.png")

    palette = Image.fromarray(gray // 2 + 1, mode="L").convert("P")
    palette.paste(0, (0, 0, 8, 16))
    palette.save(folder / "transparent.png", transparency=0)
    flat = np.asarray(palette.convert("L")).copy()
    flat[:, :8] = 255  # transparent: white
    Image.fromarray(flat).save(folder / "flat.png")

    outcome, vectors = embed(glyph_checkpoint, folder, tmp_path / "emb.npy")
    assert outcome.code == 0, outcome
    for unusual, plain in (
        ("deep.png", "plain.png"),
        ("turned.jpg", "upright.png"),
        ("transparent.png", "flat.png"),
    ):
        np.testing.assert_allclose(vectors[unusual], vectors[plain], atol=1e-5, err_msg=unusual)
    assert (
        np.abs(vectors["deep.png"] - vectors["flat.png"]).max() > 1e-3
    )  # the embeddings do tell images apart


def test_embed_refuses_a_decompression_bomb_by_name(tmp_path: Path, glyph_checkpoint: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("L", (16, 16)).save(folder / "fine.png")
    huge = png_header(folder / "huge.png", 20_000, 10_000)
    outcome, _ = embed(glyph_checkpoint, folder, tmp_path / "emb.npy")
    assert_named_error(outcome, 1, str(huge), "200,000,000 pixels", "limit of 178,956,970")
    assert not (tmp_path / "emb.npy").exists()


# -- a checkpoint applies its own preprocessing -------------------------------------------------------------


@pytest.mark.parametrize("dataset_args", ["channels=1", "channels=3"])
def test_glyph_checkpoint_evaluates_images_of_any_size(
    tmp_path: Path, glyph_checkpoint: Path, dataset_args: str
) -> None:
    """A 16 px one-channel checkpoint on 105 px glyphs and RGB photos of varying sizes (a ``folder``
    decoding to 1 or 3 channels): its recorded pipeline resizes and converts every image (before: a crash
    "stack expects each tensor to be equal size", or a silent run at 105 px)."""
    root = tmp_path / "mixed"
    rng = np.random.default_rng(0)
    for c in range(6):
        (root / f"c{c}").mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (105, 105), dtype=np.uint8)).save(root / f"c{c}" / "glyph.png")
        for j, (w, h) in enumerate([(40, 30), (23, 61)]):
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"c{c}" / f"photo{j}.jpg")
    before = snapshot(glyph_checkpoint.parent)
    outcome = run_cli(
        ["eval", "--checkpoint", glyph_checkpoint, "--dataset", "folder", "--data-root", root,
         "--dataset-args", dataset_args, "--no-progress"]
    )  # fmt: skip
    assert outcome.code == 0, outcome
    assert "recall@1" in outcome.stdout and "Traceback" not in outcome.stderr
    assert_unchanged(before, glyph_checkpoint.parent)


# -- train/test overlap -----------------------------------------------------------------------------------


def test_one_file_under_a_train_and_a_test_label_is_warned(
    tmp_path: Path, photos: Path, caplog: pytest.LogCaptureFixture, recwarn: pytest.WarningsRecorder
) -> None:
    rows = ["image,label"] + [
        f"{p.relative_to(photos).as_posix()},{p.parent.name}" for p in sorted(photos.rglob("*.png"))
    ]
    rows.append("c00/0.png,c12")  # c00 is a train class, c12 a test class
    (photos / "images.csv").write_text("\n".join(rows) + "\n")
    argv = [*folder_argv(tmp_path / "runs", photos, "overlap"), "--dataset", "csv", "--dataset-args",
            "{image_size: 16, extension: ''}"]  # fmt: skip
    outcome = run_cli(argv)
    assert outcome.code == 0, outcome
    text = warned(caplog, recwarn)
    assert "1 image(s) of the train split" in text and "also in its test split (same path)" in text, text
    assert f": '{photos / 'c00' / '0.png'}'; test results would be optimistic" in text


# -- Omniglot ---------------------------------------------------------------------------------------------


def test_truncated_omniglot_file_is_named(tmp_path: Path) -> None:
    npz = tmp_path / "omniglot28.npz"
    np.savez(npz, images=np.zeros((4, 28, 28), np.uint8), label=np.arange(4))
    npz.write_bytes(npz.read_bytes()[:1000])
    before = snapshot(tmp_path)
    outcome = run_cli(["train", *tiny_argv(tmp_path / "runs", "omni", epochs=1), "--dataset", "omniglot",
                       "--data-root", npz, "--dataset-args", "{}"])  # fmt: skip
    assert_named_error(outcome, 1, str(npz), "truncated or corrupt")
    assert_unchanged(before, tmp_path)
