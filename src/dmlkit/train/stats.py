"""Per-epoch running sums of the training statistics, part of the checkpoint so a resumed epoch reports
the same averages as an uninterrupted one."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class EpochStats:
    """Sums and counts of the step statistics of the current epoch.

    ``sums[key] / counts[key]`` is the epoch mean of a statistic over the steps where it was finite
    (statistics absent or undefined at a step are not averaged in); ``counted`` steps were taken,
    ``skipped`` were not (non-finite embeddings, loss or gradient); ``images`` and ``seconds`` give the
    throughput; ``substituted`` counts unreadable images replaced by another of their class
    (``skip_unreadable``).
    """

    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    counted: int = 0
    images: int = 0
    skipped: int = 0
    seconds: float = 0.0
    substituted: int = 0

    def add_step(self, loss: float | None, stats: dict[str, float], images: int) -> None:
        """Account one batch: its loss and statistics (``loss=None``: the step was skipped)."""
        self.images += images
        if loss is None:
            self.skipped += 1
            return
        self.counted += 1
        for key, value in (("train_loss", loss), *stats.items()):
            if math.isfinite(value):
                self.sums[key] = self.sums.get(key, 0.0) + value
                self.counts[key] = self.counts.get(key, 0) + 1

    @property
    def images_per_second(self) -> float:
        return self.images / max(self.seconds, 1e-9)

    def summary(self) -> dict[str, float]:
        """Epoch means, throughput, epoch time and skipped steps: one row of ``history.jsonl``."""
        means: dict[str, float] = {key: total / self.counts[key] for key, total in self.sums.items()}
        means.update(
            images_per_s=self.images_per_second, epoch_time_s=self.seconds, skipped_steps=self.skipped
        )
        return means

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> EpochStats:
        return cls(**state)  # a key added later (``substituted``) takes its default from older checkpoints
