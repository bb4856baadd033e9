"""A solve owns its state: steppers made per solve, nothing read back from shared objects.

Regression tests for silent wrong results that came from per-solve state kept on long-lived
objects (the method registry, modules): nested solves, threads, jump steps, checkpoint replay,
the Newton linear algebra and the adjoint's tolerances.
"""
from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from neuralode import SolverError, odeint, record_stats
from neuralode.solvers import implicit, rk

F64 = torch.float64


def robertson(t, y):
    y1, y2, y3 = y.unbind(-1)
    return torch.stack([-0.04 * y1 + 1e4 * y2 * y3, 0.04 * y1 - 1e4 * y2 * y3 - 3e7 * y2 ** 2, 3e7 * y2 ** 2], -1)


def van_der_pol(mu):
    return lambda t, y: torch.stack([y[..., 1], mu * (1 - y[..., 0] ** 2) * y[..., 1] - y[..., 0]], -1)


ROBER_Y0 = torch.tensor([1.0, 0.0, 0.0], dtype=F64)


# -- re-entrancy -------------------------------------------------------------------------------------------
def test_nested_kvaerno5_solve_inside_a_kvaerno5_vector_field():
    """The inner solve's Newton state is its own: the outer result equals the one with the inner
    quantity computed in closed form (no solve in the field)."""
    def k_of(y):
        return 1.0 + 0.1 * torch.tanh(y.sum())

    def inner_rate(y):  # z' = -100 (z - k) from 0 over [0, 0.2]: z = k (1 - e^-20)
        k = k_of(y.detach())  # (the outer Newton matrix then ignores dk/dy: only iterations change)
        z = odeint(lambda t, z: -100.0 * (z - k), torch.zeros(1, dtype=F64), torch.tensor([0.0, 0.2], dtype=F64),
                   rtol=1e-5, atol=1e-7, method="kvaerno5")
        return z[-1, 0]

    def nested(t, y):
        return -50.0 * (y - torch.cos(t)) * inner_rate(y)

    def flat(t, y):
        return -50.0 * (y - torch.cos(t)) * k_of(y) * (1 - torch.exp(torch.tensor(-20.0, dtype=F64)))

    ts = torch.tensor([0.0, 0.3], dtype=F64)
    y0 = torch.tensor([2.0], dtype=F64)
    with record_stats() as stats:
        a = odeint(nested, y0, ts, rtol=1e-4, atol=1e-6, method="kvaerno5")
    b = odeint(flat, y0, ts, rtol=1e-4, atol=1e-6, method="kvaerno5")
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # within the inner solve's tolerance
    assert stats.n_jac >= 2  # inner and outer solves both counted


def test_threads_equal_sequential_bit_for_bit():
    problems = [(robertson, ROBER_Y0, torch.tensor([0.0, 1.0, 100.0], dtype=F64), 1e-6, 1e-10),
                (van_der_pol(100.0), torch.tensor([2.0, 0.0], dtype=F64), torch.tensor([0.0, 5.0], dtype=F64), 1e-6, 1e-6),
                (robertson, ROBER_Y0 * 0.5, torch.tensor([0.0, 10.0], dtype=F64), 1e-5, 1e-9),
                (van_der_pol(30.0), torch.tensor([1.0, 1.0], dtype=F64), torch.tensor([0.0, 3.0], dtype=F64), 1e-7, 1e-7)]
    methods = ["kvaerno5", "kvaerno3", "auto", "kvaerno5"]

    def run(i):
        f, y0, ts, rtol, atol = problems[i]
        return odeint(f, y0, ts, rtol=rtol, atol=atol, method=methods[i])

    sequential = [run(i) for i in range(4)]
    threaded = [None] * 4
    threads = [threading.Thread(target=lambda i=i: threaded.__setitem__(i, run(i))) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for s, p in zip(sequential, threaded):
        assert torch.equal(s, p)


# -- jump steps by the right method with the caller's settings ----------------------------------------------
def test_implicit_step_onto_a_jump_uses_the_solves_state(monkeypatch):
    """The step that lands on a jump runs in the same stepper as every other step: the caller's
    tolerances, and every Jacobian counted (a Jacobian is the one call of func on a state that
    requires grad)."""
    jacobians = []

    def f(t, y):
        if y.requires_grad:
            jacobians.append(float(t))
        return torch.where(t < 0.3, -1000.0 * (y - 1.0), -1000.0 * (y + 1.0))

    seen_tols = []
    real_step = implicit.ESDIRKStepper.step

    def spy_step(self, func, t, h, y, f0, tag=None):
        seen_tols.append((self.tol.rtol, self.tol.atol))
        return real_step(self, func, t, h, y, f0, tag)

    monkeypatch.setattr(implicit.ESDIRKStepper, "step", spy_step)
    with record_stats() as stats:
        y = odeint(f, torch.tensor([0.0], dtype=F64), torch.tensor([0.0, 0.6], dtype=F64), rtol=1e-4, atol=1e-7,
                   method="kvaerno5", options=dict(jump_t=[0.3]))
    assert set(seen_tols) == {(1e-4, 1e-7)}
    assert stats.n_jac == len(jacobians) > 0
    assert abs(y[-1].item() + 1.0) < 1e-6


def test_auto_after_the_switch_steps_onto_a_jump_implicitly(monkeypatch):
    calls = []
    real_explicit, real_implicit = rk.ExplicitStepper.step, implicit.ESDIRKStepper.step
    monkeypatch.setattr(rk.ExplicitStepper, "step",
                        lambda self, func, t, h, y, f0, tag=None: calls.append(("e", t + h)) or real_explicit(self, func, t, h, y, f0, tag))
    monkeypatch.setattr(implicit.ESDIRKStepper, "step",
                        lambda self, func, t, h, y, f0, tag=None: calls.append(("i", t + h)) or real_implicit(self, func, t, h, y, f0, tag))
    with record_stats() as stats:
        odeint(van_der_pol(1000.0), torch.tensor([2.0, 0.0], dtype=F64), torch.tensor([0.0, 60.0], dtype=F64),
               rtol=1e-6, atol=1e-6, method="auto", options=dict(jump_t=[50.0]))
    assert stats.n_switches == 1 and stats.switched_at < 50.0
    after = [kind for kind, t_end in calls if t_end > stats.switched_at + 1e-9]
    assert after and set(after) == {"i"}
    assert ("i", 50.0) in calls


# -- checkpoint replay ---------------------------------------------------------------------------------------
def test_checkpoint_replay_reports_a_failed_implicit_step(monkeypatch):
    k = nn.Parameter(torch.tensor(50.0, dtype=F64))
    y = odeint(lambda t, y: -k * y, torch.ones(2, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64), method="kvaerno5",
               grad="checkpoint", adjoint_params=(k,))
    real = implicit.ESDIRKStepper.step

    def failing(self, func, t, h, y, f0, tag=None):
        step = real(self, func, t, h, y, f0, tag)
        step.failed = True
        return step

    monkeypatch.setattr(implicit.ESDIRKStepper, "step", failing)
    with pytest.raises(SolverError, match="checkpoint replay: the Newton iteration did not converge"):
        y.sum().backward()


# -- the Newton linear algebra --------------------------------------------------------------------------------
def test_out_of_memory_is_never_swallowed():
    def oom(t, y):
        if torch.is_grad_enabled() and y.requires_grad:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return -y

    with pytest.raises(torch.OutOfMemoryError):
        odeint(oom, torch.ones(2, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64), method="kvaerno5")


def test_autograd_failure_falls_back_with_a_warning():
    class NoGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, y):
            return -y

        @staticmethod
        def backward(ctx, g):
            raise RuntimeError("this function has no derivative")

    with pytest.warns(RuntimeWarning, match="finite differences"):
        y = odeint(lambda t, y: NoGrad.apply(y), torch.ones(2, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64),
                   method="kvaerno5")
    torch.testing.assert_close(y[-1], torch.full((2,), torch.exp(torch.tensor(-1.0, dtype=F64)).item(), dtype=F64),
                               rtol=1e-5, atol=1e-6)


# -- the adjoint keeps per-component tolerances ----------------------------------------------------------------
def test_adjoint_keeps_per_component_tolerances():
    """A loose tolerance on a hard component must stay loose in the backward solve (it used to
    collapse to the tightest component's): the backward NFE follows the forward's."""
    f = lambda t, y: torch.stack([torch.sin(8 * t) - y[0], -0.1 * y[1]])  # noqa: E731  (hard+loose, easy+tight)

    def nfe(rtol):
        y0 = torch.ones(2, dtype=F64, requires_grad=True)
        with record_stats() as stats:
            y = odeint(f, y0, torch.tensor([0.0, 5.0], dtype=F64), rtol=rtol, atol=rtol, grad="adjoint",
                       adjoint_params=())
            y[-1].sum().backward()
        return stats.nfe_forward, stats.nfe_backward

    (mixed_f, mixed_b), (tight_f, tight_b) = nfe(torch.tensor([1e-3, 1e-10], dtype=F64)), nfe(1e-10)
    assert mixed_f < 0.5 * tight_f and mixed_b < 0.5 * tight_b, (mixed_f, mixed_b, tight_f, tight_b)
