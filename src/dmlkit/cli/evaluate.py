"""dmlkit eval: retrieval metrics of a checkpoint on a split under the dataset's protocol (leave-one-out,
or query/gallery: In-shop, an OML CSV; default: the dataset and metrics the checkpoint was trained with, test
split), or a landmark benchmark (--revisited, --gldv2). --calibrate-fmr F also calibrates the verification
threshold of a false match rate F (on the validation split when the run has one) into threshold.json."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

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
from dmlkit.inference import evaluate_embeddings, query_gallery_positions, resolve_device
from dmlkit.metrics.verification import Threshold, calibrate_threshold, threshold_rates
from dmlkit.search import rerank
from dmlkit.serving.index import fingerprint
from dmlkit.train import checkpoint as ckpt
from dmlkit.train.data import RunData, build_data


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
    parser.add_argument(
        "--rerank",
        action="append",
        type=rerank.parse_spec,
        default=None,
        metavar="STEP[:KEY=VALUE,...]",
        help=f"post-process the search (repeatable, applied in order): {', '.join(rerank.available())}, "
        "e.g. aqe:alpha=3,k=2; pcaw is fitted on the training split unless state=FILE; see docs/metrics.md",
    )
    add_embedding_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    parser.add_argument(
        "--per-class",
        action="store_true",
        help="also report every retrieval metric per class (JSON: 'per_class'; table: the 5 worst classes)",
    )
    parser.add_argument(
        "--per-category",
        action="store_true",
        help="also report every retrieval metric per category of the queries (datasets with categories: "
        "sop, a csv with a category column)",
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
    parser.add_argument(
        "--calibrate-fmr",
        type=_rate,
        default=None,
        metavar="F",
        help="also calibrate a verification threshold: the closest-pair cut at which at most a share F of "
        "the different-label pairs match (e.g. 1e-3), on the validation split when the run has one; "
        "written to --threshold-out for `dmlkit search --threshold`",
    )
    parser.add_argument(
        "--calibrate-split",
        choices=("val", "train", "test"),
        default=None,
        help="split the threshold is calibrated on (default: val when the run has one, else the evaluated "
        "split; the test split gives optimistic rates)",
    )
    parser.add_argument(
        "--threshold-out",
        default=None,
        metavar="FILE",
        help="where --calibrate-fmr writes the threshold (default: threshold.json beside the checkpoint)",
    )
    landmarks.add_arguments(parser)
    parser.set_defaults(handler=run)


def _rate(text: str) -> float:
    """argparse type: a false match rate, a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a false match rate in [0, 1], got {text!r}") from None
    if not 0 <= value <= 1:  # NaN fails this too
        raise argparse.ArgumentTypeError(f"must be a false match rate in [0, 1], got {text!r}")
    return value


def _check_calibration(args: argparse.Namespace) -> None:
    """Fail on a bad combination of --calibrate-fmr, --calibrate-split and --threshold-out before anything
    is loaded."""
    if args.calibrate_fmr is None:
        given = [
            flag
            for flag, value in (
                ("--calibrate-split", args.calibrate_split),
                ("--threshold-out", args.threshold_out),
            )
            if value is not None
        ]
        if given:
            raise ConfigError(f"{', '.join(given)} only apply with --calibrate-fmr")
        return
    if args.revisited is not None or args.gldv2 is not None:
        raise ConfigError(
            "--calibrate-fmr calibrates on a split's labelled pairs; it cannot be combined with --revisited "
            "or --gldv2"
        )
    if args.threshold_out is not None and Path(args.threshold_out).is_dir():
        raise ConfigError(f"--threshold-out {args.threshold_out} is a folder; give the .json file to write")


def run(args: argparse.Namespace) -> int:
    # Built before anything is loaded: a bad option value or order fails at once.
    args.rerank_steps = rerank.build_steps(
        [rerank.build(name, **options) for name, options in args.rerank or ()]
    )
    _check_calibration(args)
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
    splits = build_data(section, trained.run.seed, spec=checkpoint["data_spec"])
    dataset = splits.split(args.split)
    dataset.transform = data_lib.transforms.build("eval", **checkpoint["data_spec"])
    if args.per_category and dataset.annotations.categories is None:
        raise ConfigError(f"--per-category: the {args.split} split of '{dataset_name}' has no categories")
    calibrate_split = None if args.calibrate_fmr is None else _calibration_split(args, splits)
    embeddings, labels = embed(model, dataset, args, device, "eval")
    steps = args.rerank_steps
    fit_embeddings = None
    if any(not step.fitted for step in steps):  # pcaw without state=: fitted on the training split
        train = splits.split("train")
        train.transform = data_lib.transforms.build("eval", **checkpoint["data_spec"])
        fit_embeddings, _ = embed(model, train, args, device, "rerank fit")
    annotations = dataset.annotations
    queries, gallery = query_gallery_positions(dataset)
    # One search serves the metrics and the pictures: it keeps as many neighbours as either needs.
    k = None
    if args.examples:
        gallery_labels = None if gallery is None else labels[torch.from_numpy(gallery)]
        needed = metrics_lib.choose_k(metric_names, labels[torch.from_numpy(queries)], gallery_labels)
        k = max(needed, _examples_top(args, dataset)) or None
    results = evaluate_embeddings(
        embeddings, labels, annotations, metric_names, k=k, seed=trained.run.seed, distance=args.distance,
        backend=args.backend, steps=steps, fit_embeddings=fit_embeddings,
    )  # fmt: skip
    values = {name: float(results.metrics[name]) for name in metric_names}
    without = results.num_queries_without_relevant
    per_category = _per_category(results, dataset, metric_names) if args.per_category else None
    examples = _draw_examples(args, results, dataset) if args.examples else None
    calibration = None
    if calibrate_split is not None:
        calibration = _calibrate(
            args,
            (model, checkpoint, device),
            splits,
            calibrate_split,
            (dataset, embeddings, labels),
            dataset_name,
        )
    num_gallery = len(dataset) if gallery is None else len(gallery)
    if args.json:
        print(
            json.dumps(
                {
                    "checkpoint": str(args.checkpoint),
                    "dataset": dataset_name,
                    "split": args.split,
                    "protocol": annotations.protocol,
                    "num_queries": results.num_queries,
                    "num_gallery": num_gallery,
                    "num_queries_without_relevant": without,
                    "distance": args.distance,
                    "backend": args.backend,
                    "rerank": [step.spec() for step in steps],
                    "metrics": values,
                    **({"per_class": _per_class(results, dataset.class_names)} if args.per_class else {}),
                    **({"per_category": per_category} if per_category is not None else {}),
                    **({"examples": examples} if examples else {}),
                    **({"threshold": calibration} if calibration is not None else {}),
                },
                indent=2,
            )
        )
    else:
        searched = (
            "leave-one-out"
            if gallery is None
            else f"query/gallery: {num_gallery} gallery items, an item never retrieves itself"
        )
        print(
            f"{dataset_name} / {args.split}: {results.num_queries} queries ({searched}, {args.distance}, "
            f"{args.backend}); {without} without a relevant item, left out of the retrieval means"
        )
        if steps:
            print(f"re-ranked: {', '.join(step.spec() for step in steps)}")
        width = max(len(n) for n in values)
        for name, value in values.items():
            print(f"{name:<{width}}  {value:.4f}")
        if args.per_class:
            for name, by_class in results.per_class.items():
                worst = sorted(by_class.items(), key=lambda item: item[1])[:5]
                shown = ", ".join(f"{dataset.class_names[int(c)]} {v:.4f}" for c, v in worst)
                print(f"{name} per class ({len(by_class)} classes), worst: {shown}")
        if per_category is not None:
            for name, by_category in per_category.items():
                shown = ", ".join(f"{c} {v:.4f}" for c, v in by_category.items())
                print(f"{name} per category: {shown}")
        if examples:
            print(f"examples: {examples['queries']} queries drawn into {examples['path']}")
        if calibration is not None:
            _print_calibration(calibration, args.split)
    return 0


def _calibration_split(args: argparse.Namespace, splits: RunData) -> str:
    """The split --calibrate-fmr uses: --calibrate-split, else val when the run has one, else the evaluated
    split. Calibrating on the test split is allowed, with a warning: the rates are measured on the pairs
    the threshold was fitted to, so they are optimistic for that split."""
    split = args.calibrate_split or ("val" if splits.val is not None and len(splits.val) else args.split)
    splits.split(split)  # a run without a validation split: ConfigError now, before anything is embedded
    if split == "test":
        why = "" if args.calibrate_split else " (the run has no validation split)"
        print(
            f"warning: calibrating the threshold on the test split{why}: its FMR/FNMR are measured on the "
            "pairs it was fitted to and are optimistic; calibrate on a validation split (--calibrate-split "
            "val, or train with --val-fraction > 0) for honest test rates",
            file=sys.stderr,
        )
    return split


def _pairs(
    dataset: data_lib.ImageDataset, embeddings: torch.Tensor, labels: torch.Tensor
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Positional and keyword arguments of :func:`calibrate_threshold` / :func:`threshold_rates` for a
    split's pairs under its protocol, as the evaluation searches it: every pair of a leave-one-out split,
    every (query, gallery) pair of a query/gallery one (an item never paired with itself); items of one
    sequence are never paired."""
    sequences = dataset.annotations.sequences
    groups = None if sequences is None else torch.as_tensor(sequences)
    queries, gallery = query_gallery_positions(dataset)
    if gallery is None:
        return (embeddings, labels), {"ignore": groups}
    q, g = torch.from_numpy(queries), torch.from_numpy(gallery)
    ignore = None if groups is None else (groups[q], groups[g])
    return (embeddings[q], labels[q], embeddings[g], labels[g]), {
        "query_ids": q,
        "gallery_ids": g,
        "ignore": ignore,
    }


def _calibrate(
    args: argparse.Namespace,
    loaded: tuple[torch.nn.Module, dict[str, Any], torch.device],
    splits: RunData,
    split: str,
    evaluated: tuple[data_lib.ImageDataset, torch.Tensor, torch.Tensor],
    dataset_name: str,
) -> dict[str, Any]:
    """Calibrate the threshold of --calibrate-fmr on ``split`` (its embeddings are the evaluation's when it
    is the evaluated split), write it to --threshold-out and measure it on the evaluated split when that is
    another one. Returns what the report shows."""
    model, checkpoint, device = loaded
    dataset, embeddings, labels = evaluated
    if split != args.split:
        dataset = splits.split(split)
        dataset.transform = data_lib.transforms.build("eval", **checkpoint["data_spec"])
        embeddings, labels = embed(model, dataset, args, device, "calibrate")
    file = ckpt.checkpoint_file(args.checkpoint)
    positional, keywords = _pairs(dataset, embeddings, labels)
    threshold: Threshold = calibrate_threshold(
        *positional,
        **keywords,
        fmr=args.calibrate_fmr,
        distance=args.distance,
        source=f"{dataset_name} / {split} ({dataset.annotations.protocol}), checkpoint {file}",
        fingerprint=fingerprint(checkpoint),
    )
    path = threshold.to_json(args.threshold_out or file.parent / "threshold.json")
    report: dict[str, Any] = {"path": str(path), "split": split, **threshold.to_dict()}
    if split != args.split:
        positional, keywords = _pairs(*evaluated)
        rates = threshold_rates(threshold, *positional, **keywords)
        report["evaluated"] = {
            "split": args.split,
            "fmr": None if math.isnan(rates.fmr) else rates.fmr,
            "fnmr": None if math.isnan(rates.fnmr) else rates.fnmr,
            "num_positive": rates.num_positive,
            "num_negative": rates.num_negative,
        }
    return report


def _print_calibration(report: dict[str, Any], evaluated_split: str) -> None:
    """The calibrated threshold in the table output."""
    print(
        f"threshold for FMR <= {report['target_fmr']:g}, calibrated on {report['split']} "
        f"({report['num_positive']} same-label / {report['num_negative']} different-label pairs): "
        f"{report['rule']}; FMR {report['fmr']:.4g}, FNMR {report['fnmr']:.4f} (TMR {report['tmr']:.4f})"
    )
    on = report.get("evaluated")
    if on is not None:
        shown = {key: "nan" if on[key] is None else f"{on[key]:.4g}" for key in ("fmr", "fnmr")}
        print(
            f"  on {evaluated_split} ({on['num_positive']} / {on['num_negative']} pairs): "
            f"FMR {shown['fmr']}, FNMR {shown['fnmr']}"
        )
    print(f"  written to {report['path']}")


def _per_category(
    results: metrics_lib.RetrievalResults, dataset: data_lib.ImageDataset, metric_names: list[str]
) -> dict[str, dict[str, float]]:
    """Every retrieval metric per category of the queries (``results.query_ids`` are split positions)."""
    categories = dataset.annotations.categories
    assert categories is not None
    codes = categories[results.query_ids.numpy()]
    found = metrics_lib.per_group(results, codes, metric_names, dataset.annotations.category_names)
    return {name: {str(c): v for c, v in by_category.items()} for name, by_category in found.items()}


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


def _examples_top(args: argparse.Namespace, dataset: data_lib.ImageDataset) -> int:
    """Results drawn per query: ``--examples-top``, at most what a query can retrieve (the other items of a
    leave-one-out split, the gallery of a query/gallery one)."""
    _, gallery = query_gallery_positions(dataset)
    return min(args.examples_top, len(dataset) - 1 if gallery is None else len(gallery))


def _draw_examples(
    args: argparse.Namespace, results: metrics_lib.RetrievalResults, dataset: data_lib.ImageDataset
) -> dict[str, Any]:
    """Draw ``--num-examples`` queries with their ``--examples-top`` results into ``--examples``, from the
    evaluation's own results (searched with k ≥ ``--examples-top``)."""
    queries = metrics_lib.pick_queries(results, args.num_examples, args.examples_mode, seed=0)
    if not queries:
        raise ConfigError("--examples: no query has a relevant item in this split; nothing to draw")
    top = _examples_top(args, dataset)
    query_positions, gallery_positions = query_gallery_positions(dataset)
    query_images = dataset if gallery_positions is None else dataset.subset(query_positions)
    gallery_images = None if gallery_positions is None else dataset.subset(gallery_positions)
    picture = metrics_lib.retrieval_grid(
        results,
        query_images,
        gallery_images,
        queries=queries,
        top=top,
        label_text=lambda code: dataset.class_names[int(code)],
    )
    path = Path(args.examples)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
    return {"path": str(path), "queries": queries, "mode": args.examples_mode, "top": top}
