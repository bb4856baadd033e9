"""Checkpointed gradients: the exact gradient of the computed solution in bounded memory.

The forward solve runs without a graph and keeps the state at the start of every k-th accepted
step (``Checkpoint(every=k)``, default 1). Backward, each segment is re-run from its checkpoint
with exactly the recorded steps (and a fresh stepper) and differentiated, last segment first.
Memory is O(n_steps / k + k) states; the result equals direct backprop, and unlike the backsolve
adjoint it stays correct for chaotic or strongly contracting dynamics (Lorenz, stiff decay).
"""
from __future__ import annotations

import torch

from .integrate import Trace, replay


class CheckpointedSolve(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, y0: torch.Tensor, *params):
        trace = Trace(run.setup.settings.grad.every if not run.setup.method.multistep else 1 << 62)
        with torch.no_grad():
            ys = torch.stack(run.forward(y0, trace=trace).outputs)
        ctx.trace, ctx.run = trace, run
        ctx.starts, ctx.n_params = sorted(trace.states), len(params)
        # the checkpoints go through autograd too, so memory watches (record_stats(memory=True)) see them
        ctx.save_for_backward(*params, *(trace.states.pop(s) for s in ctx.starts))
        errors = run.setup.prob.errors
        if errors is None:
            return ys
        # the error regulariser's sum of the accepted steps' [error, stiffness] terms, a second output
        # whose gradient the backward replay adds (the terms are rebuilt with their graph there)
        return ys, torch.stack(errors).sum(0) if errors else ys.new_zeros(2)

    @staticmethod
    def backward(ctx, grad_ys: torch.Tensor, *grad_rest):
        saved = ctx.saved_tensors
        params = saved[:ctx.n_params]
        trace, run = ctx.trace, ctx.run
        trace.states = dict(zip(ctx.starts, saved[ctx.n_params:]))
        ts = run.out_ts
        prob = run.setup.replay_problem()
        steps = trace.steps
        if not steps:  # an event at t0: the outputs are y0 itself
            return (None, grad_ys.sum(0), *[torch.zeros_like(p) for p in params])
        # which step emits each output t_i (i >= 1): the first whose end reaches it
        owner, j = [], 0
        for t_out in ts[1:]:
            while (steps[j][1] - t_out) * (steps[j][1] - steps[j][0]) < 0:
                j += 1
            owner.append(j)
        grad_err = grad_rest[0] if grad_rest else None
        a = torch.zeros_like(grad_ys[0])
        g = [torch.zeros_like(p) for p in params]
        end = len(steps)
        for s in sorted(trace.states, reverse=True):
            idx = [i + 1 for i, o in enumerate(owner) if s <= o < end]
            with torch.enable_grad():
                y = trace.states[s].detach().requires_grad_(True)
                errs = [] if grad_err is not None else None
                outs = replay(prob, y, steps[s:end], [ts[i] for i in idx], errors=errs)
                weights = [grad_ys[i] for i in idx] + [a]
                if errs:
                    outs, weights = outs + [torch.stack(errs).sum(0)], weights + [grad_err]
            grads = torch.autograd.grad(outs, (y, *params), weights, allow_unused=True)
            a = grads[0]
            g = [acc if d is None else acc + d for acc, d in zip(g, grads[1:])]
            end = s
        return (None, a + grad_ys[0], *g)
