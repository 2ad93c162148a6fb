"""The BatchSampler contract for the samplers added with issue 4: registry, epochs, ranks, resume, errors.

Embedding-driven samplers are checked here with a fixed embedding buffer (filled before the test and not
updated while iterating), under which their batches are a pure function of ``(seed, epoch)`` like every
other sampler; their behaviour with a changing buffer is tested in ``test_sampler_coreset.py``.
"""

from __future__ import annotations

import io
import warnings
from collections import Counter
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sampler_checks import class_sizes, iterate_epoch, labels_from_sizes
from torch.utils.data import DataLoader, TensorDataset

from dmlkit import samplers
from dmlkit.errors import ConfigError, DataError, UnknownNameError

LABELS = labels_from_sizes([5, 9, 4, 12, 7, 3, 8, 6, 10, 2, 11, 6], seed=1)  # 83 items, 12 classes
EMBEDDING = ("greedy_coreset", "d2_coreset", "disthist_batchmatch")
NAMES = ("class_random", "intra_class_uniform", "hierarchical", *EMBEDDING)


def super_of(labels: np.ndarray) -> np.ndarray:
    """Three super-classes of the ``labels_from_sizes`` classes (label 3c + offset → c mod 3)."""
    return (np.asarray(labels) // 3) % 3


def kwargs_for(name: str, labels: np.ndarray) -> dict[str, Any]:
    if name == "hierarchical":
        return {"samples_per_class": 3, "super_labels": super_of(labels), "batches_per_epoch": 10}
    return {"samples_per_class": 3}


def fill_buffer(sampler: samplers.BatchSampler, seed: int = 0, dim: int = 8) -> None:
    """Give every item a fixed random embedding (classes clustered), so selection is non-trivial."""
    if not sampler.needs_embeddings:
        return
    assert isinstance(sampler, samplers.EmbeddingBatchSampler)
    labels = torch.from_numpy(sampler.labels)
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(int(labels.max()) + 1, dim, generator=gen) * 3
    emb = centres[labels] + torch.randn(len(labels), dim, generator=gen)
    sampler.update_embeddings(torch.arange(len(labels)), emb)


def make(name: str, labels: Any = LABELS, batch_size: int = 12, **kwargs: Any) -> samplers.BatchSampler:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small-class warnings; tested separately
        sampler = samplers.build(
            name, labels, batch_size, **{**kwargs_for(name, np.asarray(labels)), **kwargs}
        )
    fill_buffer(sampler)
    return sampler


def test_registry_lists_every_sampler_and_class_random_is_roths() -> None:
    assert set(samplers.available()) >= {"m_per_class", "random", *NAMES}
    assert samplers.REGISTRY.get("class_random") is samplers.ClassRandomSampler
    assert samplers.REGISTRY.get("m_per_class") is samplers.MPerClassSampler
    assert isinstance(make("intra_class_uniform"), samplers.IntraClassUniformSampler)
    assert isinstance(make("hierarchical"), samplers.HierarchicalSampler)
    for name, cls in zip(
        EMBEDDING,
        (samplers.GreedyCoresetSampler, samplers.D2CoresetSampler, samplers.DistHistBatchMatchSampler),
        strict=True,
    ):
        sampler = make(name)
        assert isinstance(sampler, cls)
        assert sampler.needs_embeddings and type(sampler).needs_embeddings
    assert not samplers.MPerClassSampler.needs_embeddings and not samplers.BatchSampler.needs_embeddings


def test_samplers_without_embeddings_refuse_them() -> None:
    """``needs_embeddings`` is the declaration a trainer checks before ``update_embeddings``."""
    for name in ("m_per_class", "intra_class_uniform", "hierarchical"):
        sampler = make(name)
        assert not sampler.needs_embeddings
        with pytest.raises(ConfigError, match=f"{type(sampler).__name__} does not choose batches"):
            sampler.update_embeddings(torch.arange(3), torch.zeros(3, 4))


def test_misspelt_names_and_keywords_suggest_the_right_one() -> None:
    with pytest.raises(UnknownNameError, match="did you mean 'greedy_coreset'"):
        samplers.build("greedy_corset", LABELS, 12)
    with pytest.raises(UnknownNameError, match="did you mean 'pool_factor'"):
        samplers.build("d2_coreset", LABELS, 12, pool_factr=2)
    with pytest.raises(UnknownNameError, match="did you mean 'super_classes_per_batch'"):
        samplers.build("hierarchical", LABELS, 12, super_labels=super_of(LABELS), super_class_per_batch=2)


@pytest.mark.parametrize("name", NAMES)
def test_dataloader_yields_the_sampler_batches(name: str) -> None:
    sampler = make(name)
    expected = sampler.batches(0)
    dataset = TensorDataset(torch.arange(len(LABELS)), torch.from_numpy(LABELS))
    got = [idx.tolist() for idx, _ in DataLoader(dataset, batch_sampler=sampler)]
    assert got == expected
    assert len(got) == len(sampler) > 0


@pytest.mark.parametrize("name", NAMES)
def test_batches_are_p_distinct_classes_times_k(name: str) -> None:
    sampler = make(name)
    for epoch in (0, 5):
        for batch in sampler.batches(epoch):
            assert len(batch) == 12
            counts = Counter(LABELS[batch].tolist())
            if name == "class_random":  # Roth's draws classes with replacement: a class may come twice
                assert set(counts.values()) <= {3, 6, 9, 12}
            else:
                assert len(counts) == 4 and set(counts.values()) == {3}
            # each class occupies K consecutive positions
            assert all(len(set(LABELS[batch[i : i + 3]].tolist())) == 1 for i in range(0, 12, 3))


@pytest.mark.parametrize("name", NAMES)
def test_label_containers_give_identical_batches(name: str) -> None:
    reference = make(name).batches(3)
    assert make(name, labels=LABELS.tolist()).batches(3) == reference
    assert make(name, labels=torch.from_numpy(LABELS)).batches(3) == reference
    assert make(name, labels=LABELS.astype(np.int32)).batches(3) == reference


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    ("labels", "error", "message"),
    [
        (LABELS.astype(np.float32), DataError, "integers"),
        (torch.tensor([0.0, 1.0, 1.0]), DataError, "integer tensor"),
        (LABELS.reshape(1, -1), DataError, "1-D"),
    ],
)
def test_bad_labels_raise(name: str, labels: Any, error: type[Exception], message: str) -> None:
    kwargs = kwargs_for(name, LABELS)
    with pytest.raises(error, match=message):
        samplers.build(name, labels, 12, **kwargs)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"rank": 2, "world_size": 2}, "rank must be < world_size"),
        ({"seed": "1"}, "seed must be an integer"),
        ({"samples_per_class": 0}, "samples_per_class must be >= 1"),
        ({"batches_per_epoch": 0}, "batches_per_epoch must be >= 1"),
        ({"batch_size": 10}, "divisible"),
        ({"drop_last": "yes"}, "drop_last must be a bool"),
    ],
)
def test_bad_settings_raise_config_error(name: str, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make(name, **kwargs)


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_reproduces_and_seeds_and_epochs_differ(name: str) -> None:
    a, b = make(name, seed=7), make(name, seed=7)
    assert a.batches(0) == b.batches(0)
    assert iterate_epoch(a, 2) == b.batches(2)
    assert a.batches(0) != a.batches(1)
    assert a.batches(0) != make(name, seed=8).batches(0)


@pytest.mark.parametrize("name", NAMES)
def test_epoch_order_does_not_depend_on_history(name: str) -> None:
    fresh = make(name).batches(4)
    sampler = make(name)
    for epoch in (0, 1, 2):
        iterate_epoch(sampler, epoch)
    sampler.set_epoch(4)
    assert list(sampler) == fresh
    assert sampler.state_dict()["epoch"] == 5


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("world_size", [1, 3])
def test_resume_mid_epoch_with_weights_only_checkpoint(name: str, world_size: int) -> None:
    for rank in range(world_size):
        sampler = make(name, rank=rank, world_size=world_size, batch_size=6, batches_per_epoch=9)
        sampler.set_epoch(3)
        full = sampler.batches(3)
        consumed = []
        for batch in sampler:
            consumed.append(batch)
            if len(consumed) == 2:
                state = sampler.state_dict()
                break
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        restored = make(name, rank=rank, world_size=world_size, batch_size=6, batches_per_epoch=9, seed=0)
        loaded = torch.load(buffer, weights_only=True)
        assert {k: loaded[k] for k in ("epoch", "batches_yielded", "seed", "world_size")} == {
            "epoch": 3,
            "batches_yielded": 2,
            "seed": 0,
            "world_size": world_size,
        }
        restored.load_state_dict(loaded)
        restored.set_epoch(3)
        assert consumed + list(restored) == full
        assert restored.state_dict()["epoch"] == 4


@pytest.mark.parametrize("name", NAMES)
def test_load_state_dict_errors_leave_the_cursor_alone(name: str) -> None:
    sampler = make(name)
    with pytest.raises(ConfigError, match="missing 'batches_yielded'"):
        sampler.load_state_dict({"epoch": 1})
    with pytest.raises(UnknownNameError, match="did you mean 'batches_yielded'"):
        sampler.load_state_dict({"epoch": 1, "batches_yieldd": 0})
    with pytest.raises(ConfigError, match="seed=3 but this sampler has seed=0"):
        sampler.load_state_dict({"epoch": 1, "batches_yielded": 0, "seed": 3})
    with pytest.raises(ConfigError, match="exceeds"):
        sampler.load_state_dict({"epoch": 1, "batches_yielded": len(sampler) + 1})
    assert sampler.state_dict()["epoch"] == 0


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_ranks_partition_the_single_process_epoch(name: str, world_size: int) -> None:
    labels = labels_from_sizes([8] * 24)
    single = make(name, labels=labels, batch_size=6, seed=5, batches_per_epoch=24).batches(2)
    shares = [
        make(
            name, labels=labels, batch_size=6, seed=5, batches_per_epoch=24, rank=r, world_size=world_size
        ).batches(2)
        for r in range(world_size)
    ]
    assert all(len(share) == 24 // world_size for share in shares)
    assert Counter(tuple(b) for share in shares for b in share) == Counter(tuple(b) for b in single)
    assert shares[1] == single[1::world_size]


@pytest.mark.parametrize("name", NAMES)
def test_uneven_world_size_pads_or_drops(name: str) -> None:
    labels = labels_from_sizes([8] * 12)
    single = make(name, labels=labels, batch_size=6, batches_per_epoch=12).batches(0)
    for drop_last, per_rank in ((True, 2), (False, 3)):
        shares = [
            make(
                name,
                labels=labels,
                batch_size=6,
                batches_per_epoch=12,
                rank=r,
                world_size=5,
                drop_last=drop_last,
            ).batches(0)
            for r in range(5)
        ]
        assert [len(s) for s in shares] == [per_rank] * 5
        flat = [tuple(b) for s in shares for b in s]
        if drop_last:
            assert len(set(flat)) == 10 and set(flat) == {tuple(b) for b in single[:10]}
        else:
            assert set(flat) == {tuple(b) for b in single}


@pytest.mark.parametrize("name", NAMES)
def test_small_classes_warn_once_with_their_count(name: str) -> None:
    labels = labels_from_sizes([1, 2, 3, 4, 9, 2, 5, 6, 7, 8, 4, 4])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sampler = samplers.build(name, labels, 8, **{**kwargs_for(name, labels), "samples_per_class": 4})
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert "4 of 12 classes have fewer than samples_per_class=4" in messages[0]
    assert caught[0].filename == __file__  # blames the caller, not dmlkit
    fill_buffer(sampler)
    single = int(np.flatnonzero(labels == 0)[0])
    if name == "class_random":  # Roth's draws every image with replacement: no spread to check
        return
    for batch in sampler.batches(0) + sampler.batches(1):
        for i in range(0, 8, 4):
            chunk = batch[i : i + 4]
            n = int(np.count_nonzero(labels == labels[chunk[0]]))
            assert len(set(chunk)) == min(n, 4)
            counts = Counter(chunk).values()
            assert max(counts) - min(counts) <= 1
            if chunk[0] == single:
                assert chunk == [single] * 4


@settings(max_examples=40, deadline=None)
@given(
    sizes=class_sizes(max_classes=16, max_size=8),
    name=st.sampled_from(NAMES),
    world_size=st.integers(1, 3),
    drop_last=st.booleans(),
    data=st.data(),
)
def test_property_rank_shares_and_resume(
    sizes: list[int], name: str, world_size: int, drop_last: bool, data: st.DataObject
) -> None:
    labels = labels_from_sizes(sizes, seed=len(sizes))
    epoch = data.draw(st.integers(0, 20))
    kwargs: dict[str, Any] = {"samples_per_class": 2, "batch_size": 4, "seed": epoch, "drop_last": drop_last}
    if name == "hierarchical":
        kwargs["super_classes_per_batch"] = 1
    try:
        shares_of = [
            make(name, labels=labels, rank=r, world_size=world_size, **kwargs) for r in range(world_size)
        ]
    except ConfigError:
        return  # too few classes (or too few batches to share with drop_last): covered by the error tests
    single = make(name, labels=labels, **kwargs)
    global_batches = [tuple(b) for b in single.batches(epoch)]
    shares = [s.batches(epoch) for s in shares_of]
    assert len({len(s) for s in shares}) == 1
    flat = [tuple(b) for s in shares for b in s]
    assert set(flat) <= set(global_batches)
    if single.num_global_batches % world_size == 0:
        assert Counter(flat) == Counter(global_batches)
    # resume anywhere on one rank
    rank = data.draw(st.integers(0, world_size - 1))
    sampler = shares_of[rank]
    sampler.set_epoch(epoch)
    stop = data.draw(st.integers(0, len(shares[rank])))
    it = iter(sampler)
    consumed = [next(it) for _ in range(stop)]
    resumed = make(name, labels=labels, rank=rank, world_size=world_size, **kwargs)
    resumed.load_state_dict(sampler.state_dict())
    resumed.set_epoch(epoch)
    assert consumed + list(resumed) == shares[rank]
