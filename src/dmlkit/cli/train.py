"""``dmlkit train``: train an embedding model (defaults: the built-in synthetic dataset)."""

from __future__ import annotations

import argparse
from pathlib import Path

from dmlkit.config import add_config_arguments, config_from_args, load_yaml
from dmlkit.errors import ConfigError


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "train",
        allow_abbrev=False,
        help="train a model",
        description="Train an embedding model. With no arguments: the built-in synthetic glyph dataset, "
        "zero-shot split, multi-similarity loss, P×K batches; prints test metrics before and after.",
    )
    parser.add_argument("--config", metavar="YAML", help="YAML file of config keys (flags override it)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last.pt")
    add_config_arguments(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from dmlkit.train.loop import Trainer

    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "last.pt").is_file():
            raise ConfigError(f"--resume {run_dir}: no last.pt there to resume from")
        if args.config:
            raise ConfigError("--resume takes the run's own config.yaml; do not pass --config with it")
        config = config_from_args(args, base=load_yaml(run_dir / "config.yaml"))
        trainer = Trainer(config, run_dir, resume=True)
    else:
        config = config_from_args(args)
        trainer = Trainer(config)
    result = trainer.run()
    if result.interrupted:
        print(f"interrupted; resume with: dmlkit train --resume {result.run_dir}")
        return 0
    return 0
