"""Model upgrades: replace an embedding model while its gallery is re-embedded ("backfilled").

- :mod:`~dmlkit.upgrade.rank_merge`: search the old part of a mixed gallery with an old-space query and the
  new part with a new-space query, merge the two top-k lists by distance (O(n·k));
- :mod:`~dmlkit.upgrade.simulate`: the backfill simulator (methods ``old``, ``new-naive``, ``bct``,
  ``rank-merge``, ``rank-merge+transform``, ``compatible``; AUC, relative gain, negative flips, cost);
- :mod:`~dmlkit.upgrade.bct`: backward-compatible training (Shen et al., CVPR 2020) with old class prototypes;
- :mod:`~dmlkit.upgrade.transform`: the reverse transformation ρ from the new space to the old one;
- :mod:`~dmlkit.upgrade.compatible`: metric-compatible training, a cross-model contrastive loss (Seo et al.,
  arXiv 2301.03767), joint with the new model or after it;
- :mod:`~dmlkit.upgrade.frozen`: the old model inside the new model's training step.

docs/upgrades.md explains the workflow and every formula. The simulator's entry point is
:func:`dmlkit.upgrade.simulate.simulate` (not re-exported here: the name is its module's).
"""

from dmlkit.upgrade.bct import BCTStep, bct_step, class_prototypes, influence_loss
from dmlkit.upgrade.compatible import (
    CompatibleHeads,
    CompatibleStep,
    compatible_loss,
    compatible_step,
    cross_model_contrastive_loss,
    load_heads,
    save_heads,
    train_compatible_after,
)
from dmlkit.upgrade.frozen import FrozenEncoder, InputAdapter, Preprocessing
from dmlkit.upgrade.rank_merge import merge_topk, merged_search, mixed_gallery
from dmlkit.upgrade.simulate import (
    BackfillInputs,
    BackfillReport,
    Side,
    auc,
    backfill_order,
    negative_flip_rate,
    relative_gain,
)
from dmlkit.upgrade.transform import ReverseTransform, load_transform, save_transform, train_transform

__all__ = [
    "BCTStep",
    "BackfillInputs",
    "BackfillReport",
    "CompatibleHeads",
    "CompatibleStep",
    "FrozenEncoder",
    "InputAdapter",
    "Preprocessing",
    "ReverseTransform",
    "Side",
    "auc",
    "backfill_order",
    "bct_step",
    "class_prototypes",
    "compatible_loss",
    "compatible_step",
    "cross_model_contrastive_loss",
    "influence_loss",
    "load_heads",
    "load_transform",
    "merge_topk",
    "merged_search",
    "mixed_gallery",
    "negative_flip_rate",
    "relative_gain",
    "save_heads",
    "save_transform",
    "train_compatible_after",
    "train_transform",
]
