"""Timing helpers shared by the benchmark scripts: interleaved, repeated, median-based comparisons.

The machines these run on are often shared, so a single timing is noise. :func:`compare` times two (or
more) callables in alternating blocks (A B, B A, A B, ...), so a burst of foreign load hits both sides
alike, and summarises each side by the median of its per-call block times and the comparison by the
median of the per-round ratios (each ratio comes from two adjacent blocks).
"""

from __future__ import annotations

import gc
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work (a no-op on CPU) so a timer brackets the whole computation."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_block(fn: Callable[[], object], number: int, device: torch.device) -> float:
    """Seconds per call of ``fn`` over ``number`` back-to-back calls (garbage collector paused)."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        synchronize(device)
        start = time.perf_counter()
        for _ in range(number):
            fn()
        synchronize(device)
        return (time.perf_counter() - start) / number
    finally:
        if enabled:
            gc.enable()


@dataclass
class Comparison:
    """Per-call block times (seconds) of each callable, one entry per round."""

    names: Sequence[str]
    times: dict[str, list[float]] = field(default_factory=dict)
    number: int = 1

    def median(self, name: str) -> float:
        return statistics.median(self.times[name])

    def ratio(self, slow: str, fast: str) -> float:
        """Median over rounds of ``time[slow] / time[fast]`` (rounds pair adjacent blocks)."""
        return statistics.median(s / f for s, f in zip(self.times[slow], self.times[fast], strict=True))

    def spread(self, name: str) -> float:
        """Interquartile range relative to the median: a noise indicator."""
        values = sorted(self.times[name])
        if len(values) < 4:
            return 0.0
        q = statistics.quantiles(values, n=4)
        return (q[2] - q[0]) / statistics.median(values)


def compare(
    fns: dict[str, Callable[[], object]],
    device: torch.device,
    warmup: int = 3,
    min_block_s: float = 0.05,
    budget_s: float = 4.0,
    min_rounds: int = 7,
    max_rounds: int = 31,
) -> Comparison:
    """Time every callable of ``fns`` in interleaved blocks and return the per-round block times.

    Each callable is warmed up ``warmup`` times, then a single call of each estimates the cost. A block
    repeats a call ``number`` times, enough for ``min_block_s`` for the slowest callable, so that
    every side runs the same count per block. The number of rounds fits ``budget_s`` (clamped to
    ``[min_rounds, max_rounds]``); the order of the callables alternates from round to round.
    """
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    estimate = {name: time_block(fns[name], 1, device) for name in names}
    number = max(1, int(min_block_s / max(min(estimate.values()), 1e-9)))
    # cap the calls per block so a slow side does not take forever
    slowest = max(estimate.values())
    number = max(1, min(number, int(max(min_block_s, 4 * slowest) / slowest)))
    per_round = number * sum(estimate.values())
    rounds = int(min(max_rounds, max(min_rounds, budget_s / max(per_round, 1e-9))))
    result = Comparison(names=names, times={name: [] for name in names}, number=number)
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            result.times[name].append(time_block(fns[name], number, device))
    return result


def limit_memory(gigabytes: float | None) -> None:
    """Cap this process's data segment (heap and anonymous mappings) so a runaway allocation fails with
    a ``RuntimeError`` instead of exhausting a shared machine's memory. None: no cap."""
    if gigabytes is None or gigabytes <= 0:
        return
    limit = int(gigabytes * (1 << 30))
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation failure (CPU allocator, CUDA OOM or Python's MemoryError)."""
    if isinstance(error, MemoryError | torch.OutOfMemoryError):
        return True
    text = str(error)
    return "can't allocate memory" in text or "out of memory" in text.lower()


def cpu_name() -> str:
    """The CPU model from ``/proc/cpuinfo`` (falls back to ``platform.processor()``)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_description(device: torch.device, threads: int) -> str:
    """One line: the device (GPU name or CPU model and core count), intra-op threads, memory."""
    cores = os.cpu_count() or 0
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
        memory = f", {mem_gb:.0f} GiB RAM"
    except (ValueError, OSError):
        memory = ""
    cpu = f"{cores}-core CPU ({cpu_name()}){memory}, torch.set_num_threads({threads})"
    if device.type == "cuda":
        return f"GPU {torch.cuda.get_device_name(device)}; host {cpu}"
    return cpu


def replace_section(path: str, heading: str, body: str) -> None:
    """Write ``heading`` + ``body`` into the Markdown file ``path``, replacing the section that starts
    with that exact heading line (up to the next heading of the same or a higher level) or appending
    it; the rest of the file is left untouched. Creates the file (with a title) if needed."""
    level = len(heading) - len(heading.lstrip("#"))
    section = heading + "\n\n" + body.strip("\n") + "\n"
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        lines = ["# Benchmarks", ""]
    start = next((i for i, line in enumerate(lines) if line.strip() == heading), None)
    if start is None:
        while lines and not lines[-1].strip():
            lines.pop()
        new = lines + ["", *section.splitlines()]
    else:
        end = len(lines)
        fenced = False
        for i in range(start + 1, len(lines)):
            stripped = lines[i].lstrip()
            if stripped.startswith("```"):
                fenced = not fenced
            if fenced:
                continue
            hashes = len(stripped) - len(stripped.lstrip("#"))
            if 0 < hashes <= level and stripped[hashes : hashes + 1] == " ":
                end = i
                break
        tail = lines[end:]
        new = lines[:start] + section.splitlines() + ([""] + tail if tail else [])
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(new).rstrip("\n") + "\n")
