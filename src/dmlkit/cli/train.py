"""dmlkit train: train an embedding model. With no arguments: the built-in synthetic glyph dataset,
zero-shot split, multi-similarity loss, P×K batches; prints test metrics before and after. Every option is
a flag and a key of its section in a --config YAML file (docs/configuration.md)."""

from __future__ import annotations

import argparse

from dmlkit.cli.parser import SuggestingParser
from dmlkit.config import add_config_arguments, config_from_args, load_yaml
from dmlkit.errors import ConfigError


def add_parser(cli: SuggestingParser) -> None:
    parser = cli.add_parser("train", help="train a model", description=__doc__)
    parser.add_argument("--config", metavar="YAML", help="YAML file of config sections (flags override it)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last.pt")
    add_config_arguments(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from dmlkit.train.loop import Trainer
    from dmlkit.train.run_dir import RunDirectory

    if args.resume:
        directory = RunDirectory.existing(args.resume)
        if args.config:
            raise ConfigError("--resume takes the run's own config.yaml; do not pass --config with it")
        config = config_from_args(args, base=load_yaml(directory.file(RunDirectory.CONFIG)))
        trainer = Trainer(config, directory.path, resume=True)
    else:
        trainer = Trainer(config_from_args(args))
    result = trainer.run()
    if result.interrupted:
        print(f"interrupted; resume with: dmlkit train --resume {result.run_dir}")
    return 0
