"""dmlkit.data.download against a local HTTP server (with Range support) and file:// URLs, never the
internet: fetch, resume, checksums, unpacking, refusals and the messages naming the URL and manual steps."""

from __future__ import annotations

import hashlib
import http.server
import io
import re
import socket
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dmlkit.data.catalog import DatasetInfo, Download
from dmlkit.data.download import ManualDownloadRequired, archive_kind, download, extract
from dmlkit.errors import DataError

MANUAL = "copy layout.tar.gz from the lab's share into the root"
HOMEPAGE = "https://example.org/tiny"


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.files`` (path → bytes) with ``Range: bytes=N-`` (206, or 416 past the end) unless
    ``server.ignore_range``; ``server.truncate`` sends only that many bytes of the body and closes. Every
    request is recorded in ``server.requests`` as (path, Range header, status, body bytes sent)."""

    def do_GET(self) -> None:
        server: Any = self.server
        data = server.files.get(self.path)
        asked = self.headers.get("Range")
        if data is None:
            server.requests.append((self.path, asked, 404, 0))
            self.send_error(404, "Not Found")
            return
        start = 0
        if asked and not server.ignore_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", asked).group(1))
            if start >= len(data):
                server.requests.append((self.path, asked, 416, 0))
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            status = 206
        else:
            self.send_response(200)
            status = 200
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        if server.content_type:
            self.send_header("Content-Type", server.content_type)
        sent = body if server.truncate is None else body[: server.truncate]
        # recorded before the reply goes out: the client may check the record as soon as it has the body
        server.requests.append((self.path, asked, status, len(sent)))
        self.end_headers()
        self.wfile.write(sent)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[Any]:
    httpd: Any = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    httpd.files, httpd.requests, httpd.ignore_range, httpd.truncate = {}, [], False, None
    httpd.content_type = None
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def tar_gz(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in files.items():
            member = tarfile.TarInfo(name)
            member.size = len(data)
            archive.addfile(member, io.BytesIO(data))
    return buffer.getvalue()


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


#: The layout the tiny dataset unpacks into: a list file and two "images".
LAYOUT = {
    "tiny/list.txt": b"a.png 1\nb.png 2\n",
    "tiny/images/a.png": b"A" * 3000,
    "tiny/images/b.png": b"B" * 5000,
}
ARCHIVE = tar_gz(LAYOUT)
MD5 = hashlib.md5(ARCHIVE).hexdigest()


def info_of(*downloads: Download, manual: str = MANUAL) -> DatasetInfo:
    return DatasetInfo(
        name="tiny", title="Tiny", protocol="none", homepage=HOMEPAGE, manual=manual, downloads=downloads
    )


def served(server: Any, data: bytes = ARCHIVE, name: str = "layout.tar.gz", **checks: Any) -> Download:
    server.files[f"/{name}"] = data
    return Download(f"{server.url}/{name}", name, **checks)


def test_download_checks_and_unpacks_into_the_layout(server, tmp_path: Path) -> None:
    info = info_of(served(server, md5=MD5, size=len(ARCHIVE)))
    lines: list[str] = []
    files = download(info, tmp_path / "root", progress=False, echo=lines.append)
    assert files == [tmp_path / "root" / "layout.tar.gz"]
    assert files[0].read_bytes() == ARCHIVE
    for name, data in LAYOUT.items():
        assert (tmp_path / "root" / name).read_bytes() == data
    assert not (tmp_path / "root" / "layout.tar.gz.part").exists()
    assert server.requests == [("/layout.tar.gz", None, 200, len(ARCHIVE))]
    assert any("md5, size checked" in line for line in lines)

    # a rerun fetches nothing and does not unpack again (a deleted member stays deleted)
    (tmp_path / "root" / "tiny" / "list.txt").unlink()
    download(info, tmp_path / "root", progress=False)
    assert len(server.requests) == 1
    assert not (tmp_path / "root" / "tiny" / "list.txt").exists()
    # the archive may be deleted once unpacked
    files[0].unlink()
    download(info, tmp_path / "root", progress=False)
    assert len(server.requests) == 1
    # force: fetched and unpacked again
    download(info, tmp_path / "root", force=True, progress=False)
    assert len(server.requests) == 2 and (tmp_path / "root" / "tiny" / "list.txt").exists()


def test_a_partial_file_resumes_with_a_range_request(server, tmp_path: Path) -> None:
    info = info_of(served(server, md5=MD5))
    root = tmp_path / "root"
    root.mkdir()
    half = len(ARCHIVE) // 2
    (root / "layout.tar.gz.part").write_bytes(ARCHIVE[:half])
    download(info, root, progress=False)
    assert server.requests == [("/layout.tar.gz", f"bytes={half}-", 206, len(ARCHIVE) - half)]
    assert (root / "layout.tar.gz").read_bytes() == ARCHIVE
    assert (root / "tiny" / "images" / "b.png").read_bytes() == LAYOUT["tiny/images/b.png"]


def test_a_broken_transfer_keeps_the_part_and_the_rerun_resumes(server, tmp_path: Path) -> None:
    info = info_of(served(server, md5=MD5))
    server.truncate = 100
    with pytest.raises(
        DataError, match=r"broke off after 100 of [\d,]+ bytes.*run it again to resume"
    ) as caught:
        download(info, tmp_path, progress=False)
    assert f"{server.url}/layout.tar.gz" in str(caught.value)
    assert (tmp_path / "layout.tar.gz.part").stat().st_size == 100
    server.truncate = None
    download(info, tmp_path, progress=False)
    assert server.requests[-1] == ("/layout.tar.gz", "bytes=100-", 206, len(ARCHIVE) - 100)
    assert (tmp_path / "layout.tar.gz").read_bytes() == ARCHIVE


def test_a_server_that_ignores_the_range_restarts_from_the_first_byte(server, tmp_path: Path) -> None:
    info = info_of(served(server, md5=MD5))
    server.ignore_range = True
    (tmp_path / "layout.tar.gz.part").write_bytes(b"stale bytes that must not stay in front")
    download(info, tmp_path, progress=False)
    assert server.requests == [("/layout.tar.gz", "bytes=39-", 200, len(ARCHIVE))]
    assert (tmp_path / "layout.tar.gz").read_bytes() == ARCHIVE


def test_a_complete_part_gets_416_and_is_kept(server, tmp_path: Path) -> None:
    info = info_of(served(server, md5=MD5))
    (tmp_path / "layout.tar.gz.part").write_bytes(ARCHIVE)
    download(info, tmp_path, progress=False)
    assert server.requests == [("/layout.tar.gz", f"bytes={len(ARCHIVE)}-", 416, 0)]
    assert (tmp_path / "layout.tar.gz").read_bytes() == ARCHIVE


def test_a_part_longer_than_the_known_size_starts_again(server, tmp_path: Path) -> None:
    info = info_of(served(server, size=len(ARCHIVE)))
    (tmp_path / "layout.tar.gz.part").write_bytes(ARCHIVE + b"junk")
    download(info, tmp_path, progress=False)
    assert server.requests == [("/layout.tar.gz", None, 200, len(ARCHIVE))]


def test_a_checksum_mismatch_deletes_the_file_and_names_it(server, tmp_path: Path) -> None:
    info = info_of(served(server, md5="0" * 32))
    with pytest.raises(DataError) as caught:
        download(info, tmp_path, progress=False)
    message = str(caught.value)
    assert str(tmp_path / "layout.tar.gz") in message
    assert f"md5 {MD5}, expected {'0' * 32}" in message
    assert not (tmp_path / "layout.tar.gz").exists() and not (tmp_path / "layout.tar.gz.part").exists()
    assert not (tmp_path / "tiny").exists()

    sha = served(server, sha256="f" * 64)
    with pytest.raises(DataError, match=f"sha256 {hashlib.sha256(ARCHIVE).hexdigest()}, expected f{{64}}"):
        download(info_of(sha), tmp_path, progress=False)
    with pytest.raises(DataError, match=f"has {len(ARCHIVE):,} bytes, expected 12"):
        download(info_of(served(server, size=12)), tmp_path, progress=False)


def test_a_present_file_with_a_wrong_checksum_is_fetched_again(server, tmp_path: Path) -> None:
    info = info_of(served(server, md5=MD5))
    (tmp_path / "layout.tar.gz").write_bytes(b"not the archive")
    lines: list[str] = []
    download(info, tmp_path, progress=False, echo=lines.append)
    assert len(server.requests) == 1 and (tmp_path / "layout.tar.gz").read_bytes() == ARCHIVE
    assert any("downloading it again" in line for line in lines)
    # a file placed by hand with the right checksum is not fetched
    other = tmp_path / "other"
    other.mkdir()
    (other / "layout.tar.gz").write_bytes(ARCHIVE)
    download(info, other, progress=False)
    assert len(server.requests) == 1 and (other / "tiny" / "list.txt").exists()


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_an_unreachable_host_names_the_url_and_the_manual_steps(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{closed_port()}/layout.tar.gz"
    with pytest.raises(DataError) as caught:
        download(info_of(Download(url, "layout.tar.gz")), tmp_path, progress=False, timeout=5)
    message = str(caught.value)
    assert f"cannot download '{url}' (dataset 'tiny')" in message
    assert "refused" in message.lower()
    assert MANUAL in message and HOMEPAGE in message


def test_an_http_error_names_the_url_and_the_status(server, tmp_path: Path) -> None:
    url = f"{server.url}/gone.tar.gz"
    with pytest.raises(DataError, match=f"cannot download '{re.escape(url)}'.*HTTP error 404") as caught:
        download(info_of(Download(url, "gone.tar.gz")), tmp_path, progress=False)
    assert MANUAL in str(caught.value)
    assert not list(tmp_path.glob("gone*"))


def test_a_web_page_instead_of_the_file_is_refused(server, tmp_path: Path) -> None:
    server.content_type = "text/html; charset=utf-8"
    info = info_of(served(server, b"<html>Sign in to continue</html>"))
    with pytest.raises(DataError, match="answered with a web page, not the file") as caught:
        download(info, tmp_path, progress=False)
    assert f"{server.url}/layout.tar.gz" in str(caught.value) and MANUAL in str(caught.value)
    assert not list(tmp_path.glob("layout*"))


def test_file_urls_copy_and_unpack_a_zip(tmp_path: Path) -> None:
    source = tmp_path / "source" / "layout.zip"
    source.parent.mkdir()
    source.write_bytes(zip_bytes(LAYOUT))
    root = tmp_path / "root"
    root.mkdir()
    (root / "layout.zip.part").write_bytes(b"stale")  # no ranges for file://: copied from the start
    item = Download(source.as_uri(), "layout.zip", md5=hashlib.md5(source.read_bytes()).hexdigest())
    download(info_of(item), root, progress=False)
    assert (root / "layout.zip").read_bytes() == source.read_bytes()
    for name, data in LAYOUT.items():
        assert (root / name).read_bytes() == data
    missing = Download((tmp_path / "nowhere.zip").as_uri(), "nowhere.zip")
    with pytest.raises(DataError, match=r"cannot download 'file://.*nowhere\.zip'"):
        download(info_of(missing), root, progress=False)


def test_plain_files_are_not_unpacked(server, tmp_path: Path) -> None:
    data = b"MATLAB 5.0 MAT-file"
    info = info_of(served(server, data, "annos.mat"), served(server, name="layout.tar.gz"))
    files = download(info, tmp_path, progress=False)
    assert [f.name for f in files] == ["annos.mat", "layout.tar.gz"]
    assert (tmp_path / "annos.mat").read_bytes() == data and (tmp_path / "tiny" / "list.txt").exists()


def test_a_zip_member_escaping_the_root_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "evil.zip"
    archive.write_bytes(zip_bytes({"fine.txt": b"ok", "../evil.txt": b"gotcha"}))
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(DataError, match=r"member '\.\./evil\.txt' would be written outside"):
        extract(archive, root)
    assert not (tmp_path / "evil.txt").exists() and not (root / "fine.txt").exists()
    # through download too
    item = Download(archive.as_uri(), "evil.zip")
    with pytest.raises(DataError, match=r"evil\.txt"):
        download(info_of(item), root, progress=False)
    assert not (tmp_path / "evil.txt").exists()


def test_a_tar_member_escaping_the_root_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "evil.tar.gz"
    archive.write_bytes(tar_gz({"../evil.txt": b"gotcha"}))
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(DataError, match=r"evil\.txt' would be written outside"):
        extract(archive, root)
    assert not (tmp_path / "evil.txt").exists()
    damaged = tmp_path / "damaged.tgz"
    damaged.write_bytes(ARCHIVE[: len(ARCHIVE) // 2])
    with pytest.raises(DataError, match=r"cannot unpack '.*damaged\.tgz'"):
        extract(damaged, root)


def test_a_dataset_without_downloads_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(ManualDownloadRequired) as caught:
        download(info_of(manual="register at https://example.org/register"), tmp_path / "root")
    message = str(caught.value)
    assert "no public download URL" in message
    assert "register at https://example.org/register" in message and HOMEPAGE in message
    assert isinstance(caught.value, DataError) and not (tmp_path / "root").exists()


def test_download_file_names_must_stay_inside_the_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="must be a relative path inside"):
        download(info_of(Download("http://127.0.0.1:9/x", "../x.tar")), tmp_path, progress=False)


@pytest.mark.parametrize(
    ("name", "kind"),
    [("a.tar", "tar"), ("a.tar.gz", "tar"), ("A.TGZ", "tar"), ("a.tar.xz", "tar"), ("a.zip", "zip"),
     ("cars_annos.mat", None), ("train.csv", None), ("a.gz", None)],
)  # fmt: skip
def test_archive_kind(name: str, kind: str | None) -> None:
    assert archive_kind(name) == kind
