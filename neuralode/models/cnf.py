"""Continuous normalizing flows (FFJORD) with RNODE regularisation.

A CNF block integrates, from t=0 (data side) to t=T (base side), the tuple state

    (z, Δlogp[, E_kin, J_frob])   with   dz/dt = f(t, z),  dΔlogp/dt = tr(∂f/∂z),
                                         dE_kin/dt = ‖f‖²,  dJ_frob/dt = ‖∂f/∂z‖²_F,

so that log p_x(x) = log p_z(z(T)) + Δlogp(T) (instantaneous change of variables).
The trace is exact (one vector-Jacobian product per dimension) or a Hutchinson estimate
εᵀ(∂f/∂z)ε with ε drawn once per solve (Gaussian or Rademacher) and held fixed for every
function evaluation of that solve, including the adjoint's backward solve. The Frobenius
integrand reuses the same products: exact with the exact trace, ‖εᵀ∂f/∂z‖² otherwise.
Sampling integrates z from the base distribution backwards in time, from T to 0.

Plain ``nn.Module`` models taking ordinary arguments; the solver settings come as a
:class:`~neuralode.solvers.SolverSettings`.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from neuralode.models.unet import UNetField
from neuralode.solvers import SolverSettings


class Trace(str, Enum):
    exact = "exact"
    hutchinson = "hutchinson"


class Noise(str, Enum):
    gaussian = "gaussian"
    rademacher = "rademacher"


class Field(str, Enum):
    """The image vector field: FFJORD's stack of time-concatenated 3x3 convs, or a small U-Net."""
    conv = "conv"
    unet = "unet"


ACTIVATIONS = {"softplus": nn.Softplus, "tanh": nn.Tanh, "elu": nn.ELU, "swish": nn.SiLU}


def activation_class(name: str) -> type[nn.Module]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; valid: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


# -- layers conditioned on time ---------------------------------------------------------------
class ConcatSquashLinear(nn.Module):
    """``W x · σ(a t + c) + b t`` (FFJORD's concat-squash layer)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.linear = nn.Linear(d_in, d_out)
        self.gate = nn.Linear(1, d_out)
        self.shift = nn.Linear(1, d_out, bias=False)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        tt = t.reshape(-1, 1).to(x.dtype)  # one time for the batch, or one per sample (flow matching)
        return self.linear(x) * torch.sigmoid(self.gate(tt)) + self.shift(tt)


class ConcatConv2d(nn.Module):
    """A conv whose input carries an extra channel filled with t."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 3, padding: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(c_in + 1, c_out, kernel, padding=padding)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        tt = t.to(x.dtype).reshape(-1, 1, 1, 1).expand(x.shape[0], 1, *x.shape[2:])  # scalar or per-sample t
        return self.conv(torch.cat([tt, x], 1))


class TimeNet(nn.Module):
    """A stack of time-conditioned layers with a smooth activation between them."""

    def __init__(self, layers: Sequence[nn.Module], activation: str):
        super().__init__()
        act = activation_class(activation)
        self.layers = nn.ModuleList(layers)
        self.acts = nn.ModuleList(act() for _ in layers[:-1])

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(t, x)
            if i < len(self.acts):
                x = self.acts[i](x)
        return x


def mlp_field(dim: int, hidden: Sequence[int], activation: str = "softplus") -> TimeNet:
    sizes = [dim, *hidden, dim]
    return TimeNet([ConcatSquashLinear(a, b) for a, b in zip(sizes, sizes[1:])], activation)


def conv_field(channels: int, hidden: Sequence[int], activation: str = "softplus") -> TimeNet:
    sizes = [channels, *hidden, channels]
    return TimeNet([ConcatConv2d(a, b) for a, b in zip(sizes, sizes[1:])], activation)


# -- the augmented dynamics -------------------------------------------------------------------
class CNFField(nn.Module):
    """``func(t, (z, Δlogp[, E, J]))`` for one solve. Everything the field reads besides the
    network (trace estimator, Hutchinson noise, whether to integrate the regularisers) is fixed
    when it is made, once per solve, so an adjoint or checkpoint backward pass that runs later
    sees exactly what the forward pass saw, however the model was used in between."""

    def __init__(self, net: nn.Module, trace: Trace, noise: torch.Tensor | None, regularise: bool):
        super().__init__()
        if trace is Trace.hutchinson and noise is None:
            raise ValueError("the Hutchinson trace needs the solve's noise")
        self.net, self.trace, self.noise, self.regularise = net, trace, noise, regularise

    def forward(self, t: torch.Tensor, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        z = state[0]
        graph = torch.is_grad_enabled()  # training (direct) or the adjoint's VJP: keep the trace differentiable
        with torch.enable_grad():
            if not graph or not z.requires_grad:  # no outer graph needed: a fresh leaf (a view made under
                z = z.detach().requires_grad_(True)  # no_grad, e.g. inside the adjoint's forward, may be cut off)
            f = self.net(t, z)
            div, frob = self._divergence(f, z, graph)
        out = [f, div]
        if self.regularise:
            kinetic = f.pow(2).flatten(1).sum(1)
            out += [kinetic, frob]
        if not graph:
            out = [o.detach() for o in out]
        return tuple(out)

    def _divergence(self, f: torch.Tensor, z: torch.Tensor, graph: bool) -> tuple[torch.Tensor, torch.Tensor]:
        batch = z.shape[0]
        if self.trace is Trace.exact:
            flat_f = f.reshape(batch, -1)
            dim = flat_f.shape[1]
            div = z.new_zeros(batch)
            frob = z.new_zeros(batch)
            for i in range(dim):
                row = torch.autograd.grad(flat_f[:, i].sum(), z, create_graph=graph, retain_graph=True)[0]
                row = row.reshape(batch, -1)
                div = div + row[:, i]
                if self.regularise:
                    frob = frob + row.pow(2).sum(1)
            return div, frob
        e = self.noise
        e_j = torch.autograd.grad(f, z, e, create_graph=graph, retain_graph=True)[0]
        div = (e_j * e).flatten(1).sum(1)
        frob = e_j.pow(2).flatten(1).sum(1) if self.regularise else div
        return div, frob


def draw_noise(like: torch.Tensor, kind: Noise | str) -> torch.Tensor:
    if Noise(kind) is Noise.gaussian:
        return torch.randn_like(like)
    return torch.randint(0, 2, like.shape, device=like.device).to(like.dtype) * 2 - 1


class CNFBlock(nn.Module):
    """One flow step: integrates the dynamics of ``net`` over [0, T]. ``trace`` and ``regularise``
    are the block's configuration; each call turns them (and fresh Hutchinson noise) into the
    :class:`CNFField` its solve captures."""

    def __init__(self, net: nn.Module, solver: SolverSettings, trace: Trace | str = Trace.exact,
                 noise: Noise | str = Noise.gaussian, time_length: float = 1.0, regularise: bool = False):
        super().__init__()
        self.net, self.solver = net, solver
        self.trace, self.noise_kind = Trace(trace), Noise(noise)
        self.time_length, self.regularise = time_length, regularise

    def forward(self, z: torch.Tensor, with_regularisers: bool | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(z(T), Δlogp, E_kin, J_frob)``, integrating from 0 to T (sampling goes back
        through :meth:`transport`)."""
        regularise = self.regularise if with_regularisers is None else with_regularisers
        noise = draw_noise(z, self.noise_kind) if self.trace is Trace.hutchinson else None
        field = CNFField(self.net, self.trace, noise, regularise)
        zeros = z.new_zeros(z.shape[0])
        state = (z, zeros) + ((zeros, zeros) if regularise else ())
        t = torch.tensor([0.0, self.time_length], dtype=z.dtype, device=z.device)
        solver = self.solver
        if solver.parsed.norm is None:  # the same steps with and without the regulariser integrals
            solver = solver.replace(norm=flow_norm)
        out = solver.odeint(field, state, t)
        final = [o[-1] for o in out]
        if not regularise:
            final += [zeros, zeros]
        return tuple(final)  # type: ignore[return-value]

    def transport(self, z: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
        """z at each of ``times`` (from ``times[0]``) under the flow alone. Sampling needs no
        log-density: its trace would cost a VJP per evaluation (one per dimension when exact), and
        its error would steer the step size of a solve whose output nobody reads."""
        return self.solver.odeint(self.net, z, times)  # the network is already a field f(t, z)


def flow_norm(scaled_error: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """RMS of the scaled error of (z, Δlogp) alone. The regulariser integrals are penalties,
    not part of the flow, so they do not shrink the step size (the seminorm argument of
    Kidger et al. 2021); they are still integrated on the same steps to the method's order.
    Without it the integral of ‖f‖², which varies fastest, sets the steps, and RNODE's
    training solves cost ~40% more NFE than its plain forward solves at the same tolerance."""
    z, delta_logp = scaled_error[0], scaled_error[1]
    return torch.sqrt((z.pow(2).sum() + delta_logp.pow(2).sum()) / (z.numel() + delta_logp.numel()))


def standard_normal_logprob(z: torch.Tensor) -> torch.Tensor:
    flat = z.flatten(1)
    return -0.5 * (flat.pow(2).sum(1) + flat.shape[1] * math.log(2 * math.pi))


class CNF(nn.Module):
    """A stack of CNF blocks over a standard-normal base distribution.

    ``log_prob(x)`` returns per-sample ``(log p(x), E_kin, J_frob)`` with the regulariser
    integrals summed over blocks; ``sample(n)`` integrates base samples back through the
    blocks in reverse order and reverse time."""

    def __init__(self, blocks: Sequence[CNFBlock], shape: Sequence[int]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.shape = tuple(shape)

    def set_trace(self, trace: Trace | str) -> None:
        for b in self.blocks:
            b.trace = Trace(trace)

    @property
    def trace(self) -> Trace:
        return self.blocks[0].trace

    def forward(self, x: torch.Tensor, with_regularisers: bool | None = None, t: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(z, Δlogp, E_kin, J_frob)`` after all blocks. With ``t`` (one time per sample), no solve:
        the single block's vector field f(t, x) (flow-matching training, through DDP's forward)."""
        if t is not None:
            if len(self.blocks) != 1:
                raise ValueError("flow matching trains a single-block CNF (model.num_blocks=1)")
            return self.blocks[0].net(t, x)
        z = x
        delta = kinetic = frob = x.new_zeros(x.shape[0])
        for block in self.blocks:
            z, d, k, j = block(z, with_regularisers=with_regularisers)
            delta, kinetic, frob = delta + d, kinetic + k, frob + j
        return z, delta, kinetic, frob

    def log_prob(self, x: torch.Tensor, with_regularisers: bool | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z, delta, kinetic, frob = self(x, with_regularisers)
        return standard_normal_logprob(z) + delta, kinetic, frob

    def invert(self, z: torch.Tensor) -> torch.Tensor:
        """Map base-space points to data space (reverse time through the blocks in reverse order),
        solving for the points alone (:meth:`CNFBlock.transport`)."""
        for block in reversed(self.blocks):
            z = block.transport(z, torch.tensor([block.time_length, 0.0], dtype=z.dtype, device=z.device))[-1]
        return z

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        p = next(self.parameters())
        z = torch.randn((n, *self.shape), generator=generator, dtype=p.dtype).to(p.device)
        return self.invert(z)


def cnf_2d(solver: SolverSettings, dim: int = 2, hidden: Sequence[int] = (64, 64, 64), num_blocks: int = 1,
           activation: str = "softplus", trace: Trace | str = Trace.exact, noise: Noise | str = Noise.gaussian,
           time_length: float = 1.0, regularise: bool = False) -> CNF:
    """Vector CNF: concat-squash MLP fields."""
    blocks = [CNFBlock(mlp_field(dim, hidden, activation), solver, trace, noise, time_length, regularise)
              for _ in range(num_blocks)]
    return CNF(blocks, (dim,))


def cnf_image(solver: SolverSettings, shape: Sequence[int], hidden: Sequence[int] = (64, 64, 64),
              num_blocks: int = 1, activation: str = "softplus", trace: Trace | str = Trace.hutchinson,
              noise: Noise | str = Noise.rademacher, time_length: float = 1.0, regularise: bool = False,
              field: Field | str = Field.conv) -> CNF:
    """Single-scale image CNF: time-concatenated 3x3 conv fields (``hidden``: the layers' channels)
    or U-Net fields (``hidden``: the channels of each resolution level)."""
    def make() -> nn.Module:
        if Field(field) is Field.unet:
            return UNetField(shape[0], hidden, activation_class(activation))
        return conv_field(shape[0], hidden, activation)

    blocks = [CNFBlock(make(), solver, trace, noise, time_length, regularise) for _ in range(num_blocks)]
    return CNF(blocks, tuple(shape))


# -- image pre-processing: dequantisation and logit transform --------------------------------
def dequantize_logit(x: torch.Tensor, alpha: float = 1e-6, generator: torch.Generator | None = None,
                     levels: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` in [0, 1] on the grid k/(levels-1). Returns ``(y, logdet)``: uniform dequantisation
    u = (k + U)/levels ∈ [0, 1), then y = logit(α + (1-2α)u); ``logdet`` = Σ log|dy/du| per sample."""
    k = torch.round(x * (levels - 1))
    noise = torch.rand(k.shape, generator=generator, dtype=x.dtype).to(x.device) if generator is not None \
        else torch.rand_like(x)
    u = (k + noise) / levels
    s = alpha + (1 - 2 * alpha) * u
    y = torch.log(s) - torch.log1p(-s)
    logdet = (math.log(1 - 2 * alpha) - torch.log(s) - torch.log1p(-s)).flatten(1).sum(1)
    return y, logdet


def bits_per_dim(log_p_y: torch.Tensor, logdet: torch.Tensor, dims: int, levels: int = 256) -> torch.Tensor:
    """Per-sample bits/dim of the discrete data: the density of u ∈ [0,1)^D is p(y)·|dy/du|, and the
    integer grid scales by ``levels`` per dimension: -log p(k+U) = -(log p(y) + logdet) + D log levels."""
    return (-(log_p_y + logdet) + dims * math.log(levels)) / (dims * math.log(2))


def logit_inverse(y: torch.Tensor, alpha: float = 1e-6) -> torch.Tensor:
    return ((torch.sigmoid(y) - alpha) / (1 - 2 * alpha)).clamp(0, 1)
