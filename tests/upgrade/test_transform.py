"""The reverse transformation ρ: architecture, loss against hand computations, training, files."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dmlkit.errors import ConfigError, DataError
from dmlkit.upgrade.transform import (
    ReverseTransform,
    fit_features,
    load_transform,
    save_transform,
    train_transform,
    transform_loss,
)


def _linears(module: nn.Module) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for m in module.modules() if isinstance(m, nn.Linear)]


def test_depth_and_width_are_as_configured() -> None:
    assert _linears(ReverseTransform(8, 5, hidden=7, depth=3)) == [(8, 7), (7, 7), (7, 5)]
    assert _linears(ReverseTransform(8, 5, hidden=7, depth=1)) == [(8, 5)]
    normed = ReverseTransform(8, 5, hidden=7, depth=3, layer_norm=True)
    assert sum(isinstance(m, nn.LayerNorm) for m in normed.modules()) == 2
    assert sum(isinstance(m, nn.ReLU) for m in normed.modules()) == 2
    assert normed.config() == {
        "in_dim": 8, "out_dim": 5, "hidden": 7, "depth": 3, "layer_norm": True, "residual": False
    }  # fmt: skip
    assert _linears(ReverseTransform(**normed.config())) == _linears(normed)
    with pytest.raises(ConfigError, match="depth must be a positive int, got 0"):
        ReverseTransform(8, 5, depth=0)
    with pytest.raises(ConfigError, match="in_dim == out_dim, got 8 and 5"):
        ReverseTransform(8, 5, residual=True)


def test_a_residual_transform_starts_as_the_identity() -> None:
    x = torch.randn(4, 6)
    assert torch.equal(ReverseTransform(6, 6, hidden=9, depth=2, residual=True)(x), x)


def _cos(a: list[float], b: list[float]) -> float:
    dot = sum(u * v for u, v in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(u * u for u in a)) * math.sqrt(sum(v * v for v in b)))


def test_regression_part_is_one_minus_cosine() -> None:
    gen = torch.Generator().manual_seed(0)
    mapped, old = torch.randn(5, 3, generator=gen), torch.randn(5, 3, generator=gen)
    labels = torch.tensor([0, 0, 1, 1, 2])
    loss, stats = transform_loss(mapped, old, labels, contrastive_weight=0.0)
    hand = sum(1 - _cos(mapped[i].tolist(), old[i].tolist()) for i in range(5)) / 5
    assert float(loss) == pytest.approx(hand, rel=1e-6)
    assert stats["regression"] == pytest.approx(hand, rel=1e-6)


def test_contrastive_part_is_supervised_infonce() -> None:
    gen = torch.Generator().manual_seed(1)
    mapped, old = torch.randn(6, 4, generator=gen), torch.randn(6, 4, generator=gen)
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    tau = 0.3
    hand = 0.0
    for i in range(6):
        logits = [_cos(mapped[i].tolist(), old[j].tolist()) / tau for j in range(6)]
        log_z = math.log(sum(math.exp(v) for v in logits))
        positives = [j for j in range(6) if labels[j] == labels[i]]  # its own old embedding included
        hand += -sum(logits[p] - log_z for p in positives) / len(positives)
    hand /= 6
    regression_only, _ = transform_loss(mapped, old, labels, contrastive_weight=0.0)
    loss, stats = transform_loss(mapped, old, labels, contrastive_weight=2.5, temperature=tau)
    assert stats["contrastive"] == pytest.approx(hand, rel=1e-5)
    assert float(loss) == pytest.approx(float(regression_only) + 2.5 * hand, rel=1e-5)


def _rotated(seed: int, n: int, dim: int = 12, classes: int = 6) -> tuple[torch.Tensor, ...]:
    """New features of clustered classes; old = a fixed random rotation of them plus noise."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(100))
    rotation, _ = torch.linalg.qr(torch.randn(dim, dim, generator=torch.Generator().manual_seed(101)))
    labels = torch.randint(0, classes, (n,), generator=gen)
    new = centres[labels] + 0.5 * torch.randn(n, dim, generator=gen)
    old = new @ rotation + 0.05 * torch.randn(n, dim, generator=gen)
    return new, old, labels


def test_training_maps_new_features_onto_old_ones() -> None:
    new, old, labels = _rotated(0, 512)
    rho, history = train_transform(new, old, labels, hidden=64, depth=2, epochs=25, batch_size=64, lr=3e-3)
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert [row["epoch"] for row in history] == [float(e) for e in range(1, 26)]
    test_new, test_old, _ = _rotated(1, 200)
    with torch.no_grad():
        cosine = nn.functional.cosine_similarity(rho(test_new), test_old, dim=1)
    assert float(cosine.mean()) > 0.9
    assert not rho.training


def test_training_is_seeded_and_leaves_the_global_rng_alone() -> None:
    new, old, labels = _rotated(2, 64)
    torch.manual_seed(5)
    before = torch.rand(1)
    torch.manual_seed(5)
    first, _ = train_transform(new, old, labels, hidden=8, epochs=2, batch_size=16, seed=3)
    assert torch.equal(torch.rand(1), before)
    second, _ = train_transform(new, old, labels, hidden=8, epochs=2, batch_size=16, seed=3)
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_fit_features_checks_its_inputs() -> None:
    rho = ReverseTransform(3, 3, depth=1)
    with pytest.raises(DataError, match=r"same non-zero length, got \[4, 5\]"):
        fit_features(rho, lambda m, a, b: (a.sum(), {}), [torch.zeros(4, 3), torch.zeros(5)], epochs=1,
                     batch_size=2, lr=0.1)  # fmt: skip
    with pytest.raises(ConfigError, match="batch_size must be a positive int"):
        fit_features(rho, lambda m, a: (a.sum(), {}), [torch.zeros(4, 3)], epochs=1, batch_size=0, lr=0.1)


def test_save_and_load_give_identical_outputs(tmp_path) -> None:
    rho = ReverseTransform(6, 4, hidden=10, depth=3, layer_norm=True)
    path = tmp_path / "rho.pt"
    save_transform(path, rho, {"old": "runs/old/best.pt", "epochs": 3, "scores": [0.5, 0.25]})
    loaded, meta = load_transform(path)
    assert meta == {"old": "runs/old/best.pt", "epochs": 3, "scores": [0.5, 0.25]}
    x = torch.randn(7, 6)
    rho.eval()
    assert torch.equal(loaded(x), rho(x))
    assert loaded.config() == rho.config()


def test_loading_something_else_names_the_file(tmp_path) -> None:
    path = tmp_path / "random.pt"
    torch.save({"weights": torch.randn(3), "epoch": 4}, path)
    with pytest.raises(DataError, match=r"random\.pt is not a dmlkit reverse transform file"):
        load_transform(path)
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(DataError, match=r"notes\.pt"):
        load_transform(text)


def test_meta_must_be_plain_values(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"meta\.when \(object\) cannot be saved"):
        save_transform(tmp_path / "x.pt", ReverseTransform(2, 2, depth=1), {"when": object()})
    assert not (tmp_path / "x.pt").exists()


def test_fit_features_class_balanced_batches() -> None:
    """With samples_per_class K every batch holds K items of each of its classes (the m_per_class sampler),
    and an epoch still trains the module."""
    from dmlkit.upgrade.transform import fit_features

    labels = torch.arange(12).repeat_interleave(6)
    features = torch.randn(72, 4)
    seen: list[torch.Tensor] = []

    def loss_fn(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict]:
        seen.append(y.clone())
        return module(x).pow(2).mean(), {}

    module = torch.nn.Linear(4, 2)
    history = fit_features(
        module, loss_fn, [features, labels], epochs=2, batch_size=12, lr=0.1, class_labels=labels,
        samples_per_class=3,
    )  # fmt: skip
    assert len(history) == 2 and history[1]["loss"] < history[0]["loss"]
    for batch in seen:
        _, counts = torch.unique(batch, return_counts=True)
        assert len(batch) == 12 and counts.tolist() == [3, 3, 3, 3]
