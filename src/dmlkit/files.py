"""Files written so that a crash never leaves a truncated one: checkpoints, indexes, markers, listings.

Every writer in dmlkit goes through :func:`write_atomic`: the bytes go to a temporary sibling, are flushed
and fsync'ed, then the sibling is renamed over the target (``os.replace`` is atomic on POSIX and Windows).
A reader sees the old file or the new one. The file gets the permissions an ordinary ``open`` would give
(``0666`` less the umask), not ``mkstemp``'s private ``0600``: a server process or a colleague reads the
checkpoints and indexes a training job wrote.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from dmlkit.errors import DataError


def _umask() -> int:
    # The only portable way to read the umask is to set it; set it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: str | Path, write: Callable[[IO[bytes]], None], *, fsync: bool = True) -> None:
    """Call ``write(handle)`` on a temporary sibling of ``path`` (binary), then rename it over ``path``.

    The parent folder is created. ``fsync=False`` skips the flush to disk (small files whose loss after a
    power cut only costs redoing a cheap step). On any error the temporary file is removed and the error
    propagates; ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            if hasattr(os, "fchmod"):
                os.fchmod(handle.fileno(), 0o666 & ~_umask())
            write(handle)
            handle.flush()
            if fsync:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(
    path: str | Path,
    write: Callable[[IO[str]], None] | str,
    *,
    encoding: str = "utf-8",
    newline: str | None = None,
    fsync: bool = True,
) -> None:
    """:func:`write_atomic` for text: ``write`` is the whole text, or a function given a text handle
    (``newline=""`` for the csv module)."""

    def as_text(handle: IO[bytes]) -> None:
        text = io.TextIOWrapper(handle, encoding=encoding, newline=newline)  # type: ignore[type-var]
        try:
            if isinstance(write, str):
                text.write(write)
            else:
                write(text)
            text.flush()
        finally:
            text.detach()  # the binary handle stays open for write_atomic's fsync and close

    write_atomic(path, as_text, fsync=fsync)


def read_json(path: str | Path, what: str) -> Any:
    """The JSON value in ``path``; ``DataError`` naming ``what`` and the file when it is missing, unreadable
    or not JSON (the parser's message, on one line, says where)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} {path} not found")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{what} {path} is not valid JSON: {' '.join(str(exc).split())}") from exc
