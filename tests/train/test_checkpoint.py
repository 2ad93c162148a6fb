"""Reading checkpoints and weight files: weights only, never code; every failure one line naming the file."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
import torch

from dmlkit.errors import DataError
from dmlkit.models.backbones import read_state_dict
from dmlkit.train import checkpoint as ckpt


def _state(tag: float) -> dict:
    return {"model": {"w": torch.full((2,), tag)}, "model_config": {}}


def test_a_run_folder_means_its_best_checkpoint(tmp_path: Path) -> None:
    ckpt.save_atomic(_state(1.0), tmp_path / "best.pt")
    ckpt.save_atomic(_state(2.0), tmp_path / "last.pt")
    assert ckpt.checkpoint_file(tmp_path) == tmp_path / "best.pt"
    assert ckpt.load(tmp_path)["model"]["w"][0] == 1.0
    assert ckpt.load(tmp_path / "last.pt")["model"]["w"][0] == 2.0


def test_a_run_folder_without_best_checkpoint_says_what_is_there(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=re.escape(f"{tmp_path} is a folder without a checkpoint")):
        ckpt.checkpoint_file(tmp_path)
    ckpt.save_atomic(_state(2.0), tmp_path / "last.pt")
    expected = (
        f"run folder {re.escape(str(tmp_path))} has no best\\.pt .*{re.escape(str(tmp_path / 'last.pt'))}"
    )
    with pytest.raises(DataError, match=expected):
        ckpt.load(tmp_path)
    with pytest.raises(DataError, match=r"checkpoint not found: .*absent\.pt"):
        ckpt.load(tmp_path / "absent.pt")


def _with_objects(path: Path) -> None:
    torch.save({"model": {}, "model_config": {}, "args": argparse.Namespace(lr=0.1)}, path)


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (_with_objects, ["objects other than tensors", "argparse.Namespace", "will not load it"]),
        (lambda p: p.write_bytes(b""), ["is an empty file"]),
        (lambda p: p.write_bytes(b"hello"), ["is not a PyTorch file"]),
        (lambda p: p.write_text("a: 1\nb: 2\n"), ["is not a PyTorch file"]),
    ],
    ids=["objects", "empty", "bytes", "text"],
)
def test_unreadable_files_are_one_line_naming_the_file(tmp_path: Path, make, words) -> None:
    path = tmp_path / "file.pt"
    make(path)
    for load, what in ((ckpt.load, "checkpoint"), (read_state_dict, "pretrained weights")):
        with pytest.raises(DataError) as err:
            load(path)
        message = str(err.value)
        assert message.startswith(f"{what} {path} ") and "\n" not in message, message
        assert "weights_only" not in message and all(word in message for word in words), message


def test_a_truncated_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    ckpt.save_atomic({"model": {"w": torch.zeros(1000)}, "model_config": {}}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=re.escape(f"checkpoint {path} is truncated or corrupted")) as err:
        ckpt.load(path)
    assert "\n" not in str(err.value) and "enforce fail" not in str(err.value)


def test_other_torch_files_are_not_dmlkit_checkpoints(tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    torch.save(torch.zeros(2), path)
    with pytest.raises(DataError, match=r"not a dmlkit checkpoint .*Tensor"):
        ckpt.load(path)
    torch.save({"model": {}}, path)
    with pytest.raises(DataError, match=r"not a dmlkit checkpoint .*'model_config'"):
        ckpt.load(path)
