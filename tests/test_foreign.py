"""Another library's loss and miner named in a configuration (``pml:ContrastiveLoss``): checked before
anything loads, built with the run's class count and embedding size, and equal to PML's own objects."""

from __future__ import annotations

import pytest
import torch
from pytorch_metric_learning import distances as pml_distances
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners

from dmlkit import foreign
from dmlkit.cli import main
from dmlkit.config.loading import make_config
from dmlkit.errors import ConfigError
from dmlkit.train.objective import build_objective

DATA = {
    "dataset": {"name": "synthetic", "args": {"num_classes": 12, "samples_per_class": 8, "image_size": 16}},
    "batch_size": 16, "samples_per_class": 4, "val_fraction": 0.25, "num_workers": 0,
}  # fmt: skip


def _config(objective: dict, **sections: dict):
    data = {"data": DATA, "model": {"backbone": "small_cnn", "embedding_size": 8}, "objective": objective}
    return make_config({**data, **sections}, source="test")


def test_a_pml_loss_and_miner_equal_pmls_own_objects():
    config = _config(
        {
            "loss": {
                "name": "pml:ContrastiveLoss",
                "args": {"pos_margin": 0.1, "distance": "pml:CosineSimilarity"},
            },
            "miner": {"name": "pml:MultiSimilarityMiner", "args": {"epsilon": 0.2}},
        }
    )
    objective = build_objective(config, num_classes=9, embedding_size=8)
    assert isinstance(objective.loss, pml_losses.ContrastiveLoss)
    assert isinstance(objective.loss.distance, pml_distances.CosineSimilarity)
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(32, 8, generator=generator, requires_grad=True)
    labels = torch.arange(8).repeat_interleave(4)
    value, _ = objective(embeddings, labels)
    miner = pml_miners.MultiSimilarityMiner(epsilon=0.2)
    loss = pml_losses.ContrastiveLoss(pos_margin=0.1, distance=pml_distances.CosineSimilarity())
    expected = loss(embeddings, labels, miner(embeddings, labels))
    assert value.item() == pytest.approx(expected.item(), rel=1e-6) and value.item() > 0


def test_class_count_and_embedding_size_come_from_the_run():
    config = _config({"loss": {"name": "pml:ProxyAnchorLoss", "args": {"margin": 0.2}}})
    loss = build_objective(config, num_classes=9, embedding_size=8).loss
    assert isinstance(loss, pml_losses.ProxyAnchorLoss) and tuple(loss.proxies.shape) == (9, 8)


def test_a_dmlkit_miner_feeds_a_pml_loss_and_a_pml_miner_a_dmlkit_loss():
    for objective in (
        {"loss": "pml:TripletMarginLoss", "miner": "semihard"},
        {"loss": "triplet", "miner": "pml:TripletMarginMiner"},
    ):
        built = build_objective(_config(objective), num_classes=9, embedding_size=8)
        embeddings = torch.randn(32, 8, requires_grad=True)
        value, _ = built(embeddings, torch.arange(8).repeat_interleave(4))
        value.backward()
        assert torch.isfinite(value) and embeddings.grad is not None


@pytest.mark.parametrize(
    ("objective", "message"),
    [
        ({"loss": "pml:ContrastivLoss"}, r"no class 'ContrastivLoss' in pytorch_metric_learning.losses"),
        (
            {"loss": {"name": "pml:ContrastiveLoss", "args": {"pos_margn": 0.1}}},
            r"no argument 'pos_margn'.*pos_margin",
        ),
        ({"loss": "no_such_package.losses:Loss"}, r"cannot import no_such_package.losses"),
        ({"loss": "pml:contrastive loss"}, r"after ':' comes a class name"),
        ({"loss": "pml:ContrastiveLoss", "args": {}, "miner": "pml:NoMiner"}, r"no class 'NoMiner'"),
        (
            {
                "loss": "triplet",
                "miner": "pml:TripletMarginMiner",
                "miner_schedule": "linear:start=0.5,end=0.1",
            },
            r"another library's miner",
        ),
        (
            {"loss": {"name": "pml:ContrastiveLoss", "args": {"distance": "pml:NoDistance"}}},
            r"no class 'NoDistance'",
        ),
    ],
)
def test_bad_names_and_keys_fail_before_anything_loads(objective, message):
    objective = {k: v for k, v in objective.items() if k != "args"}
    with pytest.raises(ConfigError, match=message):
        _config(objective)


def test_a_bad_value_fails_when_built_naming_the_component():
    config = _config({"loss": {"name": "pml:ContrastiveLoss", "args": {"reducer": 3}}})
    with pytest.raises(ConfigError, match="pml:ContrastiveLoss"):
        build_objective(config, num_classes=9, embedding_size=8)


def test_names_other_than_prefixed_ones_are_not_foreign():
    assert foreign.is_foreign("pml:ContrastiveLoss") and foreign.is_foreign("pkg.mod:Cls")
    assert not foreign.is_foreign("contrastive") and not foreign.is_foreign("timm:resnet18")


def test_train_from_the_command_line_with_a_pml_loss(tmp_path):
    argv = [
        "train", "--dataset", "synthetic",
        "--dataset-args", "{num_classes: 12, samples_per_class: 8, image_size: 16}",
        "--epochs", "1", "--backbone", "small_cnn", "--embedding-size", "8", "--batch-size", "16",
        "--samples-per-class", "4", "--loss", "pml:MultiSimilarityLoss",
        "--miner", "pml:MultiSimilarityMiner",
        "--output-dir", str(tmp_path), "--no-progress", "--device", "cpu", "--num-workers", "0",
    ]  # fmt: skip
    assert main(argv) == 0
    (run,) = tmp_path.iterdir()
    assert run.name.startswith("synthetic-pml_MultiSimilarityLoss-") and (run / "best.pt").is_file()


def test_a_pml_loss_uses_the_cross_batch_memory():
    config = _config(
        {"loss": "pml:ContrastiveLoss"}, memory={"xbm_size": 64, "xbm_start": 0, "xbm_weight": 1.0}
    )
    objective = build_objective(config, num_classes=9, embedding_size=8, train_size=96)
    labels = torch.arange(8).repeat_interleave(4)
    first = torch.nn.functional.normalize(torch.randn(32, 8), dim=1)
    objective(first, labels, torch.arange(32))  # enqueued after use
    embeddings = torch.nn.functional.normalize(torch.randn(32, 8), dim=1).requires_grad_()
    value, _ = objective(embeddings, labels, torch.arange(32, 64))
    loss = pml_losses.ContrastiveLoss()
    # ref_labels a copy: PML drops the diagonal when `ref_labels is labels`, as if the batch were its own
    # reference set; the memory holds other items (other dataset indices) that happen to share labels
    expected = loss(embeddings, labels) + loss(embeddings, labels, ref_emb=first, ref_labels=labels.clone())
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
