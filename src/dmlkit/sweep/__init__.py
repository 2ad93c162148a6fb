"""``dmlkit sweep``: studies over training factors on Optuna, and their reports (docs/sweeps.md)."""

from dmlkit.sweep.spec import Factor, SweepSpec, config_id, level_label, load_spec

__all__ = ["Factor", "SweepSpec", "config_id", "level_label", "load_spec"]
