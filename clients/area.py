"""AREA as a federated client objective: before local training, the client computes the AREA class weights
(:mod:`fedlt.losses.area`, xiaohua-chen/AREA ``calculate_eff_weight``) from the received global model on its own
data (two passes: class means, then effective areas), and trains the weighted CE ``F.cross_entropy(weight=w)``.

``client.area_from_round`` (default 1): plain CE before that round (the official CE warm-up stage, counted in
rounds). A class absent from the client gets weight 0, as a class absent from the official loader does.
"""

from __future__ import annotations

from functools import partial

import torch
from pydantic import Field
from torch import nn

from fedlt.centralized.area import feature_pass
from fedlt.client_method import ClientMethod
from fedlt.losses import cross_entropy_loss, loss_objective
from fedlt.losses.area import area_class_weights, area_loss
from fedlt.registry import CLIENTS
from fedlt.train import Augment, Objective, TensorData


@CLIENTS.register("area")
class AREAClient(ClientMethod):
    class Options(ClientMethod.Options):
        area_from_round: int = Field(1, ge=1, description="first round that re-weights (CE before it)")

        def unused(self, cfg, section: str) -> list[str]:
            out = super().unused(cfg, section)
            if self.area_from_round > cfg.federation.rounds:
                out.append(f"{section}.area_from_round={self.area_from_round} > federation.rounds="
                           f"{cfg.federation.rounds}: AREA never re-weights (plain CE in every round)")
            return out

    weights: torch.Tensor | None = None

    def prepare(self, model: nn.Module, data: TensorData, config: dict, generator: torch.Generator,
                augment: Augment) -> None:
        """From ``client.area_from_round`` on: the class weights of one feature pass of the received model over
        the client's data (order and augmentation drawn from ``generator``, before the training's batches)."""
        self.weights = None
        if int(config.get("server-round", 0)) >= self.opts.area_from_round:
            batches = feature_pass(model.to(data.images.device), data, augment, self.cfg.train.batch_size, generator)
            self.weights = area_class_weights(batches, data.num_classes, data.class_counts)

    def objective(self, model: nn.Module, data: TensorData, config: dict) -> Objective:
        """CE, or :func:`~fedlt.losses.area.area_loss` with the weights :meth:`prepare` found (a partial: the
        fused engine computes a round's clients' losses in one call)."""
        if self.weights is None:
            return loss_objective(cross_entropy_loss)
        return loss_objective(partial(area_loss, weights=self.weights))
