"""Latent ODE (paper Sec. 5; Rubanova et al. 2019) and an RNN baseline for irregular time series.

Both models take a batch on the sorted union of its series' times (see
:func:`neuralode.data.timeseries.collate_series`): ``times`` (T,), ``t0``, ``values``/``obs``
(B, T, D) and ``present`` (B, T), and return predictions at every union time, (B, T, D).

- :class:`LatentODE`: a recognition network runs backwards in time over the observed points
  and gives q(z0) = N(mu, diag(sigma^2)). Encoder ``gru``: a GRU whose input is the observed
  values, their mask and the time gap to the previous (later) update. Encoder ``odernn``: between
  observations its hidden state follows a learned ODE dh/dt = g(h), solved with
  :func:`neuralode.odeint` (Rubanova's ODE-RNN). The latent state follows dz/dt = f(z), an MLP
  solved with the project's solvers in any gradient mode, from ``t0`` over the batch's union grid;
  a decoder MLP maps z(t) to the observation mean.
- :class:`RNNBaseline`: a GRU over the observations forward in time, with the time gap as an
  input; the prediction at time t is an MLP of the hidden state and the gap since the last update.
  After a series' last observation it decodes autoregressively: each prediction at one of the
  series' own time points is fed back as an observation.
"""

from __future__ import annotations

import torch
from torch import nn

from neuralode.solvers import SolverSettings


def mlp(n_in: int, n_hidden: int, n_out: int, layers: int = 1, act: type = nn.Tanh) -> nn.Sequential:
    mods: list[nn.Module] = []
    d = n_in
    for _ in range(layers):
        mods += [nn.Linear(d, n_hidden), act()]
        d = n_hidden
    mods.append(nn.Linear(d, n_out))
    return nn.Sequential(*mods)


class ODEFunc(nn.Module):
    """Autonomous dynamics dy/dt = net(y); an nn.Module so the adjoint finds its parameters."""

    def __init__(self, dim: int, hidden: int, layers: int = 1):
        super().__init__()
        self.net = mlp(dim, hidden, dim, layers, nn.ELU)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(y)


def per_sample_ok(solver: SolverSettings, time_grid: str) -> bool:
    """Whether ``time_grid="per_sample"`` takes effect: per-sample stepping covers the adaptive
    one-step methods (explicit, kvaerno3/5, auto) in every gradient mode but reversible; other
    settings solve jointly."""
    return time_grid == "per_sample" and solver.per_sample_capable


class Encoder(nn.Module):
    """q(z0 | observations), run backwards in time over each series' own observation times."""

    def __init__(self, obs_dim: int, latent_dim: int, hidden: int, kind: str, solver: SolverSettings,
                 ode_hidden: int = 20, init_logvar: float = 0.0, time_grid: str = "union"):
        super().__init__()
        if kind not in ("gru", "odernn"):
            raise ValueError(f"unknown encoder {kind!r}; expected gru or odernn")
        self.kind, self.solver, self.time_grid = kind, solver, time_grid
        # gru: [values * mask, mask, gap]; odernn: [values * mask, mask] (time is in the ODE).
        self.cell = nn.GRUCell(2 * obs_dim + (kind == "gru"), hidden)
        self.ode = ODEFunc(hidden, ode_hidden) if kind == "odernn" else None
        self.out = nn.Linear(hidden, 2 * latent_dim)
        with torch.no_grad():  # a narrow posterior at the start keeps z0 samples informative
            self.out.bias[latent_dim:] = init_logvar

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Each series is read at its own observed times, latest first. Step k of the loop takes
        every series' k-th observation from the end, so the loop is as long as the longest
        series, not the union grid. The ODE-RNN flows each series' state over its own gap at
        once by rescaling time: h(t + s*gap) for s in [0, 1] solves dh/ds = gap * g(h)."""
        times, m = batch["times"], batch["obs"]
        x = _masked(batch["values"], m)
        B, T, D = x.shape
        t0 = torch.as_tensor(batch["t0"], dtype=times.dtype, device=times.device)
        has = m.sum(-1) > 0  # (B, T): series b observes something at union time j
        counts = has.sum(1)
        K = int(counts.max())
        # Observed union indices of each series, latest first, padded (valid marks real ones).
        key = torch.where(has, torch.arange(T, device=x.device).expand(B, T), torch.full((B, T), -1, device=x.device))
        order = key.sort(dim=1, descending=True).values[:, :K]
        valid = order >= 0
        order = order.clamp_min(0)
        t_obs = times[order]  # (B, K)
        x_obs = x.gather(1, order[..., None].expand(B, K, D))
        m_obs = m.gather(1, order[..., None].expand(B, K, D)) * valid[..., None]
        h = x.new_zeros(B, self.cell.hidden_size)
        tau = t_obs[:, 0].clone()  # time of each series' last update; first gap is 0
        for k in range(K):
            tk, upd = t_obs[:, k], valid[:, k]
            gap = torch.where(upd, tk - tau, torch.zeros_like(tk))  # <= 0: we run backwards
            if self.kind == "odernn":
                if k > 0:
                    h = self._flow(h, gap)
                inp = torch.cat([x_obs[:, k] * m_obs[:, k], m_obs[:, k]], -1)
            else:
                inp = torch.cat([x_obs[:, k] * m_obs[:, k], m_obs[:, k], -gap[:, None]], -1)
            h = torch.where(upd[:, None], self.cell(inp, h), h)
            tau = torch.where(upd, tk, tau)
        # Bring every summary to t0: the ODE flows there, the GRU sees the remaining gap once.
        if self.kind == "odernn":
            h = self._flow(h, t0 - tau)
        else:
            zero = torch.zeros_like(x[:, 0])
            h = self.cell(torch.cat([zero, zero, (tau - t0)[:, None]], -1), h)
        mu, raw = self.out(h).chunk(2, dim=-1)
        return mu, raw.clamp(-10.0, 10.0)  # log-variance

    def _flow(self, h: torch.Tensor, gap: torch.Tensor) -> torch.Tensor:
        """h evolved by dh/dt = g(h) over a per-series time ``gap`` (0 leaves a series unchanged)."""
        if not bool((gap != 0).any()):
            return h
        func = _Scaled(self.ode, gap[:, None])
        s = torch.tensor([0.0, 1.0], dtype=h.dtype, device=h.device)
        solver = self.solver  # decided per call: solver_overrides may change the method
        if per_sample_ok(solver, self.time_grid):  # each series takes its own steps over its own gap
            solver = solver.replace(per_sample=True)
        return solver.odeint(func, h, s)[-1]


class _Scaled(nn.Module):
    """dh/ds = gap * g(h): one solve on s in [0, 1] covers a different time gap per series."""

    def __init__(self, func: nn.Module, gap: torch.Tensor):
        super().__init__()
        self.func, self.gap = func, gap

    def forward(self, s: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self.gap * self.func(s, h)


class LatentODE(nn.Module):
    """``time_grid``: "union" solves the batch jointly on the sorted union of its series' times;
    "per_sample" gives every series its own steps and its own output times (per-sample stepping,
    for adaptive one-step methods; others fall back to the union grid)."""

    def __init__(self, obs_dim: int, solver: SolverSettings, latent_dim: int = 4, rec_hidden: int = 25,
                 dyn_hidden: int = 20, dec_hidden: int = 20, encoder: str = "gru", dyn_layers: int = 1,
                 init_logvar: float = 0.0, time_grid: str = "union"):
        super().__init__()
        if time_grid not in ("union", "per_sample"):
            raise ValueError(f"time_grid must be 'union' or 'per_sample', got {time_grid!r}")
        self.solver, self.time_grid = solver, time_grid
        self.encoder = Encoder(obs_dim, latent_dim, rec_hidden, encoder, solver, init_logvar=init_logvar,
                               time_grid=time_grid)
        self.dynamics = ODEFunc(latent_dim, dyn_hidden, dyn_layers)
        self.decoder = mlp(latent_dim, dec_hidden, obs_dim)

    def latent_trajectory(self, z0: torch.Tensor, times: torch.Tensor, t0: float) -> torch.Tensor:
        """z(t) for every t in ``times`` (sorted, >= t0) with z(t0) = z0; returns (B, T, latent)."""
        t0_ = torch.as_tensor(t0, dtype=times.dtype, device=times.device).reshape(1)
        prepend = bool(times[0] > t0_)
        grid = torch.cat([t0_, times]) if prepend else times
        if grid.numel() == 1:
            return z0[:, None]
        z = self.solver.odeint(self.dynamics, z0, grid).transpose(0, 1)
        return z[:, 1:] if prepend else z

    def per_sample_trajectory(self, z0: torch.Tensor, times: torch.Tensor, t0: float,
                              present: torch.Tensor) -> torch.Tensor:
        """z(t) at each series' own times only (``present``), solved per sample from t0; returns
        (B, T, latent) on the union layout, zero where a series has no time."""
        B, T = present.shape
        counts = present.sum(1)
        K = int(counts.max())
        at = torch.arange(T, device=times.device).expand(B, T)
        idx = torch.where(present, at, torch.full_like(at, T)).sort(1).values[:, :K]  # the row's positions, padded
        valid = idx < T
        own = times[idx.clamp(max=T - 1)]
        last = own.gather(1, (counts - 1).clamp_min(0)[:, None])
        own = torch.where(valid, own, last)  # pad a short row by repeating its last time
        grid = torch.cat([torch.full((B, 1), float(t0), dtype=times.dtype, device=times.device), own], 1)
        z = self.solver.replace(per_sample=True).odeint(self.dynamics, z0, grid)[1:].transpose(0, 1)  # (B, K, latent)
        out = z0.new_zeros(B, T + 1, z0.shape[-1])
        out = out.scatter(1, torch.where(valid, idx, torch.full_like(idx, T))[..., None].expand(-1, -1, z0.shape[-1]), z)
        return out[:, :T]

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """Sample z0 ~ q in training mode; use its mean in eval mode (deterministic metrics)."""
        mu, logvar = self.encoder(batch)
        z0 = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if self.training else mu
        if per_sample_ok(self.solver, self.time_grid) and "present" in batch:
            z = self.per_sample_trajectory(z0, batch["times"], batch["t0"], batch["present"])
        else:
            z = self.latent_trajectory(z0, batch["times"], batch["t0"])
        return dict(pred=self.decoder(z), mu=mu, logvar=logvar, z=z)


def _masked(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Zero every unobserved entry, whatever it holds (even NaN), so it cannot reach the model."""
    return torch.where(m > 0, x, torch.zeros_like(x))


class RNNBaseline(nn.Module):
    def __init__(self, obs_dim: int, hidden: int = 25, dec_hidden: int = 20):
        super().__init__()
        self.cell = nn.GRUCell(2 * obs_dim + 1, hidden)
        self.decoder = mlp(hidden + 1, dec_hidden, obs_dim)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """Each series is read at its own time points, earliest first (step k takes every series'
        k-th point), so the loop is as long as the longest series. Predictions at union times
        that are not a series' own are 0 (every mask is 0 there)."""
        times, m, present = batch["times"], batch["obs"], batch["present"]
        x = _masked(batch["values"], m)
        B, T, D = x.shape
        t0 = torch.as_tensor(batch["t0"], dtype=times.dtype, device=times.device)
        ar = torch.arange(T, device=x.device).expand(B, T)
        K = int(present.sum(1).max())
        idx = torch.where(present, ar, torch.full_like(ar, T)).sort(dim=1).values[:, :K]
        valid = idx < T
        gidx = idx.clamp_max(T - 1)
        t_p = times[gidx]
        x_p = x.gather(1, gidx[..., None].expand(B, K, D))
        m_p = m.gather(1, gidx[..., None].expand(B, K, D)) * valid[..., None]
        has = m_p.sum(-1) > 0
        # After a series' last observation it decodes autoregressively.
        last_obs = torch.where(has, torch.arange(K, device=x.device).expand(B, K), torch.full((B, K), -1,
                               device=x.device)).max(1).values
        h = x.new_zeros(B, self.cell.hidden_size)
        tau = t0.expand(B).clone()
        preds = []
        for k in range(K):
            tk = t_p[:, k]
            gap = (tk - tau)[:, None]
            pred = self.decoder(torch.cat([h, gap], -1))
            preds.append(pred)
            feed_self = valid[:, k] & (k > last_obs)
            upd = has[:, k] | feed_self
            if not bool(upd.any()):
                continue
            xin = torch.where(feed_self[:, None], pred, x_p[:, k] * m_p[:, k])
            min_ = torch.where(feed_self[:, None], torch.ones_like(pred), m_p[:, k])
            h = torch.where(upd[:, None], self.cell(torch.cat([xin, min_, gap], -1), h), h)
            tau = torch.where(upd, tk, tau)
        packed = torch.stack(preds, 1)  # (B, K, D)
        out = x.new_zeros(B, T + 1, D).scatter(1, idx[..., None].expand(B, K, D), packed)
        return dict(pred=out[:, :T])


def build_model(kind: str, obs_dim: int, solver: SolverSettings, **kw) -> nn.Module:
    if kind == "latent_ode":
        return LatentODE(obs_dim, solver, latent_dim=kw["latent_dim"], rec_hidden=kw["rec_hidden"],
                         dyn_hidden=kw["dyn_hidden"], dec_hidden=kw["dec_hidden"], encoder=kw["encoder"],
                         dyn_layers=kw.get("dyn_layers", 1), init_logvar=kw.get("init_logvar", 0.0),
                         time_grid=kw.get("time_grid", "union"))
    if kind == "rnn":
        return RNNBaseline(obs_dim, hidden=kw["rec_hidden"], dec_hidden=kw["dec_hidden"])
    raise ValueError(f"unknown model.kind {kind!r}; expected latent_ode or rnn")
