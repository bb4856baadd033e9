"""Bad input raises ValueError / TypeError / a SolverError subclass whose message names the problem."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from neuralode import record_stats, MaxStepsError, NonFiniteError, SolverError, StepSizeUnderflowError, odeint, odeint_adjoint

F64 = torch.float64
Y0 = torch.ones(2, dtype=F64)
T = torch.tensor([0.0, 1.0], dtype=F64)


def decay(t, y):
    return -y


# --- t ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("t", [torch.zeros(2, 2, dtype=F64), torch.tensor(1.0, dtype=F64)], ids=["2d", "0d"])
def test_t_not_1d(t):
    with pytest.raises(ValueError, match=r"t must be a non-empty one dimensional tensor, got shape"):
        odeint(decay, Y0, t)


def test_t_empty():
    with pytest.raises(ValueError, match=r"non-empty one dimensional.*\(0,\)"):
        odeint(decay, Y0, torch.tensor([], dtype=F64))


@pytest.mark.parametrize("t", [[0.0, 1.0, 0.5], [0.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.5]])
def test_t_not_strictly_monotonic(t):
    with pytest.raises(ValueError, match="strictly increasing or decreasing"):
        odeint(decay, Y0, torch.tensor(t, dtype=F64))


def test_t_not_a_float_tensor():
    with pytest.raises(TypeError, match="t must be a 1-D tensor"):
        odeint(decay, Y0, [0.0, 1.0])
    with pytest.raises(TypeError, match="`t` must be a floating point Tensor"):
        odeint(decay, Y0, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="t contains NaN or Inf"):
        odeint(decay, Y0, torch.tensor([0.0, math.nan], dtype=F64))


# --- y0 --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_y0_not_floating_point(dtype):
    with pytest.raises(TypeError, match="y0 must be floating point or complex"):
        odeint(decay, torch.ones(2, dtype=dtype), T)
    with pytest.raises(TypeError, match="y0 must be floating point or complex"):
        odeint(lambda t, s: (-s[0], -s[1]), (torch.ones(2), torch.ones(2, dtype=dtype)), T.float())


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_y0_not_finite(bad):
    with pytest.raises(ValueError, match="y0 contains NaN or Inf"):
        odeint(decay, torch.tensor([1.0, bad], dtype=F64), T)
    with pytest.raises(ValueError, match="y0 contains NaN or Inf"):
        odeint(lambda t, s: (-s[0], -s[1]), (Y0, torch.tensor([bad], dtype=F64)), T)


def test_y0_not_a_tensor():
    with pytest.raises(TypeError, match="y0 must be either a torch.Tensor or a tuple of tensors"):
        odeint(decay, [1.0, 2.0], T)


# --- func ------------------------------------------------------------------------------------

@pytest.mark.parametrize("grad", ["direct", "adjoint", "checkpoint"])
def test_func_wrong_shape(grad):
    with pytest.raises(ValueError, match=r"func returned shape \(3,\) but y0 has shape \(2,\)"):
        odeint(lambda t, y: torch.ones(3, dtype=F64), Y0, T, grad=grad, adjoint_params=())


def test_func_dtype_is_cast_to_the_state_like_torchdiffeq():
    """torchdiffeq casts what func returns into the state's dtype; so do we (the state keeps y0's dtype)."""
    y = odeint(lambda t, y: (-y).float(), Y0, T)
    assert y.dtype == F64
    torch.testing.assert_close(y[-1], Y0 * math.exp(-1.0), rtol=1e-6, atol=1e-6)


def test_func_wrong_structure():
    with pytest.raises(ValueError, match="func must return the same structure as y0"):
        odeint(lambda t, y: (-y,), Y0, T)
    with pytest.raises(ValueError, match="func must return the same structure as y0"):
        odeint(lambda t, s: -s[0], (Y0, Y0), T)
    with pytest.raises(TypeError, match="func must return tensors"):
        odeint(lambda t, y: 1.0, Y0, T)


def test_func_wrong_shape_with_fixed_step_and_tuple():
    with pytest.raises(ValueError, match="func returned shape"):
        odeint(lambda t, s: (-s[0], -s[1][:1]), (Y0, Y0), T, method="rk4", options=dict(step_size=0.1))


# --- method and options ----------------------------------------------------------------------

def test_unknown_method_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown method 'rk45'; valid methods: .*dopri5.*tsit5.*dopri8"):
        odeint(decay, Y0, T, method="rk45")
    with pytest.raises(ValueError, match=r"unknown method 'nope'"):
        odeint(decay, Y0, T, grad="adjoint", adjoint_params=(), adjoint_method="nope")


def test_unknown_option_key_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['stepsize'\].*valid options: .*step_size"):
        odeint(decay, Y0, T, options=dict(stepsize=0.1))
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['foo'\]"):
        odeint(decay, Y0, T, grad="adjoint", adjoint_params=(), adjoint_options=dict(foo=1))


def test_fixed_step_method_without_step_size_steps_on_t():
    """As in torchdiffeq: with no step_size a fixed-step method takes one step per interval of t."""
    t = torch.tensor([0.0, 0.1, 0.3], dtype=F64)
    with record_stats() as stats:
        y = odeint(decay, Y0, t, method="euler")
    assert stats.n_accepted == 2
    torch.testing.assert_close(y[1], Y0 * 0.9)
    torch.testing.assert_close(y[2], Y0 * 0.9 * 0.8)


@pytest.mark.parametrize("step", [0.0, -0.1])
def test_step_size_not_positive(step):
    with pytest.raises(ValueError, match="step_size must be positive"):
        odeint(decay, Y0, T, method="rk4", options=dict(step_size=step))
    with pytest.raises(ValueError, match="step_size must be positive"):
        odeint(decay, Y0, T, options=dict(step_size=step))


@pytest.mark.parametrize("options,match", [
    (dict(controller="PID"), "controller must be 'I' or 'PI'"),
    (dict(norm="seminorm"), "norm must be a callable"),
    (dict(checkpoint_every=0), "unknown option"),
    (dict(safety=0.0), "safety must be in"),
    (dict(max_num_steps=0), "max_num_steps must be >= 1"),
])
def test_bad_option_values(options, match):
    with pytest.raises(ValueError, match=match):
        odeint(decay, Y0, T, options=options)


# --- tolerances ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["rtol", "atol"])
@pytest.mark.parametrize("value", [0.0, -1e-6])
def test_tolerance_not_positive(name, value):
    with pytest.raises(ValueError, match=f"{name} must be positive"):
        odeint(decay, Y0, T, **{name: value})
    with pytest.raises(ValueError, match=f"{name} must be positive"):
        odeint(decay, Y0, T, **{name: torch.tensor([1e-6, value], dtype=F64)})


@pytest.mark.parametrize("name", ["rtol", "atol"])
def test_tolerance_shape_does_not_broadcast(name):
    with pytest.raises(ValueError, match=rf"{name} of shape \(3,\) does not broadcast to the state shape \(2,\)"):
        odeint(decay, Y0, T, **{name: torch.full((3,), 1e-6)})


def test_adjoint_tolerance_not_positive():
    y0 = Y0.clone().requires_grad_(True)
    with pytest.raises(ValueError, match="adjoint_rtol must be positive"):
        ys = odeint(decay, y0, T, grad="adjoint", adjoint_params=(), adjoint_rtol=-1.0)
        ys.sum().backward()


# --- failures during the solve ---------------------------------------------------------------

def test_max_num_steps_exceeded_says_where():
    with pytest.raises(MaxStepsError, match=r"max_num_steps=5 exceeded at t=\S+.*max_num_steps"):
        odeint(decay, Y0, torch.tensor([0.0, 100.0], dtype=F64), options=dict(max_num_steps=5))
    with pytest.raises(MaxStepsError, match=r"exceeded at t=0\.5"):
        odeint(decay, Y0, torch.tensor([0.0, 100.0], dtype=F64), method="euler",
               options=dict(step_size=0.1, max_num_steps=5))


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "bosh3", "dopri8"])
def test_finite_time_blowup_gives_t_dt_and_a_hint(method):
    # y' = y^2, y(0) = 1: y = 1 / (1 - t) blows up at t = 1
    with pytest.raises(SolverError) as info:
        odeint(lambda t, y: y * y, torch.ones(1, dtype=F64), torch.tensor([0.0, 2.0], dtype=F64), method=method)
    msg = str(info.value)
    assert isinstance(info.value, (StepSizeUnderflowError, NonFiniteError, MaxStepsError))
    assert "t=1" in msg and "dt=" in msg
    assert "looser tolerance" in msg and "stiff" in msg
    assert isinstance(info.value, RuntimeError)  # generic handlers still catch it


def test_non_finite_vector_field_is_reported():
    # f is NaN for t > 0.5
    def f(t, y):
        return -y * torch.sqrt(0.5 - t)

    with pytest.raises(NonFiniteError, match=r"NaN or Inf near t=0\.4.*collapsed at t=0\.5"):
        odeint(f, Y0, T)


def test_nan_from_the_start_is_reported():
    with pytest.raises(NonFiniteError, match=r"NaN or Inf at the initial point t=0"):
        odeint(lambda t, y: y * math.nan, Y0, T)


def test_steps_at_min_step_are_accepted_like_torchdiffeq():
    """A step at min_step is accepted whatever its error (torchdiffeq's rule), so a blow-up is
    stepped into and reported as non-finite, not as an underflow."""
    with record_stats() as stats:
        odeint(lambda t, y: -y, torch.ones(1, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64),
               rtol=1e-12, atol=1e-12, options=dict(min_step=0.25))
    assert stats.n_rejected == 0 and stats.n_accepted == 4
    with pytest.raises(NonFiniteError, match="NaN or Inf"):
        odeint(lambda t, y: y * y, torch.ones(1, dtype=F64), torch.tensor([0.0, 2.0], dtype=F64),
               options=dict(min_step=1e-3, max_num_steps=2000))


# --- gradient modes --------------------------------------------------------------------------

def test_odeint_adjoint_with_plain_function_needs_adjoint_params():
    with pytest.raises(ValueError, match=r"nn.Module to specify the adjoint parameters"):
        odeint_adjoint(decay, Y0, T)
    with pytest.raises(ValueError, match=r"nn.Module to specify the adjoint parameters"):
        odeint(decay, Y0, T, grad="checkpoint")


def test_odeint_adjoint_with_module_or_params_is_fine():
    class Decay(nn.Module):
        def forward(self, t, y):
            return -y

    odeint_adjoint(Decay(), Y0, T)
    odeint_adjoint(decay, Y0, T, adjoint_params=())


def test_unknown_grad_mode():
    with pytest.raises(ValueError, match=r"unknown grad mode 'backsolve'; valid modes: direct, adjoint, checkpoint"):
        odeint(decay, Y0, T, grad="backsolve")
