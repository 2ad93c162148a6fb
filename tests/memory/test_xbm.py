"""Cross-batch memory: FIFO order, sizing, self-exclusion by dataset index, warm-up, checkpoints, 2 ranks."""

from __future__ import annotations

import collections
import os
import signal

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

from dmlkit import losses, miners
from dmlkit import memory as memory_lib
from dmlkit.config import make_config
from dmlkit.errors import ConfigError
from dmlkit.memory import CrossBatchMemory, resolve_size
from dmlkit.train import checkpoint as ckpt
from dmlkit.train.loop import Trainer
from dmlkit.train.objective import Objective


def test_resolve_size_counts_and_ratios() -> None:
    assert resolve_size(500, 1000) == 500
    assert resolve_size(0.25, 1000) == 250
    assert resolve_size("1.0", 1000) == 1000
    assert resolve_size("64", 1000) == 64
    assert resolve_size(1e-9, 1000) == 1
    for bad in (0, -3, "abc", 0.0, True):
        with pytest.raises(ConfigError):
            resolve_size(bad, 1000)


def test_memory_bytes_counts_embeddings_labels_and_indices() -> None:
    assert memory_lib.memory_bytes(10, 4, "float32") == 10 * (4 * 4 + 8 + 8)
    assert memory_lib.memory_bytes(10, 4, "bfloat16") == 10 * (4 * 2 + 8 + 8)
    available = memory_lib.available_bytes("cpu")
    assert available is None or available > 0


def test_a_memory_larger_than_the_available_memory_is_refused_before_allocating(monkeypatch) -> None:
    monkeypatch.setattr(memory_lib.xbm, "available_bytes", lambda device=None: 2 * 1024**3)

    def no_allocation(*args, **kwargs):
        raise AssertionError("allocated before the size check")

    monkeypatch.setattr(memory_lib.xbm.torch, "zeros", no_allocation)
    with pytest.raises(ConfigError) as err:
        memory_lib.build_memory("1.0", 10**9, 64, "float32", "cpu")  # 10⁹ × (256 + 16) bytes
    message = str(err.value)
    assert message.startswith("xbm_size 1.0: a cross-batch memory of 1,000,000,000 entries (64-d float32")
    assert "needs 253.3 GiB, but only 2.0 GiB is available on cpu" in message
    with pytest.raises(ConfigError, match=r"CrossBatchMemory\(size=100000000\)"):
        CrossBatchMemory(10**8, 64)


def test_memory_is_allocated_on_the_requested_device() -> None:
    memory = memory_lib.build_memory(8, 100, 4, "float16", "cpu")
    assert memory.size == 8 and memory.embeddings.dtype == torch.float16
    assert {buffer.device.type for buffer in memory.buffers()} == {"cpu"}


@settings(max_examples=40, deadline=None)
@given(size=st.integers(1, 20), batches=st.lists(st.integers(1, 30), min_size=1, max_size=12))
def test_fifo_order_matches_a_reference_queue(size: int, batches: list[int]) -> None:
    memory = CrossBatchMemory(size, 3)
    reference: collections.deque[int] = collections.deque(maxlen=size)
    counter = 0
    for n in batches:
        ids = torch.arange(counter, counter + n)
        counter += n
        memory.enqueue(ids[:, None].float().repeat(1, 3), ids % 7, ids)
        reference.extend(ids.tolist())
        emb, labels, indices = memory.ordered()
        assert indices.tolist() == list(reference)
        assert labels.tolist() == [i % 7 for i in reference]
        assert emb[:, 0].long().tolist() == list(reference)
        assert len(memory) == len(reference)
        assert sorted(memory.contents()[2].tolist()) == sorted(reference)


def test_memory_stores_detached_in_chosen_dtype() -> None:
    memory = CrossBatchMemory(4, 2, dtype="bfloat16")
    emb = torch.randn(3, 2, requires_grad=True)
    memory.enqueue(emb, torch.tensor([0, 1, 2]), torch.tensor([5, 6, 7]))
    stored = memory.contents()[0]
    assert stored.dtype == torch.bfloat16 and not stored.requires_grad
    with pytest.raises(ConfigError):
        memory.enqueue(emb, torch.tensor([0.0, 1.0, 2.0]), torch.tensor([5, 6, 7]))  # float labels
    with pytest.raises(ConfigError):
        CrossBatchMemory(4, 2, dtype="float64")


def reference_memory_loss(loss, emb, labels, indices, mem_emb, mem_labels, mem_indices) -> torch.Tensor:
    """Independent construction: every anchor × memory pair, by loops, minus the anchor's own copies."""
    a1, p, a2, n = [], [], [], []
    for i in range(len(emb)):
        for j in range(len(mem_emb)):
            if labels[i] == mem_labels[j]:
                if indices[i] != mem_indices[j]:
                    a1.append(i)
                    p.append(j)
            else:
                a2.append(i)
                n.append(j)
    pairs = tuple(torch.tensor(x, dtype=torch.int64) for x in (a1, p, a2, n))
    return loss(emb, labels, pairs, mem_emb, mem_labels)


def _filled_memory_and_batch(memory: CrossBatchMemory):
    """Fill ``memory`` with an earlier pass over items 0..39 (4 classes of 10) at shuffled positions; return
    copies of its contents and a float64 batch of 12 of those items (3 per class)."""
    stored_idx = torch.randperm(40)
    memory.enqueue(torch.randn(40, 8), stored_idx // 10, stored_idx)
    contents = tuple(t.clone() for t in memory.contents())
    emb = torch.randn(12, 8, dtype=torch.float64, requires_grad=True)
    indices = torch.tensor([0, 1, 2, 11, 12, 13, 21, 22, 23, 31, 32, 33])
    return contents, (emb, indices // 10, indices)


@pytest.mark.parametrize(
    "name", ["contrastive", "multisimilarity", "triplet", "ntxent", "circle", "supcon", "lifted", "margin"]
)
def test_own_copies_are_excluded_by_dataset_index(name: str) -> None:
    torch.manual_seed(0)
    loss = losses.build(name)
    memory = CrossBatchMemory(64, 8)
    objective = Objective(loss, memory=memory, memory_weight=1.0, memory_start=0)
    (mem_emb, mem_labels, mem_idx), (emb, labels, indices) = _filled_memory_and_batch(memory)
    value, stats = objective(emb, labels, indices)
    in_batch = loss(emb, labels)
    expected = in_batch + reference_memory_loss(
        loss, emb, labels, indices, mem_emb.double(), mem_labels, mem_idx
    )
    torch.testing.assert_close(value, expected)
    grad = torch.autograd.grad(value, emb)[0]
    torch.testing.assert_close(grad, torch.autograd.grad(expected, emb)[0])
    assert stats["xbm/active"] == 1.0 and stats["xbm/fill"] == 40
    # the batch was enqueued after use
    assert memory.ordered()[2][-12:].tolist() == indices.tolist()


@pytest.mark.parametrize("name", ["contrastive", "multisimilarity"])
def test_regularizers_count_once_per_step_under_a_memory(name: str) -> None:
    """As PML's CrossBatchMemory (one loss call per step): the embedding penalty is added to the batch term
    only, not again, weighted, to the memory term."""
    torch.manual_seed(1)
    options = {"embedding_regularizer": "lp", "embedding_reg_weight": 0.5}
    loss, plain = losses.build(name, **options), losses.build(name)
    memory = CrossBatchMemory(64, 8)
    objective = Objective(loss, memory=memory, memory_weight=2.0, memory_start=0)
    (mem_emb, mem_labels, mem_idx), (emb, labels, indices) = _filled_memory_and_batch(memory)
    value, _ = objective(emb, labels, indices)
    penalty = 0.5 * emb.norm(dim=1).mean()  # lp: mean L2 norm of the embeddings
    expected = (
        plain(emb, labels)
        + penalty
        + 2.0 * reference_memory_loss(plain, emb, labels, indices, mem_emb.double(), mem_labels, mem_idx)
    )
    torch.testing.assert_close(value, expected)
    assert loss(emb, labels).item() == pytest.approx((plain(emb, labels) + penalty).item())  # restored after


def test_mined_tuples_never_pair_an_anchor_with_its_own_copy() -> None:
    torch.manual_seed(1)
    loss = losses.build("contrastive")
    miner = miners.build("batch_hard")
    memory = CrossBatchMemory(32, 4)
    objective = Objective(loss, miner=miner, memory=memory)
    indices = torch.arange(16)
    labels = indices // 4
    emb = torch.randn(16, 4)
    memory.enqueue(emb.clone(), labels, indices)  # the memory holds exact copies of the batch
    stored_emb, stored_labels, stored_indices = (t.clone() for t in memory.contents())
    seen: list[tuple[torch.Tensor, ...]] = []
    real_forward = loss.forward

    def spy(embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None, ref_exclude=None):
        if ref_emb is not None:
            seen.append((indices_tuple, ref_exclude))
        return real_forward(embeddings, labels, indices_tuple, ref_emb, ref_labels, ref_exclude)

    loss.forward = spy
    objective(emb, labels, indices)
    (((a, p, _n), exclude),) = seen
    assert len(a) > 0
    assert not torch.any(stored_indices[p] == indices[a])  # no anchor is paired with its own copy
    # the exclusion is by dataset index
    torch.testing.assert_close(exclude, indices[:, None] == stored_indices[None, :])
    # batch_hard then takes the hardest *other* positive: the same as mining each anchor alone against
    # the memory without its copy
    for i in range(len(indices)):
        keep = stored_indices != indices[i]
        _, p_i, n_i = miner(emb[i : i + 1], labels[i : i + 1], stored_emb[keep], stored_labels[keep])
        row = a == i
        assert stored_indices[p[row]].tolist() == stored_indices[keep][p_i].tolist()
        assert stored_indices[_n[row]].tolist() == stored_indices[keep][n_i].tolist()


def test_warm_up_delays_filling_and_use() -> None:
    torch.manual_seed(2)
    loss = losses.build("contrastive")
    memory = CrossBatchMemory(100, 4)
    objective = Objective(loss, memory=memory, memory_weight=0.5, memory_start=3)
    for step in range(5):
        emb = torch.randn(8, 4)
        labels = torch.arange(8) // 2
        indices = torch.arange(8) + 8 * step
        value, stats = objective(emb, labels, indices)
        if step < 3:
            assert len(memory) == 0 and stats["xbm/active"] == 0.0
            torch.testing.assert_close(value, loss(emb, labels))
        elif step == 3:
            assert stats["xbm/active"] == 1.0 and len(memory) == 8  # first use: empty memory, then enqueued
            torch.testing.assert_close(value, loss(emb, labels))
        else:
            assert len(memory) == 16
            assert not torch.allclose(value, loss(emb, labels))
    assert int(memory.iteration) == 5


def test_config_rejects_memory_for_losses_without_reference_sets() -> None:
    no_ref = [n for n in losses.available() if not losses.REGISTRY.get(n).accepts_ref]
    assert no_ref, "the loss library has proxy/classification losses"
    with pytest.raises(ConfigError, match="cannot take a reference set"):
        make_config({"loss": no_ref[0], "xbm_size": 0.5})


def interrupt_at(step: int):
    def hook(trainer: Trainer, global_step: int) -> None:
        if global_step == step:
            os.kill(os.getpid(), signal.SIGINT)

    return hook


def test_memory_survives_checkpoint_and_resume(tiny_config) -> None:
    xbm = {"loss": "contrastive", "xbm_size": 0.5, "xbm_start": 2, "xbm_weight": 1.0}
    straight = Trainer(tiny_config(name="xbm-straight", **xbm)).run()
    config = tiny_config(name="xbm-resumed", **xbm)
    first = Trainer(config, step_hooks=[interrupt_at(5)]).run()
    assert first.interrupted
    saved = ckpt.load(first.run_dir / "last.pt")["objective"]
    assert int(saved["memory.iteration"]) == 5 and int(saved["memory.fill"]) == 24  # 48 × 0.5; 3 batches in
    resumed = Trainer(config, first.run_dir, resume=True).run()
    a = ckpt.load(straight.run_dir / "last.pt")
    b = ckpt.load(resumed.run_dir / "last.pt")
    for key in a["objective"]:
        assert torch.equal(a["objective"][key], b["objective"][key]), key
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def _rank_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    memory = CrossBatchMemory(10, 2)
    for step in range(3):
        n = 3 + rank  # ranks enqueue batches of different lengths
        ids = torch.arange(n) + 100 * rank + 10 * step
        memory.enqueue_all_ranks(torch.stack([ids.float(), -ids.float()], 1), ids % 5, ids)
    torch.save({k: v for k, v in memory.state_dict().items()}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_ranks_hold_identical_memories(tmp_path) -> None:
    mp.start_processes(_rank_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                       start_method="spawn")  # fmt: skip
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for key in r0:
        assert torch.equal(r0[key], r1[key]), key
    # rank order within each step: rank 0's 3 items, then rank 1's 4 items; the last 10 of 21 remain
    expected = []
    for step in range(3):
        expected += [10 * step + i for i in range(3)] + [100 + 10 * step + i for i in range(4)]
    memory = CrossBatchMemory(10, 2)
    memory.load_state_dict(r0)
    assert memory.ordered()[2].tolist() == expected[-10:]


def test_a_loss_without_ref_exclude_gets_the_same_exclusion_through_listed_pairs() -> None:
    """A foreign loss (no ``ref_exclude`` parameter) gets the own-copy exclusion as explicit pairs; the
    result must equal the built-in mask path."""
    inner = losses.build("contrastive")

    class Foreign(torch.nn.Module):
        def forward(self, embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None):
            return inner(embeddings, labels, indices_tuple, ref_emb, ref_labels)

    values = []
    for loss in (inner, Foreign()):
        memory = CrossBatchMemory(64, 8)
        stored_idx = torch.randperm(40, generator=torch.Generator().manual_seed(0))
        memory.enqueue(
            torch.randn(40, 8, generator=torch.Generator().manual_seed(1)), stored_idx // 10, stored_idx
        )
        emb = torch.randn(12, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        indices = torch.tensor([0, 1, 2, 11, 12, 13, 21, 22, 23, 31, 32, 33])
        values.append(Objective(loss, memory=memory)(emb, indices // 10, indices)[0])
    torch.testing.assert_close(values[0], values[1])
