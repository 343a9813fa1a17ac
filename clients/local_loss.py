"""Any registered loss of the zoo (``fedlt.registry.LOSSES``, see :mod:`fedlt.losses`) as the local objective,
under any strategy, built from the client's own class counts: ``client.name=local_loss
client.loss=balanced_softmax`` is FedAvg with Balanced Softmax on each client's local prior (or any other
strategy with ``strategy.name=…``).

The loss is ``LOSSES.get(client.loss)(local_counts, **client.loss_options)``, called on ``model(x)``; its
options are validated by the loss's ``Options`` (e.g. ``client.loss=focal client.loss_options={gamma: 2}``,
``client.loss=la client.loss_options={tau: 0.5}``). ``ldam`` expects a cosine classifier of scale 1
(``model.classifier=cosine model.scale=1``). A class absent from a client counts as 1 in the re-weighting
and LDAM margins, and as π = 1e-12 in the prior of la, balanced_softmax and bal_bce.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, SerializeAsAny, ValidationInfo, field_validator
from torch import nn

from fedlt.client_method import ClientMethod
from fedlt.losses import loss_objective
from fedlt.options import Options as PartOptions
from fedlt.registry import CLIENTS, LOSSES
from fedlt.train import Objective, TensorData


@CLIENTS.register("local_loss")
class LocalLossClient(ClientMethod):
    class Options(ClientMethod.Options):
        loss: str = Field("balanced_softmax", description="a registered loss of the zoo (--list: losses)")
        loss_options: SerializeAsAny[PartOptions] = Field(
            default_factory=dict, validate_default=True, description="the loss's own options, e.g. {gamma: 2}")

        @field_validator("loss")
        @classmethod
        def _registered(cls, value: str) -> str:
            if value not in LOSSES:
                raise ValueError(f"must be a registered loss ({', '.join(LOSSES)})")
            return value

        @field_validator("loss_options", mode="before")
        @classmethod
        def _validate_loss_options(cls, value: Any, info: ValidationInfo) -> PartOptions:
            if isinstance(value, PartOptions):
                return value
            if not isinstance(value, dict):
                raise ValueError("must be a mapping of the loss's options")
            loss = info.data.get("loss")
            if loss is None:  # the loss name itself was refused; that error is the one reported
                return PartOptions()
            options = LOSSES.options(loss)
            unknown = sorted(set(value) - set(options.model_fields))
            if unknown:
                takes = ", ".join(options.model_fields) or "no options"
                raise ValueError(f"has no key {unknown[0]!r} for loss {loss!r} (it takes {takes})")
            from fedlt.config import validate_section

            return validate_section("client.loss_options", value, options, loss)

    def objective(self, model: nn.Module, data: TensorData, config: dict) -> Objective:
        loss = LOSSES.get(self.opts.loss)(data.class_counts, **self.opts.loss_options.model_dump())
        return loss_objective(loss)
