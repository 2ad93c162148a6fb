"""Zero-shot retrieval on the clothing photos with the offline ImageNet weights: random vs pretrained,
frozen vs fine-tuned.

    python benchmarks/clothing_transfer.py --root ../shared/data/clothing  # 2 epochs, lr 1e-4, last 2 stages

The clothing CSV's 18 labels (``Not sure`` and ``Skip`` left out) are split zero-shot: 9 classes train,
the other 9 are the test split (``test_classes: 0.5``, the last in sorted order). For each backbone:

- **frozen**: the backbone's pooled features (no head, L2-normalised), with random weights and with the
  ImageNet weights of its offline package, evaluated on the test split;
- **fine-tuned**: ``dmlkit train`` from the ImageNet weights (no head: the same pooled features,
  multi-similarity loss, P×K batches of 8 classes × 4, Adam (``--lr``, 1e-4 by default), warm-up + cosine,
  BatchNorm frozen, only the last ``--trainable-blocks`` stages (2 by default)),
  then the same test split.

Test metrics: R@1 and MAP@R, leave-one-out, cosine. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from typing import Any

import torch

from dmlkit import models
from dmlkit.config import make_config
from dmlkit.inference import evaluate_model
from dmlkit.train.data import run_data
from dmlkit.train.loop import Trainer

BACKBONES = {
    "EfficientNet-Lite0": ("timm:tf_efficientnet_lite0", "package:efficientnet-lite0"),
    "MobileNetV2": ("torchvision:mobilenet_v2", "package:mobilenet_v2"),
}
METRICS = ["recall@1", "map@r"]


def _data(root: str, image_size: int) -> dict[str, Any]:
    return {
        "dataset": "csv",
        "data_root": root,
        "dataset_args": {
            "exclude_labels": ["Not sure", "Skip"],
            "test_classes": 0.5,
            "image_size": image_size,
        },
        "metrics": METRICS,
        "select_metric": "map@r",
        "progress": False,
    }


def frozen(root: str, image_size: int, backbone: str, weights: str | None) -> dict[str, float]:
    """Test metrics of the backbone's pooled features (no training)."""
    config = make_config({**_data(root, image_size), "backbone": backbone, "pretrained_weights": weights})
    data = run_data(config)
    model = models.build_model(
        backbone=backbone, embedding_size=0, pretrained_weights=weights, image_size=data.spec["image_size"]
    )
    results = evaluate_model(model, data.test, METRICS, batch_size=64)
    return {name: float(results.metrics[name]) for name in METRICS}


def fine_tuned(
    root: str,
    image_size: int,
    backbone: str,
    weights: str,
    epochs: int,
    lr: float,
    trainable_blocks: int | None,
) -> dict[str, float]:
    """Test metrics of best.pt after ``dmlkit train`` from the pretrained weights."""
    with tempfile.TemporaryDirectory() as folder:
        config = make_config(
            {
                **_data(root, image_size),
                "backbone": backbone,
                "pretrained_weights": weights,
                "embedding_size": 0,  # the pooled features, as frozen: the change is the backbone's own
                "freeze_bn": True,
                "val_fraction": 0.0,
                "batch_size": 32,
                "samples_per_class": 4,
                "epochs": epochs,
                "lr": lr,
                "trainable_blocks": trainable_blocks,
                "eval_batch_size": 64,
                "output_dir": folder,
                "name": "clothing",
            }
        )
        return Trainer(config).run().after


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", required=True, help="the clothing folder (images.csv, images/)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--trainable-blocks", type=int, default=2, help="train only the last K stages")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--skip-fine-tuning", action="store_true")
    parser.add_argument("--skip-frozen", action="store_true")
    parser.add_argument("--backbones", nargs="+", choices=list(BACKBONES), default=list(BACKBONES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.backbones:
        backbone, weights = BACKBONES[name]
        started = time.perf_counter()
        if not args.skip_frozen:
            rows.append((name, "random, frozen", frozen(args.root, args.image_size, backbone, None)))
            rows.append((name, "ImageNet, frozen", frozen(args.root, args.image_size, backbone, weights)))
        if not args.skip_fine_tuning:
            tuned = fine_tuned(
                args.root, args.image_size, backbone, weights, args.epochs, args.lr, args.trainable_blocks
            )
            blocks = "all" if args.trainable_blocks is None else f"last {args.trainable_blocks}"
            kind = f"ImageNet, fine-tuned ({args.epochs} epochs, lr {args.lr:g}, {blocks} blocks)"
            rows.append((name, kind, tuned))
        print(f"{name}: {time.perf_counter() - started:.0f} s", flush=True)
    print("\n| backbone | weights | R@1 | MAP@R |\n|---|---|---|---|")
    for name, kind, values in rows:
        print(f"| {name} | {kind} | {values['recall@1']:.4f} | {values['map@r']:.4f} |")


if __name__ == "__main__":
    main()
