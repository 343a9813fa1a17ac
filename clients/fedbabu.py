"""FedBABU client (Oh, Kim & Yun, "FedBABU: Toward Enhanced Representation for Federated Image
Classification", ICLR 2022): the body is trained on the client's cross-entropy under the head as it was
initialised (never updated during federated training); for the personalised model the received global model's
head (``client.finetune=head``, the paper's personalisation) or the whole model (``full``) is fine-tuned for
``eval.finetune_epochs`` local epochs.

Official code (jhoon-oh/FedBABU): ``main_fed.py`` with ``--local_upt_part body --aggr_part body`` trains
``LocalUpdate.train(net, body_lr=lr, head_lr=0.)`` (``models/Update.py``: one SGD with the head's group at lr 0);
here the head's parameters are frozen instead (no gradient: SGD skips them, so neither momentum nor weight
decay moves them, as at lr 0). Fine-tuning (``--fine_tuning``, ``--ft_ep`` default 5) trains the same loss; for
the head alone the body's lr is 0 (its BatchNorm statistics still follow the client's batches in train mode,
as in the official loop). FedLoGe's ``baselines/fedbabu_ltspar.py`` evaluates the local test sets without
fine-tuning; the paper's fine-tuned personalisation is what is built here.
"""

from __future__ import annotations

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
        finetune: Literal["head", "full"] = Field(
            "head", description="personalisation: fine-tune the head alone (FedBABU) or the whole model")

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        require_single_network(cfg, "client method fedbabu freezes the one classifier")

    def objective(self, model: nn.Module, data: TensorData, config: dict) -> Objective:
        """Cross-entropy with the head frozen at its initial weights (body-only update)."""
        freeze(model.classifier)
        return cross_entropy_objective

    def personalise(self, model: nn.Module, data: TensorData, config: dict) -> nn.Module:
        """The global model after ``eval.finetune_epochs`` epochs of local cross-entropy on the head alone
        (body frozen) or on the whole model, batches from ``(seed, Stream.PERSONALISE, partition id)``."""
        epochs = self.cfg.eval.finetune_epochs
        if epochs <= 0:
            return model
        for p in model.parameters():
            p.requires_grad_(True)
        if self.opts.finetune == "head":
            freeze(model.features)
        gen = torch_generator(self.cfg.seed, Stream.PERSONALISE, int(config.get("partition-id", 0)))
        train(model, data, cross_entropy_objective, opt=self.optim(config), generator=gen,
              augment=augment_for(self.cfg, data), epochs=epochs, sampler=instance_balanced_sampler)
        return model
