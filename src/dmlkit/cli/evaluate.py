"""dmlkit eval: leave-one-out retrieval metrics of a checkpoint on a split (default: the dataset and
metrics the checkpoint was trained with, test split), or a landmark benchmark (--revisited, --gldv2)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from dmlkit import data as data_lib
from dmlkit import distances
from dmlkit import metrics as metrics_lib
from dmlkit import search as search_lib
from dmlkit.cli import landmarks
from dmlkit.cli.common import add_checkpoint_argument, add_embedding_arguments, embed, load_model
from dmlkit.cli.parser import SuggestingParser, positive_int
from dmlkit.config import ComponentSpec, DataSection, config_from_checkpoint
from dmlkit.config import parse_list as _parse_list
from dmlkit.config import parse_mapping as _parse_mapping
from dmlkit.errors import ConfigError
from dmlkit.inference import resolve_device
from dmlkit.train.data import build_data


def add_parser(cli: SuggestingParser) -> None:
    parser = cli.add_parser("eval", help="evaluate a checkpoint", description=__doc__)
    add_checkpoint_argument(parser)
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
        choices=distances.available(indexable=True),
        default=None,
        help="distance of the k-NN search and of dists@* (default: the checkpoint's eval_distance, "
        "else cosine)",
    )
    parser.add_argument(
        "--backend",
        choices=search_lib.available(),
        default=None,
        help="k-NN search: torch (exact), faiss-flat (exact), faiss-ivf / faiss-hnsw (approximate, need "
        "faiss); default: the checkpoint's eval_backend, else torch; see docs/metrics.md",
    )
    add_embedding_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    parser.add_argument(
        "--per-class",
        action="store_true",
        help="also report every retrieval metric per class (JSON: 'per_class'; table: the 5 worst classes)",
    )
    parser.add_argument(
        "--examples",
        default=None,
        metavar="IMAGE",
        help="draw queries and their top results (green: same label, red: another) into this .png/.jpg",
    )
    parser.add_argument(
        "--num-examples", type=positive_int, default=8, help="queries drawn by --examples (8)"
    )
    parser.add_argument(
        "--examples-top", type=positive_int, default=5, help="results per query in --examples (5)"
    )
    parser.add_argument(
        "--examples-mode",
        choices=("failures", "random", "first"),
        default="failures",
        help="which queries --examples draws: failures (top-1 wrong first, default), random, first",
    )
    landmarks.add_arguments(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    code = landmarks.dispatch(args)  # --revisited / --gldv2: a landmark benchmark instead of a split
    if code is not None:
        return code
    args.split = args.split or "test"
    _check_examples(args)
    requested = [name.strip().lower() for name in args.metrics or ()]
    # Before anything is loaded: a typo or an impossible combination fails at once, with a suggestion.
    metrics_lib.check_options(requested, args.distance or "cosine", args.backend or "torch")
    device = resolve_device(args.device)
    model, checkpoint = load_model(args.checkpoint, device)
    trained = config_from_checkpoint(checkpoint["config"], str(args.checkpoint))
    metric_names = requested or list(trained.eval.metrics)
    args.distance = args.distance or trained.eval.eval_distance
    args.backend = args.backend or trained.eval.eval_backend
    metrics_lib.check_options(metric_names, args.distance, args.backend)
    dataset_name = args.dataset or trained.data.dataset.name
    # The checkpoint's recorded preprocessing, not one resolved again from the flags of today's defaults.
    section = _data_section(args, trained.data)
    dataset = build_data(section, trained.run.seed, spec=checkpoint["data_spec"]).split(args.split)
    dataset.transform = data_lib.transforms.build("eval", **checkpoint["data_spec"])
    embeddings, labels = embed(model, dataset, args, device, "eval")
    # One search serves the metrics and the pictures: it keeps as many neighbours as either needs.
    k = None
    if args.examples:
        k = max(metrics_lib.choose_k(metric_names, labels), _examples_top(args, len(labels))) or None
    results = metrics_lib.evaluate(
        embeddings, labels, metrics=tuple(metric_names), k=k, seed=trained.run.seed, distance=args.distance,
        backend=args.backend,
    )  # fmt: skip
    values = {name: float(results.metrics[name]) for name in metric_names}
    without = results.num_queries_without_relevant
    examples = _draw_examples(args, results, dataset) if args.examples else None
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
                    **({"per_class": _per_class(results, dataset.class_names)} if args.per_class else {}),
                    **({"examples": examples} if examples else {}),
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
        if args.per_class:
            for name, by_class in results.per_class.items():
                worst = sorted(by_class.items(), key=lambda item: item[1])[:5]
                shown = ", ".join(f"{dataset.class_names[int(c)]} {v:.4f}" for c, v in worst)
                print(f"{name} per class ({len(by_class)} classes), worst: {shown}")
        if examples:
            print(f"examples: {examples['queries']} queries drawn into {examples['path']}")
    return 0


def _data_section(args: argparse.Namespace, trained: DataSection) -> DataSection:
    """The checkpoint's data section with ``--dataset``/``--data-root``/``--dataset-args`` applied; another
    dataset starts from its own defaults (no root, no arguments, every data option at its default)."""
    if args.dataset is None or args.dataset == trained.dataset.name:
        dataset = trained.dataset
        if args.dataset_args is not None:
            dataset = ComponentSpec(name=dataset.name, args=args.dataset_args)
        return trained.model_copy(
            update={"dataset": dataset, "data_root": args.data_root or trained.data_root}
        )
    # Every other data option (image-file checks, image size, recipe, cache, ...) at its default.
    dataset = ComponentSpec(name=args.dataset, args=args.dataset_args or {})
    return DataSection(
        dataset=dataset,
        data_root=args.data_root,
        val_fraction=trained.val_fraction,
        num_workers=trained.num_workers,
    )


def _per_class(results: metrics_lib.RetrievalResults, class_names: list[str]) -> dict[str, dict[str, float]]:
    """Per-class values keyed by class name (the results hold the dataset's class codes)."""
    return {
        name: {class_names[int(code)]: float(value) for code, value in by_class.items()}
        for name, by_class in results.per_class.items()
    }


def _check_examples(args: argparse.Namespace) -> None:
    """Fail on bad --examples options before anything is loaded."""
    if args.examples is None:
        return
    if Path(args.examples).suffix.lower() not in (".png", ".jpg", ".jpeg"):
        raise ConfigError(f"--examples must name a .png or .jpg file, got '{args.examples}'")


def _examples_top(args: argparse.Namespace, num_items: int) -> int:
    """Results drawn per query: ``--examples-top``, at most the other items of the split."""
    return min(args.examples_top, num_items - 1)


def _draw_examples(
    args: argparse.Namespace, results: metrics_lib.RetrievalResults, dataset: data_lib.base.ImageDataset
) -> dict[str, Any]:
    """Draw ``--num-examples`` queries with their ``--examples-top`` results into ``--examples``, from the
    evaluation's own results (searched with k ≥ ``--examples-top``)."""
    queries = metrics_lib.pick_queries(results, args.num_examples, args.examples_mode, seed=0)
    if not queries:
        raise ConfigError("--examples: no query has a relevant item in this split; nothing to draw")
    top = _examples_top(args, results.num_queries)
    picture = metrics_lib.retrieval_grid(
        results, dataset, queries=queries, top=top, label_text=lambda code: dataset.class_names[int(code)]
    )
    path = Path(args.examples)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
    return {"path": str(path), "queries": queries, "mode": args.examples_mode, "top": top}
