"""Metric-compatible training: the cross-model loss against a Python-loop reference, the joint step with a
frozen old model behind an input adapter, and the after mode on synthetic features."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torchvision.transforms.v2 import functional as TF

from dmlkit import losses
from dmlkit.errors import ConfigError, DataError
from dmlkit.train.objective import Objective
from dmlkit.train.step import Batch
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
from dmlkit.upgrade.transform import ReverseTransform, save_transform

CPU = torch.device("cpu")


def _unit(v: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def _reference(z, r, o, labels, tau: float, hard: int | None) -> float:
    """The module docstring's formula, candidate by candidate."""
    z, r, o = ([_unit(row) for row in t.tolist()] for t in (z, r, o))
    y = labels.tolist()
    total = 0.0
    for i in range(len(y)):
        candidates = [(_dot(z[i], z[c]), y[c]) for c in range(len(y)) if c != i]
        candidates += [(_dot(r[i], o[c]), y[c]) for c in range(len(y))]
        positives = [s for s, label in candidates if label == y[i]]
        negatives = sorted((s for s, label in candidates if label != y[i]), reverse=True)
        if hard is not None:
            negatives = negatives[:hard]
        log_z = math.log(sum(math.exp(s / tau) for s in positives + negatives))
        total += -sum(s / tau - log_z for s in positives) / len(positives)
    return total / len(y)


@pytest.mark.parametrize("hard", [None, 1, 3, 50])
def test_loss_equals_the_python_loop_reference(hard: int | None) -> None:
    gen = torch.Generator().manual_seed(0)
    z, r, o = (
        torch.randn(6, 4, generator=gen),
        torch.randn(6, 3, generator=gen),
        torch.randn(6, 3, generator=gen),
    )
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    loss, stats = cross_model_contrastive_loss(z, r, o, labels, temperature=0.2, hard_negatives=hard)
    assert float(loss) == pytest.approx(_reference(z, r, o, labels, 0.2, hard), rel=1e-5)
    negatives_per_anchor = [2 * sum(int(b != a) for b in labels) for a in labels]
    expected = sum(min(n, hard) if hard else n for n in negatives_per_anchor) / 6
    assert stats["negatives"] == pytest.approx(expected)
    with_regression, _ = compatible_loss(
        z, r, o, labels, temperature=0.2, hard_negatives=hard, regression_weight=0.4
    )
    regression = sum(1 - _dot(_unit(a), _unit(b)) for a, b in zip(r.tolist(), o.tolist(), strict=True)) / 6
    assert float(with_regression) == pytest.approx(float(loss) + 0.4 * regression, rel=1e-5)


@pytest.mark.parametrize("labels", [[3, 3, 3, 3], [0, 1, 2, 3]], ids=["one-class", "own-positive-only"])
def test_loss_is_finite_without_negatives_or_other_positives(labels: list[int]) -> None:
    gen = torch.Generator().manual_seed(1)
    z, r, o = (torch.randn(4, 5, generator=gen, requires_grad=True) for _ in range(3))
    y = torch.tensor(labels)
    loss, _ = cross_model_contrastive_loss(z, r, o, y, hard_negatives=2)
    loss.backward()
    assert math.isfinite(float(loss.detach()))
    assert float(loss.detach()) == pytest.approx(
        _reference(z.detach(), r.detach(), o.detach(), y, 0.1, 2), rel=1e-5
    )
    assert all(torch.isfinite(t.grad).all() for t in (z, r, o))


def test_bad_inputs_and_options_are_named() -> None:
    z, o, y = torch.randn(4, 5), torch.randn(4, 3), torch.tensor([0, 0, 1, 1])
    with pytest.raises(ConfigError, match=r"ρ outputs \(4, 2\) but the old embeddings are \(4, 3\)"):
        cross_model_contrastive_loss(z, torch.randn(4, 2), o, y)
    with pytest.raises(ConfigError, match="hard_negatives must be a positive int or None"):
        cross_model_contrastive_loss(z, torch.randn(4, 3), o, y, hard_negatives=0)
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        compatible_step(FrozenEncoder(nn.Linear(2, 3)), CompatibleHeads(5, 3), temperature=0.0)
    with pytest.raises(DataError, match="N labels expected"):
        cross_model_contrastive_loss(z, torch.randn(4, 3), o, torch.tensor([0, 1]))


def test_input_adapter_renormalises_resizes_and_matches_channels() -> None:
    gen = torch.Generator().manual_seed(2)
    pixels = torch.rand(2, 3, 12, 12, generator=gen)
    new = Preprocessing((0.4, 0.5, 0.6), (0.2, 0.25, 0.3), 12)
    old = Preprocessing((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), (6, 8))
    as_new = (pixels - torch.tensor(new.mean).view(3, 1, 1)) / torch.tensor(new.std).view(3, 1, 1)
    expected = (TF.resize(pixels, [6, 8], antialias=True) - 0.5) / 0.5
    assert torch.allclose(InputAdapter(new, old)(as_new), expected, atol=1e-5)
    assert InputAdapter(new, new)(as_new) is as_new

    gray = Preprocessing((0.1,), (0.3,), 12)
    as_gray = (pixels[:, :1] - 0.1) / 0.3
    rgb = Preprocessing((0.2, 0.3, 0.4), (0.5, 0.5, 0.5), 12)
    out = InputAdapter(gray, rgb)(as_gray)
    for c, mean in enumerate((0.2, 0.3, 0.4)):
        assert torch.allclose(out[:, c], (pixels[:, 0] - mean) / 0.5, atol=1e-5)
    with pytest.raises(ConfigError, match="std must be positive"):
        Preprocessing((0.1,), (0.0,), 12)


def test_frozen_encoder_stays_frozen_and_in_eval_mode() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5))
    encoder = FrozenEncoder(model)
    encoder.train()
    assert not model.training and not model[1].training
    assert not any(p.requires_grad for p in model.parameters())
    x = torch.randn(5, 4, dtype=torch.float64)
    model.double()
    out = encoder(x)
    assert out.dtype == torch.float32 and not out.requires_grad
    assert torch.equal(out, encoder(x))  # no dropout


def _latent_data(seed: int, n: int, classes: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, 8, generator=torch.Generator().manual_seed(50)) * 2
    labels = torch.randint(0, classes, (n,), generator=gen)
    return centres[labels] + 0.6 * torch.randn(n, 8, generator=gen), labels


def test_joint_step_trains_the_new_model_and_heads_but_not_the_old_model() -> None:
    torch.manual_seed(0)
    old_model, model = nn.Linear(8, 5), nn.Linear(8, 4)
    old_weights = old_model.weight.detach().clone()
    heads = CompatibleHeads(4, 5, hidden=16)
    objective = Objective(losses.build("multisimilarity"))
    step = compatible_step(FrozenEncoder(old_model), heads, weight=2.0, hard_negatives=8)(
        model, objective, CPU, "none"
    )
    assert isinstance(step, CompatibleStep)
    assert set(step.state_dict()) == {f"heads.{key}" for key in heads.state_dict()}  # no old model in it
    parameters = [*model.parameters(), *step.extra_parameters()]
    assert len(parameters) == 2 + len(list(heads.parameters()))
    optimizer = torch.optim.Adam(parameters, lr=0.01)
    x, y = _latent_data(0, 48)
    batch = Batch(x, y, torch.arange(len(y)))
    values = []
    for _ in range(20):
        out = step(batch)
        values.append(out.stats["compatible"])
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    assert values[-1] < 0.7 * values[0]
    with torch.no_grad():
        objective_value, _ = objective(model(x), y)
        z, r = heads(model(x))
        term, _ = compatible_loss(z, r, old_model(x), y, hard_negatives=8)
    final = step(batch)
    assert float(final.loss.detach()) == pytest.approx(float(objective_value) + 2.0 * float(term), rel=1e-5)
    assert torch.equal(old_model.weight, old_weights)


def test_after_mode_makes_old_and_new_space_similarities_comparable() -> None:
    latent, labels = _latent_data(1, 256)
    new_map = torch.randn(8, 10, generator=torch.Generator().manual_seed(60))
    old_map = torch.randn(8, 6, generator=torch.Generator().manual_seed(61))
    heads, history = train_compatible_after(
        latent @ new_map, latent @ old_map, labels, hidden=32, epochs=12, batch_size=64, lr=3e-3
    )
    assert history[-1]["loss"] < 0.7 * history[0]["loss"]
    test_latent, test_labels = _latent_data(2, 120)
    with torch.no_grad():
        z, r = heads(test_latent @ new_map)
    z, r = nn.functional.normalize(z, dim=1), nn.functional.normalize(r, dim=1)
    o = nn.functional.normalize(test_latent @ old_map, dim=1)
    same = test_labels[:, None] == test_labels[None, :]
    other = ~torch.eye(len(test_labels), dtype=torch.bool)
    cross, new_space = r @ o.T, z @ z.T
    # a query's old-space positives outscore its negatives of either space, and so do its new-space ones
    for positives in (cross[same], new_space[same & other]):
        for negatives in (cross[~same], new_space[~same]):
            assert float(positives.mean()) > float(negatives.mean()) + 0.3


def test_heads_save_and_load_and_refuse_other_files(tmp_path) -> None:
    heads = CompatibleHeads(6, 4, hidden=12, depth=3, new_head=True, layer_norm=True)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(0.1 * torch.randn_like(p))  # ψ's last layer starts at zero: make it matter
    save_heads(tmp_path / "heads.pt", heads, {"mode": "after"})
    loaded, meta = load_heads(tmp_path / "heads.pt")
    assert meta == {"mode": "after"} and loaded.config() == heads.config()
    x = torch.randn(5, 6)
    heads.eval()
    for a, b in zip(loaded(x), heads(x), strict=True):
        assert torch.equal(a, b)
    save_transform(tmp_path / "rho.pt", ReverseTransform(6, 4))
    with pytest.raises(DataError, match=r"rho\.pt holds a reverse_transform, not a compatible_heads"):
        load_heads(tmp_path / "rho.pt")


@pytest.mark.slow  # a whole (1-epoch) training run: 2-5 s
def test_trainer_runs_the_joint_step_with_an_adapted_old_model(tiny_config) -> None:
    """Through ``Trainer(step=...)``: the old model (RGB, 24 px) sees the tiny gray 16 px batches through
    the adapter, the heads train and are checkpointed, the old model is not."""
    from dmlkit import data, models
    from dmlkit.train import checkpoint as ckpt
    from dmlkit.train.loop import Trainer

    config = tiny_config(name="compatible", epochs=1)
    old_model = models.build_model(**{**config.model.model_kwargs(), "embedding_size": 8}, image_size=24)
    old_weights = {k: v.clone() for k, v in old_model.state_dict().items()}
    spec = data.build("synthetic", **config.data.dataset.args).spec()
    adapter = InputAdapter(Preprocessing.from_spec(spec), Preprocessing((0.5,) * 3, (0.25,) * 3, 24))
    heads = CompatibleHeads(16, 8, hidden=8)
    before = {k: v.clone() for k, v in heads.state_dict().items()}
    result = Trainer(config, step=compatible_step(FrozenEncoder(old_model, adapter), heads)).run()
    state = ckpt.load(result.run_dir / "last.pt")
    assert set(state["step"]) == {f"heads.{key}" for key in heads.state_dict()}
    assert all(not torch.equal(state["step"][f"heads.{k}"], v) for k, v in before.items() if "weight" in k)
    assert all(torch.equal(v, old_weights[k]) for k, v in old_model.state_dict().items())
    history = (result.run_dir / "history.jsonl").read_text()
    assert '"compatible/contrastive"' in history and '"compatible/regression"' in history
