"""Ranking- and histogram-based losses (list-wise objectives over the distance ranking)."""

from __future__ import annotations
