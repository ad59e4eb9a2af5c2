"""The memory a training process used: its peak, measured, to print beside the estimate (``graftr estimate``).

On CPU the figure is the kernel's high-water mark of the process's resident memory (``VmHWM``) above its
resident memory when training started (after the imports, the process group and the tokenized data, before any
weight is read): the weights (mapped from the checkpoint or copied), ZeRO partitions and gathered layers,
gradients, optimizer states and activations, and what the allocator keeps of freed memory. The checkpoint's pages are shared between the processes of one machine, so the sum over ranks
counts them once per rank; a sampler also records the peak of the private (anonymous) part, ``RssAnon``, which
is this rank's own. On a GPU the figure is ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import torch


def _status() -> dict[str, int]:
    """Resident-memory fields of /proc/self/status, in bytes."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


# "auto" returns freed memory when graftr's estimate of this machine's training processes exceeds this share of the
# memory available at the start: there the retained heap can decide whether the run fits; below it the run fits
# either way and keeps the faster steps
TIGHT = 0.5
# ... or when the model has this many parameters: there the heap keeps gigabytes (0.84 GiB, 17 % of the 7B NF4 run's
# peak) and the page faults are a small part of a step (+6.6 % on that run), while on SmolLM2-135M they cost +60 %
# for 0.27 GiB (docs/benchmarks.md)
LARGE = 3_000_000_000
MMAP_THRESHOLD = 128 * 1024  # glibc's default mmap threshold, made fixed


def return_freed_memory() -> bool:
    """Keep glibc's malloc from holding on to freed activations (CPU training; returns whether it applied).

    glibc serves an allocation above its mmap threshold (128 KiB) with its own mapping, returned to the system when
    freed, but after such a free it raises the threshold to that size (up to 32 MiB), so later activations of that
    size come from the heap, which keeps freed memory resident. Over a training step that retention reached 0.25 GiB
    of a 0.85 GiB peak on a 57 M-parameter Llama (tests/test_scale.py): ``mallopt(M_MMAP_THRESHOLD, 128 KiB)`` fixes
    the threshold at its default and turns the adjustment off.

    The cost is a page fault (and the kernel zeroing the page) per 4 KiB of every new tensor above 128 KiB, on
    every step: measured on SmolLM2-135M (IA³, batch 8 × ~70 tokens, 2 cores), 3.1 s a step instead of 1.9 s for
    0.27 GiB less peak (docs/benchmarks.md). So ``graftr train`` applies it only where memory is tight or the
    model is large (:func:`decide`).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to do
        return False
    if mallopt is None:
        return False
    return bool(mallopt(-3, MMAP_THRESHOLD))  # M_MMAP_THRESHOLD


def available() -> int | None:
    """Bytes of memory the system can give without swapping (``MemAvailable``), or None where not known."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def decide(setting: str, estimate: int | None, local_processes: int, free: int | None,
           parameters: int | None = None) -> tuple[bool, str | None]:
    """Whether this CPU process returns freed memory to the system (``train.return_freed_memory``), and the note
    that says why when it does.

    ``auto``: when the estimated peak of this machine's training processes (``estimate`` per process ×
    ``local_processes``) exceeds :data:`TIGHT` of the memory ``free`` at the start, or the model has
    :data:`LARGE` ``parameters`` or more; without an estimate, not."""
    if setting == "always":
        return True, "train.return_freed_memory: always (freed activations go back to the system; slower steps)"
    if setting == "never" or estimate is None:
        return False, None
    need = estimate * local_processes
    if free and need > TIGHT * free:
        return True, (f"memory is tight ({gib(need)} estimated for {local_processes} process(es), {gib(free)} "
                      "available): freed activations go back to the system at some cost in step time "
                      "(train.return_freed_memory: never turns this off)")
    if parameters is not None and parameters >= LARGE:
        return True, (f"a {parameters / 1e9:.1f}B-parameter model: freed activations go back to the system (the "
                      "heap would keep gigabytes; its page faults cost a few percent of such a model's steps; "
                      "train.return_freed_memory: never turns this off)")
    return False, None


def _reset_high_water_mark() -> None:
    """Set ``VmHWM`` to the current resident size (Linux: ``5`` written to ``/proc/self/clear_refs``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not permitted here: the high-water mark then counts from the process's start
        pass


@dataclass
class Peak:
    peak: int  # bytes above the start (CPU: VmHWM - VmRSS at start; GPU: max allocated)
    anon: int | None  # CPU: sampled peak of the private resident memory above the start
    device: str


class PeakMemory:
    """Start at the beginning of training; :meth:`stop` returns the :class:`Peak`."""

    def __init__(self, device: torch.device, interval: float = 0.05):
        self.device = device
        self.cpu = device.type == "cpu" and Path("/proc/self/status").is_file()
        self._stop = threading.Event()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            self.start = torch.cuda.memory_allocated(device)
        elif self.cpu:
            _reset_high_water_mark()  # a process that ran something before (a test, a notebook) measures this run
            status = _status()
            self.start, self.anon_start = status["VmRSS"], status.get("RssAnon", 0)
            self.anon_peak = self.anon_start
            self._thread = threading.Thread(target=self._sample, args=(interval,), daemon=True)
            self._thread.start()
        else:
            self.start = 0

    def _sample(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.anon_peak = max(self.anon_peak, _status().get("RssAnon", 0))

    def stop(self) -> Peak:
        if self.device.type == "cuda":
            return Peak(torch.cuda.max_memory_allocated(self.device) - self.start, None, "cuda")
        if not self.cpu:
            return Peak(0, None, self.device.type)
        self._stop.set()
        self._thread.join()
        status = _status()
        self.anon_peak = max(self.anon_peak, status.get("RssAnon", 0))
        return Peak(status["VmHWM"] - self.start, self.anon_peak - self.anon_start, "cpu")


def gib(n: int | float) -> str:
    return f"{n / 2**30:.2f} GiB"
