"""Training options: bf16, frozen BatchNorm, clipping, SGD + step schedule, seeds, optional loggers."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from dmlkit.errors import ConfigError
from dmlkit.train import checkpoint as ckpt
from dmlkit.train.loop import Trainer


def weights(run_dir, name: str = "last.pt") -> dict[str, torch.Tensor]:
    return ckpt.load(run_dir / name)["model"]


def test_bf16_autocast_trains_on_cpu(tiny_config) -> None:
    result = Trainer(tiny_config(name="bf16", amp="bf16")).run()
    rows = [json.loads(line) for line in (result.run_dir / "history.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in rows)
    assert all(r["skipped_steps"] == 0 for r in rows)
    assert all(torch.isfinite(t).all() for t in weights(result.run_dir).values() if t.is_floating_point())


def test_fp16_needs_cuda(tiny_config) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: fp16 is allowed")
    with pytest.raises(ConfigError, match="fp16"):
        Trainer(tiny_config(amp="fp16", device="cpu"))


def test_frozen_batchnorm_keeps_statistics_and_affine(tiny_config) -> None:
    initial = Trainer(tiny_config(name="init", epochs=0)).run()
    frozen = Trainer(tiny_config(name="frozen", freeze_bn=True)).run()
    before, after = weights(initial.run_dir, "best.pt"), weights(frozen.run_dir)
    bn_keys = [k for k in before if k.endswith(("running_mean", "running_var"))]
    assert bn_keys
    for key in bn_keys:
        assert torch.equal(before[key], after[key]), key
        affine = key.rsplit(".", 1)[0]
        assert torch.equal(before[f"{affine}.weight"], after[f"{affine}.weight"])
    conv = next(k for k in before if k.endswith("weight") and before[k].ndim == 4)
    assert not torch.equal(before[conv], after[conv])  # the rest still trains

    free = Trainer(tiny_config(name="free")).run()
    assert not torch.equal(before[bn_keys[0]], weights(free.run_dir)[bn_keys[0]])


def test_sgd_step_schedule_and_clipping_run(tiny_config) -> None:
    config = tiny_config(
        name="sgd", optimizer="sgd", lr=0.05, scheduler="step", step_size=1, gamma=0.5, grad_clip=0.1
    )
    result = Trainer(config).run()
    rows = [json.loads(line) for line in (result.run_dir / "history.jsonl").read_text().splitlines()]
    # the lr logged at each epoch end is the one the next step would use: halved every epoch
    assert [r["lr"] for r in rows] == pytest.approx([0.025, 0.0125, 0.00625])


def test_same_seed_same_weights_other_seed_other_weights(tiny_config) -> None:
    a = weights(Trainer(tiny_config(name="a", epochs=1)).run().run_dir)
    b = weights(Trainer(tiny_config(name="b", epochs=1)).run().run_dir)
    c = weights(Trainer(tiny_config(name="c", epochs=1, seed=1)).run().run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize(("flag", "module"), [("tensorboard", "torch.utils.tensorboard"), ("wandb", "wandb")])
def test_missing_logger_package_fails_before_data_loading(tiny_config, monkeypatch, flag, module) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    trainer = Trainer(tiny_config(name=flag, **{flag: True}))
    with pytest.raises(ConfigError, match=rf"dmlkit\[{flag}\]"):
        trainer.run()
    assert not (trainer.run_dir / "last.pt").exists()


def test_run_directory_is_not_overwritten(tiny_config) -> None:
    Trainer(tiny_config(name="once", epochs=1)).run()
    with pytest.raises(ConfigError, match="--resume"):
        Trainer(tiny_config(name="once", epochs=1))


SAMPLERS = ["m_per_class", "class_random", "random", "intra_class_uniform", "greedy_coreset", "d2_coreset",
            "disthist_batchmatch"]  # fmt: skip


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_trains_and_resumes_exactly(tiny_config, sampler) -> None:
    import os
    import signal

    def interrupt(trainer: Trainer, step: int) -> None:
        if step == 4:
            os.kill(os.getpid(), signal.SIGINT)

    straight = Trainer(tiny_config(name=f"{sampler}-a", sampler=sampler)).run()
    config = tiny_config(name=f"{sampler}-b", sampler=sampler)
    assert Trainer(config, step_hooks=[interrupt]).run().interrupted
    resumed = Trainer(config, straight.run_dir.parent / f"{sampler}-b", resume=True).run()
    a, b = weights(straight.run_dir), weights(resumed.run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_hierarchical_sampler_uses_super_classes_from_class_names(tiny_config) -> None:
    from dmlkit.samplers import super_labels_of

    class Named:
        class_names = ("a/x", "a/y", "b/z")
        labels = (0, 1, 2, 2, 0)

    assert super_labels_of(Named(), None).tolist() == [0, 0, 1, 1, 0]
    assert super_labels_of(Named(), {"a/x": "q", "a/y": "p", "b/z": "p"}).tolist() == [1, 0, 0, 0, 1]
    with pytest.raises(ConfigError, match="super-class"):
        Trainer(tiny_config(name="hier", sampler="hierarchical")).run()  # synthetic class names are flat


def test_progressive_mining_schedule_is_applied_and_logged(tiny_config) -> None:
    config = tiny_config(
        name="sched", loss="triplet", miner="triplet_margin", miner_args={"type_of_triplets": "semihard"},
        miner_schedule="linear:start=0.5,end=0.1,from=0.0,until=1.0",
    )  # fmt: skip
    result = Trainer(config).run()
    rows = [json.loads(line) for line in (result.run_dir / "history.jsonl").read_text().splitlines()]
    # margin at iteration t of 9: 0.5 - 0.4 t / 9; per-epoch means of iterations {0,1,2}, {3,4,5}, {6,7,8}
    expected = [0.5 - 0.4 * (3 * e + 1) / 9 for e in range(3)]
    assert [r["miner/schedule/margin"] for r in rows] == pytest.approx(expected)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"miner_schedule": "linear:start=0.5,end=0.1"}, "no miner"),
        ({"miner": "batch_hard", "miner_schedule": "linear:start=0.5,end=0.1"}, "batch_hard"),
        ({"miner": "triplet_margin", "miner_schedule": "lineer:start=0.5,end=0.1"}, "lineer"),
    ],
)
def test_bad_schedules_are_config_errors(tiny_config, overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        tiny_config(**overrides)


def test_validation_and_test_use_the_configured_distance_and_backend(tiny_config, capsys) -> None:
    """``eval_distance``/``eval_backend`` reach validation and test: the test metrics of best.pt equal PML's
    AccuracyCalculator with an unnormalised Euclidean distance on the same (unnormalised) embeddings, and
    ``dmlkit eval`` on the checkpoint defaults to the same options."""
    from dmlkit.cli import main
    from dmlkit.config import config_from_checkpoint
    from dmlkit.metrics import evaluate
    from tests_support import assert_match_pml_euclidean, checkpoint_test_embeddings

    config = tiny_config(
        name="euclid",
        normalize=False,
        eval_distance="euclidean",
        eval_backend="faiss-flat",
        metrics=["recall@1", "map@r", "r_precision"],
    )
    result = Trainer(config).run()
    rows = [json.loads(line) for line in (result.run_dir / "history.jsonl").read_text().splitlines()]
    assert all(0 <= r["val/map@r"] <= 1 for r in rows)
    test_after = json.loads((result.run_dir / "results.json").read_text())["test_after"]

    x, y, checkpoint = checkpoint_test_embeddings(result.run_dir / "best.pt")
    stored = config_from_checkpoint(checkpoint["config"], "best.pt").eval
    assert (stored.eval_distance, stored.eval_backend) == (
        "euclidean",
        "faiss-flat",
    )
    assert not torch.allclose(x.norm(dim=1), torch.ones(len(x)))  # so Euclidean ranks differ from cosine
    assert_match_pml_euclidean(test_after, x, y)
    cosine = evaluate(x, y, metrics=("map@r",), distance="cosine")
    assert cosine["map@r"] != pytest.approx(test_after["map@r"], abs=1e-9)  # the option changed something

    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(result.run_dir), "--json", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["distance"], report["backend"]) == ("euclidean", "faiss-flat")
    assert report["metrics"] == pytest.approx(test_after, abs=1e-6)


def test_dataloader_workers_train_every_batch_of_every_epoch(tiny_config) -> None:
    # tqdm.auto used to be handed the DataLoader and created (and dropped) a first, prefetching iterator.
    with_workers = Trainer(tiny_config(name="workers", epochs=2, num_workers=1)).run()
    in_process = Trainer(tiny_config(name="in-process", epochs=2)).run()
    assert ckpt.load(with_workers.run_dir / "last.pt")["global_step"] == 6
    a, b = weights(with_workers.run_dir), weights(in_process.run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_unreadable_images_replaced_while_training_are_counted_per_epoch(tmp_path, capsys) -> None:
    import numpy as np
    from PIL import Image

    from dmlkit.config import make_config

    root = tmp_path / "photos"
    rng = np.random.default_rng(0)
    for c in range(8):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(6):
            pixels = rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"c{c}" / f"{i}.jpg")
        if c < 4:  # the training classes: one truncated file each (its header still parses)
            path = root / f"c{c}" / "0.jpg"
            data = path.read_bytes()
            path.write_bytes(data[: len(data) * 2 // 3])
    config = make_config({
        "name": "substitutes", "output_dir": str(tmp_path / "runs"),
        "dataset": "folder", "data_root": str(root),
        "dataset_args": {"image_size": 16}, "skip_unreadable": True, "verify_images": "header",
        "val_fraction": 0.0, "sampler": "random", "batch_size": 8, "embedding_size": 8, "epochs": 2,
        "progress": False, "metrics": ["recall@1"], "select_metric": "recall@1",
    })  # fmt: skip
    with pytest.warns(UserWarning, match="skip_unreadable: replaced by another image"):
        result = Trainer(config).run()
    rows = [json.loads(line) for line in (result.run_dir / "history.jsonl").read_text().splitlines()]
    assert [row["substituted_images"] for row in rows] == [4, 4]  # every item once per epoch
    assert "4 unreadable image(s) replaced" in capsys.readouterr().out


def test_frozen_backbone_epochs_then_it_trains(tiny_config) -> None:
    initial = weights(Trainer(tiny_config(name="init", epochs=0)).run().run_dir, "best.pt")
    backbone = [k for k in initial if k.startswith("backbone.")]
    head = [k for k in initial if k.startswith("head.")]
    assert any(k.endswith("running_mean") for k in backbone) and head

    frozen = weights(Trainer(tiny_config(name="frozen", epochs=1, freeze_backbone_epochs=1)).run().run_dir)
    for key in backbone:  # weights and BatchNorm statistics: a fixed feature extractor
        assert torch.equal(initial[key], frozen[key]), key
    assert not torch.equal(initial[head[0]], frozen[head[0]])  # the head trained

    thawed = Trainer(tiny_config(name="thawed", epochs=2, freeze_backbone_epochs=1)).run()
    after = weights(thawed.run_dir)
    assert all(
        not torch.equal(initial[k], after[k]) for k in backbone if not k.endswith("num_batches_tracked")
    )
    rows = [json.loads(line) for line in (thawed.run_dir / "history.jsonl").read_text().splitlines()]
    assert [row["backbone_frozen"] for row in rows] == [True, False]


def test_thawing_keeps_batchnorm_frozen_by_freeze_bn(tiny_config) -> None:
    initial = weights(Trainer(tiny_config(name="init", epochs=0)).run().run_dir, "best.pt")
    after = weights(
        Trainer(tiny_config(name="both", epochs=2, freeze_backbone_epochs=1, freeze_bn=True)).run().run_dir
    )
    bn = [k for k in initial if k.endswith("running_mean")]
    for key in bn:
        layer = key.rsplit(".", 1)[0]
        for name in ("running_mean", "running_var", "weight", "bias"):
            assert torch.equal(initial[f"{layer}.{name}"], after[f"{layer}.{name}"]), f"{layer}.{name}"
    conv = next(k for k in initial if k.startswith("backbone.") and initial[k].ndim == 4)
    assert not torch.equal(initial[conv], after[conv])


def test_resume_inside_the_frozen_epochs_is_exact(tiny_config) -> None:
    import os
    import signal

    def interrupt(trainer: Trainer, global_step: int) -> None:
        if (trainer.epoch, trainer.batches_done) == (0, 1):
            os.kill(os.getpid(), signal.SIGINT)

    options = {"epochs": 3, "freeze_backbone_epochs": 2}
    straight = Trainer(tiny_config(name="straight", **options)).run()
    first = Trainer(tiny_config(name="stopped", **options), step_hooks=[interrupt]).run()
    assert first.interrupted
    Trainer(tiny_config(name="stopped", **options), first.run_dir, resume=True).run()
    a, b = weights(straight.run_dir), weights(first.run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_head_lr_is_applied_and_logged(tiny_config) -> None:
    result = Trainer(tiny_config(name="head-lr", epochs=1, scheduler="constant", head_lr=0.05)).run()
    row = json.loads((result.run_dir / "history.jsonl").read_text().splitlines()[0])
    assert row["lr"] == pytest.approx(1e-3) and row["head_lr"] == pytest.approx(0.05)


def test_no_test_before_skips_the_untrained_test(tiny_config) -> None:
    result = Trainer(tiny_config(epochs=1, test_before=False)).run()
    results = json.loads((result.run_dir / "results.json").read_text())
    assert result.before == {} and results["test_before"] == {} and results["test_after"]
    header, _rule, *rows = result.table().splitlines()
    assert header.split() == ["metric", "after"] and "nan" not in result.table()  # no column of nan
    assert [row.split()[0] for row in rows] == list(results["test_after"])
    with_before = Trainer(tiny_config(name="with-before", epochs=1)).run()
    assert with_before.table().splitlines()[0].split() == ["metric", "before", "after"]
