"""The ``dmlkit`` command: thin wrappers that parse arguments and call the library."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import NoReturn

from dmlkit import __version__
from dmlkit.cli.parser import SuggestingParser
from dmlkit.errors import ConfigError, DmlkitError

#: The exit status after Ctrl-C (128 + SIGINT, as shells report it).
INTERRUPTED = 130

#: The subcommands (``dmlkit <command>``), named before the parser is built (an interrupt while the
#: subcommands' modules import still names its command).
COMMANDS: tuple[str, ...] = (
    "train", "eval", "embed", "search", "index", "export", "upgrade", "datasets", "sweep", "report", "list",
)  # fmt: skip


def build_parser() -> SuggestingParser:
    """The ``dmlkit`` parser with every subcommand (importing their modules: torch and the registries)."""
    from dmlkit.cli import (
        datasets,
        embed,
        evaluate,
        export,
        index,
        listing,
        report,
        search,
        sweep,
        train,
        upgrade,
    )

    parser = SuggestingParser(
        prog="dmlkit", description="Train and evaluate image-retrieval (deep metric learning) models."
    )
    parser.add_argument("--version", action="version", version=f"dmlkit {__version__}")
    for module in (train, evaluate, embed, search, index, export, upgrade, datasets, sweep, report, listing):
        module.add_parser(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``dmlkit ARGV``; the exit status: 0 done, 1 bad data or a failed run, 2 a bad option or
    configuration (one line ``dmlkit <command>: error: <message>`` naming the culprit), 130 interrupted
    (``dmlkit <command>: interrupted``, no traceback, wherever Ctrl-C lands)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _run(argv)
    except KeyboardInterrupt:
        # Exiting now: a further (or pending) Ctrl-C must not turn the clean exit into a kill by SIGINT.
        with contextlib.suppress(ValueError):  # ValueError: not the main thread
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        command = argv[0] if argv and argv[0] in COMMANDS else None
        print(f"dmlkit{f' {command}' if command else ''}: interrupted", file=sys.stderr)
        return INTERRUPTED


def console_main() -> NoReturn:
    """The process entry point (``dmlkit`` and ``python -m dmlkit``): :func:`main`, then exit with its status.

    After an interrupt the process leaves through ``os._exit(130)``: CPython re-raises SIGINT after
    finalisation (exit status -2, not 130) when the KeyboardInterrupt passed through code a C extension ran
    with ``PyRun_*``, even though :func:`main` handled it. Everything worth keeping is already written."""
    code = main()
    if code == INTERRUPTED:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(INTERRUPTED)
    sys.exit(code)


def _run(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv  # what a command that launches itself again passes on (train --nproc-per-node)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    logging.captureWarnings(True)  # a converted flat config file warns through the log, once
    try:
        return int(args.handler(args) or 0)
    except ConfigError as exc:
        # every process of a torchrun launch reads the same options: one of them says what is wrong
        if os.environ.get("RANK", "0") == "0":
            print(f"dmlkit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except DmlkitError as exc:
        print(f"dmlkit {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
