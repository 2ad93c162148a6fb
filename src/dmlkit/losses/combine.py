"""Combinators: weighted sums of losses, each optionally fed by its own miner."""

from __future__ import annotations
