"""Solver statistics, readable without a counter inside the user's ``func``.

Every solve owns a :class:`SolveStats`. A backward pass that runs later (adjoint, checkpoint)
updates the same object, so a recorder opened around the forward pass also sees the backward NFE:

    with record_stats() as stats:
        loss = model(x).sum()
    loss.backward()
    stats.nfe_forward, stats.nfe_backward
"""
from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass, fields
from typing import Iterator, List


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


class StatsRecorder:
    """Sums the statistics of every solve started while it was active."""

    def __init__(self) -> None:
        self.solves: List[SolveStats] = []

    def __getattr__(self, name: str) -> int:
        if name == "switched_at":  # the first switch among the recorded solves
            return next((s.switched_at for s in self.solves if not math.isnan(s.switched_at)), math.nan)
        if name in _FIELDS:
            return sum(getattr(s, name) for s in self.solves)
        raise AttributeError(name)

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in _FIELDS}

    def __repr__(self) -> str:
        return f"StatsRecorder({self.as_dict()})"


_FIELDS = tuple(f.name for f in fields(SolveStats))
_active = threading.local()


def _recorders() -> List[StatsRecorder]:
    if not hasattr(_active, "stack"):
        _active.stack = []
    return _active.stack


@contextlib.contextmanager
def record_stats() -> Iterator[StatsRecorder]:
    recorder = StatsRecorder()
    _recorders().append(recorder)
    try:
        yield recorder
    finally:
        _recorders().remove(recorder)


def new_solve_stats() -> SolveStats:
    stats = SolveStats()
    for recorder in _recorders():
        recorder.solves.append(stats)
    return stats
