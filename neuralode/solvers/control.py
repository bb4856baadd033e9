"""Error control: the tolerance scale, error norms, the initial step and the step-size controller.

The mixed error scale ``atol + rtol * max(|y_n|, |y_n+1|)`` is formed here and nowhere else;
every method (explicit, implicit Newton tests, the adjoint's augmented state) asks a
:class:`Tolerance` for it. Complex states are measured by magnitude.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import torch

from .errors import NonFiniteError, ToleranceError

Norm = Callable[[torch.Tensor], torch.Tensor]
Tol = Union[float, torch.Tensor]


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x) / math.sqrt(max(x.numel(), 1))


def mixed_rms_norm(sizes: Sequence[int]) -> Norm:
    """The max over consecutive slices of a flat vector of each slice's RMS norm (torchdiffeq's
    default for tuple states: every tensor of the tuple is held to the tolerance on its own)."""
    bounds, start = [], 0
    for n in sizes:
        if n:
            bounds.append((start, start + n))
        start += n
    if len(bounds) == 1:
        return rms_norm

    def norm(x: torch.Tensor) -> torch.Tensor:
        return torch.stack([rms_norm(x[a:b]) for a, b in bounds]).max()

    return norm


class Tolerance:
    """rtol and atol of one solve, each a float or a flat tensor matching the flat state."""

    __slots__ = ("rtol", "atol", "scalar")

    def __init__(self, rtol: Tol, atol: Tol):
        self.rtol, self.atol = rtol, atol
        self.scalar = isinstance(rtol, float) and isinstance(atol, float)

    def scale(self, abs_a: torch.Tensor, abs_b: Optional[torch.Tensor] = None) -> torch.Tensor:
        """atol + rtol * max(|a|, |b|) (|a| alone without b); inputs are magnitudes."""
        m = abs_a if abs_b is None else torch.maximum(abs_a, abs_b)
        if self.scalar:
            return m.mul(self.rtol).add_(self.atol)
        return self.atol + self.rtol * m

    def check_resolution(self, dtype: torch.dtype) -> None:
        """Refuse tolerances the state's dtype cannot resolve: when both rtol and atol are below a
        tenth of its machine epsilon, no step can meet them and the step size would underflow."""
        eps = torch.finfo(dtype).eps
        r, a = (t if isinstance(t, float) else float(t.min()) for t in (self.rtol, self.atol))
        if r < eps / 10 and a < eps / 10:
            name = str(dtype).replace("torch.", "")
            raise ToleranceError(
                f"rtol={r:.3g} and atol={a:.3g} are below the resolution of {name} (machine epsilon {eps:.3g}): "
                f"no step can meet them. Use rtol, atol >= {eps:.1g} or a wider dtype "
                f"({'float64' if dtype == torch.float32 else 'e.g. float32 or float64'})."
            )


def initial_step(func, tol: Tolerance, norm: Norm, order: int, t0: float, y0: torch.Tensor, f0: torch.Tensor,
                 direction: float, max_step: float) -> float:
    """Hairer, Norsett & Wanner (II.4): match an Euler step's error to the tolerance. One NFE."""
    with torch.no_grad():
        scale = tol.scale(y0.abs())
        d0, d1 = torch.stack([norm(y0 / scale), norm(f0 / scale)]).tolist()
        if not math.isfinite(d1):
            raise NonFiniteError(f"func returned NaN or Inf at the initial point t={t0:.6g}; check the vector field and y0")
        h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
        h0 = min(h0, max_step)
        f1 = func(t0 + direction * h0, y0 + direction * h0 * f0)
        d2 = float(norm((f1 - f0) / scale)) / h0
    if not math.isfinite(d2):
        d2 = 1e15  # f blows up just past t0: start with a tiny step, error control takes over
    if max(d1, d2) <= 1e-15:
        h1 = max(1e-6, h0 * 1e-3)
    else:
        h1 = (0.01 / max(d1, d2)) ** (1.0 / (order + 1))
    return min(100 * h0, h1, max_step)


class Controller:
    """Integral (I) or proportional-integral (PI) step-size control on the error norm."""

    __slots__ = ("safety", "ifactor", "dfactor", "pcoeff", "icoeff", "k", "prev_ratio")

    def __init__(self, opts, order: int):
        pi = opts.controller == "PI"
        self.pcoeff = opts.pcoeff if opts.pcoeff is not None else (0.2 if pi else 0.0)
        self.icoeff = opts.icoeff if opts.icoeff is not None else (0.65 if pi else 1.0)
        self.safety, self.ifactor, self.dfactor = opts.safety, opts.ifactor, opts.dfactor
        self.k = order + 1
        self.prev_ratio = 1.0

    def factor(self, ratio: float, accepted: bool) -> float:
        if ratio == 0.0:
            f = self.ifactor
        else:
            f = self.safety * ratio ** (-(self.icoeff + self.pcoeff) / self.k) * self.prev_ratio ** (self.pcoeff / self.k)
        f = min(self.ifactor, max(self.dfactor, f))
        if accepted:
            self.prev_ratio = max(ratio, 1e-4)
            return f
        return min(1.0, f)
