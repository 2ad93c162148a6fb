"""Atomic checkpoints under ``kill -9``: whenever a writer dies, the previous checkpoint still loads.

A writer subprocess saves checkpoint after checkpoint through :meth:`RunDirectory.save` (``save_atomic``:
temporary file, fsync, rename); the test kills it with SIGKILL at a random moment, then loads ``last.pt``
with ``weights_only=True`` and checks that it is one whole checkpoint (its tensor agrees with its version
number). Leftover temporary files prove that some kills landed in the middle of a write.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from dmlkit.train import checkpoint as ckpt

WRITER = textwrap.dedent(
    """
    import sys
    import torch
    from dmlkit.train.run_dir import RunDirectory

    directory = RunDirectory(sys.argv[1])
    version = 0
    while True:
        weights = torch.full((1_000_000,), float(version))  # 4 MB: a write takes a while
        state = {"model": {"w": weights}, "model_config": {}, "version": version}
        directory.save(state)
        if version == 0:
            print("ready", flush=True)
        version += 1
    """
)


def _kill_writer_at_random(run_dir: Path, rng: random.Random) -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(run_dir)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.3))
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)


def _assert_whole(path: Path) -> int:
    state = ckpt.load(path)
    version = int(state["version"])
    weights = state["model"]["w"]
    assert weights.shape == (1_000_000,)
    assert torch.equal(weights, torch.full_like(weights, float(version))), f"checkpoint {version} is mixed"
    return version


@pytest.mark.slow
def test_previous_checkpoint_always_loads_after_kill_9(tmp_path: Path) -> None:
    rng = random.Random(12)
    trials, interrupted_writes, versions = 60, 0, []
    for trial in range(trials):
        run_dir = tmp_path / f"trial{trial}"
        _kill_writer_at_random(run_dir, rng)
        versions.append(_assert_whole(run_dir / "last.pt"))
        interrupted_writes += any(run_dir.glob(".last.pt.*.tmp"))
    print(f"{trials} kills: {interrupted_writes} mid-write, {len(set(versions))} distinct checkpoints loaded")
    # The kills must have hit writes in progress, and at different points of the stream.
    assert interrupted_writes >= trials // 10, f"only {interrupted_writes} kills interrupted a write"
    assert len(set(versions)) > 5, versions


def test_killed_writer_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    """The default-suite version: a few kills, each followed by a load."""
    rng = random.Random(3)
    for trial in range(3):
        _kill_writer_at_random(tmp_path / f"trial{trial}", rng)
        _assert_whole(tmp_path / f"trial{trial}" / "last.pt")
