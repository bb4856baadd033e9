"""Image classification with ODE-Net, RK-Net and ResNet (paper Sec. 3, Table 1)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from neuralode.data import image_datasets
from neuralode.models import odenet, resnet
from neuralode.tasks import Task, register, solver_settings


@register("odenet", "rknet", "resnet")
class ImageClassification(Task):
    """rknet is odenet with ``solver.grad=direct``, which its config preset sets."""

    def __init__(self, cfg: Any):
        self.cfg = cfg
        m, d = cfg.model, cfg.dataset
        if m.name == "resnet":
            self.model = resnet(d.channels, d.num_classes, m.width, m.augment_dim, m.num_blocks)
        else:
            self.model = odenet(d.channels, d.num_classes, solver_settings(cfg), m.width, m.augment_dim)

    def datasets(self) -> tuple[Dataset, Dataset]:
        d = self.cfg.dataset
        return image_datasets(d.name, self.cfg.data_dir, list(d.mean), list(d.std), d.augment, d.download)

    def loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        x, y = batch
        logits = self.net(x)
        loss = F.cross_entropy(logits, y)
        acc = (logits.argmax(1) == y).float().mean().item()
        return loss, {"acc": acc}
