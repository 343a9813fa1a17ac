"""FedETF client (Li et al., "No Fear of Classifier Biases: Neural Collapse Inspired Federated Learning with
Synthetic and Fixed Classifier", ICCV 2023; official code ZexiLee/ICCV-2023-FedETF).

The model's classifier is replaced (:meth:`FedETFClient.adapt_model`) by :class:`ETFProjectionHead`:
z = T · M^T · u/‖u‖, u = P h + b (a learnable projection of the backbone's feature h), T a learnable
temperature (``scaling_train``), M (p × C) a fixed simplex equiangular tight frame,
M = √(C/(C−1)) · Q (I − 11^T / C), Q the orthonormal factor of the QR decomposition of a U[0, 1) matrix
(``models_dict/proto_classifiers.py``, ``Proto_Classifier``). Local training minimises Balanced Softmax on
the client's own counts: CE(z + log n_k, y), n_{k,c} floored at 1 (``client_funct.py``,
``balanced_softmax_loss`` and ``client_fedetf``; ``nodes.py``, ``generate_sample_per_class``). The server is
FedAvg over backbone, projection and temperature (strategies/fedetf.py); M never leaves a process: every
process builds the same M from the seeded initialisation stream.

Personalised model (``Client_personalization``): ``finetune_epochs`` (default train.local_epochs) epochs of the local training above
from the global model, then ``personal_rounds`` times alternately ``personal_epochs`` epochs of plain CE
on M alone (SGD lr ``proto_lr``, no momentum) and ``personal_epochs`` epochs on the projection alone (SGD
lr ``projection_lr`` with train.momentum and train.weight_decay); temperature and backbone stay fixed.

The global test logits keep T (the official ``validate`` drops it; the argmax is the same for T > 0, and
fedlt's calibration metrics need the trained scale). Not copied: the official client builds its optimizer once
(``nodes.py``, ``utils.py``) and keeps its momentum buffer from the last round it trained (rounds earlier, on
another global model) into the next round and the personalisation; a fedlt client keeps no state between
rounds, and each round's SGD starts without momentum. Official widths: p = C for the ResNets, p = d for
its CIFAR CNN (``client.projection_dim``); T starts at 1 (ResNets, LeNet) or 10 (CIFAR CNN).
"""

from __future__ import annotations

import copy
import math
from functools import partial

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from fedlt.client_method import ClientMethod, classifier_of
from fedlt.config import Config
from fedlt.errors import FedLTError
from fedlt.losses import balanced_softmax_loss
from fedlt.models.experts import require_single_network, require_unset_head
from fedlt.objectives import LossObjective
from fedlt.registry import CLIENTS
from fedlt.streams import Stream, torch_generator
from fedlt.train import Objective, OptimConfig, TensorData, train


def simplex_etf(random: torch.Tensor) -> torch.Tensor:
    """M = √(C/(C−1)) · Q (I − 11^T/C) (p × C), Q the orthonormal (p × C) QR factor of ``random`` (p × C,
    p ≥ C): unit columns with pairwise cosine −1/(C−1)."""
    p, c = random.shape
    if p < c:
        raise FedLTError(f"a simplex ETF of {c} classes needs at least {c} dimensions, got {p}")
    q, _ = torch.linalg.qr(random.double())
    centre = torch.eye(c, dtype=torch.float64) - torch.full((c, c), 1.0 / c, dtype=torch.float64)
    return (math.sqrt(c / (c - 1)) * q @ centre).float()


def floored_log_counts(counts: torch.Tensor) -> torch.Tensor:
    """log max(n_c, 1) of the client's class counts n (absent classes count as 1), float32: the shift of its
    Balanced Softmax CE(z + log max(n_c, 1), y) (:func:`fedlt.losses.balanced_softmax_loss`)."""
    return torch.clamp(torch.as_tensor(counts), min=1).float().log()


class ETFProjectionHead(nn.Module):
    """z = T · (u/‖u‖) M, u = projection(h): learnable projection and temperature, fixed ETF M (buffer, not
    sent: every process builds it from the seed; personalisation may turn it into a parameter)."""

    def __init__(self, feature_dim: int, num_classes: int, projection_dim: int, temperature: float) -> None:
        super().__init__()
        self.projection = nn.Linear(feature_dim, projection_dim)
        self.temperature = nn.Parameter(torch.tensor(float(temperature)))
        self.register_buffer("proto", simplex_etf(torch.rand(projection_dim, num_classes, dtype=torch.float64)),
                             persistent=False)

    def normalised(self, h: torch.Tensor) -> torch.Tensor:
        u = self.projection(h)
        return u / torch.norm(u, p=2, dim=1, keepdim=True).clamp(min=1e-12)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.temperature * (self.normalised(h) @ self.proto)


def _head(model: nn.Module) -> ETFProjectionHead:
    return classifier_of(model, ETFProjectionHead, "fedetf")


@CLIENTS.register("fedetf")
class FedETFClient(ClientMethod):
    replaced_head = "its fixed ETF projection head"

    class Options(ClientMethod.Options):
        projection_dim: int | None = Field(None, gt=0, description="projection width p (None: the number of "
                                           "classes, the official ResNets'); at least the number of classes")
        temperature: float = Field(1.0, gt=0, description="initial temperature T (official ResNets: 1)")
        finetune_epochs: float | None = Field(None, ge=0, description="personalisation: epochs of local "
                                              "training first (None: train.local_epochs)")
        personal_rounds: int = Field(20, ge=0, description="personalisation: alternations ETF / projection")
        personal_epochs: float = Field(3.0, gt=0, description="personalisation: epochs per alternation step")
        proto_lr: float = Field(0.1, gt=0, description="personalisation: lr on the ETF (plain SGD)")
        projection_lr: float = Field(0.05, gt=0, description="personalisation: lr on the projection")

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        require_single_network(cfg, "client method fedetf replaces the classifier by its ETF projection")
        require_unset_head(cfg, "client method fedetf replaces the head by its fixed ETF classifier")

    @classmethod
    def adapt_model(cls, model: nn.Module, cfg: Config, num_classes: int) -> nn.Module:
        if not hasattr(model, "feature_dim"):
            raise FedLTError(f"client method fedetf needs a model with one classifier head, not {cfg.model.name}")
        p = cfg.client.projection_dim or num_classes
        if p < num_classes:
            raise FedLTError(f"config key 'client.projection_dim' must be at least the number of classes "
                             f"({num_classes}), got {p}")
        model.classifier = ETFProjectionHead(model.feature_dim, num_classes, p, cfg.client.temperature)
        return model

    def objective(self, model: nn.Module, data: TensorData, config: dict) -> Objective:
        _head(model)
        log_n = floored_log_counts(data.class_counts.to(data.images.device))  # once, not every step
        return LossObjective(partial(balanced_softmax_loss, log_pi=log_n))

    def personalise(self, model: nn.Module, data: TensorData, config: dict) -> nn.Module:
        """The official ``Client_personalization`` on a copy of ``model`` (the global model)."""
        from fedlt.experiment import augment_for

        model = copy.deepcopy(model)
        head = _head(model)
        t, o = self.cfg.train, self.opts
        gen = torch_generator(self.cfg.seed, Stream.CLIENT, int(config.get("server-round", 0)),
                              int(config.get("partition-id", 0)), 1)
        augment = augment_for(self.cfg, data)
        finetune = t.local_epochs if o.finetune_epochs is None else o.finetune_epochs
        if finetune > 0:
            train(model, data, self.objective(model, data, config), opt=self.optim(config),
                  epochs=finetune, generator=gen, augment=augment)
        head.proto = nn.Parameter(head.proto.detach().clone())
        proto_opt = OptimConfig(lr=o.proto_lr, momentum=0.0, weight_decay=0.0, batch_size=t.batch_size)
        proj_opt = OptimConfig(lr=o.projection_lr, momentum=t.momentum, weight_decay=t.weight_decay,
                               batch_size=t.batch_size)
        ce = lambda m, x, y: F.cross_entropy(m(x).float(), y)  # noqa: E731
        for _ in range(o.personal_rounds):
            for part, opt in ((lambda n: n == "classifier.proto", proto_opt),
                              (lambda n: n.startswith("classifier.projection."), proj_opt)):
                for name, p in model.named_parameters():
                    p.requires_grad_(part(name))
                train(model, data, ce, opt=opt, epochs=o.personal_epochs, generator=gen, augment=augment)
        for p in model.parameters():
            p.requires_grad_(True)
        return model.eval()
