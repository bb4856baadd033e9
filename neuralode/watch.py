"""Solver events a user of the runner should hear about, beyond NFE: ``solver=auto`` switching to
the implicit method, forward NFE growing far beyond its early level (the learned dynamics
stiffening), and warnings raised by the solver library.

The runner wraps every training iteration and every evaluation in :meth:`SolverWatch.block`. Each
kind of event is logged once, when it first happens (with the iteration and phase), counted after
that, and written to TensorBoard (``solver/*`` scalars, ``solver/events`` text) and to the
``solver_events`` list of ``metrics.json``. Warnings from outside this package are passed on
unchanged; the CLI filters the ones a user cannot act on (see ``train.main``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import statistics
import warnings
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger("neuralode.train")

PACKAGE = str(Path(__file__).resolve().parent)
BASELINE_ITERS = 5  # iterations whose median forward NFE is the baseline
NFE_GROWTH = 10.0  # an iteration with this many times the baseline forward NFE is reported


class SolverWatch:
    def __init__(self, run: Any, method: str):
        self.run, self.method = run, method
        self.events: dict[str, dict[str, Any]] = {}  # kind (or warning text) -> first occurrence and count
        self._early_nfe: list[float] = []

    @contextlib.contextmanager
    def block(self, step: int, phase: str) -> Iterator[None]:
        """Collect the warnings raised inside the block; solver statistics are passed to
        :meth:`solves` by the caller, who owns the ``record_stats`` recorder."""
        with warnings.catch_warnings(record=True) as caught:
            yield
        for w in caught:
            if str(Path(w.filename).resolve()).startswith(PACKAGE):
                self._event(f"warning: {w.message}", step, phase, f"{w.category.__name__}: {w.message}",
                            event="warning", category=w.category.__name__, message=str(w.message))
            else:
                warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)

    def solves(self, stats: Any, step: int, phase: str, training: bool) -> None:
        """Look at the statistics of one iteration (``training``) or one evaluation batch."""
        if self.method == "auto" and training:
            self.run.scalars({"solver/auto_switches": stats.n_switches}, step)
        if stats.n_switches:
            t = stats.switched_at
            self._event("auto_switch", step, phase,
                        f"solver=auto switched from its explicit to its implicit method at t={t:.6g} "
                        f"({stats.n_switches} solve(s) switched); later switches are counted in TensorBoard "
                        "(solver/auto_switches) and metrics.json", t=t, switches=stats.n_switches)
            if training:
                self.run.scalars({"solver/switched_at": t}, step)
        if not training:
            return
        nfe = float(stats.nfe_forward)
        if len(self._early_nfe) < BASELINE_ITERS:
            self._early_nfe.append(nfe)
            return
        base = statistics.median(self._early_nfe)
        if base > 0 and nfe >= NFE_GROWTH * base:
            self._event("nfe_growth", step, phase,
                        f"forward NFE per iteration grew to {nfe:.0f} from {base:.0f} in the first iterations: the "
                        "learned dynamics are getting stiff or hard to solve; consider solver=auto, a looser rtol, "
                        "or (cnf) model.kinetic_weight/jacobian_weight", nfe_forward=nfe, baseline=base)

    def _event(self, key: str, step: int, phase: str, text: str, event: str | None = None, **data: Any) -> None:
        seen = self.events.get(key)
        if seen is not None:
            seen["count"] += 1
            if "switches" in data:
                seen["switches"] += data["switches"]
            return
        self.events[key] = {"event": event or key, "step": step, "phase": phase, "count": 1,
                            **{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in data.items()}}
        log.warning("solver event at step %d (%s): %s", step, phase, text)
        self.run.text("solver/events", f"step {step} ({phase}): {text}", step)

    def summary(self) -> list[dict[str, Any]]:
        """For ``metrics.json``: each event's first step and phase, how often it happened, its data."""
        return list(self.events.values())
