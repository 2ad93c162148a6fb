"""Fixtures of the data tests: the shared clothing photos (skipped where they are absent)."""

from __future__ import annotations

from pathlib import Path

import pytest

CLOTHING = Path(__file__).resolve().parents[3] / "shared" / "data" / "clothing"


@pytest.fixture(scope="session")
def clothing_paths() -> list[str]:
    """The clothing JPEGs (real photos, ≈ 176 × 215), sorted; the test is skipped without them."""
    found = sorted(str(p) for p in (CLOTHING / "images").glob("*.jpg"))
    if not found:
        pytest.skip("shared clothing data not present")
    return found
