"""The fault-injection harness: run ``dmlkit`` on a bad input and check how it failed.

Every case of ``tests/reliability`` asserts the same four things (docs/reliability.md):

- the exit code (2: a bad option or configuration, 1: bad data or a failed run, 130: interrupted);
- that the first line of stderr names the culprit (file, line, key or value);
- that no traceback is printed;
- that no earlier artifact changed (:func:`snapshot` before and after).

:func:`run_cli` runs the command in-process (fast; what ``main`` prints and returns), :func:`run_process`
in a fresh interpreter (signals, DataLoader workers, exit codes as the shell sees them).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import tests_support

#: The command line of a tiny run (seconds): see ``tests_support.tiny_argv``.
tiny_argv = tests_support.tiny_argv


@dataclass
class Outcome:
    """What a command did: its exit code and what it printed."""

    code: int
    stdout: str
    stderr: str

    @property
    def first_line(self) -> str:
        """The first non-empty line of stderr (the error line the user reads)."""
        return next((line for line in self.stderr.splitlines() if line.strip()), "")

    def __str__(self) -> str:
        return f"exit {self.code}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"


def run_cli(argv: Sequence[str]) -> Outcome:
    """``dmlkit.cli.main(argv)`` in this process, stdout/stderr captured. An exception that escapes
    ``main`` (what the user would see as a traceback) fails the test with that exception."""
    from dmlkit.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exit_:  # argparse errors
            code = exit_.code if isinstance(exit_.code, int) else 1
    return Outcome(int(code), out.getvalue(), err.getvalue())


def process_command(argv: Sequence[str]) -> list[str]:
    """``python -m dmlkit ARGV`` with this interpreter."""
    return [sys.executable, "-m", "dmlkit", *[str(a) for a in argv]]


def run_process(argv: Sequence[str], *, cwd: Path | None = None, timeout: float = 300) -> Outcome:
    """``python -m dmlkit ARGV`` in a fresh interpreter."""
    done = subprocess.run(
        process_command(argv), cwd=cwd, capture_output=True, text=True, timeout=timeout, env=quiet_env()
    )
    return Outcome(done.returncode, done.stdout, done.stderr)


def quiet_env() -> dict[str, str]:
    """The environment of a subprocess: one thread (2-core CI), no colour codes."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "NO_COLOR": "1", "PYTHONWARNINGS": "default"}


def assert_named_error(outcome: Outcome, code: int, *culprits: str) -> None:
    """Exit ``code``; the first stderr line names every one of ``culprits``; no traceback anywhere."""
    assert outcome.code == code, outcome
    assert "Traceback" not in outcome.stderr and "Traceback" not in outcome.stdout, outcome
    first = outcome.first_line
    for culprit in culprits:
        assert culprit in first, f"first stderr line does not name {culprit!r}: {first!r}\n{outcome}"


def snapshot(*roots: Path) -> dict[str, str]:
    """SHA-256 of every file under ``roots`` (a missing root: nothing), keyed by path."""
    hashes: dict[str, str] = {}
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            hashes[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


def assert_unchanged(before: dict[str, str], *roots: Path) -> None:
    """Every file of ``before`` still exists with the same content (new files are allowed)."""
    after = snapshot(*roots)
    changed = [path for path, digest in before.items() if after.get(path) != digest]
    assert not changed, f"earlier artifacts changed or disappeared: {changed}"
