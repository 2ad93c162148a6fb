"""The argument parser and ``main``: errors name the culprit on the first line, interrupts exit 130."""

from __future__ import annotations

import argparse

import pytest

import dmlkit.cli
from dmlkit.cli import main
from dmlkit.cli.parser import SuggestingParser, non_negative_int, positive_int


@pytest.mark.parametrize(("function", "text", "value"), [(positive_int, "3", 3), (non_negative_int, "0", 0)])
def test_integer_argument_types_accept(function, text, value) -> None:
    assert function(text) == value


@pytest.mark.parametrize(
    ("function", "text", "message"),
    [
        (positive_int, "0", "must be a positive integer, got 0"),
        (positive_int, "-4", "must be a positive integer, got -4"),
        (positive_int, "2.5", "must be a positive integer, got '2.5'"),
        (non_negative_int, "-1", "must be an integer ≥ 0, got -1"),
        (non_negative_int, "many", "must be an integer ≥ 0, got 'many'"),
    ],
)
def test_integer_argument_types_refuse(function, text, message) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        function(text)


def test_error_line_comes_first_then_the_usage(capsys) -> None:
    parser = SuggestingParser(prog="dmlkit demo")
    parser.add_argument("--size", type=positive_int)
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["--size", "0"])
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "dmlkit demo: error: argument --size: must be a positive integer, got 0"
    assert lines[1].startswith("usage: dmlkit demo")


def test_a_long_usage_is_replaced_by_a_pointer_to_help(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--epochs"])
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["dmlkit train: error: argument --epochs: expected one argument",
                     "run 'dmlkit train --help' for the options"]  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "first_line"),
    [(["eval", "--checkpoint", "x"], "dmlkit eval: interrupted"), (["--version"], "dmlkit: interrupted")],
)
def test_interrupt_anywhere_exits_130(monkeypatch, capsys, argv, first_line) -> None:
    """Even while the parser (and with it torch and the registries) is being built."""

    def interrupted() -> SuggestingParser:
        raise KeyboardInterrupt

    monkeypatch.setattr(dmlkit.cli, "build_parser", interrupted)
    assert main(argv) == 130
    captured = capsys.readouterr()
    assert captured.err == f"{first_line}\n" and captured.out == ""
