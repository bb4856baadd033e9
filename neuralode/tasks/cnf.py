"""``model=cnf``: continuous normalizing flows (FFJORD) with RNODE regularisation.

The loss is the negative log-likelihood (nats per sample for 2-D data, bits/dim for
images, after uniform dequantisation and a logit transform whose log-determinant is
counted) plus ``kinetic_weight · ∫‖f‖²`` and ``jacobian_weight · ∫‖∂f/∂z‖²_F``.
2-D test metrics always use the exact trace, whatever ``model.trace`` trains with.
Figures go to TensorBoard as image tensors drawn by :mod:`neuralode.plots` (pixel grids: no
plotting library needed).

``model.objective=flow_matching`` trains the same vector field by flow matching instead (no solve
during training; :mod:`neuralode.models.flow_matching`); evaluation, figures and tags are the ML
CNF's, so a sweep over ``model.objective`` compares both. Both objectives also log the sampling
cost and quality (``samples/*``: :func:`sample_quality`) and, in 2-D, a trajectories figure.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Any, Iterator

import torch
from torch.utils.data import Dataset

from neuralode.data.toy2d import TOY_NAMES, toy_datasets
from neuralode.models.cnf import (CNF, Trace, bits_per_dim, cnf_2d, cnf_image, dequantize_logit, logit_inverse,
                                  standard_normal_logprob)
from neuralode.models.flow_matching import (EMAField, PairingCollate, energy_distance, fm_loss, load_init,
                                            pair_global, update_ema)
from neuralode.plots import colormap, histogram_image, side_by_side
from neuralode.tasks import Task, register, rnode_weights, solver_settings

log = logging.getLogger(__name__)

# 2-D view used by the figures: the toy generators live in about [-4, 4]^2.
EXTENT = 4.5


@register("cnf")
class CNFTask(Task):
    primary_metric = "nll"  # "bpd" for images
    primary_mode = "min"

    def __init__(self, cfg: Any):
        self.cfg = cfg
        m, d = cfg.model, cfg.dataset
        self.name = d.name
        self.is_toy = self.name in TOY_NAMES
        solver = solver_settings(cfg)
        self.kinetic_weight, self.jacobian_weight = rnode_weights(cfg)  # model.* or regularizer=rnode
        regularise = self.kinetic_weight > 0 or self.jacobian_weight > 0
        common = dict(hidden=list(m.hidden_dims), num_blocks=m.num_blocks, activation=m.activation,
                      trace=m.trace, noise=m.noise, time_length=m.time_length, regularise=regularise)
        if self.is_toy:
            self.model: CNF = cnf_2d(solver, dim=2, **common)
        else:
            if "channels" not in d:
                raise ValueError(f"model=cnf needs a toy 2-D or an image dataset, got dataset.name={self.name!r}")
            self.primary_metric = "bpd"
            self.model = cnf_image(solver, (d.channels, d.image_size, d.image_size), field=m.get("field", "conv"),
                                   **common)
        self._test_set: Dataset | None = None
        self._set_up_flow_matching(m)

    # -- flow matching (objective, coupling, EMA, init_from) -----------------------------------------
    def _set_up_flow_matching(self, m: Any) -> None:
        from neuralode.config import ConfigError
        from neuralode.distributed import Distributed

        self.objective = m.get("objective", "ml")
        self.coupling = m.get("coupling", "independent")
        self.sigma = float(m.get("sigma", 0.0) or 0.0)
        self.ot_max_batch = int(m.get("ot_max_batch", 2048))
        self.fm = self.objective == "flow_matching"
        ema = m.get("ema")
        self.ema = float(ema) if ema is not None else (0.999 if self.fm and not self.is_toy else 0.0)
        if self.ema > 0:
            for block in self.model.blocks:
                block.net = EMAField(block.net, self.ema)
        self.dist = Distributed.from_env()
        self.train_collate_fn = None
        if self.fm:
            exact_ot = self.coupling == "exact_ot"
            if exact_ot:
                import importlib.util

                if importlib.util.find_spec("scipy") is None:
                    raise ConfigError("model.coupling=exact_ot needs scipy (its exact assignment solver): "
                                      "pip install scipy, or pip install 'neuralode[fm]'")
            transform = None if self.is_toy else functools.partial(_logit_space, alpha=float(m.logit_alpha))
            # Under DDP the pairing covers the global batch (pair_global in loss), so the workers only draw noise.
            self.train_collate_fn = PairingCollate(exact_ot, self.ot_max_batch, transform, pair=not self.dist.enabled)
        if m.get("init_from"):
            self._init_from(str(m.init_from))

    def _init_from(self, target: str) -> None:
        from neuralode.run import CheckpointError, Run

        try:
            path, state = Run.load_checkpoint(target)
        except CheckpointError as e:
            raise CheckpointError(str(e).replace("resume=", "model.init_from=", 1).replace(
                "resume from another run directory", "give another run directory") + " (model.init_from: the "
                "run whose weights start this one, e.g. a finished experiment=cnf_fm_checkerboard run)") from None
        try:
            load_init(self.model, state["model"], str(path))
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        saved = state.get("config", {}).get("model", {}) if isinstance(state.get("config"), dict) else {}
        log.info("model.init_from=%s: weights of a %s run (objective %s) loaded", path, saved.get("name", "?"),
                 saved.get("objective", "ml"))

    def after_step(self) -> None:
        """After each optimizer step (train.py): the EMA of the weights."""
        if self.ema > 0:
            update_ema(self.model)

    def _fm_loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        x1, x0 = batch[0], batch[1]
        if self.coupling == "exact_ot" and self.dist.enabled:
            x0 = pair_global(x0, x1, self.dist, self.ot_max_batch)
        net = self.net
        loss = fm_loss(lambda t, x: net(x, t=t), x0, x1, self.sigma, float(self.cfg.model.time_length))
        return loss, {"fm_loss": loss.item()}

    # -- data ------------------------------------------------------------------
    def datasets(self) -> tuple[Dataset, Dataset]:
        d = self.cfg.dataset
        if self.is_toy:
            train, test = toy_datasets(self.name, d.n_train, d.n_test, d.seed)
        else:
            from neuralode.data import image_datasets

            # Pixels stay in [0, 1] (identity normalisation): dequantisation needs the 256-level grid.
            train, test = image_datasets(self.name, self.cfg.data_dir, [0.0] * d.channels, [1.0] * d.channels,
                                         False, d.download)
        self._test_set = test
        return train, test

    # -- loss ------------------------------------------------------------------
    def loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        if self.fm and self.model.training:  # evaluation is the ML one: exact NLL through the solver
            return self._fm_loss(batch)
        if self.fm and not self.is_toy:  # images: the same dequantisation and Hutchinson noise at every evaluation
            device = batch[0].device
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(0)
                return self._ml_loss(batch)
        return self._ml_loss(batch)

    def _ml_loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        x = batch[0]
        with self._eval_trace():
            y, logdet = (x, None) if self.is_toy else dequantize_logit(x, self.cfg.model.logit_alpha)
            z, delta, kinetic, frob = self.net(y)
            log_p = standard_normal_logprob(z) + delta
            name, per_sample = ("nll", -log_p) if self.is_toy else ("bpd", bits_per_dim(log_p, logdet, y[0].numel()))
            nll = per_sample.mean()
            metrics = {name: nll.item()}
            if not self.model.training:  # the test set's standard error (neuralode.tasks.Task.loss)
                metrics[f"{name}_sq"] = per_sample.detach().pow(2).mean().item()
        loss = nll
        if self.kinetic_weight > 0 or self.jacobian_weight > 0:
            loss = nll + self.kinetic_weight * kinetic.mean() + self.jacobian_weight * frob.mean()
            metrics.update(kinetic=kinetic.mean().item(), jacobian=frob.mean().item())
        return loss, metrics

    @contextlib.contextmanager
    def _eval_trace(self) -> Iterator[None]:
        """2-D test metrics use the exact trace (two VJPs per evaluation)."""
        saved = self.model.trace
        if self.is_toy and not self.model.training:
            self.model.set_trace(Trace.exact)
        try:
            yield
        finally:
            self.model.set_trace(saved)

    # -- figures ---------------------------------------------------------------
    def hparams(self) -> dict[str, Any]:
        m = self.cfg.model
        return {"trace": m.trace, "noise": m.noise, "kinetic_weight": self.kinetic_weight,
                "jacobian_weight": self.jacobian_weight, "hidden_dims": str(list(m.hidden_dims)),
                "field": m.get("field", "conv") if not self.is_toy else "mlp",
                "num_blocks": m.num_blocks, "time_length": m.time_length, "objective": self.objective,
                "coupling": self.coupling, "sigma": self.sigma, "ema": self.ema,
                "init_from": str(m.get("init_from") or "")}

    # -- sample quality and sampling cost (both objectives, same tags) ---------------------------------
    @torch.no_grad()
    def sample_metrics(self, n: int | None = None) -> dict[str, float]:
        """Sampling NFE of dopri5/tsit5 at rtol=atol=1e-3 and 1e-5, and the energy distance of the
        samples to held-out data after 1, 2, 4, 8 Euler steps and after each adaptive solve
        (2-D: 2,000 samples; images: 16, in pixel space). ``samples/energy_distance/data_floor`` is
        the distance between two held-out halves of the same size: the noise floor."""
        if self._test_set is None:
            return {}
        data = self._test_set.tensors[0] if self.is_toy else None
        if n is None:
            n = 2000 if self.is_toy else 16
        if self.is_toy:
            n = min(n, len(data) // 2)
            ref, floor_ref = data[:n], data[n:2 * n]
        else:
            n = min(n, len(self._test_set) // 2)
            ref = torch.stack([self._test_set[i][0] for i in range(n)])
            floor_ref = torch.stack([self._test_set[i][0] for i in range(n, 2 * n)])
        to_data = (lambda y: y) if self.is_toy else functools.partial(logit_inverse, alpha=self.cfg.model.logit_alpha)
        with self._evaluating():
            return sample_quality(self.model, ref, floor_ref, float(self.cfg.model.time_length), to_data)

    @contextlib.contextmanager
    def _evaluating(self) -> Iterator[None]:
        was_training = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was_training)

    @torch.no_grad()
    def trajectories(self, n: int = 400, points: int = 41) -> torch.Tensor:
        """A (3, R, R) image of sampling paths (2-D): base samples integrated from t=T to 0."""
        res = self.cfg.model.figure_resolution
        z = torch.randn(n, 2, generator=torch.Generator().manual_seed(2)).to(next(self.model.parameters()))
        trajs = []
        with self._evaluating():
            for blk in reversed(self.model.blocks):
                ts = torch.linspace(blk.time_length, 0.0, points, dtype=z.dtype, device=z.device)
                traj = blk.transport(z, ts)  # (points, n, 2)
                trajs.append(traj.reshape(-1, 2))
                z = traj[-1]
        lines = histogram_image(torch.cat(trajs), res, EXTENT)
        ends = histogram_image(z, res, EXTENT)
        return torch.maximum(lines * 0.6, ends)

    @torch.no_grad()
    def figures(self) -> dict[str, torch.Tensor]:
        """``{tag: (3, H, W) image in [0, 1]}``."""
        m = self.cfg.model
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        g = torch.Generator().manual_seed(0)
        try:
            if self.is_toy:
                res = m.figure_resolution
                axis = (torch.arange(res, dtype=torch.float32) + 0.5) / res * 2 * EXTENT - EXTENT
                yy, xx = torch.meshgrid(axis.flip(0), axis, indexing="ij")  # row 0 is the top (y = +extent)
                grid = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1).to(device)
                with self._eval_trace():
                    log_p = torch.cat([self.model.log_prob(c, with_regularisers=False)[0] for c in grid.split(4096)])
                density = log_p.exp().view(res, res).cpu()
                heat = colormap(density / density.max().clamp(min=1e-12))
                samples = self.model.sample(m.figure_samples, generator=g).cpu()
                n = min(m.figure_samples, len(self._test_set)) if self._test_set is not None else 0
                data = self._test_set.tensors[0][:n] if n else torch.zeros(0, 2)
                return {"figures/density_samples_data": side_by_side(heat, histogram_image(samples, res, EXTENT),
                                                                     histogram_image(data, res, EXTENT)),
                        "figures/trajectories": self.trajectories()}
            from torchvision.utils import make_grid

            y = self.model.sample(min(m.figure_samples, 64), generator=g)
            images = logit_inverse(y, m.logit_alpha).cpu()
            return {"figures/samples": make_grid(images, nrow=8, padding=2, pad_value=1.0)}
        finally:
            self.model.train(was_training)

    def log_figures(self, writer: Any, step: int) -> None:
        """``writer`` is a TensorBoard ``SummaryWriter``: the figures, and the sample metrics
        (:meth:`sample_metrics`) as scalars."""
        for tag, image in self.figures().items():
            writer.add_image(tag, image, step)
        for tag, value in self.sample_metrics().items():
            writer.add_scalar(tag, value, step)


ADAPTIVE = (("dopri5", 1e-3), ("dopri5", 1e-5), ("tsit5", 1e-3), ("tsit5", 1e-5))
EULER_STEPS = (1, 2, 4, 8)


@torch.no_grad()
def sample_quality(model: CNF, ref: torch.Tensor, floor_ref: torch.Tensor, time_length: float = 1.0,
                   to_data: Any = None, seed: int = 1) -> dict[str, float]:
    """Sample ``len(ref)`` points from ``model`` (in eval mode) with dopri5 and tsit5 at rtol=atol=1e-3
    and 1e-5 (``samples/nfe/<method>_tol=<tol>``: forward NFE of that sampling solve) and with 1, 2, 4
    and 8 Euler steps; ``samples/energy_distance/<how>``: energy distance of each sample to ``ref``
    (``to_data`` maps model space to data space first). ``samples/energy_distance/data_floor`` is the
    distance between ``ref`` and ``floor_ref`` (held-out data of the same size): the noise floor."""
    from neuralode import record_stats
    from neuralode.models import solver_overrides

    p = next(model.parameters())
    z = torch.randn((len(ref), *model.shape), generator=torch.Generator().manual_seed(seed), dtype=p.dtype).to(p.device)
    to_data = to_data or (lambda y: y)
    out = {"samples/energy_distance/data_floor": energy_distance(ref, floor_ref)}
    for method, tol in ADAPTIVE:
        with solver_overrides(model, method=method, rtol=tol, atol=tol), record_stats() as st:
            x = to_data(model.invert(z))
        out[f"samples/nfe/{method}_tol={tol:g}"] = float(st.nfe_forward)
        out[f"samples/energy_distance/{method}_tol={tol:g}"] = energy_distance(x, ref)
    for k in EULER_STEPS:
        with solver_overrides(model, method="euler", step_size=time_length / k):
            x = to_data(model.invert(z))
        out[f"samples/energy_distance/euler_{k}"] = energy_distance(x, ref)
    return out


def _logit_space(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """Images for flow matching: the ML CNF's space (uniform dequantisation, then logit)."""
    return dequantize_logit(x, alpha)[0]
