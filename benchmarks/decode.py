"""CPU decoding throughput on real photos: Pillow vs torchvision (libjpeg-turbo), alone and with the train
transform, in images per second per core.

    python benchmarks/decode.py ../shared/data/clothing/images --count 512

One thread (``torch.set_num_threads(1)``), CPU-time clock (``time.process_time``: what one core spends,
insensitive to other processes on a shared machine), the variants interleaved round by round
(:func:`common.compare`). Rows:

- ``decode``: the file to an RGB image: ``load_image`` (Pillow, a PIL image) vs ``load_image_tensor``
  (``decoder="torchvision"``: libjpeg-turbo for JPEGs, a ``uint8`` tensor);
- ``decode + train transform``: what a DataLoader worker does per item, ``dataset[i]`` of a
  ``FileImageDataset`` with the ``base`` recipe (``RandomResizedCrop(size)`` + flip + normalise), for the
  issue-12 path (a PIL image into the pipeline, ``ToDtype`` + ``Normalize`` at its end), ``decoder="pil"``
  (Pillow, then a tensor; the fused ``Normalise``) and ``decoder="torchvision"`` (the default now).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import compare

from dmlkit.data import FileImageDataset, images, transforms


class _PilDataset(FileImageDataset):
    """The issue-12 dataset: Pillow decodes, the PIL image goes into the pipeline."""

    def load(self, index: int) -> object:  # type: ignore[override]
        return images.load_image(str(self.paths[index]), self.channels, max_pixels=self.max_pixels)


def _datasets(paths: list[str], size: int) -> dict[str, FileImageDataset]:
    labels = np.zeros(len(paths), dtype=np.int64)
    ids = [Path(p).name for p in paths]
    made = {
        "PIL image → pipeline (issue 12)": _PilDataset(paths, labels, ["x"], ids),
        "decoder=pil → tensor pipeline": FileImageDataset(paths, labels, ["x"], ids, decoder="pil"),
        "decoder=torchvision → tensor pipeline": FileImageDataset(paths, labels, ["x"], ids),
    }
    for dataset in made.values():
        dataset.transform = transforms.build("train", size, recipe="base")
        dataset.augment_seed = 0
    # issue 12's last steps: ToDtype + Normalize, where the pipeline now has one fused Normalise
    first = made["PIL image → pipeline (issue 12)"]
    last = [
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(transforms.IMAGENET_MEAN, transforms.IMAGENET_STD),
    ]
    first.transform = v2.Compose([*first.transform.transforms[:-1], *last, v2.ToPureTensor()])
    return made


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "images", type=Path, help="folder of JPEG photos (e.g. ../shared/data/clothing/images)"
    )
    parser.add_argument("--count", type=int, default=512, help="images per timed pass")
    parser.add_argument("--size", type=int, default=224, help="train crop size")
    parser.add_argument("--budget", type=float, default=20.0, help="seconds per comparison")
    parser.add_argument(
        "--max-foreign",
        type=float,
        default=None,
        help="discard rounds while other processes keep more cores busy",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    paths = sorted(str(p) for p in args.images.glob("*.jpg"))[: args.count]
    if not paths:
        raise SystemExit(f"no .jpg files in {args.images}")
    sizes = [images.jpeg_header(Path(p).read_bytes()) for p in paths[:200]]
    mean_size = np.mean([(h.height, h.width) for h in sizes if h is not None], axis=0)
    print(f"{len(paths)} JPEGs from {args.images}, mean {mean_size[0]:.0f} × {mean_size[1]:.0f} px; 1 thread")

    def decode_all(decode) -> None:
        for path in paths:
            decode(path)

    decoding = compare(
        {
            "Pillow (load_image)": lambda: decode_all(images.load_image),
            "torchvision (load_image_tensor)": lambda: decode_all(images.load_image_tensor),
        },
        torch.device("cpu"),
        warmup=1,
        clock="cpu",
        budget_s=args.budget,
        min_rounds=5,
        max_foreign=args.max_foreign,
    )
    datasets = _datasets(paths, args.size)
    pipelines = compare(
        {name: (lambda d=d: [d[i] for i in range(len(d))]) for name, d in datasets.items()},
        torch.device("cpu"),
        warmup=1,
        clock="cpu",
        budget_s=args.budget,
        min_rounds=5,
        max_foreign=args.max_foreign,
    )
    print()
    print("| step | path | img/s per core (median) | spread (IQR / median) | vs Pillow |")
    print("|---|---|---|---|---|")
    for label, result, reference in (
        ("decode", decoding, "Pillow (load_image)"),
        (f"decode + train transform ({args.size} px)", pipelines, "PIL image → pipeline (issue 12)"),
    ):
        for name in result.names:
            rate = len(paths) / result.median(name)
            ratio = result.ratio(reference, name)
            print(f"| {label} | {name} | {rate:,.0f} | {result.spread(name):.2f} | ×{ratio:.2f} |")
    rounds = statistics.median(
        [len(decoding.times[decoding.names[0]]), len(pipelines.times[pipelines.names[0]])]
    )
    noisy = " (noisy: too few quiet rounds)" if decoding.noisy or pipelines.noisy else ""
    print(f"\n{rounds:.0f} rounds per comparison, CPU-time clock{noisy}")


if __name__ == "__main__":
    main()
