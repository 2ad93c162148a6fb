"""Contract shared by every registered sampler: registry, epochs, ranks, resumable state, errors."""

from __future__ import annotations

import inspect
import io
import pydoc
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
from dmlkit.registry import extends

LABELS = labels_from_sizes([5, 9, 4, 12, 7, 3, 8, 6, 10, 2, 11, 6], seed=1)  # 83 items, 12 classes
KWARGS: dict[str, dict[str, Any]] = {"m_per_class": {"samples_per_class": 3}, "random": {}}
NAMES = sorted(KWARGS)


def make(name: str, labels: Any = LABELS, batch_size: int = 12, **kwargs: Any) -> samplers.BatchSampler:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small-class warning of m_per_class; tested separately
        return samplers.build(name, labels, batch_size, **{**KWARGS[name], **kwargs})


def test_available_and_registry() -> None:
    assert samplers.available() == [
        "class_random",
        "d2_coreset",
        "disthist_batchmatch",
        "greedy_coreset",
        "hierarchical",
        "intra_class_uniform",
        "m_per_class",
        "random",
    ]
    assert samplers.REGISTRY.available() == samplers.available()
    assert isinstance(make("m_per_class"), samplers.MPerClassSampler)
    assert isinstance(make("random"), samplers.RandomBatchSampler)


def test_unknown_name_and_misspelt_keyword_suggest_the_right_one() -> None:
    with pytest.raises(UnknownNameError, match="did you mean 'm_per_class'"):
        samplers.build("m_per_clas", LABELS, 12)
    with pytest.raises(UnknownNameError, match="did you mean 'samples_per_class'"):
        samplers.build("m_per_class", LABELS, 12, sample_per_class=3)
    with pytest.raises(UnknownNameError, match="did you mean 'world_size'"):
        samplers.build("random", LABELS, 12, worldsize=2)


PK_OPTIONS: dict[str, Any] = {"samples_per_class": 4, "batches_per_epoch": None}
POOL_OPTIONS: dict[str, Any] = {
    "samples_per_class": 4,
    "pool_factor": 4,
    "batches_per_epoch": None,
    "distance": "euclidean",
}
#: Every registered sampler's own options, in constructor order, with their defaults.
OWN_OPTIONS: dict[str, dict[str, Any]] = {
    "class_random": PK_OPTIONS,
    "d2_coreset": {**POOL_OPTIONS, "power": 1.0},
    "disthist_batchmatch": {**POOL_OPTIONS, "num_candidates": 10, "bins": 50, "reference_size": 1024},
    "greedy_coreset": POOL_OPTIONS,
    "hierarchical": {
        "super_labels": inspect.Parameter.empty,
        "samples_per_class": 4,
        "super_classes_per_batch": 2,
        "batches_per_super_tuple": 4,
        "batches_per_epoch": None,
    },
    "intra_class_uniform": PK_OPTIONS,
    "m_per_class": PK_OPTIONS,
    "random": {},
}


@pytest.mark.parametrize("name", sorted(OWN_OPTIONS))
def test_signature_is_labels_batch_size_own_options_then_shared_keyword_only_options(name: str) -> None:
    assert sorted(OWN_OPTIONS) == samplers.available()
    cls = samplers.REGISTRY.get(name)
    params = list(inspect.signature(cls).parameters.values())
    positional, keyword = inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY
    assert [(p.name, p.kind, p.default) for p in params[:2]] == [
        ("labels", positional, inspect.Parameter.empty),
        ("batch_size", positional, inspect.Parameter.empty),
    ]
    own = params[2:-4]
    assert [(p.name, p.default) for p in own] == list(OWN_OPTIONS[name].items())
    assert all(p.kind == positional for p in own)
    shared = {"seed": 0, "rank": 0, "world_size": 1, "drop_last": name == "random"}
    assert [(p.name, p.default) for p in params[-4:]] == list(shared.items())
    assert all(p.kind == keyword for p in params[-4:])
    assert samplers.REGISTRY.parameters(name) == {p.name: p for p in params}  # what the config reads
    assert str(inspect.signature(cls)) in pydoc.render_doc(cls, renderer=pydoc.plaintext)  # help()


@pytest.mark.parametrize("name", sorted(OWN_OPTIONS))
def test_every_misspelt_option_raises_with_the_closest_name(name: str) -> None:
    cls = samplers.REGISTRY.get(name)
    required = {"super_labels": (LABELS // 3) % 3} if name == "hierarchical" else {}
    for option in [*OWN_OPTIONS[name], "seed", "rank", "world_size", "drop_last"]:
        with pytest.raises(UnknownNameError, match=f"did you mean '{option}'"):
            samplers.build(name, LABELS, 12, **required, **{option[:-1]: 1})
        with pytest.raises(TypeError, match=f"'{option[:-1]}'"):
            cls(LABELS, 12, **required, **{option[:-1]: 1})  # direct construction checks the signature too
    with pytest.raises(TypeError):  # the shared options after the own ones are keyword-only
        cls(LABELS, 12, *OWN_OPTIONS[name].values(), 0)


def test_extends_appends_own_options_after_the_base_ones_and_refuses_a_clash() -> None:
    base = samplers.D2CoresetSampler
    assert list(inspect.signature(base.configure).parameters)[1:] == [*POOL_OPTIONS, "power"]

    def no_kwargs(self: Any, power: float = 1.0) -> None: ...

    def clash(self: Any, distance: str = "cosine", **inherited: Any) -> None: ...

    with pytest.raises(TypeError, match="must end with"):
        extends(samplers.EmbeddingBatchSampler.configure)(no_kwargs)
    with pytest.raises(TypeError, match=r"redeclares options .*\['distance'\]"):
        extends(samplers.EmbeddingBatchSampler.configure)(clash)


@pytest.mark.parametrize("name", NAMES)
def test_dataloader_yields_the_sampler_batches(name: str) -> None:
    sampler = make(name)
    expected = sampler.batches(0)
    dataset = TensorDataset(torch.arange(len(LABELS)), torch.from_numpy(LABELS))
    loader = DataLoader(dataset, batch_sampler=sampler)
    got = [(idx.tolist(), lab) for idx, lab in loader]
    assert [idx for idx, _ in got] == expected
    assert len(loader) == len(sampler) == len(expected)
    for idx, lab in got:
        assert lab.dtype == torch.int64
        assert lab.tolist() == LABELS[idx].tolist()


@pytest.mark.parametrize("name", NAMES)
def test_label_containers_give_identical_batches(name: str) -> None:
    reference = make(name).batches(3)
    assert make(name, labels=LABELS.tolist()).batches(3) == reference
    assert make(name, labels=torch.from_numpy(LABELS)).batches(3) == reference
    assert make(name, labels=LABELS.astype(np.int32)).batches(3) == reference


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (LABELS.astype(np.float32), "integers"),
        (torch.tensor([0.0, 1.0, 1.0]), "integer tensor"),
        (torch.tensor([True, False]), "integer tensor"),
        (LABELS.reshape(1, -1), "1-D"),
        ([], "empty"),
    ],
)
def test_bad_labels_raise_data_error(name: str, labels: Any, message: str) -> None:
    with pytest.raises(DataError, match=message):
        make(name, labels=labels)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"batch_size": 12.0}, "batch_size must be an integer"),
        ({"rank": 2, "world_size": 2}, "rank must be < world_size"),
        ({"rank": -1}, "rank must be >= 0"),
        ({"world_size": 0}, "world_size must be >= 1"),
        ({"seed": "1"}, "seed must be an integer"),
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
    list(sampler)  # iterating further must not change what epoch 4 is
    sampler.set_epoch(4)
    assert list(sampler) == fresh
    assert sampler.batches(4) == fresh


@pytest.mark.parametrize("name", NAMES)
def test_exhausted_epoch_advances_and_set_epoch_keeps_position(name: str) -> None:
    sampler = make(name)
    first = list(sampler)
    assert sampler.state_dict()["epoch"] == 1 and sampler.state_dict()["batches_yielded"] == 0
    assert list(sampler) == make(name).batches(1) != first  # loops without set_epoch still reshuffle

    sampler.set_epoch(5)
    it = iter(sampler)
    next(it)
    next(it)
    sampler.set_epoch(5)  # same epoch: keeps the cursor (resume-then-set_epoch pattern)
    assert sampler.batches_yielded == 2
    assert list(sampler) == sampler.batches(5)[2:]
    sampler.set_epoch(0)
    assert sampler.state_dict()["batches_yielded"] == 0 and sampler.epoch == 0


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_resume_mid_epoch_yields_exactly_the_remaining_batches(name: str, world_size: int) -> None:
    for rank in range(world_size):
        sampler = make(name, rank=rank, world_size=world_size, batch_size=6)
        sampler.set_epoch(3)
        full = sampler.batches(3)
        consumed = []
        for batch in sampler:
            consumed.append(batch)
            if len(consumed) == 2:
                state = sampler.state_dict()  # taken mid-epoch, while the batch is being processed
                break
        assert state == {"epoch": 3, "batches_yielded": 2, "seed": 0, "world_size": world_size}
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        restored = make(name, rank=rank, world_size=world_size, batch_size=6)
        restored.load_state_dict(torch.load(buffer, weights_only=True))
        restored.set_epoch(3)
        rest = list(restored)
        assert consumed + rest == full
        assert len(rest) == len(full) - 2
        assert restored.state_dict()["epoch"] == 4


@pytest.mark.parametrize("name", NAMES)
def test_counter_tracks_iteration_and_state_is_plain_ints(name: str) -> None:
    sampler = make(name)
    it = iter(sampler)
    for i in range(1, len(sampler)):
        next(it)
        state = sampler.state_dict()
        assert state["batches_yielded"] == i
        assert all(type(v) is int for v in state.values())


@pytest.mark.parametrize("name", NAMES)
def test_resume_at_end_of_epoch_yields_nothing_then_moves_on(name: str) -> None:
    sampler = make(name)
    sampler.load_state_dict({"epoch": 2, "batches_yielded": len(sampler)})
    assert list(sampler) == []
    assert sampler.epoch == 3
    assert list(sampler) == sampler.batches(3)


@pytest.mark.parametrize("name", NAMES)
def test_load_state_dict_errors(name: str) -> None:
    sampler = make(name)
    with pytest.raises(ConfigError, match="missing 'batches_yielded'"):
        sampler.load_state_dict({"epoch": 1})
    with pytest.raises(UnknownNameError, match="did you mean 'batches_yielded'"):
        sampler.load_state_dict({"epoch": 1, "batches_yieldd": 0})
    with pytest.raises(ConfigError, match="seed=3 but this sampler has seed=0"):
        sampler.load_state_dict({"epoch": 1, "batches_yielded": 0, "seed": 3})
    with pytest.raises(ConfigError, match="world_size=2"):
        sampler.load_state_dict({"epoch": 1, "batches_yielded": 0, "world_size": 2})
    with pytest.raises(ConfigError, match="exceeds"):
        sampler.load_state_dict({"epoch": 1, "batches_yielded": len(sampler) + 1})
    with pytest.raises(ConfigError, match="epoch"):
        sampler.load_state_dict({"epoch": -1, "batches_yielded": 0})
    with pytest.raises(ConfigError, match="epoch"):
        sampler.set_epoch(-2)
    assert sampler.state_dict()["epoch"] == 0  # failed loads leave the cursor alone


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_ranks_partition_the_single_process_epoch(name: str, world_size: int) -> None:
    # 72 global batches are divisible by 2, 3 and 4.
    labels = labels_from_sizes([12] * 36)
    single = make(name, labels=labels, batch_size=6, seed=5).batches(2)
    assert len(single) == 72
    shares = [
        make(name, labels=labels, batch_size=6, seed=5, rank=r, world_size=world_size).batches(2)
        for r in range(world_size)
    ]
    assert all(len(share) == 72 // world_size for share in shares)
    union = Counter(tuple(b) for share in shares for b in share)
    assert union == Counter(tuple(b) for b in single)
    # Strided, like DistributedSampler: rank r gets batches r, r + W, ...
    assert shares[1] == single[1::world_size]


@pytest.mark.parametrize("name", NAMES)
def test_uneven_world_size_pads_or_drops(name: str) -> None:
    labels = labels_from_sizes([12] * 6)  # 72 items -> 12 batches of 6; world_size 5 does not divide 12
    single = make(name, labels=labels, batch_size=6, drop_last=True).batches(0)
    assert len(single) == 12
    for drop_last, per_rank in ((True, 2), (False, 3)):
        shares = [
            make(name, labels=labels, batch_size=6, rank=r, world_size=5, drop_last=drop_last).batches(0)
            for r in range(5)
        ]
        assert [len(s) for s in shares] == [per_rank] * 5
        flat = [tuple(b) for s in shares for b in s]
        if drop_last:
            assert len(set(flat)) == len(flat) == 10  # disjoint; the last 2 global batches dropped
            assert set(flat) == {tuple(b) for b in single[:10]}
        else:
            assert set(flat) == {tuple(b) for b in single}  # padded by wrapping to the first batches
            assert Counter(flat)[tuple(single[0])] == 2


@pytest.mark.parametrize("name", NAMES)
def test_drop_last_with_more_ranks_than_batches_is_an_error(name: str) -> None:
    with pytest.raises(ConfigError, match="world_size=8"):
        make(name, labels=labels_from_sizes([6] * 4), batch_size=6, world_size=8, drop_last=True)


@settings(max_examples=80, deadline=None)
@given(
    sizes=class_sizes(),
    name=st.sampled_from(NAMES),
    world_size=st.integers(1, 4),
    batch_size=st.sampled_from([2, 4, 6]),
    drop_last=st.booleans(),
    epoch=st.integers(0, 1000),
)
def test_property_rank_shares_are_equal_and_cover_the_epoch(
    sizes: list[int], name: str, world_size: int, batch_size: int, drop_last: bool, epoch: int
) -> None:
    labels = labels_from_sizes(sizes, seed=epoch)
    kwargs: dict[str, Any] = {"samples_per_class": 2} if name == "m_per_class" else {}
    try:
        single = make(name, labels=labels, batch_size=batch_size, drop_last=drop_last, **kwargs)
    except ConfigError:
        return  # too few classes / items for this batch_size: covered by the error tests
    n_global = len(single.batches(epoch)) if world_size == 1 or not drop_last else None
    try:
        shares = [
            make(
                name,
                labels=labels,
                batch_size=batch_size,
                rank=r,
                world_size=world_size,
                drop_last=drop_last,
                **kwargs,
            ).batches(epoch)
            for r in range(world_size)
        ]
    except ConfigError:
        assert drop_last and single.num_global_batches < world_size
        return
    lengths = {len(s) for s in shares}
    assert len(lengths) == 1
    global_batches = [tuple(b) for b in iterate_epoch(single, epoch)]
    flat = [tuple(b) for s in shares for b in s]
    assert set(flat) <= set(global_batches)
    if single.num_global_batches % world_size == 0:
        assert Counter(flat) == Counter(global_batches)
    if n_global is not None:
        assert len(shares[0]) == -(-n_global // world_size)


@settings(max_examples=60, deadline=None)
@given(
    sizes=class_sizes(),
    name=st.sampled_from(NAMES),
    world_size=st.integers(1, 3),
    data=st.data(),
)
def test_property_resume_anywhere_continues_exactly(
    sizes: list[int], name: str, world_size: int, data: st.DataObject
) -> None:
    labels = labels_from_sizes(sizes)
    rank = data.draw(st.integers(0, world_size - 1))
    epoch = data.draw(st.integers(0, 50))
    kwargs: dict[str, Any] = {"samples_per_class": 1} if name == "m_per_class" else {"drop_last": False}
    sampler = make(name, labels=labels, batch_size=1, rank=rank, world_size=world_size, seed=epoch, **kwargs)
    sampler.set_epoch(epoch)
    full = sampler.batches(epoch)
    stop = data.draw(st.integers(0, len(full)))
    it = iter(sampler)
    consumed = [next(it) for _ in range(stop)]
    state = sampler.state_dict()
    resumed = make(name, labels=labels, batch_size=1, rank=rank, world_size=world_size, seed=epoch, **kwargs)
    resumed.load_state_dict(state)
    resumed.set_epoch(epoch)
    assert consumed + list(resumed) == full
