"""dmlkit train: train an embedding model. With no arguments: the built-in synthetic glyph dataset,
zero-shot split, multi-similarity loss, P×K batches; prints test metrics before and after. With --ssl:
self-supervised, two augmented views of every image, e.g. of an unlabelled folder (--dataset unlabelled;
docs/ssl.md). Every option is a flag and a key of its section in a --config YAML file
(docs/configuration.md)."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from typing import TYPE_CHECKING

from dmlkit.cli.parser import SuggestingParser, positive_int
from dmlkit.config import add_config_arguments, config_from_args
from dmlkit.errors import ConfigError

if TYPE_CHECKING:
    from dmlkit.train.loop import Trainer

#: Exit status of a run interrupted before training started (128 + SIGINT, as a shell reports it).
EXIT_INTERRUPTED = 130


def add_parser(cli: SuggestingParser) -> None:
    parser = cli.add_parser("train", help="train a model", description=__doc__)
    parser.add_argument("--config", metavar="YAML", help="YAML file of config sections (flags override it)")
    parser.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its last.pt (flags may change only the options listed in "
        "the README's 'The run directory')",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run already in <output-dir>/<name>: its files are removed when the new run starts "
        "(not saved in config.yaml)",
    )
    parser.add_argument(
        "--nproc-per-node",
        type=positive_int,
        default=1,
        metavar="N",
        help="train on N processes of this machine (one per GPU, or CPU processes with gloo): launches "
        "torchrun --standalone --nproc-per-node N -m dmlkit train with the other arguments; for several "
        "machines run torchrun yourself (docs/distributed.md). --batch-size is the global batch (not saved "
        "in config.yaml)",
    )
    add_config_arguments(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from dmlkit.train.loop import Trainer

    if args.nproc_per_node > 1 and "WORLD_SIZE" not in os.environ:
        return _launch(args)
    trainer = _resumed(args) if args.resume else Trainer(config_from_args(args), overwrite=args.overwrite)
    result = trainer.run()
    if not result.started:
        what = f"{result.run_dir} is unchanged" if args.resume else "no run directory was created"
        print(
            f"dmlkit train: interrupted before training started; nothing was saved ({what})", file=sys.stderr
        )
        return EXIT_INTERRUPTED
    if result.interrupted:
        print(f"interrupted; resume with: dmlkit train --resume {result.run_dir}")
    return 0


def _launch(args: argparse.Namespace) -> int:
    """``--nproc-per-node N``: check the options here (a typo fails before any process starts), then run
    ``torchrun --standalone --nproc-per-node N -m dmlkit train`` with the other arguments; its exit status."""
    nproc = args.nproc_per_node
    if not args.resume:
        batch_size = config_from_args(args).data.batch_size
        if batch_size % nproc:
            raise ConfigError(
                f"--batch-size {batch_size} is the global batch: it must be divisible by --nproc-per-node "
                f"{nproc}"
            )
    rest = _without_nproc(list(args.argv))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "dmlkit", *rest]  # fmt: skip
    logging.getLogger(__name__).info("launching %s", " ".join(command))
    return subprocess.run(command, check=False).returncode


def _without_nproc(argv: list[str]) -> list[str]:
    """``argv`` without its ``--nproc-per-node N`` / ``--nproc-per-node=N``."""
    out, skip = [], False
    for word in argv:
        if skip:
            skip = False
        elif word == "--nproc-per-node":
            skip = True
        elif not word.startswith("--nproc-per-node="):
            out.append(word)
    return out


def _resumed(args: argparse.Namespace) -> Trainer:
    """The trainer of ``--resume RUN``: the configuration saved in ``last.pt`` with the flags over it (the
    trainer refuses flags that cannot change on resume before anything is written)."""
    from dmlkit.train.loop import Trainer
    from dmlkit.train.run_dir import RunDirectory

    if args.config:
        raise ConfigError("--resume takes the run's own configuration; do not pass --config with it")
    if args.overwrite:
        raise ConfigError("--overwrite starts a new run; it cannot be combined with --resume")
    directory = RunDirectory.existing(args.resume)
    stored = directory.stored_config()
    edited = directory.config_file_differences()
    if edited:
        shown = ", ".join(f"{path}: {old!r} → {new!r}" for path, old, new in edited)
        logging.getLogger(__name__).warning(
            "%s differs from the configuration saved in %s (%s); resuming with the saved one (pass options "
            "as flags to change those that may change)",
            directory.file(RunDirectory.CONFIG),
            directory.file(RunDirectory.LAST),
            shown,
        )
    config = config_from_args(args, base=stored.model_dump(mode="json"))
    return Trainer(config, directory, resume=True)
