"""FedBABU client (Oh, Kim & Yun, "FedBABU: Toward Enhanced Representation for Federated Image
Classification", ICLR 2022): the body is trained on the client's cross-entropy under the head as it was
initialised (never updated during federated training); for the personalised model the received global model is
fine-tuned for ``eval.finetune_epochs`` local epochs, the whole model (``client.finetune=full``, the official)
or the head alone (``head``).

Official code (jhoon-oh/FedBABU): ``main_fed.py`` with ``--local_upt_part body --aggr_part body`` trains
``LocalUpdate.train(net, body_lr=lr, head_lr=0.)`` (``models/Update.py``: one SGD with the head's group at lr 0);
here the head's parameters are frozen instead (no gradient: SGD skips them, so neither momentum nor weight
decay moves them, as at lr 0). The personalisation is in ``analysis.ipynb``: for each client, SGD over body and
head at lr 1e-3 (``client.finetune_lr``; the official training lr 0.1 after its two ×0.1 decays) with the
training momentum and no weight decay, ``personalization_epoch = 5`` epochs of cross-entropy at the local batch
size, then the client's test set. With ``finetune=head`` the body is frozen (its BatchNorm statistics still
follow the client's batches in train mode). FedLoGe's ``baselines/fedbabu_ltspar.py`` evaluates the local test
sets without fine-tuning (``eval.finetune_epochs=0``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

from pydantic import Field
from torch import nn

from fedlt.client_method import ClientMethod
from fedlt.config import Config
from fedlt.experiment import augment_for
from fedlt.models.experts import require_single_network
from fedlt.registry import CLIENTS
from fedlt.streams import Stream, torch_generator
from fedlt.train import Objective, TensorData, cross_entropy_objective, instance_balanced_sampler, train


def freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


@CLIENTS.register("fedbabu")
class FedBABUClient(ClientMethod):
    class Options(ClientMethod.Options):
        finetune: Literal["full", "head"] = Field(
            "full", description="personalisation: fine-tune the whole model (the official analysis.ipynb) or "
                                "the head alone")
        finetune_lr: float = Field(1e-3, gt=0, description="personalisation lr (official 1e-3; momentum "
                                                           "train.momentum, no weight decay)")

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        require_single_network(cfg, "client method fedbabu freezes the one classifier")

    def objective(self, model: nn.Module, data: TensorData, config: dict) -> Objective:
        """Cross-entropy with the head frozen at its initial weights (body-only update)."""
        freeze(model.classifier)
        return cross_entropy_objective

    def personalise(self, model: nn.Module, data: TensorData, config: dict) -> nn.Module:
        """The global model after ``eval.finetune_epochs`` epochs of local cross-entropy on the whole model or
        on the head alone (body frozen), at ``finetune_lr`` without weight decay, batches from
        ``(seed, Stream.PERSONALISE, partition id)``."""
        epochs = self.cfg.eval.finetune_epochs
        if epochs <= 0:
            return model
        for p in model.parameters():
            p.requires_grad_(True)
        if self.opts.finetune == "head":
            freeze(model.features)
        gen = torch_generator(self.cfg.seed, Stream.PERSONALISE, int(config.get("partition-id", 0)))
        opt = replace(self.optim(config), lr=self.opts.finetune_lr, weight_decay=0.0)
        train(model, data, cross_entropy_objective, opt=opt, generator=gen,
              augment=augment_for(self.cfg, data), epochs=epochs, sampler=instance_balanced_sampler)
        return model
