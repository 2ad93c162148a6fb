"""--channels-last and --compile: the layouts and the compiled module are what training uses, while
checkpoints keep the plain model's keys and load into an uncompiled model."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch

from dmlkit import models
from dmlkit.train import checkpoint as ckpt
from dmlkit.train.loop import Trainer
from dmlkit.train.step import EmbeddingStep


class Recording(EmbeddingStep):
    """The default step, recording for every batch whether the images and the weights of the widest
    convolution are channels-last (the synthetic images have 1 channel, where both layouts are contiguous:
    the channel stride tells them apart), and which module embeds it."""

    seen: ClassVar[list[tuple[bool, bool, type]]] = []

    def embed(self, batch):
        conv = max(
            (m for m in self.model.modules() if isinstance(m, torch.nn.Conv2d)), key=lambda m: m.in_channels
        )
        type(self).seen.append((batch.images.stride(1) == 1, conv.weight.stride(1) == 1, type(self.model)))
        return super().embed(batch)


def reloads_into_a_plain_model(run_dir) -> dict:
    state = ckpt.load(run_dir / "last.pt")
    assert not any("_orig_mod" in key for key in state["model"])
    model = models.build_model(**state["model_config"])
    model.load_state_dict(state["model"])  # strict: every key matches the uncompiled model
    return state


def test_channels_last_reaches_model_and_batches(tiny_config) -> None:
    Recording.seen = []
    result = Trainer(tiny_config(name="cl", epochs=1, channels_last=True), step=Recording).run()
    assert Recording.seen and all(images and weight for images, weight, _ in Recording.seen)
    assert reloads_into_a_plain_model(result.run_dir)["config"]["run"]["channels_last"] is True

    Recording.seen = []
    Trainer(tiny_config(name="plain", epochs=1), step=Recording).run()
    assert not any(images or weight for images, weight, _ in Recording.seen)


def test_compile_wraps_the_model_the_step_trains(tiny_config, monkeypatch) -> None:
    """The wiring, with torch.compile's eager backend (tracing without code generation: fast on CPU)."""
    real_compile, compiled = torch.compile, []

    def eager_compile(module, **kwargs):
        compiled.append(module)
        return real_compile(module, backend="eager", **kwargs)

    monkeypatch.setattr(torch, "compile", eager_compile)
    Recording.seen = []
    trainer = Trainer(tiny_config(name="compiled", epochs=1, compile=True), step=Recording)
    result = trainer.run()
    assert compiled == [trainer.model] and not isinstance(
        trainer.model, torch._dynamo.eval_frame.OptimizedModule
    )
    assert {kind for *_, kind in Recording.seen} == {torch._dynamo.eval_frame.OptimizedModule}
    state = reloads_into_a_plain_model(result.run_dir)
    assert state["config"]["run"]["compile"] is True
    for name in ("best.pt",):
        assert not any("_orig_mod" in key for key in ckpt.load(result.run_dir / name)["model"])


def test_performance_switches_may_change_on_resume(tiny_config, monkeypatch) -> None:
    first = Trainer(tiny_config(name="switch", epochs=1)).run()
    monkeypatch.setattr(torch, "compile", lambda module, **kw: module)  # the wiring is tested above
    resumed = Trainer(
        tiny_config(name="switch", epochs=2, channels_last=True, compile=True), first.run_dir, resume=True
    ).run()
    assert not resumed.interrupted
    assert ckpt.load(first.run_dir / "last.pt")["config"]["run"]["channels_last"] is True


@pytest.mark.slow
def test_compile_with_inductor_trains_and_matches_eager(tiny_config) -> None:
    """A real torch.compile (inductor, C++ on CPU): the run finishes with finite weights close to eager's."""
    eager = Trainer(tiny_config(name="eager", epochs=1)).run()
    compiled = Trainer(tiny_config(name="inductor", epochs=1, compile=True)).run()
    a, b = (
        ckpt.load(eager.run_dir / "last.pt")["model"],
        reloads_into_a_plain_model(compiled.run_dir)["model"],
    )
    for key, tensor in a.items():
        if tensor.is_floating_point():
            assert torch.allclose(tensor, b[key], atol=1e-4), key
