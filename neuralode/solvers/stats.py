"""Solver statistics, readable without a counter inside the user's ``func``.

Every solve owns a :class:`SolveStats`. A backward pass that runs later (adjoint, checkpoint)
updates the same object, so a recorder opened around the forward pass also sees the backward NFE:

    with record_stats() as stats:
        loss = model(x).sum()
    loss.backward()
    stats.nfe_forward, stats.nfe_backward

``record_stats(memory=True)`` also measures the peak memory of what runs inside the block (put
the backward pass inside it too): ``stats.mem_peak`` in bytes, ``stats.mem_source`` says how.
"""
from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass, fields
from typing import Dict, Iterator, List, Optional

import torch


@dataclass
class SolveStats:
    nfe_forward: int = 0
    nfe_backward: int = 0
    n_accepted: int = 0
    n_rejected: int = 0
    n_accepted_backward: int = 0
    n_rejected_backward: int = 0
    n_jac: int = 0  # Jacobian evaluations of implicit methods (forward and backward)
    n_linear_solves: int = 0
    n_newton_iters: int = 0
    n_switches: int = 0  # method="auto": explicit -> implicit switches
    switched_at: float = math.nan  # time of the first switch (nan: none)
    sample_accepted: Optional[torch.Tensor] = None  # per-sample solves: accepted steps of each sample
    sample_rejected: Optional[torch.Tensor] = None
    # grad="reversible" (nan otherwise): the largest relative error of a state reconstructed by the backward
    # pass at an output time, and the largest relative gap |y - z| / |y| of the coupled states there
    reconstruction_error: float = math.nan
    coupling_drift: float = math.nan


class StatsRecorder:
    """Sums the statistics of every solve started while it was active."""

    def __init__(self) -> None:
        self.solves: List[SolveStats] = []
        self.mem_peak: Optional[int] = None  # bytes, with record_stats(memory=True)
        self.mem_source: Optional[str] = None  # "cuda" or "autograd" (see MemoryWatch)

    def __getattr__(self, name: str) -> int:
        if name == "switched_at":  # the first switch among the recorded solves
            return next((s.switched_at for s in self.solves if not math.isnan(s.switched_at)), math.nan)
        if name in ("reconstruction_error", "coupling_drift"):  # the worst among the reversible solves (nan: none)
            return max((getattr(s, name) for s in self.solves if not math.isnan(getattr(s, name))), default=math.nan)
        if name in ("sample_accepted", "sample_rejected"):  # the latest per-sample solve's (None: none)
            return next((getattr(s, name) for s in reversed(self.solves) if getattr(s, name) is not None), None)
        if name in _FIELDS:
            return sum(getattr(s, name) for s in self.solves)
        raise AttributeError(name)

    def as_dict(self) -> dict:
        out = {name: getattr(self, name) for name in _FIELDS}
        if self.mem_source is not None:
            out.update(mem_peak=self.mem_peak, mem_source=self.mem_source)
        return out

    def __repr__(self) -> str:
        return f"StatsRecorder({self.as_dict()})"


_FIELDS = tuple(f.name for f in fields(SolveStats))
_active = threading.local()


def _recorders() -> List[StatsRecorder]:
    if not hasattr(_active, "stack"):
        _active.stack = []
    return _active.stack


class _Held:
    """What autograd stores for one saved tensor while a MemoryWatch is on: the tensor (detached,
    so an output saved by its own node makes no reference cycle), released when autograd drops it."""

    __slots__ = ("watch", "key", "tensor")

    def __init__(self, watch: "MemoryWatch", key: tuple, tensor: torch.Tensor):
        self.watch, self.key, self.tensor = watch, key, tensor

    def __del__(self):
        self.watch._release(self.key)


class MemoryWatch:
    """The peak memory of a block of work, in bytes (forward and backward passes inside it).

    On CUDA (when the CUDA runtime is in use) it is the caching allocator's high-water mark above
    the memory allocated when the block began (``torch.cuda.max_memory_allocated``; it resets the
    device's peak statistics). On the CPU PyTorch keeps no allocator statistics, and neither
    tracemalloc (it does not see tensor memory) nor the process RSS (the C allocator keeps freed
    pages; a delta misses reused memory, and it needs a sampling thread to see a peak) measures a
    tensor peak. There it counts instead what the gradient modes trade against each other: the
    bytes autograd holds for backward (``saved_tensors_hooks``), each storage once, as they are
    saved and released. That covers the graph of direct backprop and the states the adjoint,
    checkpoint and reversible modes store, but not short-lived working tensors, so on the CPU it
    is a lower bound that grows exactly where memory grows with the number of steps.
    """

    def __init__(self) -> None:
        self.live = self.peak = 0
        self.storages: Dict[tuple, list] = {}  # storage key -> [bytes, number of saved tensors on it]
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._cuda_base: Optional[int] = None

    def __enter__(self) -> "MemoryWatch":
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()
            self._cuda_base = torch.cuda.memory_allocated()
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    def result(self) -> tuple:
        """(peak bytes, source): the CUDA allocator's when this block allocated CUDA memory."""
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            peak = torch.cuda.max_memory_allocated() - (self._cuda_base or 0)
            if peak > 0:
                return peak, "cuda"
        return self.peak, "autograd"

    def _pack(self, tensor: torch.Tensor) -> _Held:
        try:
            storage = tensor.untyped_storage()
            key, size = (storage.device.type, storage.device.index, storage.data_ptr()), storage.nbytes()
        except (RuntimeError, NotImplementedError):  # no plain storage (sparse, nested, ...)
            key, size = ("tensor", id(tensor)), tensor.nelement() * tensor.element_size()
        entry = self.storages.get(key)
        if entry is None:
            self.storages[key] = [size, 1]
            self.live += size
            self.peak = max(self.peak, self.live)
        else:
            entry[1] += 1
        return _Held(self, key, tensor.detach())

    @staticmethod
    def _unpack(held: _Held) -> torch.Tensor:
        return held.tensor

    def _release(self, key: tuple) -> None:
        entry = self.storages[key]
        entry[1] -= 1
        if entry[1] == 0:
            del self.storages[key]
            self.live -= entry[0]


@contextlib.contextmanager
def record_stats(memory: bool = False) -> Iterator[StatsRecorder]:
    """Sum the statistics of the solves started inside the block; with ``memory=True`` also
    measure its peak memory (:class:`MemoryWatch`) into ``mem_peak``/``mem_source``."""
    recorder = StatsRecorder()
    _recorders().append(recorder)
    watch = MemoryWatch() if memory else None
    try:
        if watch is None:
            yield recorder
        else:
            with watch:
                yield recorder
    finally:
        _recorders().remove(recorder)
        if watch is not None:
            recorder.mem_peak, recorder.mem_source = watch.result()


def new_solve_stats() -> SolveStats:
    stats = SolveStats()
    for recorder in _recorders():
        recorder.solves.append(stats)
    return stats
