"""Fetch a dataset's official files into a folder and unpack them there (``dmlkit datasets download``).

Each :class:`~dmlkit.data.catalog.Download` of a :class:`~dmlkit.data.catalog.DatasetInfo` is fetched into
``root/<filename>`` through ``root/<filename>.part``: an interrupted transfer over HTTP(S) resumes from the
bytes already there (a ``Range`` request), other URLs (``file://``, ``ftp://``) are copied again from the
start. The finished file is checked (its size and its md5/sha256, when the catalogue knows them) before it
takes its final name, then unpacked into ``root`` (``.tar``, ``.tar.gz``/``.tgz``, ``.tar.bz2``,
``.tar.xz``, ``.zip``; a member that would land outside ``root`` is refused). A marker
``root/.dmlkit-download-<filename>.json`` records what was verified and unpacked, so a rerun neither
fetches, hashes nor unpacks again (the archive may be deleted after unpacking). ``root`` is the folder the
dataset's table function reads: the archives unpack into the layout it expects.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import tarfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

from tqdm.auto import tqdm

from dmlkit import __version__
from dmlkit.data.catalog import DatasetInfo, Download
from dmlkit.errors import DataError
from dmlkit.files import write_text_atomic

#: Bytes read (and hashed) at a time.
CHUNK = 1 << 20
#: The name of the marker of ``filename`` in the download folder (``/`` of a sub-path becomes ``__``).
MARKER_PREFIX = ".dmlkit-download-"
#: File name endings unpacked with ``tarfile`` (any compression it reads) and ``zipfile``.
TAR_SUFFIXES: tuple[str, ...] = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
ZIP_SUFFIXES: tuple[str, ...] = (".zip",)

Echo = Callable[[str], None]


class ManualDownloadRequired(DataError):
    """The dataset has no public download URL (a licence-gated set): the message says where to get it."""


def manual_steps(info: DatasetInfo) -> str:
    """What to do by hand to get ``info``'s files: its ``manual`` text and its homepage (one line each)."""
    lines = []
    if info.manual:
        lines.append(f"To get it by hand: {info.manual.strip()}")
    if info.homepage:
        lines.append(f"Homepage: {info.homepage}")
    return "\n".join(lines)


def archive_kind(filename: str) -> str | None:
    """``"tar"``, ``"zip"`` or ``None`` (not an archive: kept as it is) from a file name's ending."""
    name = filename.lower()
    if name.endswith(TAR_SUFFIXES):
        return "tar"
    if name.endswith(ZIP_SUFFIXES):
        return "zip"
    return None


def download(
    info: DatasetInfo,
    root: str | Path,
    *,
    force: bool = False,
    progress: bool = True,
    timeout: float = 60,
    echo: Echo | None = None,
) -> list[Path]:
    """Fetch, check and unpack every file of ``info.downloads`` into ``root`` (created if needed); returns
    the files' paths under ``root`` (an archive deleted after it was unpacked is listed all the same).

    - A file already there with the right size and checksum is not fetched again, an archive already
      unpacked (its marker says so) is not unpacked again; ``force`` fetches and unpacks everything anew.
    - ``progress``: tqdm bars on stderr for the transfers and the checksums; ``timeout``: seconds a
      connection may stay silent; ``echo``: called with one line per step (what was fetched, found, unpacked).

    Raises :class:`ManualDownloadRequired` (a ``DataError``) when the dataset has no download URL, with the
    manual steps; ``DataError`` when a host cannot be reached or answers with an error (naming the URL, the
    cause and the manual steps), when a transfer breaks off (rerun to resume), when a checksum or size does
    not match (naming the file, the expected and the actual value; the file is deleted) and when an archive
    is damaged or holds a member that would land outside ``root``.
    """
    if not info.downloads:
        steps = manual_steps(info)
        raise ManualDownloadRequired(
            f"dataset '{info.name}' has no public download URL; its files are fetched by hand"
            + (f"\n{steps}" if steps else "")
        )
    folder = Path(root).expanduser()
    for item in info.downloads:
        _target(folder, item, info)  # every file name checked before anything is fetched
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create the download folder '{folder}': {exc}") from exc
    say = echo or (lambda _line: None)
    return [_fetch(info, item, folder, force, progress, timeout, say) for item in info.downloads]


# ------------------------------------------------------------------------------------------- one file
def _target(folder: Path, item: Download, info: DatasetInfo) -> Path:
    name = PurePosixPath(item.filename)
    if not item.filename or name.is_absolute() or ".." in name.parts or "\\" in item.filename:
        raise DataError(
            f"dataset '{info.name}': download file name '{item.filename}' must be a relative path inside "
            "the download folder"
        )
    return folder / name


def _marker(folder: Path, item: Download) -> Path:
    return folder / f"{MARKER_PREFIX}{item.filename.replace('/', '__')}.json"


def _read_marker(path: Path) -> dict[str, Any]:
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _write_marker(path: Path, state: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(state), fsync=False)


def _stat(path: Path) -> dict[str, int]:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _fetch(
    info: DatasetInfo, item: Download, folder: Path, force: bool, progress: bool, timeout: float, say: Echo
) -> Path:
    target = _target(folder, item, info)
    part = target.with_name(target.name + ".part")
    marker = _marker(folder, item)
    if force:
        for path in (target, part, marker):
            path.unlink(missing_ok=True)
    state = _read_marker(marker)
    if state.get("extracted") and not target.exists():
        say(f"{item.filename}: already downloaded and unpacked into {folder}")
        return target
    if target.is_file():
        if state.get("verified") == _stat(target):
            say(f"{item.filename}: already downloaded")
        else:
            problem = _problem(target, item, progress)
            if problem is None:
                state["verified"] = _stat(target)
                _write_marker(marker, state)
                say(f"{item.filename}: already downloaded{_checked(item)}")
            else:
                say(f"{item.filename}: the file present {problem}; downloading it again")
                target.unlink()
                state = {}
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        say(f"{item.filename}: downloading {item.url}")
        _transfer(info, item, part, timeout, progress)
        problem = _problem(part, item, progress)
        if problem is not None:
            part.unlink(missing_ok=True)
            raise DataError(
                f"'{target}' downloaded from '{item.url}' {problem}; the file was deleted, run the download "
                "again (a lasting mismatch means the host serves another file: get it by hand)"
            )
        os.replace(part, target)
        state = {"verified": _stat(target)}
        _write_marker(marker, state)
        say(f"{item.filename}: downloaded{_checked(item)}")
    kind = archive_kind(item.filename) if item.extract else None
    if kind is not None and not state.get("extracted"):
        say(f"{item.filename}: unpacking into {folder}")
        count = extract(target, folder)
        state["extracted"] = True
        _write_marker(marker, state)
        say(f"{item.filename}: unpacked {count} entries")
    return target


def _checked(item: Download) -> str:
    known = [name for name in ("md5", "sha256") if getattr(item, name)]
    if item.size is not None:
        known.append("size")
    return f" ({', '.join(known)} checked)" if known else " (no checksum known)"


def _problem(path: Path, item: Download, progress: bool) -> str | None:
    """Why the file at ``path`` is not ``item`` (its size, then its checksum), or ``None``."""
    size = path.stat().st_size
    if item.size is not None and size != item.size:
        return f"has {size:,} bytes, expected {item.size:,}"
    for name in ("sha256", "md5"):
        expected = getattr(item, name)
        if expected:
            got = file_digest(path, name, progress)
            if got != expected.lower():
                return f"has {name} {got}, expected {expected.lower()}"
    return None


def file_digest(path: str | Path, algorithm: str = "md5", progress: bool = False) -> str:
    """The hex digest (``md5``, ``sha256``, any ``hashlib`` name) of a file, read in chunks."""
    digest = hashlib.new(algorithm)
    path = Path(path)
    with (
        path.open("rb") as handle,
        tqdm(
            total=path.stat().st_size,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=f"{algorithm} {path.name}",
            disable=not progress,
            leave=False,
        ) as bar,
    ):
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------- transfer
def _unreachable(info: DatasetInfo, url: str, cause: object) -> DataError:
    steps = manual_steps(info)
    return DataError(
        f"cannot download '{url}' (dataset '{info.name}'): {cause}" + (f"\n{steps}" if steps else "")
    )


def _range_start_total(header: str | None) -> tuple[int | None, int | None]:
    """``Content-Range: bytes START-END/TOTAL`` (or ``bytes */TOTAL``) → (START, TOTAL), None if absent."""
    match = re.match(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", header or "")
    if match is None:
        return None, None
    start, total = match.groups()
    return (int(start) if start else None), (int(total) if total and total != "*" else None)


def _open(info: DatasetInfo, url: str, offset: int, timeout: float) -> Any:
    """The response to a GET of ``url`` from byte ``offset``; ``None`` when the server answers 416 (the
    range starts at or past the end: the partial file may be complete); ``DataError`` on any failure."""
    headers = {"User-Agent": f"dmlkit/{__version__}"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        with contextlib.closing(exc):
            if exc.code == 416 and offset:
                _, total = _range_start_total(exc.headers.get("Content-Range"))
                return None if total is None or total == offset else _RESTART
            raise _unreachable(info, url, f"HTTP error {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        raise _unreachable(info, url, exc.reason) from exc
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise _unreachable(info, url, exc) from exc


#: What :func:`_open` returns when the partial file does not fit the server's file: start again.
_RESTART = object()


def _transfer(info: DatasetInfo, item: Download, part: Path, timeout: float, progress: bool) -> None:
    """Fetch ``item.url`` into ``part``, resuming an HTTP(S) transfer from the bytes ``part`` holds."""
    ranged = urlsplit(item.url).scheme.lower() in ("http", "https")
    offset = part.stat().st_size if part.is_file() else 0
    if offset and (not ranged or (item.size is not None and offset > item.size)):
        part.unlink()
        offset = 0
    if offset and offset == item.size:
        return  # complete: checked next
    response = _open(info, item.url, offset, timeout)
    if response is _RESTART:
        part.unlink()
        offset = 0
        response = _open(info, item.url, offset, timeout)
    if response is None:
        return  # the server says the partial file is complete
    if offset and getattr(response, "status", None) == 206:
        start, _ = _range_start_total(response.headers.get("Content-Range"))
        if start != offset:  # not the range asked for: start again from the first byte
            response.close()
            part.unlink()
            offset = 0
            response = _open(info, item.url, offset, timeout)
    else:
        offset = 0  # 200 (or not HTTP): the whole file comes, from its first byte
    _receive(info, item, response, part, offset, progress)


def _receive(
    info: DatasetInfo, item: Download, response: Any, part: Path, offset: int, progress: bool
) -> None:
    kind = (response.headers.get("Content-Type") or "").split(";")[0].strip().lower()
    if kind == "text/html" and not item.filename.lower().endswith((".html", ".htm")):
        response.close()
        raise _unreachable(
            info,
            item.url,
            "the host answered with a web page, not the file (a login, licence or confirmation page?)",
        )
    length_header = response.headers.get("Content-Length")
    length = int(length_header) if length_header and length_header.isdigit() else None
    total = offset + length if length is not None else item.size
    received = 0
    try:
        out = part.open("ab" if offset else "wb")
    except OSError as exc:
        raise DataError(f"cannot write '{part}': {exc}") from exc
    with (
        out,
        response,
        tqdm(
            total=total,
            initial=offset,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=item.filename,
            disable=not progress,
            leave=False,
        ) as bar,
    ):
        while True:
            try:
                chunk = response.read(CHUNK)
            except (OSError, http.client.HTTPException) as exc:
                raise _interrupted(info, item, offset + received, total, exc) from exc
            if not chunk:
                break
            try:
                out.write(chunk)
            except OSError as exc:
                raise DataError(f"cannot write '{part}': {exc}") from exc
            received += len(chunk)
            bar.update(len(chunk))
    if length is not None and received < length:
        raise _interrupted(info, item, offset + received, total, "the connection closed early")


def _interrupted(info: DatasetInfo, item: Download, have: int, total: int | None, cause: object) -> DataError:
    of = f" of {total:,}" if total else ""
    return DataError(
        f"the download of '{item.url}' (dataset '{info.name}') broke off after {have:,}{of} bytes: {cause}; "
        "run it again to resume"
    )


# ------------------------------------------------------------------------------------------- unpacking
def extract(archive: str | Path, folder: str | Path) -> int:
    """Unpack a ``.tar*`` or ``.zip`` archive into ``folder``; returns the number of entries.

    A member that would be written outside ``folder`` (an absolute path, ``..``, a link pointing out, a
    device file) raises ``DataError`` naming the archive and the member: a zip is refused before anything
    is written; a tar (read as a stream, not twice) stops at that member. A damaged archive raises
    ``DataError`` too."""
    archive, folder = Path(archive), Path(folder)
    kind = archive_kind(archive.name)
    if kind is None:
        raise DataError(
            f"'{archive}' is not an archive dmlkit unpacks ({', '.join(TAR_SUFFIXES + ZIP_SUFFIXES)})"
        )
    try:
        return _extract_zip(archive, folder) if kind == "zip" else _extract_tar(archive, folder)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, RuntimeError, OSError) as exc:
        if isinstance(exc, getattr(tarfile, "FilterError", ())):
            member = getattr(exc, "tarinfo", None)
            name = member.name if member is not None else "?"
            raise DataError(
                f"'{archive}': member '{name}' would be written outside '{folder}' or is not a plain file "
                f"({exc}); refused, run the download with --force after replacing the archive"
            ) from exc
        raise DataError(f"cannot unpack '{archive}': {exc}; delete it and download it again") from exc


def _outside(base: Path, name: str) -> bool:
    posix = PurePosixPath(name.replace("\\", "/"))
    if posix.is_absolute() or re.match(r"^[A-Za-z]:", name):
        return True
    return not (base / posix).resolve().is_relative_to(base)


def _extract_zip(archive: Path, folder: Path) -> int:
    base = folder.resolve()
    with zipfile.ZipFile(archive) as handle:
        members = handle.infolist()
        for member in members:
            if _outside(base, member.filename):
                raise DataError(
                    f"'{archive}': member '{member.filename}' would be written outside '{folder}'; refused "
                    "(nothing was unpacked)"
                )
        handle.extractall(base)
    return len(members)


def _extract_tar(archive: Path, folder: Path) -> int:
    base = folder.resolve()
    count = 0

    def checked(handle: tarfile.TarFile) -> Any:
        nonlocal count
        for member in handle:
            count += 1
            if not hasattr(tarfile, "data_filter"):  # Python < 3.11.4: the same rules, by hand
                link = member.issym() or member.islnk()
                target = str(PurePosixPath(member.name).parent / member.linkname) if member.issym() else None
                if (
                    _outside(base, member.name)
                    or (link and _outside(base, target or member.linkname))
                    or member.isdev()
                ):
                    raise DataError(
                        f"'{archive}': member '{member.name}' would be written outside '{folder}' or is not "
                        "a plain file; refused"
                    )
            yield member

    with tarfile.open(archive, "r:*") as handle:
        if hasattr(tarfile, "data_filter"):
            handle.extractall(base, members=checked(handle), filter="data")
        else:  # pragma: no cover - older Python
            handle.extractall(base, members=checked(handle))
    return count


__all__ = [
    "CHUNK",
    "MARKER_PREFIX",
    "ManualDownloadRequired",
    "archive_kind",
    "download",
    "extract",
    "file_digest",
    "manual_steps",
]
