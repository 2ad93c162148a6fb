"""dmlkit.files: atomic writes with ordinary permissions, nothing left behind on failure."""

from __future__ import annotations

import csv
import os
import stat

import pytest
import torch

from dmlkit.files import write_atomic, write_text_atomic
from dmlkit.train.checkpoint import save_atomic


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


@pytest.mark.skipif(not hasattr(os, "fchmod"), reason="POSIX permissions")
def test_files_get_the_umask_permissions_not_mkstemps_private_ones(tmp_path, umask_027):
    save_atomic({"w": torch.ones(2)}, tmp_path / "run" / "last.pt")
    write_text_atomic(tmp_path / "note.txt", "hello")
    for path in (tmp_path / "run" / "last.pt", tmp_path / "note.txt"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o640  # 0666 & ~0027
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["w"].tolist() == [1.0, 1.0]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "index.json"
    write_text_atomic(target, "old")

    def fail(handle):
        handle.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomic(target, fail)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.json"]


def test_text_writer_takes_the_csv_module(tmp_path):
    target = tmp_path / "out.csv"

    def rows(handle):
        writer = csv.writer(handle)
        writer.writerows([["path", "label"], ["a,b.jpg", "é"]])

    write_text_atomic(target, rows, newline="")
    assert target.read_bytes() == 'path,label\r\n"a,b.jpg",é\r\n'.encode()
