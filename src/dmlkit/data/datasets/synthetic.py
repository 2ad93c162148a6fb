"""``synthetic``: procedurally drawn glyphs, an Omniglot-like many-class dataset built in memory.

Each class is a prototype of 2–4 strokes, each a cubic Bézier curve with random control points. Each sample
re-draws the prototype like a different hand would: control points jittered (Gaussian, σ = ``jitter``),
then a random similarity transform (rotation ±``rotation`` degrees, scale ×0.85–1.15, shift ±``shift`` of
the half-width), a random stroke width, and pixel noise (σ = ``noise``). Strokes are bright on a dark
background.

Rendering is vectorised: every stroke is sampled at 32 points, each point is a Gaussian blob weighted by the
arc length it stands for, so the summed density along a stroke is ≈ 1 whatever the curve's speed; the
Gaussians are separable, so a whole image is one small matrix product ``G_yᵀ G_x``; ``1 - exp(-3 ρ)`` turns
the density ρ into ink. Randomness comes from per-class NumPy generators seeded with ``(seed, class)``, so a
class looks the same whatever ``num_classes`` is, and the output is bit-identical across runs.
"""

from __future__ import annotations

import numpy as np
import torch

from dmlkit.data.base import REGISTRY, ArrayImageDataset, DatasetSplits
from dmlkit.data.catalog import CATALOG, DatasetInfo
from dmlkit.errors import ConfigError

MAX_STROKES = 4
POINTS_PER_STROKE = 32
INK_GAIN = 3.0
_CHUNK = 512  # samples rendered at once: bounds the N × K × W temporaries to a few MB


def _class_parameters(
    seed: int,
    label: int,
    samples: int,
    image_size: int,
    jitter: float,
    rotation: float,
    shift: float,
    noise: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Control points (S×4×2 per sample), stroke mask, affine maps, widths and noise of one class."""
    proto_rng = np.random.default_rng([seed, label, 0])
    num_strokes = int(proto_rng.integers(2, MAX_STROKES + 1))
    start = proto_rng.uniform(-0.6, 0.6, (MAX_STROKES, 2))
    end = proto_rng.uniform(-0.6, 0.6, (MAX_STROKES, 2))
    # inner control points near the chord's thirds, bent sideways: curves rather than scribbles
    thirds = np.array([1.0 / 3.0, 2.0 / 3.0])[None, :, None]
    inner = start[:, None] + (end - start)[:, None] * thirds + proto_rng.normal(0.0, 0.3, (MAX_STROKES, 2, 2))
    prototype = np.concatenate([start[:, None], inner, end[:, None]], axis=1)

    rng = np.random.default_rng([seed, label, 1])
    control = prototype[None] + rng.normal(0.0, jitter, (samples, MAX_STROKES, 4, 2))
    mask = np.zeros((samples, MAX_STROKES))
    mask[:, :num_strokes] = 1.0
    angle = np.deg2rad(rng.uniform(-rotation, rotation, samples))
    scale = rng.uniform(0.85, 1.15, samples)
    affine = np.empty((samples, 2, 3))
    affine[:, 0, 0] = scale * np.cos(angle)
    affine[:, 0, 1] = -scale * np.sin(angle)
    affine[:, 1, 0] = scale * np.sin(angle)
    affine[:, 1, 1] = scale * np.cos(angle)
    affine[:, :, 2] = rng.uniform(-shift, shift, (samples, 2))
    width = rng.uniform(0.035, 0.055, samples)
    pixel_noise = rng.normal(0.0, noise, (samples, image_size, image_size)).astype(np.float32)
    return control, mask, affine, width, pixel_noise


def render_glyphs(
    num_classes: int = 200,
    samples_per_class: int = 30,
    image_size: int = 32,
    seed: int = 0,
    jitter: float = 0.1,
    rotation: float = 25.0,
    shift: float = 0.25,
    noise: float = 0.08,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``num_classes × samples_per_class`` glyphs: ``(images uint8 N×H×W, labels int64 N)``.

    Items are class-major (``labels = repeat(arange(num_classes), samples_per_class)``). See the module
    docstring for the model.
    """
    if num_classes < 1 or samples_per_class < 1 or image_size < 4:
        raise ConfigError(
            f"synthetic needs num_classes ≥ 1, samples_per_class ≥ 1 and image_size ≥ 4, got "
            f"{num_classes}, {samples_per_class}, {image_size}"
        )
    parts = [
        _class_parameters(seed, c, samples_per_class, image_size, jitter, rotation, shift, noise)
        for c in range(num_classes)
    ]
    control, mask, affine, width, pixel_noise = (np.concatenate(p) for p in zip(*parts, strict=True))
    n = len(control)

    t = np.linspace(0.0, 1.0, POINTS_PER_STROKE)
    bernstein = np.stack([(1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t**2, t**3], axis=1)
    points = np.einsum("tk,nskd->nstd", bernstein, control)
    points = np.einsum("nij,nstj->nsti", affine[:, :, :2], points) + affine[:, None, None, :, 2]
    # arc length around each point, so densely sampled stretches of a curve are not drawn darker
    segment = np.linalg.norm(points[:, :, 1:] - points[:, :, :-1], axis=-1)
    weight = np.zeros(points.shape[:3])
    weight[:, :, 1:] += segment / 2
    weight[:, :, :-1] += segment / 2
    weight *= mask[:, :, None] / (width[:, None, None] * np.sqrt(2 * np.pi))

    points_t = torch.from_numpy(points.reshape(n, -1, 2)).float()
    weight_t = torch.from_numpy(weight.reshape(n, -1)).float()
    inv_var = torch.from_numpy(-0.5 / width**2).float()[:, None, None]
    centres = (torch.arange(image_size, dtype=torch.float32) + 0.5) / image_size * 2 - 1
    images = torch.empty(n, image_size, image_size, dtype=torch.uint8)
    for lo in range(0, n, _CHUNK):
        hi = min(lo + _CHUNK, n)
        p, s = points_t[lo:hi], inv_var[lo:hi]
        gx = torch.exp((centres - p[:, :, 0:1]).square_().mul_(s)).mul_(weight_t[lo:hi, :, None])
        gy = torch.exp((centres - p[:, :, 1:2]).square_().mul_(s))
        # float64 product: summation-order rounding (thread count, BLAS) stays far below one uint8 level
        density = torch.bmm(gy.transpose(1, 2).double(), gx.double())
        ink = (1.0 - torch.exp(-INK_GAIN * density)).float() + torch.from_numpy(pixel_noise[lo:hi])
        images[lo:hi] = ink.clamp_(0.0, 1.0).mul_(255.0).round_().to(torch.uint8)
    labels = np.repeat(np.arange(num_classes, dtype=np.int64), samples_per_class)
    return images.numpy(), labels


@REGISTRY.register("synthetic")
def synthetic(
    root: str | None = None,
    num_classes: int = 200,
    samples_per_class: int = 30,
    image_size: int = 32,
    test_fraction: float = 0.5,
    num_test_classes: int | None = None,
    seed: int = 0,
    jitter: float = 0.1,
    rotation: float = 25.0,
    shift: float = 0.25,
    noise: float = 0.08,
) -> DatasetSplits:
    """Synthetic glyphs (built in, no download; ``root`` is ignored).

    Classes ``0 .. C_train-1`` train and the last ``num_test_classes`` (default
    ``round(test_fraction × num_classes)``) are the zero-shot test classes. Grayscale, ``image_size`` pixels.
    """
    del root  # generated, nothing to read
    if num_test_classes is None:
        if not 0.0 < test_fraction < 1.0:
            raise ConfigError(f"synthetic test_fraction must be in (0, 1), got {test_fraction}")
        num_test_classes = round(test_fraction * num_classes)
    num_train_classes = num_classes - num_test_classes
    if num_train_classes < 2 or num_test_classes < 2:
        raise ConfigError(
            f"synthetic needs ≥ 2 train and ≥ 2 test classes, got {num_train_classes} and {num_test_classes} "
            f"(num_classes={num_classes})"
        )
    images, labels = render_glyphs(
        num_classes, samples_per_class, image_size, seed, jitter, rotation, shift, noise
    )
    names = [f"glyph_{c:04d}" for c in range(num_classes)]
    ids = [f"{names[c]}/{j:03d}" for c in range(num_classes) for j in range(samples_per_class)]
    in_train = labels < num_train_classes
    train_pixels = images[in_train]
    mean, std = float(train_pixels.mean()) / 255.0, float(train_pixels.std()) / 255.0
    train = ArrayImageDataset(
        train_pixels, labels[in_train], names[:num_train_classes], [ids[i] for i in np.flatnonzero(in_train)]
    )
    test = ArrayImageDataset(
        images[~in_train],
        labels[~in_train] - num_train_classes,
        names[num_train_classes:],
        [ids[i] for i in np.flatnonzero(~in_train)],
    )
    glyph = {"recipe": "glyph", "mean": [mean], "std": [std]}
    return DatasetSplits.checked(train, test, image_size, 1, "synthetic", glyph, source="synthetic")


CATALOG.add(
    DatasetInfo(
        name="synthetic",
        title="Synthetic glyphs (built in, no files)",
        protocol="num_classes glyph classes, the last test_fraction of them test (zero-shot); leave-one-out",
        layout="nothing: generated from num_classes, samples_per_class and seed",
    )
)

__all__ = ["render_glyphs", "synthetic"]
