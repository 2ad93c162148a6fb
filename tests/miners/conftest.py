"""Shared fixtures for these tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    # The inputs here are tiny: intra-op threads only add scheduling overhead (5x slower on a busy
    # 2-core machine). Restored afterwards so other test areas keep their setting.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
