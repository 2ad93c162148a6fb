"""``dmlkit eval``: retrieval metrics of a checkpoint on a dataset split."""

from __future__ import annotations

import argparse
import json

from dmlkit import data as data_lib
from dmlkit import metrics as metrics_lib
from dmlkit.cli import landmarks
from dmlkit.cli.common import load_model
from dmlkit.config import _parse_list, _parse_mapping
from dmlkit.distances import DISTANCES
from dmlkit.errors import ConfigError
from dmlkit.inference import evaluate_model, resolve_device


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "eval",
        allow_abbrev=False,
        help="evaluate a checkpoint",
        description="Leave-one-out retrieval metrics of a checkpoint on a split (default: the dataset and "
        "metrics the checkpoint was trained with, test split), or a landmark benchmark (--revisited, "
        "--gldv2).",
    )
    parser.add_argument(
        "--checkpoint", required=True, help="checkpoint file (best.pt, last.pt) or run folder"
    )
    parser.add_argument("--dataset", default=None, help="dataset name (default: the checkpoint's)")
    parser.add_argument(
        "--data-root", default=None, help="dataset folder or file (default: the checkpoint's)"
    )
    parser.add_argument("--dataset-args", type=_parse_mapping, default=None, metavar="MAP")
    parser.add_argument(
        "--split",
        choices=("test", "val", "train"),
        default=None,
        help="test (default): the held-out classes; val/train: the checkpoint's class-disjoint split",
    )
    parser.add_argument(
        "--metrics",
        type=_parse_list,
        default=None,
        metavar="A,B,...",
        help=f"metrics (default: the checkpoint's); available: {', '.join(metrics_lib.available())}",
    )
    parser.add_argument(
        "--distance",
        choices=DISTANCES,
        default=None,
        help="distance of the k-NN search and of dists@* (default: the checkpoint's eval_distance, "
        "else cosine)",
    )
    parser.add_argument(
        "--backend",
        choices=metrics_lib.BACKENDS,
        default=None,
        help="k-NN search: torch (exact), faiss-flat (exact), faiss-ivf / faiss-hnsw (approximate, need "
        "faiss); default: the checkpoint's eval_backend, else torch; see docs/metrics.md",
    )
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    landmarks.add_arguments(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    code = landmarks.dispatch(args)  # --revisited / --gldv2: a landmark benchmark instead of a split
    if code is not None:
        return code
    args.split = args.split or "test"
    requested = [name.strip().lower() for name in args.metrics or ()]
    # Before anything is loaded: a typo or an impossible combination fails at once, with a suggestion.
    metrics_lib.check_options(requested, args.distance or "cosine", args.backend or "torch")
    device = resolve_device(args.device)
    model, checkpoint = load_model(args.checkpoint, device)
    trained = checkpoint["config"]
    metric_names = requested or list(trained["metrics"])
    # Checkpoints written before these options existed searched with cosine / torch.
    args.distance = args.distance or trained.get("eval_distance", "cosine")
    args.backend = args.backend or trained.get("eval_backend", "torch")
    metrics_lib.check_options(metric_names, args.distance, args.backend)
    dataset_name = args.dataset or trained["dataset"]
    same_dataset = dataset_name == trained["dataset"]
    root = args.data_root or (trained["data_root"] if same_dataset else None)
    dataset_args = (
        args.dataset_args
        if args.dataset_args is not None
        else (trained["dataset_args"] if same_dataset else {})
    )
    splits = data_lib.build(dataset_name, root, **dataset_args)
    if args.split == "test":
        dataset = splits.test
    else:
        if trained["val_fraction"] <= 0 and args.split == "val":
            raise ConfigError("the checkpoint was trained without a validation split (val_fraction 0)")
        if trained["val_fraction"] > 0:
            train_part, val_part = data_lib.class_disjoint_split(
                splits.train, trained["val_fraction"], trained["seed"]
            )
        else:
            train_part, val_part = splits.train, None
        dataset = val_part if args.split == "val" else train_part
    dataset.transform = data_lib.transforms.build("eval", **checkpoint["data_spec"])
    results = evaluate_model(
        model,
        dataset,
        metric_names,
        batch_size=args.batch_size,
        device=device,
        num_workers=args.num_workers,
        progress=not args.no_progress,
        seed=trained["seed"],
        distance=args.distance,
        backend=args.backend,
    )
    values = {name: float(results.metrics[name]) for name in metric_names}
    without = results.num_queries_without_relevant
    if args.json:
        print(
            json.dumps(
                {
                    "checkpoint": str(args.checkpoint),
                    "dataset": dataset_name,
                    "split": args.split,
                    "num_queries": len(dataset),
                    "num_queries_without_relevant": without,
                    "distance": args.distance,
                    "backend": args.backend,
                    "metrics": values,
                },
                indent=2,
            )
        )
    else:
        print(
            f"{dataset_name} / {args.split}: {len(dataset)} queries (leave-one-out, {args.distance}, "
            f"{args.backend}); {without} without a relevant item, left out of the retrieval means"
        )
        width = max(len(n) for n in values)
        for name, value in values.items():
            print(f"{name:<{width}}  {value:.4f}")
    return 0
