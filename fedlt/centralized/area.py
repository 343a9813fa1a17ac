"""AREA centrally: plain CE, then, from epoch round(area_fraction·epochs) on, CE re-weighted by the effective
area of each class's feature span (:mod:`fedlt.losses.area`; xiaohua-chen/AREA ``AREA_cifar.py``: CE until
epoch 160 of 200, then the weights recomputed with the current model before every epoch)."""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from pydantic import Field
from torch import nn

from fedlt.centralized.base import CentralizedMethod
from fedlt.losses import cross_entropy_loss, loss_objective
from fedlt.losses.area import area_class_weights, area_loss
from fedlt.options import CentralizedOptions
from fedlt.registry import CENTRALIZED
from fedlt.streams import Stream, torch_generator
from fedlt.train import Augment, Objective, TensorData, prepare_batch


def feature_pass(model: nn.Module, data: TensorData, augment: Augment | None, batch_size: int,
                 generator: torch.Generator) -> Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]]:
    """A function that yields (model.features(x), y) over one shuffled, augmented pass of ``data`` in batches of
    ``batch_size`` (the official ``train_loader``: shuffle, training transform, last batch kept), the model in
    eval mode without gradients, the images in the model's dtype. Each call draws a new pass (order,
    augmentation) from ``generator``."""

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        dtype = next(model.parameters()).dtype
        was_training = model.training
        model.eval()
        try:
            order = torch.randperm(len(data), generator=generator)
            with torch.no_grad():
                for start in range(0, len(order), batch_size):
                    x, y = prepare_batch(data, order[start:start + batch_size], augment, generator)
                    yield model.features(x.to(dtype)).float(), y
        finally:
            model.train(was_training)
    return batches


@CENTRALIZED.register("area")
class AREA(CentralizedMethod):
    """AREA (Chen et al., ICCV 2023; xiaohua-chen/AREA): CE, then CE weighted by w_c ∝ 1/A_c, A_c the effective
    area of class c's centred features summed over the batches of one training pass, Σ w = C."""

    class Options(CentralizedOptions):
        area_fraction: float = Field(0.8, ge=0, le=1, description="fraction of the epochs before re-weighting "
                                     "(official 160 of 200)")

    weights: torch.Tensor | None = None

    def area_epoch(self) -> int:
        return int(round(self.opts.area_fraction * self.epochs))

    def begin_epoch(self, model: nn.Module, data: TensorData, augment: Augment | None, epoch: int) -> None:
        if epoch < self.area_epoch():
            self.weights = None
            return
        batch_size = self.cfg.centralized.batch_size or self.cfg.train.batch_size
        generator = torch_generator(self.cfg.seed, Stream.CENTRAL, Stream.METHOD, epoch)
        batches = feature_pass(model, data, augment, batch_size, generator)
        self.weights = area_class_weights(batches, self.num_classes, self.class_counts)

    def objective(self, epoch: int) -> Objective:
        if self.weights is None:
            return loss_objective(cross_entropy_loss)
        weights = self.weights

        def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return area_loss(logits, targets, weights)
        return loss_objective(loss)
