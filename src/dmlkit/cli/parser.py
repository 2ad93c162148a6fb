"""An argparse parser that answers an unknown option with the closest valid one.

Subcommands are added with :meth:`SuggestingParser.add_parser` (named like argparse's subparsers method),
which keeps each subcommand's parser, and every parser records the long options it was given (through
``add_argument`` on the parser or on any of its groups), so an unknown ``--embeding-size`` is reported by
the subcommand that knows ``--embedding-size`` — without argparse's private classes or its error text.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from dmlkit.errors import unknown_name_message


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
        super().__init__(*args, **kwargs)

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:  # type: ignore[override]
        action = super().add_argument(*args, **kwargs)
        self.long_options.extend(o for o in action.option_strings if o.startswith("--"))
        return action

    def add_argument_group(self, *args: Any, **kwargs: Any) -> Any:
        return _RecordingGroup(super().add_argument_group(*args, **kwargs), self.long_options)

    def add_mutually_exclusive_group(self, **kwargs: Any) -> Any:
        return _RecordingGroup(super().add_mutually_exclusive_group(**kwargs), self.long_options)

    def add_parser(self, name: str, **kwargs: Any) -> SuggestingParser:
        """A subcommand ``name`` (its handler is set with ``set_defaults(handler=...)``)."""
        if self._command_action is None:
            self._command_action = self.add_subparsers(
                dest="command", metavar="COMMAND", parser_class=SuggestingParser
            )
        parser: SuggestingParser = self._command_action.add_parser(name, **kwargs)
        self.commands[name] = parser
        return parser

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:  # type: ignore[override]
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            # Options a subcommand does not know come back here; the subcommand reports them.
            self.commands.get(getattr(parsed, "command", None) or "", self).reject(extras)
        return parsed

    def reject(self, extras: list[str]) -> None:
        """Exit with status 2 naming the first unknown option and the closest valid one."""
        for token in extras:
            flag = token.split("=", 1)[0]
            if flag.startswith("--") and flag not in self.long_options:
                self.error(unknown_name_message("option", flag, self.long_options))
        self.error("unrecognized arguments: " + " ".join(extras))
