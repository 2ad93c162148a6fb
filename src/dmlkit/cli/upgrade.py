"""dmlkit upgrade: replace an embedding model without re-embedding the gallery first (docs/upgrades.md).

dmlkit upgrade train-bct --old OLD [training flags]            backward-compatible training (BCT)
dmlkit upgrade train-transform --old OLD --new NEW --out T.pt  the reverse transformation ρ (new → old)
dmlkit upgrade train-compatible --old OLD [training flags]     metric-compatible training (joint), or
dmlkit upgrade train-compatible --mode after --old OLD --new NEW --out H.pt   (heads on a trained model)
dmlkit upgrade simulate --old OLD --new NEW [--transform T.pt] [--bct BCT] [--compatible NEW2]
                        --steps 10 --plot backfill.png                     online backfilling, step by step
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dmlkit import data as data_lib
from dmlkit import distances
from dmlkit import metrics as metrics_lib
from dmlkit import search as search_lib
from dmlkit.cli.common import add_embedding_arguments, embed, load_model
from dmlkit.cli.evaluate import _data_section
from dmlkit.cli.parser import SuggestingParser, positive_int
from dmlkit.config import (
    DataSection,
    add_config_arguments,
    config_from_args,
    config_from_checkpoint,
)
from dmlkit.config import parse_list as _parse_list
from dmlkit.config import parse_mapping as _parse_mapping
from dmlkit.errors import ConfigError, DataError
from dmlkit.inference import resolve_device
from dmlkit.train import checkpoint as ckpt
from dmlkit.train.data import build_data

log = logging.getLogger(__name__)

#: Where ``train-compatible`` (joint mode) leaves the trained heads ψ and ρ, inside the run directory.
HEADS_FILE = "compatible_heads.pt"


def add_parser(cli: SuggestingParser) -> None:
    parser = cli.add_parser(
        "upgrade", help="model upgrades: compatible training, backfilling", description=__doc__
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    _add_train_bct(parser)
    _add_train_transform(parser)
    _add_train_compatible(parser)
    _add_simulate(parser)


# ------------------------------------------------------------------------------------------- shared options
def _float(minimum: float = 0.0, strict: bool = False) -> Any:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if value < minimum or (strict and value == minimum) or value != value:
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '≥'} {minimum:g}, got {text}")
        return value

    return parse


def _add_old(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--old", required=True, metavar="CHECKPOINT", help="the old model: a checkpoint file or a run folder"
    )


def _add_data_overrides(parser: argparse.ArgumentParser, split: str) -> None:
    parser.add_argument("--dataset", default=None, help="dataset name (default: the checkpoints')")
    parser.add_argument(
        "--data-root", default=None, help="dataset folder or file (default: the checkpoints')"
    )
    parser.add_argument("--dataset-args", type=_parse_mapping, default=None, metavar="MAP")
    parser.add_argument(
        "--split", choices=("test", "val", "train"), default=split, help=f"the split to use ({split})"
    )


def _add_head_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("the reverse transformation ρ (and the new-side head ψ)")
    group.add_argument("--hidden", type=positive_int, default=512, help="hidden width of the MLP (512)")
    group.add_argument(
        "--depth", type=positive_int, default=2, help="linear layers of the MLP; 1: linear (2)"
    )
    group.add_argument(
        "--temperature", type=_float(strict=True), default=0.1, help="softmax temperature τ (0.1)"
    )


def _add_feature_training(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training on the frozen models' features")
    group.add_argument("--epochs", type=positive_int, default=30, help="passes over the features (30)")
    group.add_argument("--train-batch-size", type=positive_int, default=256, help="features per batch (256)")
    group.add_argument("--lr", type=_float(strict=True), default=1e-3, help="Adam learning rate (1e-3)")
    group.add_argument(
        "--seed", type=int, default=0, help="seed of the heads' initialisation and batches (0)"
    )
    group.add_argument("--out", required=True, metavar="FILE", help="where to save the trained module (.pt)")
    group.add_argument(
        "--feature-samples-per-class",
        type=positive_int,
        default=None,
        help="P×K batches of the features, K items per class (default: a seeded shuffle, which trained "
        "better heads in BENCHMARKS.md)",
    )


# --------------------------------------------------------------------------------------------- train-bct
def _add_train_bct(parser: SuggestingParser) -> None:
    sub = parser.add_parser(
        "train-bct",
        dest="upgrade_command",
        help="train a new model backward-compatible with an old one (BCT)",
        description="Train a new model with its own loss plus BCT's influence loss: cross-entropy of the new "
        "embeddings through the old model's frozen classifier, here the old model's class prototypes (the "
        "normalised mean old embedding of each training class).",
    )
    _add_old(sub)
    sub.add_argument("--bct-weight", type=_float(), default=1.0, help="weight λ of the influence loss (1)")
    sub.add_argument("--bct-scale", type=_float(strict=True), default=16.0, help="logit scale s (16)")
    _add_run_options(sub)
    sub.set_defaults(handler=_train_bct)


def _add_run_options(sub: SuggestingParser) -> None:
    sub.add_argument("--config", metavar="YAML", help="YAML file of config sections (flags override it)")
    sub.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR (pass --old again)")
    sub.add_argument("--overwrite", action="store_true", help="replace the run already in the run folder")
    add_config_arguments(sub)


def _trainer(args: argparse.Namespace, step: Any) -> Any:
    """The Trainer of a training command (new or resumed), with its step factory."""
    from dmlkit.cli.train import _resumed
    from dmlkit.train.loop import Trainer

    if args.resume:
        trainer = _resumed(args)
        trainer.step_factory = step
        return trainer
    return Trainer(config_from_args(args), overwrite=args.overwrite, step=step)


def _config(args: argparse.Namespace) -> Any:
    if not args.resume:
        return config_from_args(args)
    from dmlkit.train.run_dir import RunDirectory

    stored = RunDirectory.existing(args.resume).stored_config()
    return config_from_args(args, base=stored.model_dump(mode="json"))


def _train_bct(args: argparse.Namespace) -> int:
    from dmlkit.upgrade import bct

    config = _config(args)
    device = resolve_device(config.run.device)
    old_model, old_checkpoint = load_model(args.old, device)
    train = build_data(config.data, config.run.seed, spec=old_checkpoint["data_spec"]).train
    train.transform = data_lib.transforms.build("eval", **old_checkpoint["data_spec"])
    embeddings, labels = _embed(old_model, train, config, device, "old model: training split")
    prototypes = bct.class_prototypes(embeddings, labels, int(labels.max()) + 1)
    log.warning("BCT: %d class prototypes of the old model (%d dimensions)", *prototypes.shape)
    del old_model
    trainer = _trainer(args, bct.bct_step(prototypes, weight=args.bct_weight, scale=args.bct_scale))
    return _finish(args, trainer.run(), {"method": "bct", "old": str(args.old)})


def _embed(model: Any, dataset: Any, config: Any, device: torch.device, what: str) -> Any:
    from dmlkit.inference import compute_embeddings

    return compute_embeddings(
        model,
        dataset,
        batch_size=config.eval.eval_batch_size,
        device=device,
        amp=config.optim.amp,
        progress=config.run.progress,
        description=what,
    )


def _finish(args: argparse.Namespace, result: Any, record: dict[str, Any]) -> int:
    """Exit status of a training command; ``upgrade.json`` in the run folder records how it was made."""
    if not result.started:
        print("dmlkit upgrade: interrupted before training started; nothing was saved", file=sys.stderr)
        return 130
    Path(result.run_dir, "upgrade.json").write_text(json.dumps(record, indent=2) + "\n")
    if result.interrupted:
        command = args.upgrade_command
        print(
            f"interrupted; resume with: dmlkit upgrade {command} --resume {result.run_dir} --old {args.old}"
        )
    return 0


# --------------------------------------------------------------------------------------- train-transform
def _add_train_transform(parser: SuggestingParser) -> None:
    sub = parser.add_parser(
        "train-transform",
        dest="upgrade_command",
        help="train the reverse transformation ρ from the new model's space to the old one's",
        description="Embed a split (default: the new model's training split) with both frozen models, then "
        "train a small MLP ρ so that ρ(φ_new(x)) ≈ φ_old(x): cosine regression plus a supervised contrastive "
        "term against old embeddings of other classes (docs/upgrades.md).",
    )
    _add_old(sub)
    sub.add_argument("--new", required=True, metavar="CHECKPOINT", help="the new model")
    sub.add_argument(
        "--contrastive-weight", type=_float(), default=1.0, help="weight of the contrastive term (1)"
    )
    _add_head_options(sub)
    _add_feature_training(sub)
    _add_data_overrides(sub, "train")
    add_embedding_arguments(sub)
    sub.set_defaults(handler=_train_transform)


@dataclass
class _Features:
    """Both frozen models' embeddings of one split (same items, same order), and the labels."""

    old: torch.Tensor
    new: torch.Tensor
    labels: torch.Tensor


def _paired_features(args: argparse.Namespace, split: str) -> tuple[_Features, _Features]:
    """The ``split`` (for training) and test features of both models, each with its own preprocessing."""
    device = resolve_device(args.device)
    ckpt.checkpoint_file(args.old), ckpt.checkpoint_file(args.new)  # both exist, before either loads
    old_model, old_checkpoint = load_model(args.old, device)
    new_model, new_checkpoint = load_model(args.new, device)
    section, seed = _shared_data(args, old_checkpoint, new_checkpoint, reference="new")
    out = []
    for part in (split, "test"):
        views = []
        for model, checkpoint, name in (
            (old_model, old_checkpoint, "old"),
            (new_model, new_checkpoint, "new"),
        ):
            dataset = build_data(section, seed, spec=checkpoint["data_spec"]).split(part)
            dataset.transform = data_lib.transforms.build("eval", **checkpoint["data_spec"])
            views.append(embed(model, dataset, args, device, f"{name} model: {part}"))
        out.append(_Features(views[0][0], views[1][0], views[0][1]))
    return out[0], out[1]


def _shared_data(
    args: argparse.Namespace, old: dict[str, Any], new: dict[str, Any] | None, reference: str
) -> tuple[DataSection, int]:
    """The data section both models are evaluated on (the ``reference`` checkpoint's, with the flags over
    it) and its seed; two checkpoints trained on different datasets are refused unless ``--dataset`` says
    which one to use."""
    old_config = config_from_checkpoint(old["config"], str(args.old))
    new_config = None if new is None else config_from_checkpoint(new["config"], str(args.new))
    base = new_config if reference == "new" and new_config is not None else old_config
    if args.dataset is None and new_config is not None:
        a, b = old_config.data, new_config.data
        if _items(a) != _items(b):
            raise ConfigError(
                f"the old model ({args.old}) was trained on {_describe(a)} and the new one ({args.new}) on "
                f"{_describe(b)}; pass --dataset/--data-root/--dataset-args to compare them on one dataset"
            )
    # the same rule as ``dmlkit eval``: the flags over the checkpoint's data section
    section = _data_section(args, base.data)
    return section, base.run.seed


def _items(section: DataSection) -> tuple[Any, ...]:
    """What decides a dataset's items and labels (its image size is each model's own preprocessing)."""
    arguments = {key: value for key, value in section.dataset.args.items() if key != "image_size"}
    return section.dataset.name, section.data_root, json.dumps(arguments, sort_keys=True, default=str)


def _describe(section: DataSection) -> str:
    arguments = {key: value for key, value in section.dataset.args.items() if key != "image_size"}
    return f"'{section.dataset.name}' ({section.data_root or 'no root'}, arguments {arguments})"


def _train_transform(args: argparse.Namespace) -> int:
    from dmlkit.upgrade import transform

    train, test = _paired_features(args, args.split)
    module, history = transform.train_transform(
        train.new,
        train.old,
        train.labels,
        hidden=args.hidden,
        depth=args.depth,
        epochs=args.epochs,
        batch_size=args.train_batch_size,
        lr=args.lr,
        contrastive_weight=args.contrastive_weight,
        temperature=args.temperature,
        samples_per_class=args.feature_samples_per_class,
        seed=args.seed,
    )
    meta = {"old": str(args.old), "new": str(args.new), "split": args.split, "history": history}
    transform.save_transform(args.out, module, meta)
    with torch.no_grad():
        mapped = module.eval()(test.new)
    _report_cross(history, mapped, test, args.out)
    return 0


def _report_cross(history: list[dict[str, float]], mapped: torch.Tensor, test: _Features, out: Any) -> None:
    """Print the last epoch's loss and, on the test split, how well ρ(φ_new) lands in the old space."""
    cosine = torch.nn.functional.cosine_similarity(mapped, test.old, dim=1).mean()
    found = search_lib.search(
        mapped,
        test.old,
        k=1,
        query_labels=test.labels,
        gallery_labels=test.labels,
        query_ids=torch.arange(len(mapped)),
        gallery_ids=torch.arange(len(mapped)),
    )
    recall = metrics_lib.compute(found, ["recall@1"])["recall@1"]
    last = ", ".join(f"{k} {v:.4f}" for k, v in history[-1].items() if isinstance(v, float))
    print(f"last epoch: {last}")
    print(f"test split: mean cos(ρ(φ_new(x)), φ_old(x)) {float(cosine):.4f}; new→old recall@1 {recall:.4f}")
    print(f"saved {out}")


# -------------------------------------------------------------------------------------- train-compatible
def _add_train_compatible(parser: SuggestingParser) -> None:
    sub = parser.add_parser(
        "train-compatible",
        dest="upgrade_command",
        help="metric-compatible training: cross-model contrastive loss (joint, or after the new model)",
        description="Train the new side of a metric-compatible upgrade: the reverse transformation ρ, an "
        "optional new-side head ψ and (mode joint) the new model itself, with one contrastive softmax over "
        "new-space and old-space candidates so that the two spaces' distances compare (docs/upgrades.md).",
    )
    _add_old(sub)
    sub.add_argument(
        "--mode",
        choices=("joint", "after"),
        default="joint",
        help="joint: train the new model with it (the training flags apply); after: heads only, on a trained "
        "--new model's frozen features (--out)",
    )
    sub.add_argument("--new", default=None, metavar="CHECKPOINT", help="mode after: the trained new model")
    sub.add_argument(
        "--compatible-weight", type=_float(), default=1.0, help="weight of the cross-model loss (1)"
    )
    sub.add_argument(
        "--regression-weight",
        type=_float(),
        default=1.0,
        help="weight of mean(1 − cos(ρ(φ_new(x)), φ_old(x))) (1)",
    )
    sub.add_argument(
        "--hard-negatives",
        type=positive_int,
        default=None,
        help="keep only the K hardest negatives per anchor",
    )
    sub.add_argument(
        "--new-head",
        action="store_true",
        help="learn a new-side head ψ (a residual MLP starting as the identity); default: the new side is "
        "φ_new itself, which served best in BENCHMARKS.md",
    )
    _add_head_options(sub)
    group = sub.add_argument_group("mode after: training on the frozen models' features")
    group.add_argument(
        "--feature-epochs", type=positive_int, default=30, help="passes over the features (30)"
    )
    group.add_argument("--train-batch-size", type=positive_int, default=256, help="features per batch (256)")
    group.add_argument(
        "--feature-samples-per-class",
        type=positive_int,
        default=None,
        help="P×K batches of the features, K items per class (default: a seeded shuffle, which trained "
        "better heads in BENCHMARKS.md)",
    )
    group.add_argument(
        "--feature-lr", type=_float(strict=True), default=1e-3, help="Adam learning rate (1e-3)"
    )
    group.add_argument(
        "--out", default=None, metavar="FILE", help="mode after: where to save the heads (.pt)"
    )
    group.add_argument(
        "--split", choices=("test", "val", "train"), default="train", help="features of (train)"
    )
    _add_run_options(sub)
    sub.set_defaults(handler=_train_compatible)


def _train_compatible(args: argparse.Namespace) -> int:
    if args.mode == "after":
        return _compatible_after(args)
    if args.new is not None or args.out is not None:
        raise ConfigError("--new and --out belong to --mode after (mode joint trains the new model itself)")
    from dmlkit.upgrade import compatible, frozen

    config = _config(args)
    device = resolve_device(config.run.device)
    old_model, old_checkpoint = load_model(args.old, device)
    new_spec = build_data(
        config.data, config.run.seed, config.model.backbone, config.model.pretrained_weights
    ).spec
    adapter = frozen.InputAdapter(
        frozen.Preprocessing.from_spec(new_spec), frozen.Preprocessing.from_spec(old_checkpoint["data_spec"])
    )
    old = frozen.FrozenEncoder(old_model, adapter)
    old_dim = int(old_model.embedding_size)

    def step(model: torch.nn.Module, objective: Any, device: torch.device, amp: str) -> Any:
        # The heads need the new model's embedding size, known once the Trainer has built it (seeded).
        heads = compatible.CompatibleHeads(
            int(model.embedding_size),
            old_dim,
            hidden=args.hidden,
            depth=args.depth,
            new_head=args.new_head,
        )
        factory = compatible.compatible_step(
            old,
            heads,
            weight=args.compatible_weight,
            temperature=args.temperature,
            hard_negatives=args.hard_negatives,
            regression_weight=args.regression_weight,
        )
        return factory(model, objective, device, amp)

    trainer = _trainer(args, step)
    result = trainer.run()
    if result.started:
        heads = trainer.step.heads
        compatible.save_heads(
            Path(result.run_dir, HEADS_FILE), heads, {"old": str(args.old), "new": str(result.run_dir)}
        )
    return _finish(args, result, {"method": "compatible-joint", "old": str(args.old), "heads": HEADS_FILE})


def _seed(args: argparse.Namespace) -> int:
    """``--seed`` of a command that also takes the training flags (which keep their values as text)."""
    value = getattr(args, "seed", 0)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"--seed must be an integer, got {value!r}") from None


def _compatible_after(args: argparse.Namespace) -> int:
    if args.new is None or args.out is None:
        raise ConfigError("--mode after needs --new (the trained new model) and --out (where the heads go)")
    from dmlkit.upgrade import compatible

    # The features of the new model's own data; embedding options from the training flags given, if any.
    args.dataset = args.data_root = args.dataset_args = None
    args.device = getattr(args, "device", "auto")
    args.batch_size = getattr(args, "eval_batch_size", 256)
    args.num_workers = getattr(args, "num_workers", 0) if getattr(args, "num_workers", 0) != "auto" else 0
    args.no_progress = not getattr(args, "progress", True)
    train, test = _paired_features(args, args.split)
    heads, history = compatible.train_compatible_after(
        train.new,
        train.old,
        train.labels,
        new_head=args.new_head,
        hidden=args.hidden,
        depth=args.depth,
        temperature=args.temperature,
        hard_negatives=args.hard_negatives,
        regression_weight=args.regression_weight,
        epochs=args.feature_epochs,
        batch_size=args.train_batch_size,
        lr=args.feature_lr,
        seed=_seed(args),
        samples_per_class=args.feature_samples_per_class,
    )
    compatible.save_heads(args.out, heads, {"old": str(args.old), "new": str(args.new), "history": history})
    with torch.no_grad():
        mapped = heads.eval().old_space(test.new)
    _report_cross(history, mapped, test, args.out)
    return 0


# ----------------------------------------------------------------------------------------------- simulate
def _add_simulate(parser: SuggestingParser) -> None:
    from dmlkit.upgrade import simulate

    sub = parser.add_parser(
        "simulate",
        dest="upgrade_command",
        help="simulate online backfilling: metrics of every method as the gallery is re-embedded",
        description="Re-embed the gallery in --steps steps from 0 %% to 100 %% and report, per method, the "
        "merged system's metrics, the negative-flip rate against old/old, AUC, the worst step, the relative "
        "gain and the cost per query; also the old/old, new/old and new/new grid (docs/upgrades.md).",
    )
    _add_old(sub)
    sub.add_argument("--new", required=True, metavar="CHECKPOINT", help="the new model, trained alone")
    sub.add_argument(
        "--transform", default=None, metavar="FILE", help="ρ of train-transform (rank-merge+transform)"
    )
    sub.add_argument("--bct", default=None, metavar="CHECKPOINT", help="a model of train-bct (method bct)")
    sub.add_argument(
        "--compatible",
        default=None,
        metavar="CHECKPOINT",
        help="the new model of train-compatible (joint, or the --new of mode after)",
    )
    sub.add_argument(
        "--compatible-heads",
        default=None,
        metavar="FILE",
        help=f"its heads ψ, ρ (default: {HEADS_FILE} in the --compatible run folder)",
    )
    sub.add_argument(
        "--methods",
        type=_parse_list,
        default=None,
        metavar="A,B,...",
        help=f"methods (default: every one the given models allow): {', '.join(simulate.available())}",
    )
    sub.add_argument("--steps", type=positive_int, default=10, help="backfilling steps from 0 to 100 %% (10)")
    sub.add_argument("--order", choices=simulate.ORDERS, default="random", help="backfilling order (random)")
    sub.add_argument("--seed", type=int, default=0, help="seed of the random order and query split (0)")
    sub.add_argument(
        "--metrics",
        type=_parse_list,
        default=["map@1000", "recall@1", "map@r"],
        metavar="A,B,...",
        help="metrics per step; the first is the AUC's (map@1000,recall@1,map@r)",
    )
    sub.add_argument("--distance", choices=distances.available(indexable=True), default="cosine")
    sub.add_argument("--backend", choices=search_lib.available(), default="torch", help="k-NN search (torch)")
    sub.add_argument(
        "--query-fraction",
        type=_float(strict=True),
        default=None,
        help="queries: this seeded fraction of the split's items, the others the gallery (default: "
        "leave-one-out, every item a query against all the others)",
    )
    sub.add_argument("--plot", default=None, metavar="PNG", help="plot the first metric against the fraction")
    sub.add_argument("--json", default=None, metavar="FILE", help="write the whole report as JSON")
    _add_data_overrides(sub, "test")
    add_embedding_arguments(sub)
    sub.set_defaults(handler=_simulate)


def _simulate(args: argparse.Namespace) -> int:
    from dmlkit.upgrade import simulate

    methods = _check_simulate(args)
    device = resolve_device(args.device)
    models = {"old": args.old, "new": args.new, "bct": args.bct, "compatible": args.compatible}
    loaded = {name: load_model(path, device) for name, path in models.items() if path is not None}
    section, seed = _shared_data(args, loaded["old"][1], loaded["new"][1], reference="old")
    for name in ("bct", "compatible"):
        if name in loaded:
            _shared_data(args, loaded["old"][1], loaded[name][1], reference="old")
    sides = {}
    for name, (model, checkpoint) in loaded.items():
        dataset = build_data(section, seed, spec=checkpoint["data_spec"]).split(args.split)
        dataset.transform = data_lib.transforms.build("eval", **checkpoint["data_spec"])
        sides[name] = embed(model, dataset, args, device, f"{name} model: {args.split}")
    labels = sides["old"][1]
    query, gallery = _query_gallery(len(labels), args.query_fraction, args.seed)

    def side(embeddings: torch.Tensor) -> simulate.Side:
        return simulate.Side(embeddings[query], embeddings[gallery])

    inputs = simulate.BackfillInputs(
        old=side(sides["old"][0]),
        query_labels=labels[query],
        gallery_labels=labels[gallery],
        leave_one_out=args.query_fraction is None,
        new=side(sides["new"][0]),
    )
    if "bct" in sides:
        inputs.bct = side(sides["bct"][0])
    with torch.no_grad():
        if args.transform:
            from dmlkit.upgrade import transform

            rho, _ = transform.load_transform(args.transform)
            inputs.transform_query = rho.eval()(inputs.new.query)  # type: ignore[union-attr]
        if "compatible" in sides:
            from dmlkit.upgrade import compatible

            heads, _ = compatible.load_heads(_heads_file(args))
            heads.eval()
            features = sides["compatible"][0]
            inputs.compatible = simulate.Side(heads.psi(features[query]), heads.psi(features[gallery]))
            inputs.compatible_query_to_old = heads.rho(features[query])
    report = simulate.simulate(
        inputs,
        methods,
        steps=args.steps,
        order=args.order,
        seed=args.seed,
        metrics=tuple(args.metrics),
        distance=args.distance,
        backend=args.backend,
    )
    print(report.table())
    if args.json:
        Path(args.json).write_text(report.to_json() + "\n")
        print(f"report: {args.json}")
    if args.plot:
        report.plot(args.plot)
        print(f"plot: {args.plot}")
    return 0


def _check_simulate(args: argparse.Namespace) -> list[str]:
    """The methods to run, every option checked before a model loads."""
    from dmlkit.upgrade import simulate

    metrics_lib.check_options([m.strip().lower() for m in args.metrics], args.distance, args.backend)
    # The BackfillInputs field each option provides.
    provides = {
        "new": "--new",
        "transform_query": "--transform" if args.transform else None,
        "bct": "--bct" if args.bct else None,
        "compatible": "--compatible" if args.compatible else None,
        "compatible_query_to_old": "--compatible" if args.compatible else None,
    }
    given = {field for field, flag in provides.items() if flag is not None}
    flags = {"transform_query": "--transform", "bct": "--bct", "compatible": "--compatible"}
    if args.methods:
        methods = [m.strip() for m in args.methods]
        for name in methods:
            missing = sorted({flags.get(f, f) for f in simulate.build(name).needs if f not in given})
            if missing:
                raise ConfigError(f"method '{name}' needs {', '.join(missing)}")
    else:
        methods = [name for name in simulate.available() if set(simulate.build(name).needs) <= given]
    if args.compatible_heads is not None and args.compatible is None:
        raise ConfigError("--compatible-heads needs --compatible (the new model the heads belong to)")
    paths = [args.old, args.new, args.bct, args.compatible]
    for path in paths:
        if path is not None:
            ckpt.checkpoint_file(path)
    for path in (args.transform, _heads_file(args) if args.compatible else None):
        if path is not None and not Path(path).is_file():
            raise DataError(f"{path}: no such file")
    return methods


def _heads_file(args: argparse.Namespace) -> Path:
    if args.compatible_heads is not None:
        return Path(args.compatible_heads)
    folder = Path(args.compatible)
    folder = folder if folder.is_dir() else folder.parent
    return folder / HEADS_FILE


def _query_gallery(n: int, query_fraction: float | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Query and gallery positions: every item both (leave-one-out), or a seeded split of the items."""
    everything = torch.arange(n)
    if query_fraction is None:
        return everything, everything
    if not 0 < query_fraction < 1:
        raise ConfigError(f"--query-fraction must be in (0, 1), got {query_fraction}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    cut = max(1, min(n - 1, round(query_fraction * n)))
    return order[:cut].sort().values, order[cut:].sort().values
