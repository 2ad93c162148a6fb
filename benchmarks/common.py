"""Timing helpers shared by the benchmark scripts: interleaved, repeated, median-based comparisons.

The machines these run on are often shared, so a single timing is noise. :func:`compare` times two (or
more) callables in alternating blocks (A B, B A, A B, ...), so a burst of foreign load hits both sides
alike, and summarises each side by the median of its per-call block times and the comparison by the
median of the per-round ratios (each ratio comes from two adjacent blocks).
"""

from __future__ import annotations

import gc
import math
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


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def time_block(fn: Callable[[], object], number: int, device: torch.device, clock: str = "wall") -> float:
    """Seconds per call of ``fn`` over ``number`` back-to-back calls (garbage collector paused).

    ``clock``: ``wall`` (``time.perf_counter``) or ``cpu`` (``time.process_time``: CPU time of this
    process, all threads; insensitive to other processes' load with one thread, but it also counts
    the busy-waiting of idle OpenMP threads with several).
    """
    timer = CLOCKS[clock]
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        synchronize(device)
        start = timer()
        for _ in range(number):
            fn()
        synchronize(device)
        return (timer() - start) / number
    finally:
        if enabled:
            gc.enable()


@dataclass
class Comparison:
    """Per-call block times (seconds) of each callable, one entry per kept round."""

    names: Sequence[str]
    times: dict[str, list[float]] = field(default_factory=dict)
    number: int = 1
    #: CPU cores used by other processes during each kept round (None where /proc/stat is unreadable)
    foreign: list[float | None] = field(default_factory=list)
    #: rounds discarded because other processes were busy
    discarded: int = 0
    #: True when too few quiet rounds were found and the least-loaded busy ones were kept
    noisy: bool = False

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


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def busy_cpu_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy (all processes, all cores) since boot, from
    ``/proc/stat``; None where unavailable."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    values = [int(v) for v in fields[1:9]] + [0] * 8
    user, nice, system, _idle, _iowait, irq, softirq, steal = values[:8]
    return (user + nice + system + irq + softirq + steal) / _CLOCK_TICKS


class ForeignLoad:
    """Measures how many cores *other* processes kept busy between :meth:`start` and :meth:`stop`:
    the machine's busy CPU time (``/proc/stat``) minus this process's own CPU time, per elapsed second.
    Resolution is a clock tick per core (10 ms), so intervals should last a few tenths of a second."""

    def start(self) -> None:
        self._busy, self._own, self._wall = busy_cpu_seconds(), time.process_time(), time.perf_counter()

    def stop(self) -> float | None:
        busy = busy_cpu_seconds()
        if busy is None or self._busy is None:
            return None
        wall = max(time.perf_counter() - self._wall, 1e-9)
        return max(0.0, (busy - self._busy) - (time.process_time() - self._own)) / wall


def compare(
    fns: dict[str, Callable[[], object]],
    device: torch.device,
    warmup: int = 3,
    min_block_s: float = 0.05,
    budget_s: float = 4.0,
    min_rounds: int = 7,
    max_rounds: int = 31,
    clock: str = "wall",
    max_foreign: float | None = None,
    max_wait_s: float = 300.0,
) -> Comparison:
    """Time every callable of ``fns`` in interleaved blocks and return the per-round block times.

    Each callable is warmed up ``warmup`` times, then the fastest of three single calls estimates its
    cost. A block repeats a call ``number`` times: enough for the fastest callable to run
    ``min_block_s``, but at most ``max(4 · min_block_s, slowest call)`` for the slowest; every callable
    runs the same count per block. A round runs one block of each callable, in alternating order from
    round to round; the number of rounds fits ``budget_s`` (clamped to ``[min_rounds, max_rounds]``).

    On a shared machine a round during which other processes kept more than ``max_foreign`` cores busy
    (see :class:`ForeignLoad`) is discarded and repeated after a pause, for at most ``max_wait_s``
    seconds; if too few quiet rounds were found by then, the least-loaded ones are kept and the result is
    marked ``noisy``. ``max_foreign=None`` (the default) keeps every round.
    """
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    estimate = {name: min(time_block(fns[name], 1, device, clock) for _ in range(3)) for name in names}
    fastest, slowest = max(min(estimate.values()), 1e-9), max(max(estimate.values()), 1e-9)
    number = max(1, min(math.ceil(min_block_s / fastest), int(max(4 * min_block_s, slowest) / slowest)))
    per_round = number * sum(estimate.values())
    rounds = int(min(max_rounds, max(min_rounds, budget_s / max(per_round, 1e-9))))
    result = Comparison(names=names, times={name: [] for name in names}, number=number)
    recorded: list[tuple[float, dict[str, float]]] = []  # (foreign load, times) of every round run
    meter = ForeignLoad()
    deadline = time.perf_counter() + max_wait_s
    r = 0
    while True:
        order = names if r % 2 == 0 else names[::-1]
        r += 1
        meter.start()
        times = {name: time_block(fns[name], number, device, clock) for name in order}
        load = meter.stop()
        recorded.append((-1.0 if load is None else load, times))
        quiet = [t for t in recorded if max_foreign is None or t[0] <= max_foreign]
        if len(quiet) >= rounds:
            break
        if time.perf_counter() > deadline and len(recorded) >= rounds:
            result.noisy = True
            quiet = sorted(recorded, key=lambda t: t[0])[:rounds]
            break
        if load is not None and max_foreign is not None and load > max_foreign:
            time.sleep(min(1.0, 2 * per_round))  # let the other process's burst pass
    result.discarded = len(recorded) - len(quiet)
    for load, times in quiet:
        result.foreign.append(None if load < 0 else load)
        for name in names:
            result.times[name].append(times[name])
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
        new = [*lines, "", *section.splitlines()]
    else:
        end = next_heading(lines, start, level)
        tail = lines[end:]
        new = lines[:start] + section.splitlines() + (["", *tail] if tail else [])
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(new).rstrip("\n") + "\n")


def next_heading(lines: list[str], start: int, level: int) -> int:
    """Index of the first Markdown heading of ``level`` or higher after line ``start`` (headings inside
    code fences do not count), or ``len(lines)``."""
    fenced = False
    for i in range(start + 1, len(lines)):
        stripped = lines[i].lstrip()
        if stripped.startswith("```"):
            fenced = not fenced
        if fenced:
            continue
        hashes = len(stripped) - len(stripped.lstrip("#"))
        if 0 < hashes <= level and stripped[hashes : hashes + 1] == " ":
            return i
    return len(lines)


def fmt_ms(value: float | None) -> str:
    """Milliseconds for a table: 3 significant digits below 100, whole numbers above; ``—`` for None."""
    if value is None:
        return "—"
    return f"{value:.3g}" if value < 100 else f"{value:,.0f}"
