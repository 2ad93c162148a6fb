"""Training throughput of one model fed three ways: synthetic tensors already on the device (the ceiling),
the GPU input pipeline (nvJPEG decode + one roi_align crop per batch), and the CPU pipeline (DataLoader
workers decoding and augmenting), on real JPEGs. Writes a markdown table.

    python benchmarks/gpu_pipeline.py ../shared/data/clothing/images --out gpu_pipeline.md

By default (a CUDA device): ResNet-50 (torchvision, random weights), bf16 autocast, channels-last,
``torch.compile``, batch 256 at 224 px, SGD on a 1000-way cross-entropy (the step a classification-style
metric-learning loss costs), ``RandomResizedCrop`` + flip (the ``base`` recipe), workers: one per core but
one. Each input path runs ``--warmup`` untimed steps, then ``--steps`` timed ones (the device synchronised
at both ends); the table gives images per second and the share of the ceiling. The data-only rows time the
loaders alone (no model), the most each path can feed.

A check on the CPU (under a minute):

    python benchmarks/gpu_pipeline.py ../shared/data/clothing/images --device cpu --steps 2 \\
        --model resnet18 --batch 8 --warmup 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch.utils.data import DataLoader

from dmlkit.data import FileImageDataset, auto_workers, transforms
from dmlkit.data.gpu_pipeline import GpuBatchPipeline, GpuLoader


class Batches:
    """``steps`` random batches of ``batch`` indices of ``count`` items (seeded), as a batch sampler."""

    def __init__(self, count: int, batch: int, steps: int, seed: int = 0) -> None:
        self.count, self.batch, self.steps, self.seed = count, batch, steps, seed

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng(self.seed)
        order = rng.permutation(self.count)
        position = 0
        for _ in range(self.steps):
            if position + self.batch > len(order):
                order, position = rng.permutation(self.count), 0
            yield order[position : position + self.batch].tolist()
            position += self.batch


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("images", type=Path, help="folder of JPEGs (e.g. ../shared/data/clothing/images)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="resnet50", help="a torchvision classification model")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=60, help="timed steps per input path")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps before each timing")
    parser.add_argument("--workers", default="auto", help="DataLoader workers: a count or auto")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the model (default: on CUDA only)")  # fmt: skip
    parser.add_argument("--amp", choices=("bf16", "fp16", "none"), default=None, help="default: bf16 on CUDA")
    parser.add_argument("--skip-cpu-pil", action="store_true", help="leave out the Pillow CPU path")
    parser.add_argument("--out", type=Path, default=None, help="markdown file for the table")
    return parser.parse_args()


def _model(name: str, device: torch.device, compile_it: bool) -> tuple[torch.nn.Module, Callable]:
    model = torchvision.models.get_model(name, weights=None).to(device).to(memory_format=torch.channels_last)
    runner = torch.compile(model) if compile_it else model
    return model, runner


def _train_step(
    runner: Callable, model: torch.nn.Module, optimizer: torch.optim.Optimizer, amp: torch.dtype | None
) -> Callable[[torch.Tensor, torch.Tensor], None]:
    device_type = next(model.parameters()).device.type

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = torch.nn.functional.cross_entropy(runner(images), labels % 1000)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _timed(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    step: Callable[[torch.Tensor, torch.Tensor], None] | None,
    device: torch.device,
    warmup: int,
    batch: int,
) -> float:
    """Images per second over the batches after the first ``warmup`` (``step`` None: the loader alone)."""
    count, started = 0, None
    for number, (images, labels, _) in enumerate(batches):
        if number == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if step is not None:
            step(images, labels)
        if number >= warmup:
            count += batch
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    assert started is not None, "fewer batches than warm-up steps"
    return count / (time.perf_counter() - started)


def _synthetic(count: int, batch: int, size: int, device: torch.device):
    images = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (batch,), device=device)
    indices = torch.arange(batch, device=device)
    return ((images, labels, indices) for _ in range(count))


def main() -> None:
    args = _parse()
    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    compile_it = on_cuda if args.compile is None else args.compile
    amp_name = args.amp or ("bf16" if on_cuda else "none")
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp_name]
    workers = auto_workers() if args.workers == "auto" else int(args.workers)
    torch.backends.cudnn.benchmark = True
    paths = sorted(str(p) for p in args.images.glob("*.jpg"))
    if not paths:
        raise SystemExit(f"no .jpg files in {args.images}")
    labels = np.arange(len(paths)) % 1000
    spec = {"image_size": args.size, "channels": 3, "recipe": "base"}
    mean, std = transforms.normalisation("photo", 3, None, None)
    total, batch, size = args.warmup + args.steps, args.batch, args.size

    def dataset(decoder: str) -> FileImageDataset:
        made = FileImageDataset(paths, labels, [str(c) for c in range(1000)], paths, decoder=decoder)
        made.transform, made.augment_seed = transforms.build("train", **spec), 0
        return made

    def gpu_loader() -> GpuLoader:
        files = dataset("torchvision")
        plan = transforms.recipe_of("base").crop_plan()
        assert plan is not None
        pipeline = GpuBatchPipeline(files, plan, args.size, mean, std, device)
        return GpuLoader(files, Batches(len(paths), args.batch, total), pipeline, num_workers=workers)

    def cpu_loader(decoder: str) -> DataLoader:
        return DataLoader(
            dataset(decoder), batch_sampler=Batches(len(paths), args.batch, total), num_workers=workers,
            pin_memory=on_cuda, persistent_workers=False, prefetch_factor=4 if workers else None,
        )  # fmt: skip

    model, runner = _model(args.model, device, compile_it)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    step = _train_step(runner, model, optimizer, amp)
    started = time.perf_counter()
    for images, target, _ in _synthetic(3, args.batch, args.size, device):  # compile and autotune first
        step(images, target)
    compile_seconds = time.perf_counter() - started
    paths_to_run: list[tuple[str, Callable[[], Iterable], bool]] = [
        ("synthetic tensors on the device (ceiling)", lambda: _synthetic(total, batch, size, device), True),
        ("GPU pipeline (nvJPEG + roi_align)", gpu_loader, True),
        ("CPU pipeline, torchvision decode", lambda: cpu_loader("torchvision"), True),
    ]  # fmt: skip
    if not args.skip_cpu_pil:
        paths_to_run.append(("CPU pipeline, Pillow decode", lambda: cpu_loader("pil"), True))
    paths_to_run += [
        ("data only: GPU pipeline", gpu_loader, False),
        ("data only: CPU pipeline, torchvision decode", lambda: cpu_loader("torchvision"), False),
    ]
    rows = []
    for name, make, with_model in paths_to_run:
        rate = _timed(make(), step if with_model else None, device, args.warmup, args.batch)
        rows.append((name, rate))
        print(f"{name}: {rate:,.0f} img/s", flush=True)
    ceiling = rows[0][1]
    gpu_name = torch.cuda.get_device_name(device) if on_cuda else platform.processor() or "CPU"
    header = (
        f"{args.model}, batch {args.batch}, {args.size} px, amp {amp_name}, channels-last, "
        f"compile {'on' if compile_it else 'off'}; {gpu_name}; {workers} DataLoader workers on "
        f"{len(os.sched_getaffinity(0))} cores; {len(paths)} JPEGs from {args.images}; "
        f"{args.steps} timed steps after {args.warmup}; torch {torch.__version__}, torchvision "
        f"{torchvision.__version__}; first steps (compile) {compile_seconds:.0f} s"
    )
    lines = [header, "", "| input | img/s | share of the ceiling |", "|---|---|---|"]
    lines += [f"| {name} | {rate:,.0f} | {rate / ceiling:.0%} |" for name, rate in rows]
    table = "\n".join(lines)
    print("\n" + table)
    if args.out is not None:
        args.out.write_text(table + "\n")
        args.out.with_suffix(".json").write_text(json.dumps({"setup": header, "rows": rows}, indent=2))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
