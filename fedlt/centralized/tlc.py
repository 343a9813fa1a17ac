"""TLC (Li et al., "Trustworthy Long-Tailed Classification", CVPR 2022; lblaoke/TLC): multi-expert evidential
learning, the experts' opinions combined by Dempster-Shafer's rule, dynamic expert engagement, and the
uncertainty of every test prediction reported beside ECE.

Follows ``model/ResnetCifar.py`` (ResNet-32 with only conv1/bn1 shared: each expert has its own layer1, layer2
(32 channels), layer3 (64 channels) and cosine head ×30), ``model/loss.py`` (``TLCLoss``, the formulas in
:mod:`fedlt.losses.tlc`), ``trainer/trainer.py`` (the test output and ``w[-1]`` as the uncertainty),
``data_loader/cifar_data_loaders.py`` (crop/flip + RandomRotation(15); test batches of 4096) and
``configs/cifar10_lt.json`` (200 epochs, batch 128, lr 0.1, wd 2e-4, Nesterov, 5 warm-up epochs, lr ×0.01 at
160 and 180, re-weighting from epoch 160). The uncertainty metrics are those of the first release's
``model/metric.py`` (:func:`fedlt.metrics.uncertainty_metrics`).

Test output: the official Σ_i z_i·softmax_batch(w_i/η) times B/M (a positive factor per batch: the argmax is
the official one; without it the logits are ~1/B of an expert's and softmax, loss and ECE would see a nearly
uniform distribution). ``experts_engaged`` is the mean number of experts i whose engagement rule of training
(w_i/max_batch w_i > τ) holds on a test sample; the official test always runs every expert.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
from pydantic import Field
from torch import nn

from fedlt.centralized.experts import ExpertMethod
from fedlt.data.augment import normalize, random_rotation
from fedlt.losses import class_weights, engaged, ldam_margins, tlc_combine
from fedlt.losses.tlc import TLCLossOptions, tlc_expert_loss
from fedlt.metrics import evaluate_logits, reliability_bins, uncertainty_metrics
from fedlt.models.experts import CIFAR_RESNET_EXPERTS
from fedlt.objectives import LossObjective
from fedlt.registry import CENTRALIZED
from fedlt.train import Augment, Objective, TensorData


class Rotated:
    """Crop/flip, then RandomRotation(``degrees``) with black (pixel 0) fill, as the official CIFAR loaders."""

    def __init__(self, weak: Augment, mean: torch.Tensor, std: torch.Tensor, degrees: float) -> None:
        self.weak, self.degrees, self.black = weak, degrees, -mean / std

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = self.weak(x, generator)
        return random_rotation(x, self.degrees, generator, self.black.to(x.device)) if self.degrees > 0 else x


@CENTRALIZED.register("tlc")
class TLC(ExpertMethod):
    """TLC: M experts trained with :func:`~fedlt.losses.tlc.tlc_loss`, combined by :func:`~fedlt.losses.tlc.
    tlc_combine`; re-weighting (class-balanced ω, diversity temperatures) from epoch R = round(drw_fraction·epochs)
    (official 160 of 200), KL annealing e/T with T = (R + annealing)/reweight_factor."""

    class Options(ExpertMethod.Options, TLCLossOptions):
        reduce_dimension: bool = Field(False, description="resnet32_experts: experts of 24/48 channels (else 32/64)")
        num_experts: int = Field(3, gt=0, description="number of experts M")
        max_margin: float = Field(0.5, gt=0, description="largest LDAM margin Δ (rarest class)")
        drw_fraction: float = Field(0.8, ge=0, le=1, description="fraction of the epochs before re-weighting (160/200)")
        rotation: float = Field(15.0, ge=0, le=180, description="RandomRotation degrees of the training view")
        test_batch: int = Field(4096, gt=0, description="test batch of the combination (softmax over the batch)")

    def __init__(self, cfg, train_counts: np.ndarray) -> None:
        super().__init__(cfg, train_counts)
        o = self.opts
        self.margins = ldam_margins(self.class_counts, o.max_margin)
        self.class_weight = class_weights(self.class_counts, o.beta)
        pi = self.class_counts.double() / self.class_counts.sum()
        t = self.num_classes * pi * o.reweight_factor + 1 - o.reweight_factor
        self.temperature = (t / t.max()).float()
        self.kl_period = (self.reweight_epoch() + o.annealing) / o.reweight_factor

    def num_experts(self) -> int:
        return self.opts.num_experts

    def reweight_epoch(self) -> int:
        """R: the official ``reweight_epoch`` (re-weighting at the official epochs e > R, fedlt's epoch ≥ R)."""
        return int(round(self.opts.drw_fraction * self.epochs))

    def model_options(self) -> dict:
        extra = {}
        if self.expert_model(self.cfg) in CIFAR_RESNET_EXPERTS:
            extra = {"widths": (16, 24, 48) if self.opts.reduce_dimension else (16, 32, 64), "shared_layer1": False}
        return dict(classifier="cosine", scale=self.opts.expert_scale, num_experts=self.num_experts(), **extra)

    def augment(self, data: TensorData) -> Augment:
        return Rotated(super().augment(data), data.mean, data.std, self.opts.rotation)

    def objective(self, epoch: int) -> Objective:
        late = epoch >= self.reweight_epoch()
        weight, temperature = (self.class_weight, self.temperature) if late else (None, None)
        o = self.opts

        return LossObjective(partial(tlc_expert_loss, margins=self.margins, epoch=epoch + 1, kl_period=self.kl_period,
                                     class_weight=weight, temperature=temperature, tau=o.tau,
                                     margin_scale=o.expert_scale, diversity=o.diversity, eta=o.eta),
                             output="expert_logits")

    @torch.no_grad()
    def predict(self, model: nn.Module, test: TensorData) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Test logits (the official output × B/M), uncertainty w_M and number of engaged experts per sample,
        in batches of ``test_batch``."""
        model.eval()
        logits, uncertainty, experts = [], [], []
        for start in range(0, len(test), self.opts.test_batch):
            x = normalize(test.images[start:start + self.opts.test_batch], test.mean, test.std)
            z = model.expert_logits(x).float()
            output, w = tlc_combine(z, self.opts.eta)
            logits.append((output * len(x) / len(z)).cpu())
            uncertainty.append(w[-1].cpu())
            experts.append(engaged(w, self.opts.tau).sum(0).float().cpu())
        return torch.cat(logits), torch.cat(uncertainty), torch.cat(experts)

    def evaluate(self, model: nn.Module, test: TensorData, train_counts: np.ndarray, batch_size: int,
                 with_bins: bool) -> dict:
        """The metrics of :func:`~fedlt.metrics.evaluate_logits`, TLC's uncertainty metrics and
        ``experts_engaged`` (``batch_size`` is not used: the combination runs on batches of ``test_batch``)."""
        logits, u, experts = self.predict(model, test)
        labels = test.labels.cpu()
        out = evaluate_logits(logits, labels, train_counts)
        if with_bins:
            out["reliability"] = reliability_bins(torch.softmax(logits, 1).numpy(), labels.numpy())
        out.update(uncertainty_metrics(u.numpy(), (logits.argmax(1) == labels).numpy()))
        out["experts_engaged"] = float(experts.mean())
        return out
