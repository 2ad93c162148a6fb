"""Multi-process training on the CPU (gloo, 2 processes): the loss and every gradient of 2 ranks with a batch
of B each equal one process on the 2B batch; the global batch is sharded, not redrawn; a failing rank stops
the run. The processes are spawned by the tests (``torch.multiprocessing``) or by ``torchrun``."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from dmlkit import distributed, samplers
from dmlkit.config.loading import make_config
from dmlkit.train.objective import build_objective
from dmlkit.train.step import Batch, EmbeddingStep

WORLD = 2
PER_RANK = 8
EMBEDDING = 6
CLASSES = 4

#: The objectives of the issue: loss, miner, memory.
CASES: dict[str, dict[str, Any]] = {
    "contrastive": {"loss": "contrastive"},
    "multisimilarity": {"loss": "multisimilarity"},
    "triplet+semihard": {"loss": "triplet", "miner": "semihard"},
    "proxyanchor": {"loss": "proxyanchor"},
    "xbm": {"loss": "contrastive", "xbm_size": 64},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, EMBEDDING))


def _batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``steps`` global batches of 2·PER_RANK rows (inputs, labels: 4 classes × 4, dataset indices)."""
    generator = torch.Generator().manual_seed(1)
    out = []
    for step in range(steps):
        x = torch.randn(WORLD * PER_RANK, 5, generator=generator)
        labels = torch.arange(CLASSES).repeat_interleave(WORLD * PER_RANK // CLASSES)
        order = torch.randperm(len(labels), generator=generator)
        out.append((x[order], labels[order], torch.arange(len(labels)) + step * len(labels)))
    return out


def _run(case: str, rank: int, world: int) -> dict[str, Any]:
    """Two steps of ``case`` on this rank's shard (the whole batch when ``world`` is 1): the losses, and
    the gradients of the model and the objective after the second step (DDP and the objective's averaging
    applied)."""
    config = make_config({"objective": {k: v for k, v in CASES[case].items() if k != "xbm_size"},
                          "memory": {"xbm_size": CASES[case].get("xbm_size")}})  # fmt: skip
    torch.manual_seed(0)
    objective = build_objective(config, CLASSES, EMBEDDING, train_size=1000)
    model = _model()
    wrapped = distributed.Distributed(rank, world).wrap(model, torch.device("cpu"))
    step = EmbeddingStep(wrapped, objective, torch.device("cpu"), "none")
    losses = []
    for x, labels, indices in _batches(2):
        part = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        for p in [*model.parameters(), *objective.parameters()]:
            p.grad = None
        out = step(Batch(x[part], labels[part], indices[part]))
        out.loss.backward()
        distributed.average_gradients(objective.parameters())
        losses.append(float(out.loss.detach()))
    grads = {f"model.{n}": p.grad.clone() for n, p in model.named_parameters()}
    grads |= {f"objective.{n}": p.grad.clone() for n, p in objective.named_parameters() if p.grad is not None}
    return {"losses": losses, "grads": grads, "gathered": out.embeddings.shape[0]}


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {case: _run(case, rank, world) for case in CASES}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("ranks")
    mp.start_processes(_worker, args=(WORLD, _free_port(), str(out)), nprocs=WORLD, start_method="spawn")
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_equal_one_process_on_the_concatenated_batch(case: str, two_ranks: list[dict]) -> None:
    single = _run(case, 0, 1)
    assert single["gathered"] == WORLD * PER_RANK
    for rank, result in enumerate(two_ranks):
        found = result[case]
        assert found["gathered"] == WORLD * PER_RANK  # every rank's loss saw the global batch
        np.testing.assert_allclose(found["losses"], single["losses"], rtol=1e-5, atol=1e-6)
        assert set(found["grads"]) == set(single["grads"]), (case, rank)
        for name, grad in single["grads"].items():
            torch.testing.assert_close(found["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=f"{case} {name}")
    if case == "proxyanchor":
        assert any(name.startswith("objective.") for name in single["grads"])  # the proxies trained


def test_the_global_batch_is_sharded_disjoint_equal_and_resumable() -> None:
    labels = np.repeat(np.arange(12), 6)

    def sampler() -> samplers.BatchSampler:
        return samplers.build("m_per_class", labels=labels, batch_size=16, samples_per_class=4, seed=3)

    single = list(sampler())
    shards = [list(samplers.ShardedBatchSampler(sampler(), r, WORLD)) for r in range(WORLD)]
    assert [len(s) for s in shards] == [len(single)] * WORLD
    for batch, *parts in zip(single, *shards, strict=True):
        assert [len(p) for p in parts] == [8, 8]
        assert not set(parts[0]) & set(parts[1])
        assert parts[0] + parts[1] == batch  # the same class structure as one process: the same batch
    resumed = samplers.ShardedBatchSampler(sampler(), 1, WORLD)
    state = samplers.ShardedBatchSampler(sampler(), 1, WORLD).state_dict()
    resumed.load_state_dict({**state, "batches_yielded": 2})
    assert list(resumed) == shards[1][2:]
    with pytest.raises(Exception, match="not divisible by the 3 processes"):
        samplers.ShardedBatchSampler(sampler(), 0, 3)


def _train_argv(out: Path, name: str) -> list[str]:
    return ["train", "--name", name, "--output-dir", str(out), "--dataset-args",
            json.dumps({"num_classes": 12, "samples_per_class": 8, "image_size": 16}),
            "--backbone", "small_cnn", "--embedding-size", "8", "--batch-size", "16",
            "--samples-per-class", "4", "--val-fraction", "0.25", "--deterministic",
            "--no-progress", "--device", "cpu", "--metrics", "recall@1,map@r", "--num-workers", "0",
            "--freeze-bn"]  # fmt: skip
    # --freeze-bn: BatchNorm statistics of each rank's part of the batch would differ from the whole
    # batch's (SyncBatchNorm, --sync-bn, runs on CUDA only)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "last.pt", weights_only=True)["model"]


def test_training_on_two_processes_equals_one_process_and_resumes_on_either(tmp_path: Path) -> None:
    """One process for 2 epochs; 2 processes (``--nproc-per-node 2``) for 1 epoch, then resumed to 2 epochs
    on 2 processes and, from a copy, on 1 process: the same losses, validation, test metrics and weights."""
    import shutil

    from dmlkit.cli import main

    assert main([*_train_argv(tmp_path, "one"), "--epochs", "2"]) == 0
    assert main([*_train_argv(tmp_path, "two"), "--epochs", "1", "--nproc-per-node", "2"]) == 0
    shutil.copytree(tmp_path / "two", tmp_path / "two-then-one")
    assert main(["train", "--resume", str(tmp_path / "two"), "--epochs", "2", "--nproc-per-node", "2"]) == 0
    assert main(["train", "--resume", str(tmp_path / "two-then-one"), "--epochs", "2"]) == 0
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    for name in ("two", "two-then-one"):
        found = json.loads((tmp_path / name / "results.json").read_text())
        assert found["processes"] == (2 if name == "two" else 1) and one["processes"] == 1
        for split in ("test_before", "test_after"):
            for metric, value in one[split].items():
                assert found[split][metric] == pytest.approx(value, abs=1e-5), (name, split, metric)
        rows = [[json.loads(line) for line in (tmp_path / run / "history.jsonl").read_text().splitlines()]
                for run in ("one", name)]  # fmt: skip
        assert len(rows[1]) == 2
        for a, b in zip(*rows, strict=True):
            assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4), name
            assert b["val/map@r"] == pytest.approx(a["val/map@r"], abs=1e-5), name
        for key, value in _weights(tmp_path / "one").items():
            torch.testing.assert_close(_weights(tmp_path / name)[key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_a_rank_that_raises_stops_the_run(tmp_path: Path) -> None:
    script = tmp_path / "fails.py"
    script.write_text(
        textwrap.dedent("""
        import os, sys
        from dmlkit.config.loading import make_config
        from dmlkit.train.loop import Trainer

        def hook(trainer, step):
            if step == 2 and os.environ["RANK"] == "1":
                raise RuntimeError("rank 1 fails on purpose")

        config = make_config({"run": {"output_dir": sys.argv[1], "name": "fails", "progress": False,
                                      "device": "cpu"},
                              "data": {"dataset": {"name": "synthetic", "args": {"num_classes": 12,
                                       "samples_per_class": 8, "image_size": 16}}, "batch_size": 16,
                                       "samples_per_class": 4, "val_fraction": 0},
                              "model": {"backbone": "small_cnn", "embedding_size": 8},
                              "optim": {"epochs": 50}})
        Trainer(config, step_hooks=[hook]).run()
    """)
    )
    started = time.perf_counter()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               str(script), str(tmp_path)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "DMLKIT_DIST_TIMEOUT": "60"})  # fmt: skip
    assert done.returncode != 0
    assert "rank 1 fails on purpose" in done.stderr
    assert time.perf_counter() - started < 200


@pytest.mark.parametrize("name", samplers.available())
def test_every_sampler_shards_its_global_batch(name: str) -> None:
    labels = np.repeat(np.arange(12), 6)
    extra = {"super_labels": labels // 4} if name == "hierarchical" else {}

    def build() -> samplers.BatchSampler:
        return samplers.build(name, labels=labels, batch_size=16, seed=0, **extra)

    whole = next(iter(build()))
    parts = [next(iter(samplers.ShardedBatchSampler(build(), r, WORLD))) for r in range(WORLD)]
    assert parts[0] + parts[1] == whole and len(parts[0]) == len(parts[1]) == 8
    wrapped = samplers.ShardedBatchSampler(build(), 0, WORLD)
    assert wrapped.needs_embeddings == build().needs_embeddings
