"""The ``dmlkit`` command: thin wrappers that parse arguments and call the library."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from dmlkit import __version__
from dmlkit.cli.parser import SuggestingParser
from dmlkit.errors import ConfigError, DmlkitError


def build_parser() -> SuggestingParser:
    from dmlkit.cli import embed, evaluate, listing, search, train

    parser = SuggestingParser(
        prog="dmlkit", description="Train and evaluate image-retrieval (deep metric learning) models."
    )
    parser.add_argument("--version", action="version", version=f"dmlkit {__version__}")
    for module in (train, evaluate, embed, search, listing):
        module.add_parser(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    logging.captureWarnings(True)  # a converted flat config file warns through the log, once
    try:
        return int(args.handler(args) or 0)
    except ConfigError as exc:
        print(f"dmlkit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except DmlkitError as exc:
        print(f"dmlkit {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
