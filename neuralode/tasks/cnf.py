"""``model=cnf``: continuous normalizing flows (FFJORD) with RNODE regularisation.

The loss is the negative log-likelihood (nats per sample for 2-D data, bits/dim for
images, after uniform dequantisation and a logit transform whose log-determinant is
counted) plus ``kinetic_weight · ∫‖f‖²`` and ``jacobian_weight · ∫‖∂f/∂z‖²_F``.
2-D test metrics always use the exact trace, whatever ``model.trace`` trains with.
Figures go to TensorBoard as tensors rendered here (no plotting library).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch.utils.data import Dataset

from neuralode.data.toy2d import TOY_NAMES, toy_datasets
from neuralode.models.cnf import (CNF, Trace, bits_per_dim, cnf_2d, cnf_image, dequantize_logit, logit_inverse,
                                  standard_normal_logprob)
from neuralode.tasks import Task, register, solver_settings

# 2-D view used by the figures: the toy generators live in about [-4, 4]^2.
EXTENT = 4.5

# A perceptually ordered colormap (dark violet -> blue -> teal -> green -> yellow), linear between anchors.
_ANCHORS = torch.tensor([[0.267, 0.005, 0.329], [0.283, 0.141, 0.458], [0.254, 0.265, 0.530],
                         [0.207, 0.372, 0.553], [0.164, 0.471, 0.558], [0.128, 0.567, 0.551],
                         [0.135, 0.659, 0.518], [0.267, 0.749, 0.441], [0.478, 0.821, 0.318],
                         [0.741, 0.873, 0.150], [0.993, 0.906, 0.144]])


def colormap(values: torch.Tensor) -> torch.Tensor:
    """Map an (H, W) tensor with values in [0, 1] to a (3, H, W) RGB image."""
    v = values.clamp(0, 1) * (len(_ANCHORS) - 1)
    lo = v.floor().long().clamp(max=len(_ANCHORS) - 2)
    w = (v - lo).unsqueeze(-1)
    rgb = _ANCHORS[lo] * (1 - w) + _ANCHORS[lo + 1] * w
    return rgb.permute(2, 0, 1).contiguous()


def histogram_image(points: torch.Tensor, resolution: int, extent: float = EXTENT) -> torch.Tensor:
    """A (3, R, R) image of the points' 2-D histogram over [-extent, extent]^2 (y axis up)."""
    p = points.detach().cpu().double()
    idx = ((p + extent) / (2 * extent) * resolution).floor().long()
    keep = ((idx >= 0) & (idx < resolution)).all(1)
    idx = idx[keep]
    counts = torch.zeros(resolution * resolution, dtype=torch.float64)
    counts.index_add_(0, (resolution - 1 - idx[:, 1]) * resolution + idx[:, 0], torch.ones(len(idx), dtype=torch.float64))
    counts = counts.view(resolution, resolution)
    return colormap((counts / counts.max().clamp(min=1)).float())


def side_by_side(*panels: torch.Tensor, gap: int = 2) -> torch.Tensor:
    sep = torch.ones(3, panels[0].shape[1], gap)
    out = [panels[0]]
    for p in panels[1:]:
        out += [sep, p]
    return torch.cat(out, 2)


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
        self.kinetic_weight, self.jacobian_weight = float(m.kinetic_weight), float(m.jacobian_weight)
        regularise = self.kinetic_weight > 0 or self.jacobian_weight > 0
        common = dict(hidden=list(m.hidden_dims), num_blocks=m.num_blocks, activation=m.activation,
                      trace=m.trace, noise=m.noise, time_length=m.time_length, regularise=regularise)
        if self.is_toy:
            self.model: CNF = cnf_2d(solver, dim=2, **common)
        else:
            if "channels" not in d:
                raise ValueError(f"model=cnf needs a toy 2-D or an image dataset, got dataset.name={self.name!r}")
            self.primary_metric = "bpd"
            self.model = cnf_image(solver, (d.channels, d.image_size, d.image_size), **common)
        self._test_set: Dataset | None = None

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
        x = batch[0]
        with self._eval_trace():
            y, logdet = (x, None) if self.is_toy else dequantize_logit(x, self.cfg.model.logit_alpha)
            z, delta, kinetic, frob = self.net(y)
            log_p = standard_normal_logprob(z) + delta
            if self.is_toy:
                nll = -log_p.mean()
                metrics = {"nll": nll.item()}
            else:
                nll = bits_per_dim(log_p, logdet, y[0].numel()).mean()
                metrics = {"bpd": nll.item()}
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
                "num_blocks": m.num_blocks, "time_length": m.time_length}

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
                return {"figures/density_samples_data": side_by_side(heat, histogram_image(samples, res),
                                                                     histogram_image(data, res))}
            from torchvision.utils import make_grid

            y = self.model.sample(min(m.figure_samples, 64), generator=g)
            images = logit_inverse(y, m.logit_alpha).cpu()
            return {"figures/samples": make_grid(images, nrow=8, padding=2, pad_value=1.0)}
        finally:
            self.model.train(was_training)

    def log_figures(self, writer: Any, step: int) -> None:
        """``writer`` is a TensorBoard ``SummaryWriter``."""
        for tag, image in self.figures().items():
            writer.add_image(tag, image, step)
