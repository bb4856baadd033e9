"""``options=dict(compile=...)``: each explicit step's stages through torch.compile.

The fast tests use torch.compile's "eager" backend: Dynamo traces the step with ``fullgraph=True``
(a graph break inside a step would fail the trace and fall back with a warning, which these tests
turn into an error) but runs the captured graph without code generation. The inductor backend
(``compile=True``) is exercised by the slow test and measured in ``scripts/bench_solvers.py
--overhead``."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import neuralode.solvers.rk as rk
from neuralode import odeint, record_stats

F64 = torch.float64


class Field(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.l1, self.l2 = nn.Linear(3, 16).double(), nn.Linear(16, 3).double()
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=F64) * 0.5)

    def forward(self, t, y):
        return self.l2(torch.tanh(self.l1(y))) * torch.cos(t)


def _solve(f, y0, t, **options):
    y = y0.clone().requires_grad_(True)
    with record_stats() as stats:
        ys = odeint(f, y, t, rtol=1e-8, atol=1e-8, options=options)
    grads = torch.autograd.grad((ys ** 2).sum(), (y, *f.parameters()))
    return ys.detach(), grads, stats.nfe_forward


@pytest.mark.parametrize("method", ["dopri5", "rk4"])
def test_compiled_steps_equal_eager_ones_without_graph_breaks(method):
    f = Field()
    y0 = torch.randn(4, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    t = torch.linspace(0, 1, 4, dtype=F64)
    kw = dict(step_size=0.05) if method == "rk4" else {}
    ys, grads, nfe = _solve(f, y0, t, **kw)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=r"options\['compile'\]")  # a fallback to eager must not happen
        ys_c, grads_c, nfe_c = _solve(f, y0, t, compile="eager", **kw)
    assert nfe_c == nfe
    torch.testing.assert_close(ys_c, ys, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads_c, grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_a_field_torch_compile_gives_up_on_runs_eagerly_with_a_warning(monkeypatch):
    def gives_up(*args):
        import torch._dynamo

        raise torch._dynamo.exc.FailOnRecompileLimitHit("Hard failure due to fullgraph=True")

    monkeypatch.setattr(rk, "compiled_stages", lambda backend: gives_up)
    f = Field()
    y0, t = torch.ones(2, 3, dtype=F64), torch.linspace(0, 1, 3, dtype=F64)
    with pytest.warns(RuntimeWarning, match=r"torch.compile gave up on this field .* count evaluations with record_stats"):
        ys = odeint(f, y0, t, rtol=1e-8, atol=1e-8, options=dict(compile=True))
    torch.testing.assert_close(ys, odeint(f, y0, t, rtol=1e-8, atol=1e-8))


@pytest.mark.parametrize("options, match", [
    (dict(compile=1), "compile must be True, False or a torch.compile backend name"),
    (dict(compile=True, per_sample=True), "compile applies to joint solves"),
])
def test_bad_compile_options(options, match):
    with pytest.raises(ValueError, match=match):
        odeint(lambda t, y: -y, torch.ones(2, 2), torch.tensor([0.0, 1.0]), options=options)


@pytest.mark.slow
def test_inductor_compiled_solve_matches_eager():
    """compile=True (inductor: generated C++ on CPU, tens of seconds to build the first time)."""
    f = Field()
    y0 = torch.randn(4, 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    t = torch.linspace(0, 1, 3, dtype=F64)
    ys, grads, nfe = _solve(f, y0, t)
    ys_c, grads_c, nfe_c = _solve(f, y0, t, compile=True)
    assert nfe_c == nfe
    torch.testing.assert_close(ys_c, ys, rtol=1e-10, atol=1e-10)
    for a, b in zip(grads_c, grads):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
