"""The README's main job: `dmlkit train` with no arguments clearly improves zero-shot retrieval (slow)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_default_training_clearly_improves_test_metrics(tmp_path) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "dmlkit", "train", "--no-progress", "--name", "default"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    results = json.loads((tmp_path / "runs" / "default" / "results.json").read_text())
    before, after = results["test_before"], results["test_after"]
    assert set(before) == {"recall@1", "recall@2", "recall@4", "recall@8", "map@r", "nmi"}
    assert after["recall@1"] >= before["recall@1"] + 0.3
    assert after["map@r"] >= 3 * before["map@r"]
    assert after["nmi"] >= before["nmi"] + 0.15
    for name in before:
        assert after[name] > before[name], name
    assert "before" in completed.stdout and "after" in completed.stdout
