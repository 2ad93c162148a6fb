"""Backward-compatible training: prototypes, influence loss and the BCT step, against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dmlkit import losses
from dmlkit.errors import ConfigError, DataError
from dmlkit.train.objective import Objective
from dmlkit.train.step import Batch, TrainingStep
from dmlkit.upgrade.bct import BCTStep, bct_step, class_prototypes, influence_loss

CPU = torch.device("cpu")


def test_prototypes_are_the_normalised_class_means() -> None:
    gen = torch.Generator().manual_seed(0)
    embeddings = torch.randn(20, 5, generator=gen)
    labels = torch.tensor([0, 1, 2, 3] * 5)[torch.randperm(20, generator=gen)]
    got = class_prototypes(embeddings, labels, 4)
    for c in range(4):
        rows = [embeddings[i] for i in range(20) if int(labels[i]) == c]
        mean = [sum(float(r[j]) for r in rows) / len(rows) for j in range(5)]
        norm = math.sqrt(sum(v * v for v in mean))
        assert got[c].tolist() == pytest.approx([v / norm for v in mean], abs=1e-6)


def test_a_class_without_items_or_out_of_range_is_named() -> None:
    embeddings = torch.randn(4, 3)
    with pytest.raises(DataError, match="class code 2 has no item"):
        class_prototypes(embeddings, torch.tensor([0, 1, 3, 3]), 4)
    with pytest.raises(DataError, match="class code 7 is outside"):
        class_prototypes(embeddings, torch.tensor([0, 1, 7, 3]), 4)


def _hand_influence(new: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor, scale: float) -> float:
    """Cosine logits built element by element, then the mean negative log-softmax of the true class."""
    total = 0.0
    for i in range(new.shape[0]):
        logits = []
        for c in range(classifier.shape[0]):
            dot = sum(float(new[i, j]) * float(classifier[c, j]) for j in range(new.shape[1]))
            logits.append(scale * dot / (float(new[i].norm()) * float(classifier[c].norm())))
        log_z = math.log(sum(math.exp(v) for v in logits))
        total += log_z - logits[int(labels[i])]
    return total / new.shape[0]


def test_influence_loss_is_cross_entropy_of_scaled_cosine_logits() -> None:
    gen = torch.Generator().manual_seed(1)
    new, classifier = torch.randn(6, 4, generator=gen), torch.randn(3, 4, generator=gen) * 5
    labels = torch.tensor([0, 2, 1, 1, 0, 2])
    got = influence_loss(new, labels, classifier, scale=7.0)
    assert float(got) == pytest.approx(_hand_influence(new, labels, classifier, 7.0), rel=1e-5)
    logits = (
        7.0 * (new / new.norm(dim=1, keepdim=True)) @ (classifier / classifier.norm(dim=1, keepdim=True)).T
    )
    assert float(got) == pytest.approx(float(nn.functional.cross_entropy(logits, labels)), rel=1e-5)


def test_dimension_mismatch_names_both_sizes() -> None:
    with pytest.raises(ConfigError, match=r"new model embeds in 4 dimensions.* in 6"):
        influence_loss(torch.randn(3, 4), torch.tensor([0, 1, 0]), torch.randn(2, 6))
    model = nn.Linear(3, 4)
    model.embedding_size = 4  # type: ignore[assignment]
    with pytest.raises(ConfigError, match=r"embeds in 4 dimensions.* in 8"):
        bct_step(torch.randn(5, 8))(model, _objective(), CPU, "none")


def test_bad_options_are_refused_before_training() -> None:
    with pytest.raises(ConfigError, match="influence weight"):
        bct_step(torch.randn(2, 4), weight=-1.0)
    with pytest.raises(ConfigError, match="scale"):
        bct_step(torch.randn(2, 4), scale=0.0)
    with pytest.raises(DataError, match="class code 5 has no row"):
        influence_loss(torch.randn(2, 4), torch.tensor([0, 5]), torch.randn(3, 4))


def _objective() -> Objective:
    return Objective(losses.build("multisimilarity"))


def _clusters(
    seed: int, classes: int = 4, per_class: int = 8, dim: int = 6
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=gen) * 3
    labels = torch.arange(classes).repeat_interleave(per_class)
    return centres[labels] + 0.3 * torch.randn(len(labels), dim, generator=gen), labels


def test_step_adds_exactly_weight_times_influence() -> None:
    torch.manual_seed(0)
    model, classifier = nn.Linear(6, 4), torch.randn(4, 4)
    step = bct_step(classifier, weight=0.7, scale=5.0)(model, _objective(), CPU, "none")
    assert isinstance(step, TrainingStep)
    x, y = _clusters(0)
    out = step(Batch(x, y, torch.arange(len(y))))
    with torch.no_grad():
        emb = model(x)
    objective_value, objective_stats = _objective()(emb, y, torch.arange(len(y)))
    influence = _hand_influence(emb, y, classifier, 5.0)
    assert float(out.loss.detach()) == pytest.approx(float(objective_value) + 0.7 * influence, rel=1e-5)
    assert out.stats["influence"] == pytest.approx(influence, rel=1e-5)
    assert set(objective_stats) < set(out.stats)  # the objective's statistics are kept


def test_influence_loss_falls_when_training() -> None:
    torch.manual_seed(0)
    x, y = _clusters(3)
    old = nn.Linear(6, 4)  # the "old model": prototypes of its embeddings are the classifier
    with torch.no_grad():
        classifier = class_prototypes(old(x), y, 4)
    model = nn.Linear(6, 4)
    step = BCTStep(model, _objective(), CPU, "none", classifier=classifier, weight=1.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    values = []
    for _ in range(50):
        out = step(Batch(x, y, torch.arange(len(y))))
        values.append(out.stats["influence"])
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    assert values[-1] < 0.5 * values[0]


def test_state_dict_round_trips_the_classifier() -> None:
    classifier = torch.randn(5, 4)
    step = BCTStep(nn.Linear(3, 4), _objective(), CPU, "none", classifier=classifier)
    state = step.state_dict()
    assert set(state) == {"classifier"}  # the model and objective are not the step's to save
    other = BCTStep(nn.Linear(3, 4), _objective(), CPU, "none", classifier=torch.zeros(5, 4))
    other.load_state_dict(state)
    assert torch.equal(other.classifier, classifier)
    assert list(step.extra_parameters()) == []  # nothing of its own trains
