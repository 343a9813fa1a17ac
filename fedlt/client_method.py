"""The client-method contract: a local objective and what the client sends back.

A plug-in in ``clients/`` subclasses :class:`ClientMethod`, overrides :meth:`objective` (and, where it
sends more than weights, :meth:`fit` or :meth:`query`) and registers itself in one line with
``@CLIENTS.register("name")``. Its ``Options`` model declares the config keys it accepts under ``client.``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch
from torch import nn

from fedlt.config import Config
from fedlt.experiment import augment_for
from fedlt.options import ClientOptions
from fedlt.streams import Stream, torch_generator
from fedlt.train import (
    Augment,
    Objective,
    OptimConfig,
    TensorData,
    cross_entropy_objective,
    instance_balanced_sampler,
    train,
)


@dataclass
class FitResult:
    """What a client returns from a train message: its weights, metrics (``num-examples`` included, and
    ``train-images``: the images trained on, epochs × examples, for the images-per-second record) and any
    extra records (a key -> {name: array or list}) a strategy reads."""

    state: dict[str, torch.Tensor]
    metrics: dict[str, float | int | list]
    extra_arrays: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


class ClientMethod:
    """Plain local SGD on cross-entropy (the FedAvg client). Subclasses change the objective."""

    Options = ClientOptions  # a method with keys of its own subclasses this (``class Options(...)``)
    # the strategy (registry name) this method trains under, where it needs that strategy's messages (its config
    # keys, records) or sends replies only it aggregates; checked when the config is read. None: any strategy but
    # one whose method is all in its own client (FedLTStrategy.client_only: FedProx, FedLC, FedETF, FedROD)
    strategy: str | None = None
    # what :meth:`adapt_model` makes of the model's nn.Linear ``classifier`` (words, for the config-time refusal
    # of a strategy that re-trains that classifier, CReFF); None: the adapted model keeps it
    replaced_head: str | None = None

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.opts = cfg.client

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Refuse, as a one-line :class:`~fedlt.errors.FedLTError`, a config this method cannot run (a check
        across sections, e.g. on the model; :func:`fedlt.config.check_parts` calls it when the config is read)."""

    @classmethod
    def adapt_model(cls, model: nn.Module, cfg: Config, num_classes: int) -> nn.Module:
        """The model this method trains, made from the config's model (default: unchanged). Called by
        :func:`fedlt.experiment.model_for` on the server and on every client alike, under the seeded
        initialisation stream, so a method that replaces the classifier (FedETF's projected simplex ETF,
        FedLoGe's fixed sparse ETF) builds the same head everywhere."""
        return model

    def optim(self, config: dict) -> OptimConfig:
        t = self.cfg.train
        return OptimConfig(lr=float(config.get("lr", t.lr)), momentum=t.momentum,
                           weight_decay=t.weight_decay, nesterov=t.nesterov, batch_size=t.batch_size)

    def objective(self, model: nn.Module, data: TensorData, config: dict) -> Objective:
        """The local loss of one batch. ``model`` still holds the global weights when this is called."""
        return cross_entropy_objective

    def prepare(self, model: nn.Module, data: TensorData, config: dict, generator: torch.Generator,
                augment: Augment) -> None:
        """The round's work before training that reads the received model or draws from the client's stream
        ``generator`` before its first batch (AREA's feature pass, Fed-GraB's release seed); what it finds, it
        keeps for the :meth:`objective` built next. Default: none. :meth:`fit` and the fused engine alike call
        it, then :meth:`attach_local` and :meth:`objective`, for one client at a time."""

    def attach_local(self, model: nn.Module, data: TensorData, config: dict) -> None:
        """Attach to ``model`` (holding the global weights) the client's own modules that train with it this
        round, before :meth:`objective` (FedLoGe's local head l_k). Default: none. The fused engine calls it
        for each client too, so what it attaches trains stacked per client like the rest of the model."""

    def detach_local(self, model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        """Remove what :meth:`attach_local` attached from ``model`` and its entries from the trained ``state``
        (in place; either may already lack them); return them as the reply's extra arrays. Default: {}."""
        return {}

    def round_metrics(self, objective: Objective) -> dict[str, float | int | list]:
        """The reply's metrics beyond the loss and counts, read from the trained ``objective`` (Fed-GraB's
        balancer state). Default: none."""
        return {}

    def fit(self, model: nn.Module, data: TensorData, config: dict, generator: torch.Generator,
            augment: Augment) -> FitResult:
        """Train ``model`` (holding the global weights) on the client's data: :meth:`prepare`,
        :meth:`attach_local`, SGD on :meth:`objective`, :meth:`detach_local`, :meth:`round_metrics`."""
        self.prepare(model, data, config, generator, augment)
        self.attach_local(model, data, config)
        objective = self.objective(model, data, config)
        t = self.cfg.train
        result = train(model, data, objective, opt=self.optim(config), generator=generator, augment=augment,
                       epochs=None if t.local_steps else t.local_epochs, steps=t.local_steps,
                       sampler=instance_balanced_sampler)
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        extra = self.detach_local(model, state)
        return FitResult(state=state, metrics={"train_loss": result.loss, "num-examples": len(data),
                                               "steps": result.steps, "train-images": result.num_examples,
                                               **self.round_metrics(objective)},
                         extra_arrays=extra)

    def personalise(self, model: nn.Module, data: TensorData, config: dict) -> nn.Module:
        """The client's personalised model for its local evaluation (:mod:`fedlt.federation.local_eval`), built
        from the received global model (already in ``model``) and the client's training ``data``.

        Default: the global model itself, or, with ``eval.finetune_epochs`` = E > 0, the global model after E
        epochs of plain local cross-entropy SGD at the message's lr (FedAvg+FT, the fine-tuning baseline of
        FedBABU, Oh et al., ICLR 2022, and FedLoGe), batches drawn from the stream
        ``(seed, Stream.PERSONALISE, partition id)``. A method with a personal part of its own overrides this;
        per-client state the server keeps for it arrives in ``config["records"]``."""
        epochs = self.cfg.eval.finetune_epochs
        if epochs <= 0:
            return model
        gen = torch_generator(self.cfg.seed, Stream.PERSONALISE, int(config.get("partition-id", 0)))
        train(model, data, cross_entropy_objective, opt=self.optim(config), generator=gen,
              augment=augment_for(self.cfg, data), epochs=epochs, sampler=instance_balanced_sampler)
        return model

    def query(self, action: str, model: nn.Module, data: TensorData, config: dict,
              generator: torch.Generator, augment: Augment) -> FitResult:
        """Answer a strategy's query (e.g. a prior-estimation round, feature statistics)."""
        raise NotImplementedError(f"client method {type(self).__name__} does not answer query {action!r}")


Head = TypeVar("Head", bound=nn.Module)


def classifier_of(model: nn.Module, kind: type[Head], method: str) -> Head:
    """``model.classifier`` where it is a ``kind`` (the head a method's ``adapt_model`` put there), else a
    TypeError naming ``method``: its training and personalisation only work on that model."""
    head = getattr(model, "classifier", None)
    if not isinstance(head, kind):
        raise TypeError(f"the {method} client needs the model its adapt_model builds (classifier {kind.__name__})")
    return head
