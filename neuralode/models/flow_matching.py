"""Flow matching for the CNFs of :mod:`neuralode.models.cnf`: simulation-free training of the
same vector fields, exact optimal-transport minibatch coupling (also across DDP ranks), an EMA
of the weights, sample-quality distances and loading flow-matching weights into an ML CNF.

Direction. Flow matching is usually written from noise x0 ~ N(0, I) at s = 0 to data x1 at
s = 1, x_s = (1 - s) x0 + s x1 (+ σ ε), with target velocity v = x1 - x0. Our CNF integrates
from data at t = 0 to the base at t = T (``time_length``); ``log_prob`` and ``sample`` are
unchanged, so the network is trained in CNF time: t = T (1 - s) and

    f(t, x_s) ≈ dx/dt = -(x1 - x0) / T,

i.e. f(t, x) = -v(1 - t/T, x) / T. With T = 1 the loss below equals the usual
‖v(s, x_s) - (x1 - x0)‖² exactly (as a mean over batch and dimensions).
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils.data import default_collate

# Batches above this many samples are refused by the exact assignment (O(n^3) time, O(n^2)
# memory); ``model.ot_max_batch`` sets the limit per run.
DEFAULT_OT_MAX_BATCH = 2048


# -- the loss ----------------------------------------------------------------------------------------
def fm_sample(x0: torch.Tensor, x1: torch.Tensor, sigma: float = 0.0, time_length: float = 1.0,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(t, x_t, target)`` for one batch of pairs: s ~ U(0, 1) per sample, t = T (1 - s) in CNF
    time, x_t = (1 - s) x0 + s x1 + σ ε, target = (x0 - x1) / T (the CNF field's velocity)."""
    shape = (x1.shape[0],) + (1,) * (x1.dim() - 1)
    s = torch.rand(x1.shape[0], generator=generator, dtype=x1.dtype).to(x1.device)
    sb = s.view(shape)
    xt = (1 - sb) * x0 + sb * x1
    if sigma > 0:
        xt = xt + sigma * torch.randn(x1.shape, generator=generator, dtype=x1.dtype).to(x1.device)
    return time_length * (1 - s), xt, (x0 - x1) / time_length


def fm_loss(field: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x0: torch.Tensor, x1: torch.Tensor,
            sigma: float = 0.0, time_length: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mean over batch and dimensions of ‖f(t, x_t) - (x0 - x1)/T‖² (see the module docstring);
    ``field(t, x)`` takes one time per sample."""
    t, xt, target = fm_sample(x0, x1, sigma, time_length, generator)
    return (field(t, xt) - target).pow(2).mean()


# -- exact OT coupling -------------------------------------------------------------------------------
def _linear_sum_assignment():
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:  # pragma: no cover - exercised only without scipy
        raise ImportError("model.coupling=exact_ot needs scipy (its exact assignment solver): "
                          "pip install scipy, or pip install 'neuralode[fm]'") from None
    return linear_sum_assignment


def ot_permutation(x0: torch.Tensor, x1: torch.Tensor, max_batch: int = DEFAULT_OT_MAX_BATCH) -> torch.Tensor:
    """The permutation ``p`` minimising Σ_j ‖x0[p[j]] - x1[j]‖² (exact, scipy's Jonker-Volgenant
    solver on the squared-distance matrix), so ``x0[p]`` is paired row by row with ``x1``."""
    n = x1.shape[0]
    if x0.shape[0] != n:
        raise ValueError(f"exact OT coupling needs as many noise samples as data samples ({x0.shape[0]} vs {n})")
    if n > max_batch:
        raise ValueError(f"model.coupling=exact_ot: a batch of {n} exceeds the exact assignment's budget of "
                         f"{max_batch} samples (model.ot_max_batch={max_batch}; the solve is O(n^3)); lower "
                         f"trainer.batch_size or raise model.ot_max_batch")
    lsa = _linear_sum_assignment()
    a, b = x0.detach().flatten(1).double().cpu(), x1.detach().flatten(1).double().cpu()
    cost = ((a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2 * a @ b.T).numpy()  # ‖a_i - b_j‖², O(n^2) memory
    rows, cols = lsa(cost)
    perm = torch.empty(n, dtype=torch.long)
    perm[torch.as_tensor(cols)] = torch.as_tensor(rows)
    return perm


def pair_global(x0: torch.Tensor, x1: torch.Tensor, dist: Any, max_batch: int = DEFAULT_OT_MAX_BATCH) -> torch.Tensor:
    """Under DDP: the exact OT coupling of the *global* batch. Every rank's noise and data are
    gathered (``dist.gather``, :class:`neuralode.distributed.Distributed`), rank 0 solves the
    assignment once, its permutation is shared the same way, and each rank keeps the noise paired
    with its own data rows (the global batch is the ranks' shares in rank order). Returns this
    rank's paired noise, equal to the single-process pairing of the concatenated batch."""
    if not dist.enabled:
        return x0[ot_permutation(x0, x1, max_batch)]
    parts = dist.gather((x0.detach().cpu(), x1.detach().cpu()))
    all0 = torch.cat([p[0] for p in parts])
    all1 = torch.cat([p[1] for p in parts])
    perm = ot_permutation(all0, all1, max_batch) if dist.rank == 0 else None
    perm = dist.gather(perm)[0]  # rank 0's permutation, on every rank
    sizes = [len(p[1]) for p in parts]
    start = sum(sizes[:dist.rank])
    return all0[perm[start:start + sizes[dist.rank]]].to(x0.device)


class PairingCollate:
    """DataLoader ``collate_fn`` for flow-matching training: stacks the data batch, maps it to the
    model's space (``transform``, e.g. dequantisation and logit for images), draws the base noise
    and, with ``exact_ot``, pairs them by exact OT. Runs in the loader's worker processes when
    ``trainer.num_workers > 0``, so the assignment overlaps the training step. Returns
    ``(x1, x0)``. ``pair=False`` (DDP) leaves the pairing to :func:`pair_global`."""

    def __init__(self, exact_ot: bool, max_batch: int = DEFAULT_OT_MAX_BATCH,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None, pair: bool = True):
        self.exact_ot, self.max_batch, self.transform, self.pair = exact_ot, max_batch, transform, pair

    def __call__(self, items: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        x1 = default_collate(items)[0]
        if self.transform is not None:
            x1 = self.transform(x1)
        x0 = torch.randn_like(x1)
        if self.exact_ot and self.pair:
            x0 = x0[ot_permutation(x0, x1, self.max_batch)]
        return x1, x0


# -- EMA of the weights --------------------------------------------------------------------------------
def _frozen_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters are buffers (saved in state_dict, not optimised)."""
    copy_ = copy.deepcopy(module)
    for m in copy_.modules():
        for name, p in list(m._parameters.items()):
            if p is None:
                continue
            del m._parameters[name]
            m.register_buffer(name, p.detach().clone())
    return copy_


class EMAField(nn.Module):
    """A vector field with an exponential moving average of its weights: training mode runs
    ``inner`` (the optimised weights), eval mode (test NLL, sampling, figures) runs ``shadow``, the
    average. The average lives in buffers, so checkpoints and resumes carry it."""

    def __init__(self, inner: nn.Module, decay: float):
        super().__init__()
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.inner, self.decay = inner, float(decay)
        self.shadow = _frozen_copy(inner)
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return (self.inner if self.training else self.shadow)(t, x)

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step after an optimizer step, with the usual warm-up min(decay, (1+n)/(10+n))."""
        n = int(self.updates)
        d = min(self.decay, (1 + n) / (10 + n))
        shadow = dict(self.shadow.named_buffers())
        for name, p in self.inner.named_parameters():
            shadow[name].lerp_(p.detach(), 1 - d)
        self.updates += 1


def update_ema(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, EMAField):
            m.update()


# -- init_from: flow-matching weights into an ML CNF -----------------------------------------------
def fm_state_for(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a checkpoint's model weights onto ``model``'s keys: an EMA checkpoint contributes its
    average (``net.shadow.*``) as the field's weights, and a model with EMA starts both its weights
    and its average from them. Keys matching nothing are kept, so they can be reported."""
    if any(".net.shadow." in k for k in state):  # the average of an EMA checkpoint, as plain weights
        plain = {k.replace(".net.shadow.", ".net."): v for k, v in state.items()
                 if ".net.inner." not in k and not k.endswith(".net.updates")}
    else:
        plain = dict(state)
    mine = model.state_dict()
    if not any(".net.inner." in k for k in mine):
        return plain
    out: dict[str, torch.Tensor] = {}
    for k, v in plain.items():
        if ".net." in k:
            out[k.replace(".net.", ".net.inner.", 1)] = v
            out[k.replace(".net.", ".net.shadow.", 1)] = v
        else:
            out[k] = v
    for k, v in mine.items():
        if k.endswith(".net.updates"):
            out[k] = torch.zeros_like(v)
    return out


def load_init(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Load ``state`` (a checkpoint's model weights) into ``model``; raise ``ValueError`` naming the
    missing, unexpected and differently shaped keys."""
    mapped = fm_state_for(model, state)
    mine = model.state_dict()
    missing = [k for k in mine if k not in mapped]
    unexpected = [k for k in mapped if k not in mine]
    shapes = [f"{k} {tuple(mapped[k].shape)} there, {tuple(v.shape)} here" for k, v in mine.items()
              if k in mapped and tuple(mapped[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing there: {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
        if unexpected:
            parts.append(f"not in this model: {', '.join(unexpected[:6])}{' ...' if len(unexpected) > 6 else ''}")
        if shapes:
            parts.append(f"shapes differ: {'; '.join(shapes[:6])}{' ...' if len(shapes) > 6 else ''}")
        raise ValueError(f"model.init_from={where}: its weights do not fit this model's architecture "
                         f"({' | '.join(parts)}); use the same model.hidden_dims, num_blocks and dataset as the "
                         f"run it comes from")
    model.load_state_dict(mapped)


# -- sample quality ----------------------------------------------------------------------------------
def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """The (squared) energy distance 2E‖X-Y‖ - E‖X-X'‖ - E‖Y-Y'‖ between two samples (V-statistics);
    zero iff the distributions agree."""
    x, y = x.detach().double().flatten(1).cpu(), y.detach().double().flatten(1).cpu()
    xy = torch.cdist(x, y).mean()
    xx = torch.cdist(x, x).mean()
    yy = torch.cdist(y, y).mean()
    return float(2 * xy - xx - yy)


def gaussian_log_density(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, cov), for the tests' analytic comparisons."""
    d = x.shape[1]
    diff = (x - mean).double()
    chol = torch.linalg.cholesky(cov.double())
    sol = torch.cholesky_solve(diff.T, chol).T
    return -0.5 * ((diff * sol).sum(1) + d * math.log(2 * math.pi)) - torch.log(torch.diagonal(chol)).sum()
