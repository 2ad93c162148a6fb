"""An argparse parser that answers an unknown option with the closest valid one.

Subcommands are added with :meth:`SuggestingParser.add_parser` (named like argparse's subparsers method),
which keeps each subcommand's parser, and every parser records the long options it was given (through
``add_argument`` on the parser or on any of its groups), so an unknown ``--embeding-size`` is reported by
the subcommand that knows ``--embedding-size`` — without argparse's private classes or its error text.

Every error is reported as ``dmlkit <command>: error: <message>`` on the first line of stderr (argparse
prints the usage first), then the usage, exit status 2. :func:`positive_int` and :func:`non_negative_int`
are argument types that refuse ``--batch-size 0`` or ``--num-workers -1`` while the arguments are parsed.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any, NoReturn

from dmlkit.errors import unknown_name_message

#: A usage longer than this many lines (``dmlkit train`` has a flag per config field) is replaced by a
#: pointer to ``--help`` after an error: the error line is what the user must read.
MAX_USAGE_LINES = 6


def positive_int(text: str) -> int:
    """argparse type: an integer ≥ 1 (``--batch-size``, ``-k``)."""
    return _integer(text, minimum=1, description="a positive integer")


def non_negative_int(text: str) -> int:
    """argparse type: an integer ≥ 0 (``--num-workers``)."""
    return _integer(text, minimum=0, description="an integer ≥ 0")


def _integer(text: str, minimum: int, description: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {description}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be {description}, got {value}")
    return value


class _RecordingGroup:
    """An argument group (or mutually exclusive group) whose long options are recorded by its parser."""

    def __init__(self, group: Any, options: list[str]) -> None:
        self._group = group
        self._options = options

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        action = self._group.add_argument(*args, **kwargs)
        self._options.extend(o for o in action.option_strings if o.startswith("--"))
        return action

    def add_mutually_exclusive_group(self, **kwargs: Any) -> _RecordingGroup:
        return _RecordingGroup(self._group.add_mutually_exclusive_group(**kwargs), self._options)

    def __getattr__(self, name: str) -> Any:  # everything else is the group's own
        return getattr(self._group, name)


class SuggestingParser(argparse.ArgumentParser):
    """``ArgumentParser`` with suggestions for unknown options; abbreviations are never accepted."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        # Set before argparse's own __init__, which already adds --help through add_argument.
        self.long_options: list[str] = []
        self.commands: dict[str, SuggestingParser] = {}
        self._command_action: Any = None
        self._command_dest = "command"
        super().__init__(*args, **kwargs)

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:  # type: ignore[override]
        action = super().add_argument(*args, **kwargs)
        self.long_options.extend(o for o in action.option_strings if o.startswith("--"))
        return action

    def add_argument_group(self, *args: Any, **kwargs: Any) -> Any:
        return _RecordingGroup(super().add_argument_group(*args, **kwargs), self.long_options)

    def add_mutually_exclusive_group(self, **kwargs: Any) -> Any:
        return _RecordingGroup(super().add_mutually_exclusive_group(**kwargs), self.long_options)

    def add_parser(self, name: str, *, dest: str = "command", **kwargs: Any) -> SuggestingParser:
        """A subcommand ``name`` (its handler is set with ``set_defaults(handler=...)``); ``dest``: the
        attribute naming the chosen subcommand (a subcommand's own subcommands use another one, so
        ``args.command`` keeps naming the top-level command)."""
        if self._command_action is None:
            self._command_dest = dest
            self._command_action = self.add_subparsers(
                dest=dest, metavar="COMMAND", parser_class=SuggestingParser, required=dest != "command"
            )
        parser: SuggestingParser = self._command_action.add_parser(name, **kwargs)
        self.commands[name] = parser
        return parser

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:  # type: ignore[override]
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            # Options a subcommand does not know come back here; the innermost subcommand reports them.
            self._chosen(parsed).reject(extras)
        return parsed

    def _chosen(self, parsed: Any) -> SuggestingParser:
        """The innermost (sub)command parser that ``parsed`` went through."""
        chosen = self.commands.get(getattr(parsed, self._command_dest, None) or "")
        return self if chosen is None else chosen._chosen(parsed)

    def error(self, message: str) -> NoReturn:
        """Exit with status 2: ``<prog>: error: <message>`` first (the culprit), then the usage (or, when
        the usage is long, where to find it)."""
        usage = self.format_usage()
        if usage.count("\n") > MAX_USAGE_LINES:
            usage = f"run '{self.prog} --help' for the options\n"
        self.exit(2, f"{self.prog}: error: {message}\n{usage}")

    def reject(self, extras: list[str]) -> None:
        """Exit with status 2 naming the first unknown option and the closest valid one."""
        for token in extras:
            flag = token.split("=", 1)[0]
            if flag.startswith("--") and flag not in self.long_options:
                self.error(unknown_name_message("option", flag, self.long_options))
        self.error("unrecognized arguments: " + " ".join(extras))
