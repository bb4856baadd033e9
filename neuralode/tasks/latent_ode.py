"""Irregular time series with a latent ODE or an RNN baseline (paper Sec. 5, Table 2).

Loss (latent ODE): the negative ELBO, -E_q[log p(x_obs | z0)] + KL(q(z0) || N(0, I)), with a
Gaussian likelihood of std ``model.obs_std`` over the observed values only, one z0 sample per
series while training and the posterior mean in eval mode. RNN: the Gaussian negative
log-likelihood of its one-step predictions of the observed values. Both are divided by the
number of observed values in the batch (a constant scale, so "per observed value").

Metrics: ``rmse_interp`` over held-out points inside the observed window, ``rmse_extrap`` over
the held-out future, ``rmse_obs`` over the observed values (reconstruction), each
sqrt(sum(mask * (pred - value)^2) / sum(mask)) against the noisy values, plus ``nll`` and ``kl``.
Nothing outside the masks enters any of them.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from neuralode import plots
from neuralode.data.timeseries import collate_series, timeseries_datasets, with_query_times
from neuralode.models.latent_ode import build_model
from neuralode.tasks import Task, register, solver_settings


def gaussian_nll(pred: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, std: float) -> torch.Tensor:
    """-sum over masked entries of log N(x; pred, std^2). Masked-out entries contribute exactly 0."""
    z = torch.where(mask > 0, (x - pred) / std, torch.zeros_like(x))
    per = 0.5 * z ** 2 + math.log(std) + 0.5 * math.log(2 * math.pi)
    return (per * mask).sum()


def kl_normal_std_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per row: 0.5 * sum(mu^2 + var - logvar - 1)."""
    return 0.5 * (mu ** 2 + logvar.exp() - logvar - 1.0).sum(-1)


def masked_rmse(pred: torch.Tensor, x: torch.Tensor, mask: torch.Tensor) -> float:
    n = float(mask.sum())
    if n == 0:
        return float("nan")
    err = torch.where(mask > 0, pred - x, torch.zeros_like(x))
    return math.sqrt(float((err ** 2 * mask).sum()) / n)


@register("latent_ode", "rnn")
class LatentTimeSeries(Task):
    """``model.kind`` picks the network (latent_ode | rnn); the rnn preset sets it."""

    primary_metric = "rmse_extrap"
    primary_mode = "min"

    def __init__(self, cfg: Any):
        self.cfg = cfg
        m, d = cfg.model, cfg.dataset
        self.obs_dim = 2 if d.name == "spirals" else 1
        self.model = build_model(m.kind, self.obs_dim, solver_settings(cfg), latent_dim=m.latent_dim,
                                 rec_hidden=m.rec_hidden, dyn_hidden=m.dyn_hidden, dec_hidden=m.dec_hidden,
                                 encoder=m.encoder, dyn_layers=m.dyn_layers, init_logvar=m.init_logvar,
                                 time_grid=m.time_grid)
        self.test_set = None

    # -- data ------------------------------------------------------------------
    def datasets(self):
        d = self.cfg.dataset
        extra = {k: d[k] for k in ("n_interp", "n_extrap") if d.get(k) is not None}
        train, test = timeseries_datasets(d.name, d.n, d.n_obs, d.noise, d.seed, d.test_fraction,
                                          d.missing_rate, **extra)
        self.test_set = test
        return train, test

    def collate_fn(self, items):
        return collate_series(items, self.test_set.t0 if self.test_set is not None else 0.0)

    def hparams(self) -> dict[str, Any]:
        m, d = self.cfg.model, self.cfg.dataset
        return {"kind": m.kind, "encoder": m.encoder if m.kind == "latent_ode" else "-", "latent_dim": m.latent_dim,
                "obs_std": m.obs_std, "n_obs": d.n_obs, "noise": d.noise}

    # -- loss and metrics ------------------------------------------------------
    def loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        out = self.net(batch)
        pred, x = out["pred"], batch["values"]
        n_obs = batch["obs"].sum().clamp_min(1.0)
        nll = gaussian_nll(pred, x, batch["obs"], self.cfg.model.obs_std)
        kl = kl_normal_std_normal(out["mu"], out["logvar"]).sum() if "mu" in out else pred.new_zeros(())
        loss = (nll + self.cfg.model.kl_weight * kl) / n_obs
        with torch.no_grad():
            metrics = {"nll": float(nll / n_obs), "kl": float(kl / n_obs),
                       "rmse_obs": masked_rmse(pred, x, batch["obs"]),
                       "rmse_interp": masked_rmse(pred, x, batch["interp"]),
                       "rmse_extrap": masked_rmse(pred, x, batch["extrap"])}
        return loss, {k: v for k, v in metrics.items() if not math.isnan(v)}

    # -- figures ---------------------------------------------------------------
    @torch.no_grad()
    def figure(self, n: int | None = None) -> torch.Tensor | None:
        """(3, H, W) image of the first ``n`` test series (:func:`neuralode.plots.series_figure`): their
        points and the model's curve on a dense grid. None without matplotlib."""
        n = n or self.cfg.model.n_figures
        test = self.test_set
        items = [test[i] for i in range(min(n, len(test)))]
        t_end = max(float(s["times"][-1]) for s in items)
        dense = torch.linspace(test.t0, t_end, 150)
        batch = collate_series([with_query_times(s, dense) for s in items], test.t0)
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        pred = self.model({k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})["pred"].cpu()
        self.model.train(was_training)
        times, on_dense = batch["times"], torch.isin(batch["times"], dense)
        panels = []
        for b in range(len(items)):
            x = batch["values"][b]
            masks = {name: batch[k][b].sum(-1) > 0
                     for name, k in (("observed", "obs"), ("interpolation", "interp"), ("extrapolation", "extrap"))}
            panels.append({**{name: (times[m], x[m]) for name, m in masks.items()},
                           "model": (times[on_dense], pred[b][on_dense])})
        return plots.series_figure(panels)

    def log_figures(self, writer: Any, step: int) -> None:
        image = self.figure() if self.test_set is not None else None
        if image is not None:
            writer.add_image("figures/test_series", image, step)

